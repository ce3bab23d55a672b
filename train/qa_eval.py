"""Evaluating the SQuAD v2 recipe: fast scored decoding, the abstain threshold, metrics, and results.md.

    dequantized          inference with each NF4 weight dequantized once, not at every decoding step
    tune_threshold       abstain iff  log p(abstain) - log p(span or first token)  >  tau, the (by, tau) that
                         maximise EM (then F1) on the calibration rows: the official best-threshold search
    abstain_diagnostics  the span's quality and the abstain decision's, each on its own (the oracle is a bound)
    qa_metrics           squad_metrics + the abstention rate and the evaluation time, one table row
    results_markdown     results.md: every row's EM / F1 / HasAns / NoAns, then how the numbers were made
"""
from __future__ import annotations

import contextlib
from typing import Sequence

import numpy as np
import torch
from torch import nn

import quant
from quant import cpu_matmul

from .metrics import exact_match, squad_metrics, token_f1
from .tasks import GenerationTask


class _Dequantized(nn.Module):
    """A Linear4bit's forward with the dequantized weight cached: the same matmul on the same numbers (in the
    dtype the layer multiplies in: `quant.cpu_matmul.matmul_dtype`)."""

    def __init__(self, layer: quant.Linear4bit):
        super().__init__()
        self.dtype = layer.compute_dtype
        self.weight = layer.dequantize(cpu_matmul.matmul_dtype_for(self.dtype, layer.weight.device))  # (out, in)
        self.bias = None if layer.bias is None else layer.bias.to(self.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return cpu_matmul.dense_linear(x.to(self.dtype), self.weight, self.bias).to(x.dtype)


@contextlib.contextmanager
def dequantized(model: nn.Module):
    """Inference with every Linear4bit's weight dequantized once instead of at every call.

    # Note: Linear4bit.forward is F.linear(x, dequantize(W)) in its matmul dtype, so caching the dequantized
    # weight changes no number; it saves one dequantization of every layer per decoding step (24 steps per
    # batch), the dominant cost of generating on a CPU. It costs a dense copy of the base (2 bytes/param
    # in bf16) for the duration, and is for no_grad inference only: the training path stays 4-bit."""
    swapped = []
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, quant.Linear4bit) and child.compute_dtype is not None:
                setattr(module, child_name, _Dequantized(child))
                swapped.append((module, child_name, child))
    try:
        yield model
    finally:
        for module, child_name, child in swapped:
            setattr(module, child_name, child)


