"""The one pipeline every task runs, and the settings every recipe shares.

    split the rows (task)  ->  load the backbone on its device  ->  rows before training (task: zero-shot, ...)
      -> make it trainable (task: quant.quantize + lora.inject, or a full fine-tune)  ->  train.fit (task's
         loss/collate)  ->  rows after training (task: fine-tuned, ...)  ->  adapter + task.json  ->  new inputs
      -> merged export  ->  metrics.json / results.md / predictions.csv / PNGs

A task type is a `Task` subclass that fills in only what differs (train/recipe.py: prompt + verbalizer
classification; train/encoder_recipe.py: an encoder with a new head; train/qa_recipe.py: extractive QA that may
abstain). Its settings are a `Recipe` subclass: the fields below are declared once here, so every task reads
`lr` or `r` from the same place, and `Recipe.train_config()` builds train.TrainConfig field by field (no
name matching: a field that is not here cannot be silently dropped). Examples and `python -m train fit` only
pick the data and a task's defaults.
"""
from __future__ import annotations

import dataclasses
import json
import os
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

import lora
import quant
from lora.atomic import atomic_dir

from .config import check_fields
from .devices import pick_dtype, resolve_device
from .distributed import is_main, say
from .loop import FitResult, TrainConfig
from .memory import allocator
from .report import write_report


@dataclass
class Recipe:
    out_dir: str                                  # metrics.json, results.md, predictions.csv, plots, adapter/
    model: str = "smollm2-135m"                   # registry name, a local HF folder or a .gguf file
    device: str = "auto"                          # "auto" (the GPU when there is one) | "cpu" | "cuda" | "cuda:N"
    dtype: str = "auto"                           # "auto" | "bf16" | "fp32": the backbone's compute dtype
    max_length: int = 256                         # tokens per training example
    # quantization (quant.quantize)
    blocksize: int = 64
    double_quant: bool = True
    backend: str | None = None                    # None: the fastest correct one for the device
    # adapters (lora.inject)
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    targets: str | Sequence[str] = "all-linear"
    use_rslora: bool = False
    use_dora: bool = False                        # DoRA (weight-decomposed LoRA), on dense and NF4 bases
    adapter_compute: str = "base"                 # "base": adapter math in the backbone dtype | "fp32"
    # training (train.TrainConfig)
    epochs: float = 1.0
    max_steps: int | None = None
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 3e-4
    loraplus_lr_ratio: float | None = None        # LoRA+: lora_B learns at ratio x lr (None: plain LoRA)
    weight_decay: float = 0.0
    warmup_ratio: float = 0.05
    grad_checkpointing: bool = True               # every block recomputed in backward: a quarter of the memory
    eval_batch_size: int = 64
    seed: int = 0
    resume: bool = False
    export_merged: str | None = None              # write a plain HF checkpoint of the merged model here
    extra: dict = field(default_factory=dict)     # anything the caller wants recorded in metrics.json

    def __post_init__(self):
        check_fields(self)                        # by type: bool is not an int, "3e-4" is not a float, ...
        resolve_device(self.device)               # a device this machine lacks fails before any work
        pick_dtype(self.dtype, "cpu")             # "auto" | "bf16" | "fp32"

    def train_config(self, **overrides) -> TrainConfig:
        """train.TrainConfig for this recipe, field by field, then `overrides` (TrainConfig's own names)."""
        unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(TrainConfig)})
        if unknown:
            raise ValueError(f"not TrainConfig fields: {unknown}")
        return TrainConfig(**{**dict(
            out_dir=self.out_dir, epochs=self.epochs, max_steps=self.max_steps, batch_size=self.batch_size,
            grad_accum=self.grad_accum, lr=self.lr, loraplus_lr_ratio=self.loraplus_lr_ratio,
            weight_decay=self.weight_decay,
            warmup_ratio=self.warmup_ratio, grad_checkpointing=self.grad_checkpointing, seed=self.seed,
            resume=self.resume), **overrides})

    def quant_options(self) -> dict:
        """quant.quantize's keywords (compute_dtype aside)."""
        return {"blocksize": self.blocksize, "double_quant": self.double_quant, "backend": self.backend}

    def lora_options(self) -> dict:
        """lora.inject's keywords."""
        targets = self.targets if isinstance(self.targets, str) else list(self.targets)
        return {"r": self.r, "alpha": self.alpha, "dropout": self.dropout, "targets": targets,
                "use_rslora": self.use_rslora, "use_dora": self.use_dora, "compute_dtype": self.adapter_compute}


