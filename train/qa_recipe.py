"""The SQuAD v2 recipe: extractive QA that may abstain, zero-shot vs QLoRA fine-tuned, on a 2-core CPU.

    dev-v2.0.json (the only SQuAD 2.0 file offline) -- train.data splits it BY ARTICLE, seeded -->
        train articles -> a few held out for calibration (never trained on) | the rest: training questions
        test articles  -> a fixed sample of n_test questions, answerable share as in the split
    zero-shot (dense backbone) greedy answers on the test sample
    -> quant.quantize (NF4) -> lora.inject -> train.fit on packed contexts (GenerationTask.pack)
    -> scored greedy answers on the calibration slice -> abstain threshold -> the test sample
    -> metrics.json / results.md / predictions.csv / train_curves.png / adapter/ (+ qa_task.json)

How a 270M model (100M of it outside the embedding) can reach EM >= 0.55 on a CPU budget:
  * The target is short and exact: the span most annotators gave, or the fixed string "unanswerable";
    the loss covers those tokens and the end-of-turn token only.
  * Every prompt stays under `max_length` tokens. Only the context is cut: its head at test time; in
    training a window that keeps the answer, so no label points outside its prompt.
  * A paragraph's ~10 questions share one sequence (block mask, GenerationTask docstring), which trains
    on the same examples as one-by-one for about a third of the tokens: a whole epoch of the training
    articles fits the budget.
  * Abstaining is the decision SQuAD v2 rewards most (half the questions have no answer), and greedy
    decoding makes it badly calibrated. The span is decoded with the abstain token masked, and we abstain
    iff  margin = log p(abstain token) - log p(span)  >  tau,  tau maximising EM on the calibration articles
    (the official script's best-threshold search, moved to held-out TRAIN articles: the test sample
    never chooses anything). log p(span) is either the whole span's or its first token's; the calibration
    slice picks which.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from lora.atomic import atomic_write

from .distributed import say
from .loop import fit
from .memory import release_free_memory
from .metrics import squad_metrics
from .models import load_model
from .pipeline import Recipe, Task, run
from .qa_eval import (abstain_diagnostics, by_id, dequantized, greedy_em, prediction_rows, qa_metrics,
                      results_markdown, tune_threshold)
from .tasks import GenerationTask


@dataclass
class QARecipe(Recipe):
    """The shared settings (train.pipeline.Recipe) with QA's defaults, and the prompt / abstain ones."""
    model: str = "gemma3-270m"                    # registry name or a local HF folder
    system: str | None = "Answer from the context."   # short: SmolLM2's default system prompt is 20 tokens
    instruction: str = ("Answer with a short span copied from the context. If the context does not answer "
                        "the question, reply unanswerable.")
    unanswerable: str = "unanswerable"            # the abstain target
    max_length: int = 384                         # prompt tokens; ~4% of SQuAD contexts are cut to fit
    max_new_tokens: int = 24                      # answers are 5 tokens on average, 23 at the 99th percentile
    max_turns: int = 16                           # questions packed after one context (longer lists are split)
    n_test: int = 500                             # test questions (answerable share as in the test articles)
    n_calib: int = 600                            # calibration questions, from held-out train articles
    train_limit: int | None = None                # cap on training questions (None: every one left)
    train_minutes: float | None = None            # stop training after this long, as an interrupt would
    abstain: str = "calibrated"                   # "calibrated" (threshold) | "greedy"
    # training: batch_size counts packed contexts (~10 questions each)
    batch_size: int = 4
    lr: float = 5e-4                              # Gemma-3 on the calibration articles: EM 60.7 (3e-4: 58.3)
    eval_batch_size: int = 32

    def __post_init__(self):
        super().__post_init__()
        if self.abstain not in ("calibrated", "greedy"):
            raise ValueError(f"abstain must be 'calibrated' or 'greedy', got {self.abstain!r}")
        if self.n_test < 1 or self.n_calib < 1:
            raise ValueError(f"n_test and n_calib must be >= 1, got {self.n_test} and {self.n_calib}")
        if self.max_turns < 1:
            raise ValueError(f"max_turns must be >= 1, got {self.max_turns}")
        if self.export_merged:
            raise ValueError("export_merged is for the classification tasks; merge a QA adapter in Python with "
                             "lora.merge_and_unload")


# ----------------------------------------------------------------------------------------------------------
# data: samples, the calibration hold-out, packing

