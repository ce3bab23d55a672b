"""The run's record: one JSON line per logged step (tail -f friendly), CSVs and a PNG of the curves at the end.

    out_dir/train_log.jsonl   {"kind": "train", "step", "epoch", "loss" (this step's), "loss_mean" (over the
                               steps since the last row), "lr", "grad_norm", "tokens_per_s", "elapsed_s",
                               ...loss_fn stats}  and  {"kind": "eval", "step", ...eval_fn metrics}
    out_dir/train_log.csv     the train rows, fixed columns first
    out_dir/eval_log.csv      the eval rows (columns: step, epoch, then the metric names)
    out_dir/train_curves.png  loss, learning rate and gradient norm against step (eval loss too, if present)
    out_dir/tensorboard/      the same scalars, when asked for (needs the `tensorboard` package)

The JSONL is appended as the run goes; the CSVs and the PNG are rewritten from the rows in memory by `finish()`,
which the loop calls at the end, on NaN and on Ctrl-C. On resume, `RunLog(..., rows=...)` rewrites the JSONL
from the checkpoint's rows, so the files never show steps the resumed run will redo.
Only rank 0 writes: other ranks get a RunLog with `enabled=False`.
"""
from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path

from lora.atomic import atomic_file

TRAIN_COLUMNS = ["step", "epoch", "loss", "loss_mean", "lr", "grad_norm", "tokens_per_s", "elapsed_s"]


class RunLog:
    def __init__(self, out_dir: str | os.PathLike, *, enabled: bool = True, rows: list[dict] = (),
                 tensorboard: bool = False):
        self.out_dir = Path(out_dir)
        self.enabled = enabled
        self.rows: list[dict] = [dict(r) for r in rows]
        self.tb = _tensorboard_writer(self.out_dir / "tensorboard") if enabled and tensorboard else None
        if enabled:
            with open(self.out_dir / "train_log.jsonl", "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in self.rows)

    def log(self, kind: str, row: dict) -> None:
        """Appends {"kind": kind, **row} to memory and to train_log.jsonl."""
        row = {"kind": kind, **row}
        self.rows.append(row)
        if not self.enabled:
            return
        with open(self.out_dir / "train_log.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for key, value in row.items():
                if key not in ("kind", "step") and isinstance(value, (int, float)):
                    self.tb.add_scalar(f"{kind}/{key}", value, row["step"])

    def train_rows(self) -> list[dict]:
        return [{k: v for k, v in r.items() if k != "kind"} for r in self.rows if r["kind"] == "train"]

    def eval_rows(self) -> list[dict]:
        return [{k: v for k, v in r.items() if k != "kind"} for r in self.rows if r["kind"] == "eval"]

    def finish(self) -> None:
        """Writes train_log.csv, eval_log.csv and train_curves.png from the rows so far."""
        if not self.enabled:
            return
        train, evals = self.train_rows(), self.eval_rows()
        _write_csv(self.out_dir / "train_log.csv", train, TRAIN_COLUMNS)
        if evals:
            _write_csv(self.out_dir / "eval_log.csv", evals, ["step", "epoch"])
        plot_curves(train, evals, self.out_dir / "train_curves.png")
        if self.tb is not None:
            self.tb.flush()


def _write_csv(path: Path, rows: list[dict], first: list[str]) -> None:
    """Columns: `first`, then every other key in order of appearance; missing cells stay empty."""
    columns = list(first)
    for row in rows:
        columns += [k for k in row if k not in columns]
    with atomic_file(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(rows)


def plot_curves(train: list[dict], evals: list[dict], path: str | os.PathLike) -> None:
    """Three panels against step: loss (train, and eval loss if logged), learning rate, gradient norm."""
    import matplotlib
    matplotlib.use("Agg")                   # no display on servers; must precede pyplot
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in train]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].plot(steps, [r["loss"] for r in train], alpha=0.35, label="train (logged step)")
    means = [(r["step"], r["loss_mean"]) for r in train if _is_number(r.get("loss_mean"))]
    if means:
        axes[0].plot(*zip(*means), label="train (mean since the last point)")
    eval_loss = [(r["step"], r["loss"]) for r in evals if _is_number(r.get("loss"))]
    if eval_loss:
        axes[0].plot(*zip(*eval_loss), "o-", label="eval")
    axes[0].legend()
    axes[1].plot(steps, [r["lr"] for r in train])
    axes[2].plot(steps, [r["grad_norm"] for r in train])
    for ax, title in zip(axes, ("loss", "learning rate", "gradient norm (before clipping)")):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _tensorboard_writer(log_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise ValueError("tensorboard=True needs the tensorboard package: pip install tensorboard, "
                         "or set tensorboard=False (the JSONL/CSV/PNG logs are always written)") from e
    return SummaryWriter(log_dir=str(log_dir))