class Task:
    """What a task type gives the pipeline. Rows before and after training land in `self.rows` (name -> the
    metrics dict of one row of the report); everything else is returned."""

    quantized = True                              # False: quant.memory_report is skipped
    new_key = "new_texts"                         # metrics.json's name for the answers to new inputs

    def __init__(self, recipe: Recipe):
        self.recipe = recipe
        self.rows: dict[str, dict] = {}
        self.device = resolve_device(recipe.device)
        self.dtype = pick_dtype(recipe.dtype)

    def split(self, train_rows, test_rows) -> tuple[list, list]:
        """The rows the run uses (e.g. a calibration slice taken out); default: as given."""
        return list(train_rows), list(test_rows)

    def load(self):
        """(model, tokenizer) on self.device; sets up the prompts/encoders the task needs."""
        raise NotImplementedError

    def before(self, model, train_rows, test_rows) -> None:
        """The rows before training (zero-shot, k-shot, an untrained head) into self.rows."""
        raise NotImplementedError

    def prepare(self, model) -> dict:
        """Makes `model` trainable (NF4 + LoRA by default); returns lora.trainable_parameters(model)."""
        quant.quantize(model, compute_dtype=self.dtype, **self.recipe.quant_options())
        lora.inject(model, **self.recipe.lora_options())
        counts = lora.trainable_parameters(model)
        say(f"trainable {counts['trainable']:,} / {counts['total']:,} ({counts['percent']:.3f}%)")
        return counts

    def fit(self, model, train_rows) -> FitResult:
        raise NotImplementedError

    def after(self, model, test_rows) -> None:
        """The rows after training (fine-tuned, ...) into self.rows."""
        raise NotImplementedError

    def save(self, model, tokenizer, out: Path) -> None:
        """The trained weights: by default out/adapter (PEFT's files) + the task file that predict reads."""
        lora.save(model, out / "adapter", base_model_name_or_path=self.recipe.model, extra_files=self.task_files())

    def task_files(self) -> dict[str, str]:
        return {}

    def predict(self, model, inputs: Sequence) -> list[dict]:
        """The trained model's answers for new inputs, said as they come."""
        return []

    def predictions(self, test_rows) -> list[dict]:
        """predictions.csv: one record per test row."""
        return []

    def summary(self, result: FitResult, train_rows, test_rows) -> dict:
        """The task's own top-level entries of metrics.json."""
        return {}

    def label_names(self) -> list[str]:
        return []

    def finish(self, out: Path, metrics: dict) -> None:
        """Anything the task adds after metrics.json is written (a results.md section, ...)."""


def run(task: Task, train_rows: Sequence, test_rows: Sequence, new_inputs: Sequence = ()) -> dict:
    """The whole pipeline (module docstring); returns the metrics also written to out_dir/metrics.json."""
    recipe = task.recipe
    out = Path(recipe.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    torch.manual_seed(recipe.seed)
    train_rows, test_rows = task.split(train_rows, test_rows)
    model, tokenizer = task.load()
    task.before(model, train_rows, test_rows)
    counts = task.prepare(model)
    memory = quant.memory_report(model) if task.quantized else None
    rss_before = peak_rss_mb()
    result = task.fit(model, train_rows)
    model.eval()
    task.after(model, test_rows)
    if not is_main():
        return task.rows
    task.save(model, tokenizer, out)
    answers = task.predict(model, new_inputs)
    if recipe.export_merged:
        export_merged(model, tokenizer, recipe.export_merged)
    elapsed = time.perf_counter() - t_start
    summary = {**task.summary(result, train_rows, test_rows), "trainable_parameters": counts, "memory": memory,
               "peak_rss_mb": peak_rss_mb(), "peak_rss_before_training_mb": rss_before, "allocator": allocator(),
               task.new_key: answers,
               "dtype": str(task.dtype).replace("torch.", ""), "device": str(task.device),
               **_gpu_memory(task.device), "run_time_s": round(elapsed, 1)}
    write_report(out, rows=task.rows, predictions=task.predictions(test_rows), label_names=task.label_names(),
                 config=dataclasses.asdict(recipe), extra=summary, elapsed=elapsed)
    metrics = json.loads((out / "metrics.json").read_text())
    task.finish(out, metrics)
    return json.loads((out / "metrics.json").read_text())


def _gpu_memory(device: torch.device) -> dict:
    if device.type != "cuda":
        return {}
    return {"max_memory_allocated_mb": round(torch.cuda.max_memory_allocated(device) / 2**20, 1)}


def train_summary(result: FitResult, n_examples: int) -> dict:
    """metrics.json's "train" entry."""
    return {"examples": n_examples, "steps": result.steps, "seconds": round(result.elapsed_s, 1),
            "tokens_per_s": round(result.tokens_per_s, 1), "final_loss": result.final_loss,
            "stopped": result.stopped}


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB.

    Linux's getrusage ru_maxrss survives fork + exec: a child process started by a 2 GB parent reports at
    least 2 GB. VmHWM in /proc/self/status is the same high-water mark for the current address space only,
    so it is read first; getrusage is the fallback (KiB on Linux, bytes on macOS)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)                 # "VmHWM:  123456 kB"
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(rss / (2**20 if os.uname().sysname == "Darwin" else 2**10), 1)


def export_merged(model, tokenizer, path: str | os.PathLike, extra_files: dict[str, str] | None = None) -> None:
    """Writes a plain HF checkpoint (dense weights, adapters folded in) that from_pretrained loads, as a folder
    replaced as a whole (lora.atomic): a kill while writing leaves the previous export. A model without
    adapters is saved as it is."""
    has_lora = any(isinstance(m, lora.LoRALinear) for m in model.modules())
    merged = lora.merge_and_unload(model) if has_lora else model
    with atomic_dir(path) as tmp:
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text, encoding="utf-8")
