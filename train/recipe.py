"""The classification recipe every example shares: zero-shot -> NF4 -> LoRA -> fit -> evaluate -> report.

    load backbone (bf16 on a CPU with avx512_bf16 / any GPU, else fp32)
      -> zero-shot (and optional k-shot) probabilities on the held-out split
      -> quant.quantize (NF4 + double quant, compute in the same dtype)
      -> lora.inject (fp32 adapters; their math in bf16 unless adapter_compute="fp32")
      -> train.fit (label-word loss at the answer position)
      -> fine-tuned probabilities -> metrics.json / results.md / predictions.csv / PNGs -> adapter

The examples in examples/ only choose the data, the label words and the prompt; everything that runs lives
here, so that a change to the recipe reaches every task at once. What they share besides the run itself:
`balanced_sample` (stratified, seeded samples: per class, or per language and class), per-group metrics
(`group_key="language"`: accuracy, macro F1 and AUC per group, in metrics.json and results.md), head+tail
truncation of long texts (`keep`), and k-shot prompts whose shots are cut to `shot_tokens` each.
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

import numpy as np
import torch

import lora
import quant
from lora.atomic import atomic_dir, atomic_write

from .distributed import is_main, say
from .loop import FitResult, TrainConfig, fit
from .metrics import classification_metrics
from .models import load_model
from .report import write_report
from .tasks import ClassificationTask, cut


@dataclass
class ClassificationRecipe:
    out_dir: str                                  # where metrics.json, predictions.csv, plots, adapter go
    model: str = "smollm2-135m"                   # registry name or a local HF folder
    instruction: str = "Classify the sentiment of the text."
    system: str | None = "You are a sentiment classifier."   # short: prompt tokens cost CPU time
    label_words: Sequence[str] = ("negative", "positive")
    max_length: int = 256                         # prompt tokens; the text part is truncated beyond it
    eval_max_length: int | None = None            # prompt tokens when evaluating and predicting (every row:
                                                  # zero-shot, k-shot, fine-tuned); None: max_length
    keep: str = "head"                            # what a long text keeps: "head" | "head+tail" (train/tasks/)
    few_shot: int = 0                             # k examples in the prompt for a k-shot baseline row
    shot_tokens: int = 128                        # each shot's text is cut to this many tokens (same `keep`)
    group_key: str | None = None                  # e.g. "language": metrics per group as well as overall
    # adapters
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.0                          # dropout masks cost ~30% of a CPU step; 1 epoch needs none
    targets: str | Sequence[str] = "all-linear"
    use_rslora: bool = False
    adapter_compute: str = "base"                 # lora.inject's compute_dtype: "base" = adapter math in the
                                                  # backbone dtype (bf16 matmuls, ~15% faster CPU steps) | "fp32"
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
    columns: dict | None = None                   # {"text", "label"}: the user's column names, kept in task.json
                                                  # so `python -m train eval/predict` read the same columns
    extra: dict = field(default_factory=dict)     # anything the example wants recorded in metrics.json

    @property
    def test_max_length(self) -> int:
        """Prompt tokens when evaluating and predicting: eval_max_length, else max_length."""
        return self.max_length if self.eval_max_length is None else self.eval_max_length


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


def evaluate(task, model, rows, label_names, batch_size: int,
             group_key: str | None = None) -> tuple[dict, np.ndarray]:
    """Probabilities over the label words for every row, and the metrics they give (per group too)."""
    t0 = time.perf_counter()
    probs = task.predict_proba(model, [r["text"] for r in rows], batch_size=batch_size,
                               progress=is_main())                                   # (N, C)
    metrics = classification_metrics([r["label"] for r in rows], probs, label_names)
    metrics["eval_seconds"] = round(time.perf_counter() - t0, 2)
    if group_key is not None:
        metrics["per_group"] = group_metrics(rows, probs, label_names, group_key)
    return metrics, probs


def group_metrics(rows, probs: np.ndarray, label_names, group_key: str) -> dict[str, dict]:
    """{group: {n, accuracy, accuracy_ci95, f1_macro, roc_auc}} over the rows sharing rows[i][group_key], groups
    sorted. A group of 150 rows measures accuracy to about +-8 points (95%): read per-group gaps with it."""
    groups = np.asarray([r[group_key] for r in rows])
    labels = np.asarray([int(r["label"]) for r in rows])
    out = {}
    for g in sorted(set(groups.tolist())):
        m = classification_metrics(labels[groups == g], probs[groups == g], label_names)
        out[g] = {k: m[k] for k in ("n", "accuracy", "accuracy_ci95", "f1_macro", "roc_auc")}
    return out


def balanced_sample(rows, n: int, *, keys: Sequence[str] = ("label",), seed: int = 0) -> list[dict]:
    """A seeded sample of n rows spread evenly over the strata that `keys` define (e.g. language x label).

    Each stratum gives n // n_strata rows (the first n % n_strata strata one more); a stratum with too few
    rows gives all it has and the shortfall is a ValueError, so "balanced" is never silently untrue."""
    rows = list(rows)
    strata: dict[tuple, list[int]] = {}
    for i, r in enumerate(rows):
        strata.setdefault(tuple(r[k] for k in keys), []).append(i)
    names = sorted(strata)
    if n > len(rows):
        raise ValueError(f"asked for {n} rows but there are only {len(rows)}; lower the sample size")
    rng = np.random.default_rng(seed)
    picked = []
    for j, name in enumerate(names):
        want = n // len(names) + (j < n % len(names))
        idx = strata[name]
        if want > len(idx):
            raise ValueError(f"stratum {dict(zip(keys, name))} has {len(idx)} rows, fewer than the {want} a "
                             f"balanced sample of {n} needs; lower the sample size")
        picked += [idx[i] for i in rng.choice(len(idx), want, replace=False)]
    return [rows[i] for i in rng.permutation(picked)]


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

    task = build_task(recipe, tokenizer)                                   # training prompts
    eval_task = build_task(recipe, tokenizer, evaluation=True)             # held-out and new texts
    rows, probs_by_row = baselines(recipe, model, tokenizer, eval_task, train_rows, test_rows, label_names)
    counts = quantize_and_inject(model, recipe, dtype)
    memory = quant.memory_report(model)
    result = fit_classifier(model, task, train_rows, recipe)

    model.eval()
    truncated_before = eval_task.n_truncated
    rows["fine_tuned"], probs_by_row["fine_tuned"] = evaluate(eval_task, model, test_rows, label_names,
                                                              recipe.eval_batch_size, recipe.group_key)
    say(f"fine-tuned accuracy {rows['fine_tuned']['accuracy']:.4f}")
    test_truncated = eval_task.n_truncated - truncated_before
    if not is_main():
        return rows
    lora.save(model, out / "adapter", base_model_name_or_path=recipe.model,
              extra_files={"task.json": _task_json(recipe, label_names)})
    examples = predict_texts(eval_task, model, new_texts, label_names, recipe.eval_batch_size)
    if recipe.export_merged:
        export_merged(model, tokenizer, recipe.export_merged)

    predictions = prediction_table(test_rows, probs_by_row, label_names, recipe.group_key)
    summary = {
        "train": {**train_summary(result, len(train_rows)), "texts_truncated": task.n_truncated},
        "test": {"examples": len(test_rows), "texts_truncated": test_truncated,
                 "max_length": eval_task.max_length},
        "trainable_parameters": counts,
        "memory": memory,
        "peak_rss_mb": peak_rss_mb(),
        "new_texts": examples,
        "dtype": str(dtype).replace("torch.", ""),
    }
    write_report(out, rows=rows, predictions=predictions, label_names=list(label_names),
                 config=dataclasses.asdict(recipe), extra=summary, elapsed=time.perf_counter() - t_start)
    if recipe.group_key is not None:
        append_markdown(out, group_markdown(rows, recipe.group_key))
    return json.loads((out / "metrics.json").read_text())


def baselines(recipe: ClassificationRecipe, model, tokenizer, eval_task, train_rows, test_rows,
              label_names) -> tuple[dict[str, dict], dict[str, np.ndarray]]:
    """The rows before training: zero-shot, and k-shot when recipe.few_shot > 0; (metrics, probabilities)."""
    rows: dict[str, dict] = {}
    probs_by_row: dict[str, np.ndarray] = {}
    rows["zero_shot"], probs_by_row["zero_shot"] = evaluate(eval_task, model, test_rows, label_names,
                                                            recipe.eval_batch_size, recipe.group_key)
    say(f"zero-shot accuracy {rows['zero_shot']['accuracy']:.4f}")
    if recipe.few_shot > 0:
        name = f"few_shot_{recipe.few_shot}"
        k_task = few_shot_task(recipe, tokenizer, train_rows, len(label_names), eval_task.budget)
        rows[name], probs_by_row[name] = evaluate(k_task, model, test_rows, label_names,
                                                  max(1, recipe.eval_batch_size // 4), recipe.group_key)
        say(f"{recipe.few_shot}-shot accuracy {rows[name]['accuracy']:.4f}")
    return rows, probs_by_row


def quantize_and_inject(model, recipe, dtype: torch.dtype) -> dict:
    """The backbone to NF4 (computing in `dtype`), then LoRA adapters; returns lora.trainable_parameters."""
    quant.quantize(model, blocksize=recipe.blocksize, double_quant=recipe.double_quant,
                   compute_dtype=dtype, backend=recipe.backend)
    lora.inject(model, r=recipe.r, alpha=recipe.alpha, dropout=recipe.dropout, targets=recipe.targets,
                use_rslora=getattr(recipe, "use_rslora", False),       # QARecipe has no such field: inject's default
                compute_dtype=recipe.adapter_compute)
    counts = lora.trainable_parameters(model)
    say(f"trainable {counts['trainable']:,} / {counts['total']:,} ({counts['percent']:.3f}%)")
    return counts


def fit_classifier(model, task, train_rows: Sequence[dict], recipe) -> FitResult:
    """train.fit on the task-encoded (text, label) rows, batched by length, with the recipe's TrainConfig."""
    encoded = [{"input_ids": task.encode(r["text"]), "label": int(r["label"])} for r in train_rows]
    return fit(model, encoded, TrainConfig.from_recipe(recipe), loss_fn=task.loss, collate_fn=task.collate,
               length_fn=lambda ex: len(ex["input_ids"]))


