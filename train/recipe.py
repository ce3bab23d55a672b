"""The classification recipe every example shares: zero-shot -> NF4 -> LoRA -> fit -> evaluate -> report.

    load backbone (bf16 on a CPU with avx512_bf16 / any GPU, else fp32)
      -> zero-shot (and optional k-shot) probabilities on the held-out split
      -> quant.quantize (NF4 + double quant, compute in the same dtype)
      -> lora.inject (fp32 adapters; their math in bf16 unless adapter_compute="fp32")
      -> train.fit (label-word loss at the answer position)
      -> fine-tuned probabilities -> metrics.json / results.md / predictions.csv / PNGs -> adapter

The run itself is train.pipeline.run (the one pipeline every task type plugs into); this module gives what a
prompt + verbalizer classifier adds to it (`ClassifyTask`). The examples in examples/ only choose the data, the
label words and the prompt. What they share besides the run itself:
`balanced_sample` (stratified, seeded samples: per class, or per language and class), per-group metrics
(`group_key="language"`: accuracy, macro F1 and AUC per group, in metrics.json and results.md), head+tail
truncation of long texts (`keep`), and k-shot prompts whose shots are cut to `shot_tokens` each.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from lora.atomic import atomic_write

from .devices import pick_dtype  # noqa: F401  (the recipes' dtype choice; kept importable from here)
from .distributed import is_main, say
from .loop import FitResult, fit
from .memory import release_free_memory
from .metrics import classification_metrics
from .models import load_model
from .pipeline import Recipe, Task, export_merged, peak_rss_mb, run, train_summary  # noqa: F401
from .tasks import ClassificationTask, cut


@dataclass
class ClassificationRecipe(Recipe):
    """The shared settings (train.pipeline.Recipe) and the prompt + verbalizer ones."""
    instruction: str = "Classify the sentiment of the text."
    system: str | None = "You are a sentiment classifier."   # short: prompt tokens cost CPU time
    label_words: Sequence[str] = ("negative", "positive")
    eval_max_length: int | None = None            # prompt tokens when evaluating and predicting (every row:
                                                  # zero-shot, k-shot, fine-tuned); None: max_length
    keep: str = "head"                            # what a long text keeps: "head" | "head+tail" (train/tasks/)
    few_shot: int = 0                             # k examples in the prompt for a k-shot baseline row
    shot_tokens: int = 128                        # each shot's text is cut to this many tokens (same `keep`)
    group_key: str | None = None                  # e.g. "language": metrics per group as well as overall
    columns: dict | None = None                   # {"text", "label"}: the user's column names, kept in task.json
                                                  # so `python -m train eval/predict` read the same ones

    @property
    def test_max_length(self) -> int:
        """Prompt tokens when evaluating and predicting: eval_max_length, else max_length."""
        return self.max_length if self.eval_max_length is None else self.eval_max_length


def evaluate(task, model, rows, label_names, batch_size: int,
             group_key: str | None = None) -> tuple[dict, np.ndarray]:
    """Probabilities over the label words for every row, and the metrics they give (per group too)."""
    t0 = time.perf_counter()
    probs = task.predict_proba(model, [r["text"] for r in rows], batch_size=batch_size,
                               progress=is_main())                                   # (N, C)
    metrics = classification_metrics([r["label"] for r in rows], probs, label_names)
    metrics["eval_seconds"] = round(time.perf_counter() - t0, 2)
    release_free_memory()
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


def run_classification(recipe: ClassificationRecipe, train_rows: Sequence[dict], test_rows: Sequence[dict],
                       label_names: Sequence[str], new_texts: Sequence[str] = ()) -> dict:
    """Runs the whole recipe and returns the metrics dict that is also written to out_dir/metrics.json."""
    return run(ClassifyTask(recipe, label_names), train_rows, test_rows, new_texts)


class ClassifyTask(Task):
    """A decoder LM as a classifier: the label words' probabilities at the answer position (train/tasks/)."""

    def __init__(self, recipe: ClassificationRecipe, label_names: Sequence[str]):
        super().__init__(recipe)
        self.names = list(label_names)
        self.probs: dict[str, np.ndarray] = {}

    def load(self):
        model, self.tokenizer = load_model(self.recipe.model, dtype=self.dtype, device=self.device)
        self.task = build_task(self.recipe, self.tokenizer)                         # training prompts
        self.eval_task = build_task(self.recipe, self.tokenizer, evaluation=True)   # held-out and new texts
        return model, self.tokenizer

    def before(self, model, train_rows, test_rows) -> None:
        self.rows, self.probs = baselines(self.recipe, model, self.tokenizer, self.eval_task, train_rows,
                                          test_rows, self.names)

    def fit(self, model, train_rows) -> FitResult:
        return fit_classifier(model, self.task, train_rows, self.recipe)

    def after(self, model, test_rows) -> None:
        truncated_before = self.eval_task.n_truncated
        self.rows["fine_tuned"], self.probs["fine_tuned"] = evaluate(
            self.eval_task, model, test_rows, self.names, self.recipe.eval_batch_size, self.recipe.group_key)
        say(f"fine-tuned accuracy {self.rows['fine_tuned']['accuracy']:.4f}")
        self.test_truncated = self.eval_task.n_truncated - truncated_before

    def task_files(self) -> dict[str, str]:
        return {"task.json": _task_json(self.recipe, self.names)}

    def predict(self, model, texts) -> list[dict]:
        return predict_texts(self.eval_task, model, texts, self.names, self.recipe.eval_batch_size)

    def predictions(self, test_rows) -> list[dict]:
        return prediction_table(test_rows, self.probs, self.names, self.recipe.group_key)

    def summary(self, result, train_rows, test_rows) -> dict:
        return {"train": {**train_summary(result, len(train_rows)), "texts_truncated": self.task.n_truncated},
                "test": {"examples": len(test_rows), "texts_truncated": self.test_truncated,
                         "max_length": self.eval_task.max_length}}

    def label_names(self) -> list[str]:
        return self.names

    def finish(self, out: Path, metrics: dict) -> None:
        if self.recipe.group_key is not None:
            append_markdown(out, group_markdown(self.rows, self.recipe.group_key))


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


def fit_classifier(model, task, train_rows: Sequence[dict], recipe) -> FitResult:
    """train.fit on the task-encoded (text, label) rows, batched by length, with the recipe's TrainConfig."""
    encoded = [{"input_ids": task.encode(r["text"]), "label": int(r["label"])} for r in train_rows]
    return fit(model, encoded, recipe.train_config(), loss_fn=task.loss, collate_fn=task.collate,
               length_fn=lambda ex: len(ex["input_ids"]))


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
