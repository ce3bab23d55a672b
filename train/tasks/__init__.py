"""Tasks: what a batch is and what the loss is, for classification with a causal LM, an encoder, and SQuAD.

    classification.py   ClassificationTask: a causal LM + verbalizer, the label words' logits at the answer position
    sequence.py         SequenceClassificationTask: an encoder with a classification head (BERT)
    generation.py       GenerationTask: SQuAD v2 as generation, packed contexts, scored abstaining
    common.py           the backbone without its head, prompt token helpers, padded batches
"""
from .classification import KEEP, ClassificationTask, cut
from .generation import IGNORE, GenerationTask, block_mask
from .sequence import SequenceClassificationTask

__all__ = ["ClassificationTask", "GenerationTask", "SequenceClassificationTask", "IGNORE", "KEEP", "block_mask",
           "cut"]