def train_summary(result: FitResult, n_examples: int) -> dict:
    """metrics.json's "train" entry."""
    return {"examples": n_examples, "steps": result.steps, "seconds": round(result.elapsed_s, 1),
            "tokens_per_s": round(result.tokens_per_s, 1), "final_loss": result.final_loss,
            "stopped": result.stopped}


def predict_texts(task, model, texts: Sequence[str], label_names, batch_size: int) -> list[dict]:
    """The predicted label and its probability for each new text, each said as it comes."""
    if not texts:
        return []
    probs = task.predict_proba(model, list(texts), batch_size=batch_size)   # (N, C)
    examples = [{"text": t, "label": label_names[int(p.argmax())], "p": round(float(p.max()), 4)}
                for t, p in zip(texts, probs)]
    for e in examples:
        say(f"  {e['label']:>9s} ({e['p']:.2f})  {e['text']}")
    return examples


def build_task(recipe: ClassificationRecipe, tokenizer, evaluation: bool = False) -> ClassificationTask:
    """The zero-shot prompt + verbalizer the recipe trains with (evaluates with, at `eval_max_length`)."""
    return ClassificationTask(tokenizer, list(recipe.label_words), instruction=recipe.instruction,
                              system=recipe.system, keep=recipe.keep,
                              max_length=recipe.test_max_length if evaluation else recipe.max_length)


