"""Evaluation metrics: classification (through scikit-learn) and SQuAD v2 (the official rules, from scratch).

Classification. `classification_metrics(y_true, probs_or_preds, label_names)` takes either probabilities
(N, C) -- the prediction is the argmax and ROC-AUC is computed from them -- or hard predictions (N,), ints
or label names. A prediction that could not be parsed into a label (-1, None, or an unknown string) is
never dropped: it counts as wrong, under the extra confusion-matrix column "none", and in `n_unparsed`.
Macro averages are over the C real classes only, so a "none" prediction lowers the recall of its true
class and the precision of no class.

    accuracy          = mean(pred == true), with its 95% Wilson score interval (`accuracy_ci95`)
    per-class acc.    = recall of that class = TP_c / support_c
    ROC-AUC           = binary: AUC of p(class 1); C >= 3: one-vs-rest, macro; None when a class is absent

SQuAD v2. `squad_metrics(predictions, references)` follows the official evaluate-v2.0.py: normalise
(lower-case, drop punctuation, drop the articles a/an/the, collapse whitespace), exact match and token F1
maximised over the gold answers; an unanswerable question has the single gold answer "" so only an empty
prediction (abstaining) scores on it. Scores are percentages (0-100) like the official script. ROUGE-L is the
LCS F-measure over the same normalised tokens. A question missing from `predictions` counts as an abstention.
`exact_ci95` is EM's 95% Wilson interval.

Why the intervals: a test set of 872 or 1,000 rows measures accuracy to about +-2 points (95%), which is the
size of the gaps between many runs and their targets; the interval says how far a number can be trusted.
Wilson's score interval (the p0 with |p_hat - p0| <= z * sqrt(p0 (1 - p0) / n)) keeps its coverage near 0
and 1, where the textbook p_hat +- z * sqrt(p_hat (1 - p_hat) / n) collapses to a point; scipy computes it
(`binomtest(k, n).proportion_ci(method="wilson")`).
"""
from __future__ import annotations

import collections
import math
import re
import string
from typing import Iterable, Mapping, Sequence

import numpy as np

NONE = "none"  # the name of the "could not be parsed" prediction


# ----------------------------------------------------------------------------------------------------------
# classification

def parse_predictions(preds, label_names: Sequence[str]) -> np.ndarray:
    """Hard predictions (ints or label names) -> int array, -1 for anything that is not a label."""
    index = {str(n).lower(): i for i, n in enumerate(label_names)}
    out = np.full(len(preds), -1, dtype=np.int64)
    for i, p in enumerate(preds):
        if p is None:
            continue
        if isinstance(p, str):
            out[i] = index.get(p.strip().lower(), -1)
        elif 0 <= int(p) < len(label_names):
            out[i] = int(p)
    return out


def classification_metrics(y_true, probs_or_preds, label_names: Sequence[str]) -> dict:
    """Accuracy, per-class and macro P/R/F1, ROC-AUC, confusion matrix; see the module docstring."""
    names = [str(n) for n in label_names]
    n_classes = len(names)
    y = np.asarray(y_true, dtype=np.int64)
    if y.ndim != 1 or len(y) == 0:
        raise ValueError(f"y_true must be a non-empty 1-D sequence of class ids, got shape {y.shape}")
    if y.min() < 0 or y.max() >= n_classes:
        raise ValueError(f"y_true has ids outside 0..{n_classes - 1} (label_names={names})")
    probs = None
    arr = np.asarray(probs_or_preds, dtype=object if _has_str(probs_or_preds) else None)
    if arr.ndim == 2:
        if arr.shape != (len(y), n_classes):
            raise ValueError(f"probabilities must be (N, C) = ({len(y)}, {n_classes}), got {arr.shape}")
        probs = arr.astype(np.float64)
        pred = probs.argmax(axis=1)
    else:
        if len(arr) != len(y):
            raise ValueError(f"{len(arr)} predictions for {len(y)} labels")
        pred = parse_predictions(list(arr), names)
    return _metrics_from(y, pred, probs, names)


def _has_str(x) -> bool:
    return isinstance(x, (list, tuple)) and any(isinstance(v, str) or v is None for v in x)


def _metrics_from(y: np.ndarray, pred: np.ndarray, probs: np.ndarray | None, names: list[str]) -> dict:
    # Note: sklearn is imported here, not at the top: it pulls scipy, pandas and pyarrow, ~146 MB of RSS that a
    # process importing `train` to train (the benchmarks, a user's own loop) would carry for nothing.
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    labels = list(range(len(names)))
    p, r, f, support = precision_recall_fscore_support(y, pred, labels=labels, average=None, zero_division=0)
    n_unparsed = int((pred < 0).sum())
    correct = int((pred == y).sum())
    cm_labels = labels + ([-1] if n_unparsed else [])
    cm = confusion_matrix(y, pred, labels=cm_labels)[: len(names)]  # rows: true classes only
    per_class = {n: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(support[i])}
                 for i, n in enumerate(names)}
    return {
        "n": int(len(y)),
        "n_unparsed": n_unparsed,
        "accuracy": correct / len(y),
        "accuracy_ci95": list(wilson_interval(correct, len(y))),
        "per_class_accuracy": {n: float(r[i]) for i, n in enumerate(names)},
        "precision_macro": float(p.mean()),
        "recall_macro": float(r.mean()),
        "f1_macro": float(f.mean()),
        "per_class": per_class,
        "roc_auc": _roc_auc(y, probs, len(names)),
        "confusion_matrix": cm.tolist(),
        "confusion_matrix_labels": {"rows": names, "columns": names + ([NONE] if n_unparsed else [])},
        "label_names": names,
    }


