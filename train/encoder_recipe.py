"""The encoder recipe: a BERT-style classifier trained with LoRA (optionally on an NF4 base) or in full.

    load encoder + a fresh classification head (BertForSequenceClassification, C outputs)
      -> "zero-shot": the untrained head (chance level: the row shows what the head alone cannot do)
      -> mode "qlora": quant.quantize (NF4, head kept dense; matmuls in bf16 where fast: `nf4_compute`)
                       -> lora.inject(query/key/value/dense, modules_to_save=["classifier"]) -> train.fit
                       -> adapter (LoRA A/B + the whole head)
         mode "lora":  the same on the dense base
         mode "full":  every weight trainable, fp32, no quantization -> a plain HF checkpoint
      -> metrics.json / results.md / predictions.csv / PNGs, with trainable parameters, train time and
         peak RSS, so that runs of different modes compare on cost as well as accuracy

An encoder has no verbalizer: the head is new, so the score of class c is the head's logit c and the loss
is the cross-entropy of model(...).logits (train.SequenceClassificationTask). The prompt-less encoder also
has no k-shot row.

Peak memory is the process's high-water RSS (train.recipe.peak_rss_mb: VmHWM, else ru_maxrss), the most it
ever held, so comparing two modes needs two processes (examples/sst2_encoder.py runs the full fine-tune in a
child process); `add_comparison` folds the child's numbers into this run's report.
"""
from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

import lora
import quant

from .distributed import is_main, say
from .models import load_model
from .recipe import (append_markdown, evaluate, export_merged, fit_classifier, peak_rss_mb, pick_dtype,
                     predict_texts, prediction_table, train_summary)
from .report import write_report
from .tasks import SequenceClassificationTask

MODES = ("qlora", "lora", "full")


@dataclass
class EncoderRecipe:
    out_dir: str                                  # where metrics.json, predictions.csv, plots, adapter go
    model: str = "minilm-l6"                      # registry name or a local HF folder (a BERT-like encoder)
    mode: str = "qlora"                           # "qlora" (NF4 base + LoRA) | "lora" (dense base) | "full"
    max_length: int = 128                         # tokens with [CLS] and [SEP]; longer texts keep the head
    # adapters (qlora / lora)
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    targets: str | Sequence[str] = ("query", "key", "value", "dense")   # attention, FFN and pooler linears
    modules_to_save: Sequence[str] = ("classifier",)                    # the new head trains in full
    # quantization (qlora)
    blocksize: int = 64
    double_quant: bool = True
    backend: str | None = None
    dtype: str = "fp32"                           # the frozen base's dtype; "full" always trains in fp32
    nf4_compute: str = "auto"                     # qlora: the NF4 matmuls' dtype ("auto": bf16 where the CPU/GPU
                                                  # runs it fast); norms, adapters and head stay in `dtype`
    # training (see train.TrainConfig)
    epochs: float = 1.0
    max_steps: int | None = None
    batch_size: int = 32
    grad_accum: int = 1
    lr: float = 1e-3                              # adapters; a full fine-tune wants ~1e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.06
    eval_batch_size: int = 128
    seed: int = 0
    resume: bool = False
    export_merged: str | None = None              # write a plain HF checkpoint of the merged model here
    columns: dict | None = None                   # {"text", "label"}: the user's column names (task.json)
    extra: dict = field(default_factory=dict)     # anything the example wants recorded in metrics.json

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")


def prepare(model, recipe: EncoderRecipe):
    """The model made trainable the way `recipe.mode` says; returns it."""
    if recipe.mode == "full":
        model.float()
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    if recipe.mode == "qlora":
        quant.quantize(model, blocksize=recipe.blocksize, double_quant=recipe.double_quant,
                       compute_dtype=pick_dtype(recipe.nf4_compute),
                       backend=recipe.backend, skip=tuple(recipe.modules_to_save))
    targets = recipe.targets if isinstance(recipe.targets, str) else list(recipe.targets)
    return lora.inject(model, r=recipe.r, alpha=recipe.alpha, dropout=recipe.dropout, targets=targets,
                       modules_to_save=list(recipe.modules_to_save))


