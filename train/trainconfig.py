"""What `fit` takes and gives back: TrainConfig, checked field by field up front, and FitResult.

Every value is checked by type (bool is not an int, 2.5 is not an int, floats must be finite) and by range when
the config is built, so a typo fails at once with the fix in the message, not steps into a run. RUN_SETTINGS are
the fields a checkpoint records: a resume with other values is refused (train/resume.py).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from .config import check_fields

# The TrainConfig fields that decide the batches and the updates: a resume must share them (train/resume.py).
RUN_SETTINGS = ("epochs", "max_steps", "batch_size", "grad_accum", "lr", "weight_decay", "warmup_ratio",
                "warmup_steps", "min_lr_ratio", "max_grad_norm", "seed", "precision", "loraplus_lr_ratio")


@dataclass
class TrainConfig:
    out_dir: str | os.PathLike              # checkpoints, train_log.jsonl/.csv and train_curves.png go here
    epochs: float = 1.0                     # passes over train_data (fractions allowed)
    max_steps: int | None = None            # cap on optimizer steps (None: epochs decide)
    batch_size: int = 8                     # micro-batch per process
    grad_accum: int = 1                     # micro-batches per optimizer step
    lr: float = 2e-4                        # peak learning rate (AdamW)
    loraplus_lr_ratio: float | None = None  # LoRA+: every lora_B (and 1-D trainable) learns at ratio x lr; None: off
    weight_decay: float = 0.0               # AdamW's decoupled weight decay
    warmup_ratio: float = 0.0               # linear warmup as a fraction of all steps ...
    warmup_steps: int | None = None         # ... or as a number of steps (then warmup_ratio must stay 0)
    min_lr_ratio: float = 0.0               # the cosine ends at min_lr_ratio * lr
    max_grad_norm: float | None = 1.0       # clip the global gradient norm (None: measure, do not clip)
    seed: int = 0                           # torch, numpy, python and the batch order
    grad_checkpointing: bool = False        # recompute the decoder blocks in backward (less memory, ~30% slower)
    precision: str = "auto"                 # "auto": bf16 autocast on CUDA, none on CPU | "bf16" | "fp32"
    eval_every: int | None = None           # steps between eval_fn calls (None: only at the end)
    save_every: int | None = None           # steps between checkpoints (None: only at the end)
    log_every: int = 10                     # steps between log rows (the last step is always logged)
    resume: bool = False                    # continue from out_dir/latest when it exists
    group_by_length: bool | None = None     # None: when a length_fn is given | True (needs length_fn) | False
    progress: bool = True                   # tqdm bar on rank 0
    tensorboard: bool = False               # also write TensorBoard events (needs the tensorboard package)

    def __post_init__(self):
        check_fields(self)
        _check(self.epochs > 0, f"epochs must be > 0, got {self.epochs}")
        _check(self.max_steps is None or self.max_steps >= 1, f"max_steps must be >= 1 or None, got {self.max_steps}")
        _check(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        _check(self.grad_accum >= 1, f"grad_accum must be >= 1, got {self.grad_accum}")
        _check(self.lr > 0, f"lr must be > 0, got {self.lr}")
        _check(self.loraplus_lr_ratio is None or self.loraplus_lr_ratio > 0,
               f"loraplus_lr_ratio must be > 0 (LoRA+ uses ~16) or None, got {self.loraplus_lr_ratio}")
        _check(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        _check(0 <= self.warmup_ratio < 1, f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        _check(self.warmup_steps is None or self.warmup_steps >= 0, "warmup_steps must be >= 0 or None")
        _check(self.warmup_steps is None or self.warmup_ratio == 0,
               "set warmup_steps or warmup_ratio, not both: leave warmup_ratio=0 when warmup_steps is given")
        _check(0 <= self.min_lr_ratio <= 1, f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        _check(self.max_grad_norm is None or self.max_grad_norm > 0,
               f"max_grad_norm must be > 0, or None for no clipping; got {self.max_grad_norm}")
        _check(0 <= self.seed < 2**32, f"seed must be in [0, 2**32) (numpy's range), got {self.seed}")
        _check(self.precision in ("auto", "bf16", "fp32"),
               f"precision must be 'auto', 'bf16' or 'fp32', got {self.precision!r} "
               "(fp16 needs loss scaling, which this loop does not do: use 'bf16')")
        for name in ("eval_every", "save_every"):
            value = getattr(self, name)
            _check(value is None or value >= 1, f"{name} must be >= 1 or None, got {value}")
        _check(self.log_every >= 1, f"log_every must be >= 1, got {self.log_every}")


@dataclass
class FitResult:
    steps: int                              # optimizer steps done (including those before a resume)
    epochs: float                           # passes over the data done
    final_loss: float | None                # loss of the last completed step
    history: list[dict]                     # the train log rows (every log_every steps)
    eval_history: list[dict] = field(default_factory=list)   # {"step", "epoch", **eval_fn(model)}
    elapsed_s: float = 0.0                  # wall time of the run, summed over resumes
    tokens_per_s: float = 0.0               # this call's training throughput (stats["n_tokens"], all ranks)
    stopped: str | None = None              # None (all epochs done) | "max_steps" | "nan" | "interrupted"
    checkpoint_dir: str | None = None       # the latest valid checkpoint
    total_steps: int = 0                    # the steps the run was planned for (epochs or max_steps)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)
