"""The run report: metrics.json, results.md, predictions.csv and a confusion-matrix PNG per row.

`rows` maps a row name ("zero_shot", "few_shot_4", "fine_tuned", ...) to the dict that
`train.metrics.classification_metrics` (or `squad_metrics`) returned. metrics.json holds every row at the top
level (so `metrics["fine_tuned"]["accuracy"]` works), plus `elapsed_s`, `label_names` and `config`.
results.md is a table, one line per row: zero-shot first, then few-shot, then fine-tuned, then the rest.

Every file is written with lora.atomic (a temp file beside its target, fsynced, moved into place), so a reader
never sees half a report, and a kill leaves the previous one intact.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from lora.atomic import atomic_file, atomic_write

_CLASSIFICATION_COLUMNS = [("accuracy", "accuracy"), ("accuracy_ci95", "95% CI"), ("precision_macro", "macro P"),
                           ("recall_macro", "macro R"), ("f1_macro", "macro F1"), ("roc_auc", "AUC"), ("n", "n"),
                           ("n_unparsed", "unparsed")]
_SQUAD_COLUMNS = [("exact", "EM"), ("exact_ci95", "EM 95% CI"), ("f1", "F1"), ("has_ans_f1", "HasAns F1"),
                  ("no_ans_f1", "NoAns F1"), ("rouge_l", "ROUGE-L"), ("n", "n")]


def write_report(out_dir: str | os.PathLike, *, rows: dict[str, dict], predictions: Sequence[dict] = (),
                 label_names: Sequence[str] = (), config=None, elapsed: float | None = None,
                 extra: dict | None = None) -> Path:
    """Writes the four kinds of file into out_dir (created if needed) and returns its path.

    `extra` entries (training stats, memory, parameter counts) go at the top level of metrics.json."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = ordered_rows(rows)
    summary = {**{n: rows[n] for n in names},
               "elapsed_s": None if elapsed is None else round(float(elapsed), 2),
               "label_names": list(label_names), **(extra or {}), "config": _plain(config)}
    atomic_write(out / "metrics.json", json.dumps(_plain(summary), indent=2, default=str) + "\n")
    atomic_write(out / "results.md", results_markdown(rows, label_names, elapsed))
    if predictions:
        atomic_write(out / "predictions.csv", _csv(predictions))
    for name in names:
        if "confusion_matrix" in rows[name]:
            plot_confusion(rows[name], out / f"confusion_{name}.png", title=name.replace("_", " "))
    return out


def ordered_rows(rows: dict) -> list[str]:
    """zero_shot, few_shot*, fine_tuned, then the rest in their given order."""
    def rank(name: str) -> int:
        return 0 if name == "zero_shot" else 1 if name.startswith("few_shot") else 2 if name == "fine_tuned" else 3
    return sorted(rows, key=rank)  # sorted() is stable: ties keep the caller's order


def results_markdown(rows: dict[str, dict], label_names: Sequence[str] = (), elapsed: float | None = None) -> str:
    names = ordered_rows(rows)
    squad = bool(names) and all("exact" in rows[n] for n in names)
    columns = _SQUAD_COLUMNS if squad else _CLASSIFICATION_COLUMNS
    lines = ["# Results", "", "| row | " + " | ".join(t for _, t in columns) + " |",
             "|---|" + "---:|" * len(columns)]
    for n in names:
        lines.append(f"| {n.replace('_', '-')} | " + " | ".join(_fmt(rows[n].get(k)) for k, _ in columns) + " |")
    if not squad and label_names:
        lines += ["", "Per-class F1:", "", "| row | " + " | ".join(label_names) + " |",
                  "|---|" + "---:|" * len(label_names)]
        for n in names:
            per = rows[n].get("per_class", {})
            lines.append(f"| {n.replace('_', '-')} | "
                         + " | ".join(_fmt(per.get(c, {}).get("f1")) for c in label_names) + " |")
    if elapsed is not None:
        lines += ["", f"Run time: {elapsed:.1f} s"]
    return "\n".join(lines) + "\n"


def plot_confusion(metrics: dict, path: Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = np.asarray(metrics["confusion_matrix"])  # (C, C) or (C, C + 1) with a "none" column
    labels = metrics.get("confusion_matrix_labels", {})
    rows = labels.get("rows", [str(i) for i in range(cm.shape[0])])
    cols = labels.get("columns", [str(i) for i in range(cm.shape[1])])
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * cm.shape[1], 1.0 + 0.9 * cm.shape[0]))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(cols)), cols, rotation=30, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for (i, j), v in np.ndenumerate(cm):
        ax.text(j, i, str(v), ha="center", va="center", color="white" if v > cm.max() / 2 else "black")
    acc = metrics.get("accuracy")
    ax.set_title(f"{title} (acc {acc:.3f})" if acc is not None else title)
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------------
# helpers

def _fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) <= 1 else f"{v:.2f}"
    if isinstance(v, (list, tuple)):                 # an interval
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    return str(v)


def _plain(obj):
    """JSON-ready: dataclasses to dicts, numpy scalars/arrays to Python, Paths/dtypes to str (via default=)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return _plain(dataclasses.asdict(obj))
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def _csv(records: Sequence[dict]) -> str:
    fields: list[str] = []
    for r in records:
        fields += [k for k in r if k not in fields]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(records)
    return buf.getvalue()