def run_encoder(recipe: EncoderRecipe, train_rows: Sequence[dict], test_rows: Sequence[dict],
                label_names: Sequence[str], new_texts: Sequence[str] = ()) -> dict:
    """Runs the whole recipe and returns the metrics dict that is also written to out_dir/metrics.json."""
    out = Path(recipe.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    torch.manual_seed(recipe.seed)                # the head's initialisation
    dtype = torch.float32 if recipe.mode == "full" else pick_dtype(recipe.dtype)
    model, tokenizer = load_model(recipe.model, dtype=dtype, kind="sequence-classification",
                                  num_labels=len(label_names))
    task = SequenceClassificationTask(tokenizer, len(label_names), max_length=recipe.max_length)
    rows, probs_by_row = {}, {}
    rows["zero_shot"], probs_by_row["zero_shot"] = evaluate(task, model, test_rows, label_names,
                                                            recipe.eval_batch_size)
    say(f"untrained head ('zero-shot') accuracy {rows['zero_shot']['accuracy']:.4f}")

    prepare(model, recipe)
    counts = lora.trainable_parameters(model)
    say(f"{recipe.mode}: trainable {counts['trainable']:,} / {counts['total']:,} ({counts['percent']:.3f}%)")
    rss_before = peak_rss_mb()
    result = fit_classifier(model, task, train_rows, recipe)
    model.eval()
    rows["fine_tuned"], probs_by_row["fine_tuned"] = evaluate(task, model, test_rows, label_names,
                                                              recipe.eval_batch_size)
    say(f"fine-tuned accuracy {rows['fine_tuned']['accuracy']:.4f}")
    if not is_main():
        return rows
    save_trained(model, tokenizer, out, recipe, label_names)
    examples = predict_texts(task, model, new_texts, label_names, recipe.eval_batch_size)
    if recipe.export_merged:
        export_merged(model, tokenizer, recipe.export_merged)

    summary = {
        "mode": recipe.mode,
        "quantized": recipe.mode == "qlora",
        "train": train_summary(result, len(train_rows)),
        "trainable_parameters": counts,
        "memory": quant.memory_report(model) if recipe.mode == "qlora" else None,
        "peak_rss_mb": peak_rss_mb(),
        "peak_rss_before_training_mb": rss_before,
        "new_texts": examples,
        "dtype": str(dtype).replace("torch.", ""),
    }
    write_report(out, rows=rows, predictions=prediction_table(test_rows, probs_by_row, label_names),
                 label_names=list(label_names), config=dataclasses.asdict(recipe), extra=summary,
                 elapsed=time.perf_counter() - t_start)
    append_markdown(out, cost_markdown({recipe.mode: _cost(json.loads((out / "metrics.json").read_text()))}))
    return json.loads((out / "metrics.json").read_text())


def save_trained(model, tokenizer, out: Path, recipe: EncoderRecipe, label_names) -> None:
    """LoRA modes: out/adapter (PEFT files, the head in full) + task.json; full: out/model (HF checkpoint)."""
    meta = {"kind": "sequence-classification", "model": recipe.model, "mode": recipe.mode,
            "label_names": list(label_names), "max_length": recipe.max_length, "columns": recipe.columns,
            "dtype": "fp32" if recipe.mode == "full" else recipe.dtype,
            "quant": {"blocksize": recipe.blocksize, "double_quant": recipe.double_quant,
                      "skip": list(recipe.modules_to_save)} if recipe.mode == "qlora" else None}
    task_json = {"task.json": json.dumps(meta, indent=2) + "\n"}
    if recipe.mode == "full":
        export_merged(model, tokenizer, out / "model", extra_files=task_json)
    else:
        lora.save(model, out / "adapter", base_model_name_or_path=recipe.model, extra_files=task_json)


def _cost(metrics: dict) -> dict:
    return {"accuracy": metrics["fine_tuned"]["accuracy"], "quantized": metrics.get("quantized"),
            "trainable": metrics["trainable_parameters"]["trainable"],
            "total": metrics["trainable_parameters"]["total"],
            "train_seconds": metrics["train"]["seconds"], "steps": metrics["train"]["steps"],
            "peak_rss_mb": metrics["peak_rss_mb"]}


def cost_markdown(costs: dict[str, dict]) -> str:
    lines = ["Cost (peak RSS: the high-water resident memory of the process, each mode in its own):", "",
             "| mode | NF4 base | accuracy | trainable params | % of all | train s | steps | peak RSS MiB |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for mode, c in costs.items():
        lines.append(f"| {mode} | {'yes' if c['quantized'] else 'no'} | {c['accuracy']:.4f} | {c['trainable']:,} | "
                     f"{100 * c['trainable'] / max(c['total'], 1):.2f} | {c['train_seconds']:.1f} | {c['steps']} | "
                     f"{c['peak_rss_mb']:.0f} |")
    return "\n".join(lines) + "\n"


def add_comparison(out_dir, other_dir, name: str = "full_fine_tune") -> dict:
    """Folds the run in `other_dir` (e.g. the full fine-tune) into the report in `out_dir`: its fine-tuned
    row becomes row `name` of metrics.json and results.md, and both runs' costs go side by side."""
    out, other = Path(out_dir), Path(other_dir)
    mine, theirs = (json.loads((d / "metrics.json").read_text()) for d in (out, other))
    names = [k for k, v in mine.items() if isinstance(v, dict) and "accuracy" in v]
    rows = {k: mine[k] for k in names}
    rows[name] = theirs["fine_tuned"]
    costs = {mine["mode"]: _cost(mine), theirs["mode"]: _cost(theirs)}
    extra = {k: v for k, v in mine.items() if k not in names and k not in ("elapsed_s", "label_names", "config")}
    extra["comparison"] = {"dir": str(other), **costs}
    write_report(out, rows=rows, label_names=mine["label_names"], config=mine["config"], extra=extra,
                 elapsed=mine["elapsed_s"])
    append_markdown(out, cost_markdown(costs))
    return json.loads((out / "metrics.json").read_text())