def wilson_interval(successes: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """The Wilson score interval of successes / n (z: the normal 97.5% quantile, a 95% interval), by scipy;
    see the module docstring. Exactly 0 (1) at its lower (upper) end when successes is 0 (n)."""
    if n <= 0 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n and n > 0, got successes={successes}, n={n}")
    from scipy.stats import binomtest   # lazily, as sklearn in _metrics_from: a heavy import

    level = math.erf(z / math.sqrt(2))  # the two-sided confidence of +-z: exactly 0.95 for the default z
    ci = binomtest(successes, n).proportion_ci(confidence_level=level, method="wilson")
    return float(ci.low), float(ci.high)


def _roc_auc(y: np.ndarray, probs: np.ndarray | None, n_classes: int) -> float | None:
    if probs is None or len(np.unique(y)) < n_classes:
        return None
    from sklearn.metrics import roc_auc_score

    if n_classes == 2:
        return float(roc_auc_score(y, probs[:, 1]))
    probs = probs / probs.sum(axis=1, keepdims=True)  # sklearn's ovr wants rows that sum to 1
    return float(roc_auc_score(y, probs, multi_class="ovr", average="macro", labels=list(range(n_classes))))


# ----------------------------------------------------------------------------------------------------------
# SQuAD v2

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCT = set(string.punctuation)


def normalize_answer(s: str) -> str:
    """The official SQuAD normalisation: lower, drop punctuation, drop articles, collapse whitespace."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCT)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def _tokens(s: str) -> list[str]:
    return normalize_answer(s).split() if s else []


def exact_match(prediction: str, gold: str) -> int:
    return int(normalize_answer(prediction) == normalize_answer(gold))


def token_f1(prediction: str, gold: str) -> float:
    pred, ref = _tokens(prediction), _tokens(gold)
    if not pred or not ref:  # an empty side scores only against an empty side (abstaining on "no answer")
        return float(pred == ref)
    common = collections.Counter(pred) & collections.Counter(ref)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


def rouge_l(prediction: str, gold: str) -> float:
    """LCS-based F-measure (beta = 1) over normalised tokens."""
    pred, ref = _tokens(prediction), _tokens(gold)
    if not pred or not ref:
        return float(pred == ref)
    lcs = _lcs_length(pred, ref)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def _lcs_length(a: list[str], b: list[str]) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def _gold_answers(references) -> dict[str, list[str]]:
    """{id: answers} from a mapping id -> answers or from rows with "id" and "answers"."""
    if isinstance(references, Mapping):
        items: Iterable = references.items()
    else:
        items = ((r["id"], r["answers"]) for r in references)
    gold = {}
    for qid, answers in items:
        if isinstance(answers, Mapping):  # the hub layout {"text": [...], "answer_start": [...]}
            answers = answers["text"]
        answers = [a for a in answers if normalize_answer(a)]
        gold[qid] = answers or [""]  # unanswerable: the only gold answer is the empty string
    return gold


def squad_metrics(predictions: Mapping[str, str], references) -> dict:
    """exact, f1, has_ans_*, no_ans_* (None when there are no such questions), rouge_l, n; in percent."""
    gold = _gold_answers(references)
    if not gold:
        raise ValueError("no references given")
    em, f1, rl, has_ans = [], [], [], []
    for qid, answers in gold.items():
        pred = predictions.get(qid) or ""
        em.append(max(exact_match(pred, a) for a in answers))
        f1.append(max(token_f1(pred, a) for a in answers))
        rl.append(max(rouge_l(pred, a) for a in answers))
        has_ans.append(answers != [""])
    em, f1, rl, has = (np.asarray(v, dtype=np.float64) for v in (em, f1, rl, has_ans))
    has = has.astype(bool)
    return {
        "exact": _pct(em), "exact_ci95": [100.0 * v for v in wilson_interval(int(em.sum()), len(em))],
        "f1": _pct(f1),
        "has_ans_exact": _pct(em[has]), "has_ans_f1": _pct(f1[has]),
        "no_ans_exact": _pct(em[~has]), "no_ans_f1": _pct(f1[~has]),
        "rouge_l": _pct(rl), "n": int(len(em)), "n_has_ans": int(has.sum()), "n_no_ans": int((~has).sum()),
    }


def _pct(x: np.ndarray) -> float | None:
    return None if len(x) == 0 else float(100.0 * x.mean())
