"""The classification recipe every example shares: zero-shot -> NF4 -> LoRA -> fit -> evaluate -> report.

    load backbone (bf16 on a CPU with avx512_bf16 / any GPU, else fp32)
      -> zero-shot (and optional k-shot) probabilities on the held-out split
      -> quant.quantize (NF4 + double quant, compute in the same dtype)
      -> lora.inject (fp32 adapters) -> train.fit (label-word loss at the answer position)
      -> fine-tuned probabilities -> metrics.json / results.md / predictions.csv / PNGs -> adapter

The examples in examples/ only choose the data, the label words and the prompt; everything that runs lives
here, so that a change to the recipe reaches every task at once.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

import lora
import quant

from .distributed import is_main
from .loop import TrainConfig, fit
from .metrics import classification_metrics
from .models import load_model
from .report import write_report
from .task import ClassificationTask


@dataclass
class ClassificationRecipe:
    out_dir: str                                  # where metrics.json, predictions.csv, plots, adapter go
    model: str = "smollm2-135m"                   # registry name or a local HF folder
    instruction: str = "Classify the sentiment of the text."
    system: str | None = "You are a sentiment classifier."   # short: prompt tokens cost CPU time
    label_words: Sequence[str] = ("negative", "positive")
    max_length: int = 256                         # prompt tokens; the text part is truncated beyond it
    few_shot: int = 0                             # k examples in the prompt for a k-shot baseline row
    # adapters
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.0                          # dropout masks cost ~30% of a CPU step; 1 epoch needs none
    targets: str | Sequence[str] = "all-linear"
    use_rslora: bool = False
    # quantization
    blocksize: int = 64
    double_quant: bool = True
    backend: str | None = None                    # None: the fastest correct one for the device
    dtype: str = "auto"                           # "auto" | "bf16" | "fp32" (compute dtype of the backbone)
    # training (see train.TrainConfig)
    epochs: float = 1.0
    max_steps: int | None = None
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 3e-4
    warmup_ratio: float = 0.05
    grad_checkpointing: bool = False              # off: on CPU memory is plentiful and recompute costs 30%
    eval_batch_size: int = 64
    seed: int = 0
    resume: bool = False
    export_merged: str | None = None              # write a plain HF checkpoint of the merged model here
    extra: dict = field(default_factory=dict)     # anything the example wants recorded in metrics.json


def pick_dtype(name: str) -> torch.dtype:
    """bf16 where the hardware runs it fast (any CUDA GPU with bf16, x86 with avx512_bf16/AMX), else fp32."""
    if name == "bf16":
        return torch.bfloat16
    if name == "fp32":
        return torch.float32
    if name != "auto":
        raise ValueError(f"dtype must be 'auto', 'bf16' or 'fp32', got {name!r}")
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if _cpu_has_fast_bf16() else torch.float32


def _cpu_has_fast_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def evaluate(task: ClassificationTask, model, rows, label_names, batch_size: int) -> tuple[dict, np.ndarray]:
    """Probabilities over the label words for every row, and the metrics they give."""
    t0 = time.perf_counter()
    probs = task.predict_proba(model, [r["text"] for r in rows], batch_size=batch_size)  # (N, C)
    metrics = classification_metrics([r["label"] for r in rows], probs, label_names)
    metrics["eval_seconds"] = round(time.perf_counter() - t0, 2)
    return metrics, probs


def run_classification(
    recipe: ClassificationRecipe,
    train_rows: Sequence[dict],
    test_rows: Sequence[dict],
    label_names: Sequence[str],
    new_texts: Sequence[str] = (),
) -> dict:
    """Runs the whole recipe and returns the metrics dict that is also written to out_dir/metrics.json."""
    out = Path(recipe.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    torch.manual_seed(recipe.seed)
    dtype = pick_dtype(recipe.dtype)
    model, tokenizer = load_model(recipe.model, dtype=dtype)
    model.eval()

    task = ClassificationTask(tokenizer, list(recipe.label_words), instruction=recipe.instruction,
                              system=recipe.system, max_length=recipe.max_length)
    rows: dict[str, dict] = {}
    probs_by_row: dict[str, np.ndarray] = {}
    rows["zero_shot"], probs_by_row["zero_shot"] = evaluate(task, model, test_rows, label_names,
                                                            recipe.eval_batch_size)
    _say(f"zero-shot accuracy {rows['zero_shot']['accuracy']:.4f}")
    if recipe.few_shot > 0:
        shots = _balanced_shots(train_rows, recipe.few_shot, len(label_names), recipe.seed)
        k_task = ClassificationTask(tokenizer, list(recipe.label_words), instruction=recipe.instruction,
                                    system=recipe.system, max_length=recipe.max_length * (recipe.few_shot + 1),
                                    few_shot=shots)
        rows[f"few_shot_{recipe.few_shot}"], probs_by_row[f"few_shot_{recipe.few_shot}"] = evaluate(
            k_task, model, test_rows, label_names, max(1, recipe.eval_batch_size // 4))

    quant.quantize(model, blocksize=recipe.blocksize, double_quant=recipe.double_quant,
                   compute_dtype=dtype, backend=recipe.backend)
    lora.inject(model, r=recipe.r, alpha=recipe.alpha, dropout=recipe.dropout,
                targets=recipe.targets, use_rslora=recipe.use_rslora)
    counts = lora.trainable_parameters(model)
    memory = quant.memory_report(model)
    _say(f"trainable {counts['trainable']:,} / {counts['total']:,} ({counts['percent']:.3f}%)")

    config = TrainConfig(out_dir=str(out), epochs=recipe.epochs, max_steps=recipe.max_steps,
                         batch_size=recipe.batch_size, grad_accum=recipe.grad_accum, lr=recipe.lr,
                         warmup_ratio=recipe.warmup_ratio, grad_checkpointing=recipe.grad_checkpointing,
                         seed=recipe.seed, resume=recipe.resume)
    encoded = [{"input_ids": task.encode(r["text"]), "label": int(r["label"])} for r in train_rows]
    result = fit(model, encoded, config, loss_fn=task.loss, collate_fn=task.collate,
                 length_fn=lambda ex: len(ex["input_ids"]))

    model.eval()
    rows["fine_tuned"], probs_by_row["fine_tuned"] = evaluate(task, model, test_rows, label_names,
                                                              recipe.eval_batch_size)
    _say(f"fine-tuned accuracy {rows['fine_tuned']['accuracy']:.4f}")
    if not is_main():
        return rows
    lora.save(model, out / "adapter", base_model_name_or_path=recipe.model)
    _write_task_meta(out / "adapter", recipe, label_names)
    examples = []
    if new_texts:
        p = task.predict_proba(model, list(new_texts), batch_size=recipe.eval_batch_size)
        examples = [{"text": t, "label": label_names[int(i)], "p": round(float(pi.max()), 4)}
                    for t, i, pi in zip(new_texts, p.argmax(1), p)]
        for e in examples:
            _say(f"  {e['label']:>9s} ({e['p']:.2f})  {e['text']}")
    if recipe.export_merged:
        export_merged(model, tokenizer, recipe.export_merged)

    predictions = _prediction_rows(test_rows, probs_by_row, label_names)
    summary = {
        "train": {"examples": len(train_rows), "steps": result.steps, "seconds": round(result.elapsed_s, 1),
                  "tokens_per_s": round(result.tokens_per_s, 1), "final_loss": result.final_loss,
                  "stopped": result.stopped},
        "trainable_parameters": counts,
        "memory": memory,
        "new_texts": examples,
        "dtype": str(dtype).replace("torch.", ""),
    }
    write_report(out, rows=rows, predictions=predictions, label_names=list(label_names),
                 config=dataclasses.asdict(recipe), extra=summary, elapsed=time.perf_counter() - t_start)
    return json.loads((out / "metrics.json").read_text())


def export_merged(model, tokenizer, path: str | os.PathLike) -> None:
    """Writes a plain HF checkpoint (dense weights, adapters folded in) that from_pretrained loads."""
    merged = lora.merge_and_unload(model)
    merged.save_pretrained(path)
    tokenizer.save_pretrained(path)


def _write_task_meta(adapter_dir: Path, recipe: ClassificationRecipe, label_names) -> None:
    """task.json beside the adapter: what train.predict needs to rebuild the same prompt."""
    meta = {"model": recipe.model, "label_names": list(label_names), "label_words": list(recipe.label_words),
            "instruction": recipe.instruction, "system": recipe.system, "max_length": recipe.max_length,
            "quant": {"blocksize": recipe.blocksize, "double_quant": recipe.double_quant}}
    tmp = adapter_dir / "task.json.tmp"
    tmp.write_text(json.dumps(meta, indent=2))
    os.replace(tmp, adapter_dir / "task.json")


def _balanced_shots(rows: Sequence[dict], k: int, n_classes: int, seed: int) -> list[tuple[str, int]]:
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(rows))
    shots, per_class = [], {c: 0 for c in range(n_classes)}
    for i in order:
        label = int(rows[i]["label"])
        if per_class[label] < max(1, k // n_classes) and len(shots) < k:
            shots.append((rows[i]["text"], label))
            per_class[label] += 1
    return shots


def _prediction_rows(test_rows, probs_by_row, label_names) -> list[dict]:
    out = []
    for i, r in enumerate(test_rows):
        row = {"text": r["text"], "label": label_names[int(r["label"])]}
        for name, probs in probs_by_row.items():
            row[f"{name}_pred"] = label_names[int(probs[i].argmax())]
            row[f"{name}_p"] = round(float(probs[i].max()), 4)
        out.append(row)
    return out


def _say(msg: str) -> None:
    if is_main():
        print(msg, flush=True)
