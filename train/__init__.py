"""train: a minimal QLoRA training loop and the data, prompt, metric and model plumbing around it."""
from . import distributed
from .attention import use_fast_attention
from .checkpointing import disable_gradient_checkpointing, enable_gradient_checkpointing
from .data import DATASETS, LABELS, label_names, load_split, squad_split_sizes
from .loop import FitResult, TrainConfig, fit, lr_multiplier
from .memory import lean_cpu_allocator
from .metrics import classification_metrics, normalize_answer, squad_metrics
from .models import DEFAULT_MODEL, REGISTRY, load_model, load_tokenizer, use_cheap_dropout
from .report import write_report
from .tasks import ClassificationTask, GenerationTask, SequenceClassificationTask

__all__ = [
    "distributed", "use_fast_attention", "enable_gradient_checkpointing", "disable_gradient_checkpointing",
    "DATASETS", "LABELS", "label_names", "load_split", "squad_split_sizes",
    "FitResult", "TrainConfig", "fit", "lr_multiplier", "lean_cpu_allocator",
    "classification_metrics", "normalize_answer", "squad_metrics",
    "DEFAULT_MODEL", "REGISTRY", "load_model", "load_tokenizer", "use_cheap_dropout", "write_report",
    "ClassificationTask", "GenerationTask", "SequenceClassificationTask",
]