def few_shot_task(recipe: ClassificationRecipe, tokenizer, train_rows, n_classes: int,
                  text_budget: int) -> ClassificationTask:
    """The k-shot prompt: k balanced training examples, each cut to `shot_tokens`, before the test text,
    which keeps the zero-shot prompt's `text_budget` tokens (so both rows see the same text)."""
    shots = []
    for text, label in _balanced_shots(train_rows, recipe.few_shot, n_classes, recipe.seed):
        ids = tokenizer(text.strip(), add_special_tokens=False)["input_ids"]
        shots.append((tokenizer.decode(cut(ids, recipe.shot_tokens, recipe.keep)), label))
    kw = dict(instruction=recipe.instruction, system=recipe.system, few_shot=shots, keep=recipe.keep)
    probe = ClassificationTask(tokenizer, list(recipe.label_words), max_length=1 << 20, **kw)
    scaffold = len(probe.prefix_ids) + len(probe.suffix_ids)              # template + instruction + shots
    return ClassificationTask(tokenizer, list(recipe.label_words), max_length=scaffold + text_budget, **kw)


def group_markdown(rows: dict[str, dict], group_key: str) -> str:
    """A results.md section: one line per group, accuracy / macro F1 / AUC for every row (zero-shot, ...)."""
    from .report import ordered_rows

    names = [n for n in ordered_rows(rows) if "per_group" in rows[n]]
    groups = list(rows[names[0]]["per_group"]) + ["all"]
    head = " | ".join(f"{n.replace('_', '-')} {m}" for n in names for m in ("acc", "F1", "AUC"))
    lines = [f"Per {group_key} (accuracy, macro F1, one-vs-rest AUC):", "",
             f"| {group_key} | n | {head} |", "|---|---:|" + "---:|" * (3 * len(names))]
    for g in groups:
        cells = [rows[n] if g == "all" else rows[n]["per_group"][g] for n in names]
        values = [c.get(k) for c in cells for k in ("accuracy", "f1_macro", "roc_auc")]
        lines.append(f"| {g} | {cells[0]['n']} | " + " | ".join("–" if v is None else f"{v:.4f}" for v in values)
                     + " |")
    return "\n".join(lines) + "\n"


