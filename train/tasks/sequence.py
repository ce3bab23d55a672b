"""Classification with an encoder and a classification head (BERT): loss = CE of model(...).logits (B, C).

The head is new, so there is no verbalizer and no prompt: the text is tokenized with [CLS] ... [SEP] and
cut to `max_length` (its head kept) when longer.
"""
from __future__ import annotations

import torch
from torch import nn

from .common import Batched, to_device


class SequenceClassificationTask(Batched):
    """An encoder with a classification head (BERT): logits = model(...).logits (B, C)."""

    def __init__(self, tokenizer, num_labels: int, *, max_length: int = 256):
        self.tokenizer, self.num_classes, self.max_length = tokenizer, num_labels, max_length
        self.n_truncated = 0

    def encode(self, text: str) -> list[int]:
        ids = self.tokenizer(text.strip())["input_ids"]  # with [CLS] ... [SEP]
        if len(ids) > self.max_length:
            self._warn_truncated(len(ids), self.max_length)
            ids = self.tokenizer(text.strip(), truncation=True, max_length=self.max_length)["input_ids"]
        return ids

    def label_logits(self, model: nn.Module, batch: dict) -> torch.Tensor:
        batch = to_device(batch, model)
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