def tune_threshold(scored: Sequence[dict], rows: Sequence[dict]) -> dict:
    """The (by, threshold) that maximise EM (then F1) on `rows` when abstaining iff margin > threshold."""
    gold = [[a for a in r["answers"] if a.strip()] for r in rows]
    em = np.array([max((exact_match(s["answer"], a) for a in g), default=0) for s, g in zip(scored, gold)])
    f1 = np.array([max((token_f1(s["answer"], a) for a in g), default=0.0) for s, g in zip(scored, gold)])
    no_answer = np.array([not g for g in gold], dtype=np.float64)  # what abstaining scores, EM and F1 alike
    best = None
    for by in ("answer", "first"):
        margin = np.array([s["logp_abstain"] - s[f"logp_{by}"] for s in scored])
        cuts = np.unique(margin)
        candidates = np.concatenate([[cuts[0] - 1.0], (cuts[1:] + cuts[:-1]) / 2, [cuts[-1] + 1.0]])
        abstains = margin[None, :] > candidates[:, None]                               # (K, N)
        em_k = np.where(abstains, no_answer, em).mean(1)                               # (K,)
        f1_k = np.where(abstains, no_answer, f1).mean(1)
        top = np.flatnonzero((em_k == em_k.max()) & (f1_k == f1_k[em_k == em_k.max()].max()))
        k = top[len(top) // 2]                                                         # middle of a plateau
        found = {"by": by, "threshold": float(candidates[k]), "exact": 100 * float(em_k[k]),
                 "f1": 100 * float(f1_k[k])}
        if best is None or (found["exact"], found["f1"]) > (best["exact"], best["f1"]):
            best = found
    return best


def abstain_diagnostics(scored: Sequence[dict], rows: Sequence[dict]) -> dict:
    """Where the errors are: the answer and the abstain decision, each on its own, on `rows` (the test sample).

    span_exact / span_f1   the span (decoded with the abstain token masked) on the ANSWERABLE questions, as if
                           the model never abstained: how good the answers are
    abstain_auc            ROC AUC of each margin (log p(abstain) - log p(span or first token)) as a detector of
                           the unanswerable questions: how good the abstain decision can be (0.5 = chance)
    oracle                 tune_threshold on these very rows: the best EM any threshold reaches here, an upper
                           bound for reading the results, never a result (the recipe's threshold comes from
                           the calibration articles)
    """
    from sklearn.metrics import roc_auc_score   # lazily, as in train.metrics (scipy + pandas: ~146 MB of RSS)

    answerable = [(s, r) for s, r in zip(scored, rows) if not r["is_impossible"]]
    gold = [[a for a in r["answers"] if a.strip()] for _, r in answerable]
    em = [max(exact_match(s["answer"], a) for a in g) for (s, _), g in zip(answerable, gold)]
    f1 = [max(token_f1(s["answer"], a) for a in g) for (s, _), g in zip(answerable, gold)]
    impossible = [r["is_impossible"] for r in rows]
    auc = {}
    for by in ("answer", "first"):
        margin = [s["logp_abstain"] - s[f"logp_{by}"] for s in scored]
        auc[by] = float(roc_auc_score(impossible, margin)) if 0 < sum(impossible) < len(rows) else None
    return {"span_exact": 100 * float(np.mean(em)) if em else None,
            "span_f1": 100 * float(np.mean(f1)) if f1 else None,
            "abstain_auc": auc, "oracle": tune_threshold(scored, rows)}


def qa_metrics(predictions: Sequence[str], rows: Sequence[dict], seconds: float | None = None) -> dict:
    """squad_metrics plus the abstention rate and the evaluation time."""
    m = squad_metrics({r["id"]: p for r, p in zip(rows, predictions)}, rows)
    m["abstain_rate"] = round(float(np.mean([p == "" for p in predictions])), 4)
    if seconds is not None:
        m["eval_seconds"] = seconds
    return m


def prediction_rows(test_rows, zero_shot, fine_tuned, greedy, scored, by) -> list[dict]:
    return [{"id": r["id"], "question": r["question"], "gold_answers": " | ".join(r["answers"]),
             "is_impossible": r["is_impossible"], "zero_shot_pred": z, "fine_tuned_pred": f,
             "fine_tuned_greedy_pred": g, "fine_tuned_span": s["answer"],
             "abstain_margin": round(s["logp_abstain"] - s[f"logp_{by}"], 4)}
            for r, z, f, g, s in zip(test_rows, zero_shot, fine_tuned, greedy, scored)]


def results_markdown(rows: dict, summary: dict, elapsed: float) -> str:
    """The table of every row (EM/F1 overall, answerable, unanswerable), then how the numbers were made."""
    data, train, ab = summary["data"], summary["train"], summary["abstain"]
    lines = ["# SQuAD 2.0: zero-shot vs QLoRA fine-tuned", "",
             f"Test: {data['test_questions']} questions ({data['test_answerable']} answerable, "
             f"{data['test_questions'] - data['test_answerable']} unanswerable) from test ARTICLES only. "
             f"{data['split']}", "",
             "| row | EM | F1 | HasAns EM | HasAns F1 | NoAns EM | ROUGE-L | abstains |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, m in rows.items():
        cells = [m["exact"], m["f1"], m["has_ans_exact"], m["has_ans_f1"], m["no_ans_exact"], m["rouge_l"]]
        lines.append(f"| {name.replace('_', '-')} | " + " | ".join("–" if c is None else f"{c:.2f}" for c in cells)
                     + f" | {100 * m['abstain_rate']:.1f}% |")
    lines += ["", "Scores in percent, official SQuAD v2 normalisation (EM 55.00 = 0.550). fine-tuned abstains "
              f"iff log p(abstain) - log p({ab['by']}) > {ab['threshold']:.3f}, the threshold tuned on "
              f"{data['calibration_questions']} questions of held-out TRAIN articles "
              f"({', '.join(data['calibration_articles'])}; EM there {ab['exact']:.2f}, greedy "
              f"{ab['calibration_greedy_exact']:.2f}); fine-tuned-greedy abstains iff the abstain token is the "
              "argmax.", "",
              _diagnostics_markdown(summary["diagnostics"], data["test_answerable"]), "",
              f"Training: {data['train_questions']} questions of {data['train_articles']} articles, packed into "
              f"{data['packed_sequences']} sequences ({data['train_tokens']:,} tokens), {_steps_done(train)} in "
              f"{train['seconds']:.0f} s ({train['input_tokens_per_s']:.0f} tokens/s), final loss "
              f"{train['final_loss'] if train['final_loss'] is None else round(train['final_loss'], 4)}.",
              f"Evaluation: zero-shot {rows['zero_shot'].get('eval_seconds', 0):.0f} s, calibration "
              f"{ab['calibration_seconds']:.0f} s, fine-tuned {rows['fine_tuned'].get('eval_seconds', 0):.0f} s. "
              f"Run time: {elapsed:.0f} s ({elapsed / 60:.1f} min).", ""]
    return "\n".join(lines)


def _steps_done(train: dict) -> str:
    """'N steps', or 'N of M steps (why)' when training stopped before the M it was planned for."""
    done, planned, stopped = train["steps"], train.get("planned_steps"), train.get("stopped")
    if stopped is None or not planned or done >= planned:
        return f"{done} steps"
    why = {"train_minutes": "stopped by the train_minutes guard", "nan": "stopped at a NaN loss"}.get(stopped, stopped)
    return f"{done} of {planned} steps ({why})"


def _diagnostics_markdown(d: dict, n_answerable: int) -> str:
    if d["span_exact"] is None:
        return "Diagnostics: no answerable question in the test sample."
    auc = ", ".join(f"{v:.3f} by {k}" for k, v in d["abstain_auc"].items() if v is not None) or "–"
    return (f"Diagnostics (fine-tuned, test sample): the span it would give is right on {d['span_exact']:.1f}% of "
            f"the {n_answerable} answerable questions (F1 {d['span_f1']:.1f}) if it never abstained; its abstain "
            f"margin tells unanswerable from answerable at ROC AUC {auc} (0.5 = chance); the best threshold "
            f"chosen on the test sample itself would give EM {d['oracle']['exact']:.2f} (an upper bound, not a "
            "result).")


def by_id(rows: Sequence[dict], predictions: Sequence[str]) -> dict[str, str]:
    return {r["id"]: p for r, p in zip(rows, predictions)}


def greedy_em(task: GenerationTask, scored: Sequence[dict], rows: Sequence[dict]) -> float:
    return squad_metrics(by_id(rows, [task.decide(s) for s in scored]), rows)["exact"]