def append_markdown(out: Path, section: str) -> None:
    """Adds a section to out/results.md (atomically, like the rest of the report)."""
    path = Path(out) / "results.md"
    atomic_write(path, path.read_text(encoding="utf-8") + "\n" + section)


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


def _task_json(recipe: ClassificationRecipe, label_names) -> str:
    """task.json beside the adapter: what train.predict needs to rebuild the same prompt."""
    meta = {"model": recipe.model, "label_names": list(label_names), "label_words": list(recipe.label_words),
            "instruction": recipe.instruction, "system": recipe.system,
            "max_length": recipe.test_max_length,
            "keep": recipe.keep, "columns": recipe.columns,
            "quant": {"blocksize": recipe.blocksize, "double_quant": recipe.double_quant}}
    return json.dumps(meta, indent=2) + "\n"


def _balanced_shots(rows: Sequence[dict], k: int, n_classes: int, seed: int) -> list[tuple[str, int]]:
    """k seeded examples spread over the classes: k // C each, one more for k % C of them (seeded), so
    k = 4, C = 3 gives 2 + 1 + 1; shuffled, so the prompt does not end on one class by construction."""
    rng = np.random.default_rng(seed)
    extra = set(rng.permutation(n_classes)[: k % n_classes].tolist())
    quota = {c: k // n_classes + (c in extra) for c in range(n_classes)}
    shots = []
    for i in rng.permutation(len(rows)):
        label = int(rows[i]["label"])
        if quota.get(label, 0) > 0:
            shots.append((rows[i]["text"], label))
            quota[label] -= 1
    return [shots[i] for i in rng.permutation(len(shots))]


def prediction_table(test_rows, probs_by_row, label_names, group_key: str | None = None) -> list[dict]:
    """predictions.csv: each test row with every row's (zero-shot, ...) predicted label and its probability."""
    out = []
    for i, r in enumerate(test_rows):
        row = {"text": r["text"], "label": label_names[int(r["label"])]}
        if group_key is not None:
            row[group_key] = r[group_key]
        for name, probs in probs_by_row.items():
            row[f"{name}_pred"] = label_names[int(probs[i].argmax())]
            row[f"{name}_p"] = round(float(probs[i].max()), 4)
        out.append(row)
    return out