def proportional_sample(rows: Sequence[dict], n: int, seed: int = 0) -> list[dict]:
    """A seeded sample of n rows whose answerable share is the share in `rows` (rounded)."""
    if n > len(rows):
        raise ValueError(f"asked for {n} questions but there are only {len(rows)}; lower the sample size")
    has = [i for i, r in enumerate(rows) if not r["is_impossible"]]
    none = [i for i, r in enumerate(rows) if r["is_impossible"]]
    n_has = round(n * len(has) / len(rows))
    rng = np.random.default_rng(seed)
    picked = list(rng.choice(has, n_has, replace=False)) + list(rng.choice(none, n - n_has, replace=False))
    return [rows[i] for i in sorted(picked)]


def hold_out_articles(rows: Sequence[dict], n_questions: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(kept, held out): whole articles, in a seeded order, held out until they hold >= n_questions."""
    titles = sorted({r["title"] for r in rows})
    held, count = set(), 0
    for i in np.random.default_rng(seed).permutation(len(titles)):
        if count >= n_questions:
            break
        held.add(titles[i])
        count += sum(r["title"] == titles[i] for r in rows)
    if len(held) == len(titles):
        raise ValueError(f"holding out {n_questions} calibration questions would take every training article; "
                         "lower n_calib")
    return [r for r in rows if r["title"] not in held], [r for r in rows if r["title"] in held]


def pack_training_set(task: GenerationTask, rows: Sequence[dict], max_turns: int, seed: int = 0) -> list[dict]:
    """Questions grouped by context (in a seeded order, max_turns per group) -> packed sequences."""
    by_context: dict[str, list[dict]] = {}
    for r in rows:
        by_context.setdefault(r["context"], []).append(r)
    rng = np.random.default_rng(seed)
    packed = []
    for group in by_context.values():
        group = [group[i] for i in rng.permutation(len(group))]
        for s in range(0, len(group), max_turns):
            packed += task.pack(group[s: s + max_turns])
    return packed


# ----------------------------------------------------------------------------------------------------------
# scoring (train/qa_eval.py: the threshold, metrics, results.md)

def score(task: GenerationTask, model, rows: Sequence[dict], recipe: QARecipe) -> tuple[list[dict], float]:
    """GenerationTask.generate_scored on every row, and the seconds it took."""
    t0 = time.perf_counter()
    with dequantized(model):
        scored = task.generate_scored(model, rows, max_new_tokens=recipe.max_new_tokens,
                                      batch_size=recipe.eval_batch_size)
    release_free_memory()
    return scored, round(time.perf_counter() - t0, 1)


# ----------------------------------------------------------------------------------------------------------
# the run

def run_qa(recipe: QARecipe, train_rows: Sequence[dict], test_rows: Sequence[dict],
           new_examples: Sequence[dict] = (), split_note: str = "") -> dict:
    """Runs the whole recipe on SQuAD-v2-shaped rows; returns the metrics also written to out_dir/metrics.json.

    train_rows / test_rows: the two sides of an article-disjoint split (test_rows is sampled down to n_test).
    new_examples: {"context", "question"} pairs answered at the end with the fine-tuned model."""
    return run(QATask(recipe, split_note), train_rows, test_rows, new_examples)


class QATask(Task):
    """Extractive QA that may abstain: greedy spans, a calibrated abstain threshold (module docstring)."""

    new_key = "new_examples"

    def __init__(self, recipe: QARecipe, split_note: str = ""):
        super().__init__(recipe)
        self.split_note = split_note
        self.scored: dict[str, list] = {}
        self.seconds: dict[str, float] = {}
        self.answers: dict[str, list] = {}

    def split(self, train_rows, test_rows):
        self.fit_rows, self.calib_rows, test_rows = three_sides(self.recipe, train_rows, test_rows)
        return self.fit_rows, test_rows

    def load(self):
        r = self.recipe
        model, tokenizer = load_model(r.model, dtype=self.dtype, device=self.device)
        self.task = GenerationTask(tokenizer, instruction=r.instruction, system=r.system,
                                   max_length=r.max_length, unanswerable=r.unanswerable)
        return model, tokenizer

    def before(self, model, train_rows, test_rows) -> None:
        self.scored["zero_shot"], self.seconds["zero_shot"] = score(self.task, model, test_rows, self.recipe)
        self.test_cut = self.task.n_truncated
        self.answers["zero_shot"] = [self.task.decide(s) for s in self.scored["zero_shot"]]
        say(f"zero-shot EM {squad_metrics(by_id(test_rows, self.answers['zero_shot']), test_rows)['exact']:.2f} "
            f"({self.seconds['zero_shot']:.0f} s)")

    def fit(self, model, train_rows):
        self.result, self.packed, self.unpacked = train(self.recipe, model, self.task, train_rows)
        return self.result

    def after(self, model, test_rows) -> None:
        task, recipe = self.task, self.recipe
        self.scored["calibration"], self.seconds["calibration"] = score(task, model, self.calib_rows, recipe)
        self.tuned = calibrate(task, self.scored["calibration"], self.calib_rows)
        self.threshold = self.tuned["threshold"] if recipe.abstain == "calibrated" else None
        self.scored["fine_tuned"], self.seconds["fine_tuned"] = score(task, model, test_rows, recipe)
        self.answers["fine_tuned"] = [task.decide(s, self.threshold, self.tuned["by"])
                                      for s in self.scored["fine_tuned"]]
        self.answers["greedy"] = [task.decide(s) for s in self.scored["fine_tuned"]]
        self.rows = metric_rows(test_rows, self.answers["zero_shot"], self.answers["fine_tuned"],
                                self.answers["greedy"], self.seconds)

    def task_files(self) -> dict[str, str]:
        return {"qa_task.json": _task_json(self.recipe, self.tuned)}

    def predict(self, model, examples) -> list[dict]:
        return answer_new(self.task, model, examples, self.recipe, self.threshold, self.tuned["by"])

    def predictions(self, test_rows) -> list[dict]:
        return prediction_rows(test_rows, self.answers["zero_shot"], self.answers["fine_tuned"],
                               self.answers["greedy"], self.scored["fine_tuned"], self.tuned["by"])

    def summary(self, result, train_rows, test_rows) -> dict:
        return {
            "data": _data_summary(self.split_note, self.fit_rows, self.calib_rows, test_rows, self.packed,
                                  self.unpacked, self.test_cut),
            "train": _train_summary(result, self.packed),
            "abstain": {"mode": self.recipe.abstain, **self.tuned, "calibration_greedy_exact":
                        greedy_em(self.task, self.scored["calibration"], self.calib_rows),
                        "calibration_seconds": self.seconds["calibration"]},
            "diagnostics": abstain_diagnostics(self.scored["fine_tuned"], test_rows),
        }

    def finish(self, out: Path, metrics: dict) -> None:
        atomic_write(out / "results.md", results_markdown(self.rows, metrics, metrics["elapsed_s"]))


def calibrate(task: GenerationTask, scored: Sequence[dict], calib_rows: Sequence[dict]) -> dict:
    """tune_threshold on the calibration articles' scored answers, said with the greedy rule's EM beside it."""
    tuned = tune_threshold(scored, calib_rows)
    say(f"abstain threshold {tuned['threshold']:.3f} on log p(abstain) - log p({tuned['by']}): calibration EM "
        f"{tuned['exact']:.2f} (greedy {greedy_em(task, scored, calib_rows):.2f})")
    return tuned


def metric_rows(test_rows, zero_shot, fine_tuned, greedy, seconds: dict) -> dict[str, dict]:
    """The table's rows: zero-shot, fine-tuned (calibrated abstain), fine-tuned greedy, always abstain."""
    rows = {"zero_shot": qa_metrics(zero_shot, test_rows, seconds["zero_shot"]),
            "fine_tuned": qa_metrics(fine_tuned, test_rows, seconds["fine_tuned"]),
            "fine_tuned_greedy": qa_metrics(greedy, test_rows),
            "always_abstain": qa_metrics([""] * len(test_rows), test_rows)}
    say(f"fine-tuned EM {rows['fine_tuned']['exact']:.2f} F1 {rows['fine_tuned']['f1']:.2f} "
        f"(greedy abstain: EM {rows['fine_tuned_greedy']['exact']:.2f}; always abstain: "
        f"EM {rows['always_abstain']['exact']:.2f})")
    return rows


def _data_summary(split_note: str, fit_rows, calib_rows, test_rows, packed, unpacked: int, test_cut: int) -> dict:
    return {"split": split_note, "test_questions": len(test_rows),
            "test_answerable": sum(not r["is_impossible"] for r in test_rows),
            "calibration_articles": sorted({r["title"] for r in calib_rows}),
            "calibration_questions": len(calib_rows), "train_questions": len(fit_rows),
            "train_articles": len({r["title"] for r in fit_rows}), "packed_sequences": len(packed),
            "train_tokens": sum(len(p["input_ids"]) for p in packed), "unpacked_tokens": unpacked,
            "test_contexts_cut": test_cut}


def _train_summary(result, packed) -> dict:
    n_tokens = sum(len(p["input_ids"]) for p in packed)
    return {"steps": result.steps, "planned_steps": result.total_steps, "seconds": round(result.elapsed_s, 1),
            "input_tokens_per_s": round(n_tokens * result.epochs / max(result.elapsed_s, 1e-9), 1),
            "final_loss": result.final_loss, "stopped": result.stopped}


def three_sides(recipe: QARecipe, train_rows, test_rows) -> tuple[list[dict], list[dict], list[dict]]:
    """(training, calibration, test) rows: whole train articles held out for calibration, then samples."""
    fit_rows, calib_pool = hold_out_articles(train_rows, recipe.n_calib, recipe.seed)
    calib_rows = proportional_sample(calib_pool, min(recipe.n_calib, len(calib_pool)), recipe.seed)
    test_rows = proportional_sample(test_rows, min(recipe.n_test, len(test_rows)), recipe.seed)
    if recipe.train_limit is not None and recipe.train_limit < len(fit_rows):
        fit_rows = proportional_sample(fit_rows, recipe.train_limit, recipe.seed)
    _check_disjoint(fit_rows, calib_rows, test_rows)
    return fit_rows, calib_rows, test_rows


def train(recipe: QARecipe, model, task: GenerationTask, rows: Sequence[dict]):
    """train.fit on the packed questions; returns (FitResult, the packed sequences, tokens one by one)."""
    unpacked = sum(task.length(r) for r in rows)
    packed = pack_training_set(task, rows, recipe.max_turns, recipe.seed)
    say(f"{len(rows)} training questions packed into {len(packed)} sequences: "
        f"{sum(len(p['input_ids']) for p in packed):,} tokens ({unpacked:,} one by one)")
    config = recipe.train_config(batch_size=min(recipe.batch_size, len(packed)))
    loss_fn = _with_deadline(task.loss, recipe.train_minutes)
    result = fit(model, packed, config, loss_fn=loss_fn, collate_fn=task.collate,
                 length_fn=lambda ex: len(ex["input_ids"]))
    if result.stopped == "interrupted" and getattr(loss_fn, "deadline_reached", False):
        result.stopped = "train_minutes"
    model.eval()
    return result, packed, unpacked


def _with_deadline(loss_fn, minutes: float | None):
    """loss_fn that raises KeyboardInterrupt once `minutes` have passed since the first call.

    # Note: fit has no wall-clock limit, and an interrupt is its graceful stop (the half step is dropped,
    # the checkpoint, log and plot are written, FitResult.stopped == "interrupted"). On a shared 2-core
    # CPU the same run can take twice as long; the deadline keeps the recipe inside its time budget."""
    if minutes is None:
        return loss_fn
    deadline = None

    def timed(model, batch):
        nonlocal deadline
        deadline = deadline or time.perf_counter() + 60 * minutes
        if time.perf_counter() > deadline:
            say(f"train_minutes={minutes} reached: stopping training here")
            timed.deadline_reached = True
            raise KeyboardInterrupt
        return loss_fn(model, batch)
    return timed


def answer_new(task: GenerationTask, model, examples: Sequence[dict], recipe: QARecipe, threshold, by) -> list[dict]:
    """Answers (or abstains on) new {"context", "question"} pairs, printing each."""
    if not examples:
        return []
    scored, _ = score(task, model, examples, recipe)
    out = []
    for ex, s in zip(examples, scored):
        answer = task.decide(s, threshold, by)
        out.append({"question": ex["question"], "answer": answer or recipe.unanswerable,
                    "margin": round(s["logp_abstain"] - s[f"logp_{by}"], 3)})
        say(f"  Q: {ex['question']}\n  A: {out[-1]['answer']}  (margin {out[-1]['margin']:+.2f})")
    return out


# ----------------------------------------------------------------------------------------------------------
# helpers

def _check_disjoint(*parts: Sequence[dict]) -> None:
    """No article on two sides (train / calibration / test): the split's promise, checked at run time."""
    seen: dict[str, int] = {}
    for side, rows in enumerate(parts):
        for title in {r["title"] for r in rows}:
            if seen.setdefault(title, side) != side:
                raise ValueError(f"article {title!r} is on two sides of the split; use an article-disjoint split")


def _task_json(recipe: QARecipe, tuned: dict) -> str:
    """qa_task.json beside the adapter: the prompt and the abstain rule a reader needs to reuse it."""
    meta = {"model": recipe.model, "system": recipe.system, "instruction": recipe.instruction,
            "unanswerable": recipe.unanswerable, "max_length": recipe.max_length,
            "max_new_tokens": recipe.max_new_tokens, "abstain": recipe.abstain, "abstain_by": tuned["by"],
            "abstain_threshold": tuned["threshold"],
            "quant": {"blocksize": recipe.blocksize, "double_quant": recipe.double_quant}}
    return json.dumps(meta, indent=2) + "\n"
