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

Targets: the default names BERT's linears (query/key/value/dense: attention, FFN and pooler). An encoder that
names them otherwise (MPNet: attn.q/k/v/o, intermediate.dense, output.dense) gets "all-linear" instead, the same
layers with the head left out (`encoder_targets`). A head with linears of its own (MPNet's and RoBERTa's
classifier: dense + out_proj) stays dense: quant.quantize's skip names each of them (`head_skip`).

An encoder has no verbalizer: the head is new, so the score of class c is the head's logit c and the loss
is the cross-entropy of model(...).logits (train.SequenceClassificationTask). The prompt-less encoder also
has no k-shot row.

Peak memory is the process's high-water RSS (train.recipe.peak_rss_mb: VmHWM, else ru_maxrss), the most it
ever held, so comparing two modes needs two processes (examples/sst2_encoder.py runs the full fine-tune in a
child process); `add_comparison` folds the child's numbers into this run's report.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

import lora
import quant

from .devices import pick_dtype
from .distributed import say
from .models import load_model
from .pipeline import Recipe, Task, export_merged, run, train_summary
from .recipe import append_markdown, evaluate, fit_classifier, predict_texts, prediction_table
from .report import write_report
from .tasks import SequenceClassificationTask

MODES = ("qlora", "lora", "full")
BERT_TARGETS = ("query", "key", "value", "dense")


@dataclass
class EncoderRecipe(Recipe):
    """The shared settings (train.pipeline.Recipe) with an encoder's defaults, and the mode."""
    model: str = "minilm-l6"                      # registry name or a local HF folder (a BERT-like encoder)
    mode: str = "qlora"                           # "qlora" (NF4 base + LoRA) | "lora" (dense base) | "full"
    max_length: int = 128                         # tokens with [CLS] and [SEP]; longer texts keep the head
    targets: str | Sequence[str] = BERT_TARGETS  # attention, FFN and pooler linears (see encoder_targets)
    adapter_compute: str = "fp32"                 # the base is fp32: adapters compute in it
    modules_to_save: Sequence[str] = ("classifier",)                    # the new head trains in full
    dtype: str = "fp32"                           # the frozen base's dtype; "full" always trains in fp32
    nf4_compute: str = "auto"                     # qlora: the NF4 matmuls' dtype ("auto": bf16 where the CPU/GPU
                                                  # runs it fast); norms, adapters and head stay in `dtype`
    batch_size: int = 32
    lr: float = 1e-3                              # adapters; a full fine-tune wants ~1e-4
    warmup_ratio: float = 0.06
    eval_batch_size: int = 128
    columns: dict | None = None                   # {"text", "label"}: the user's column names (task.json)

    def __post_init__(self):
        super().__post_init__()
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
        device = next(model.parameters()).device
        quant.quantize(model, compute_dtype=pick_dtype(recipe.nf4_compute, device), **recipe.quant_options(),
                       skip=head_skip(model, recipe.modules_to_save))
    options = {**recipe.lora_options(), "targets": encoder_targets(model, recipe.targets)}
    return lora.inject(model, **options, modules_to_save=list(recipe.modules_to_save))


def encoder_targets(model, targets):
    """`targets`, unless they are the default BERT names and `model` lacks one of them: then "all-linear".

    For MPNet that is attn.q/k/v/o + intermediate/output.dense, the layers BERT's names select there (its
    ForSequenceClassification has no pooler); the classifier is left to modules_to_save. A model that has the
    BERT names (MiniLM) keeps exactly the list, so its adapters, their order and seeded init are unchanged."""
    if isinstance(targets, str) or list(targets) != list(BERT_TARGETS):
        return targets
    leaves = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    return targets if set(BERT_TARGETS) <= leaves else "all-linear"


def head_skip(model, modules_to_save) -> tuple[str, ...]:
    """quant.quantize's `skip` that keeps the trained-in-full head dense: its names, and the full name of every
    linear inside it (skip matches names and name suffixes; MPNet's classifier is .dense + .out_proj)."""
    names = dict(model.named_modules())
    heads = [n for n in names for key in modules_to_save if n == key or n.endswith("." + key)]
    inner = [n for n, m in names.items()
             if isinstance(m, torch.nn.Linear) and any(n.startswith(h + ".") for h in heads)]
    return (*modules_to_save, *inner)


def run_encoder(recipe: EncoderRecipe, train_rows: Sequence[dict], test_rows: Sequence[dict],
                label_names: Sequence[str], new_texts: Sequence[str] = ()) -> dict:
    """Runs the whole recipe and returns the metrics dict that is also written to out_dir/metrics.json."""
    return run(EncoderTask(recipe, label_names), train_rows, test_rows, new_texts)


class EncoderTask(Task):
    """An encoder with a new head: the head's logits are the class scores (train.SequenceClassificationTask)."""

    def __init__(self, recipe: EncoderRecipe, label_names: Sequence[str]):
        super().__init__(recipe)
        self.quantized = recipe.mode == "qlora"
        if recipe.mode == "full":
            self.dtype = torch.float32
        self.names = list(label_names)
        self.probs: dict = {}

    def load(self):
        model, tokenizer = load_model(self.recipe.model, dtype=self.dtype, kind="sequence-classification",
                                      num_labels=len(self.names), device=self.device)
        self.task = SequenceClassificationTask(tokenizer, len(self.names), max_length=self.recipe.max_length)
        return model, tokenizer

    def before(self, model, train_rows, test_rows) -> None:
        self.rows["zero_shot"], self.probs["zero_shot"] = evaluate(self.task, model, test_rows, self.names,
                                                                   self.recipe.eval_batch_size)
        say(f"untrained head ('zero-shot') accuracy {self.rows['zero_shot']['accuracy']:.4f}")

    def prepare(self, model) -> dict:
        prepare(model, self.recipe)
        counts = lora.trainable_parameters(model)
        say(f"{self.recipe.mode}: trainable {counts['trainable']:,} / {counts['total']:,} "
            f"({counts['percent']:.3f}%)")
        return counts

    def fit(self, model, train_rows):
        return fit_classifier(model, self.task, train_rows, self.recipe)

    def after(self, model, test_rows) -> None:
        self.rows["fine_tuned"], self.probs["fine_tuned"] = evaluate(self.task, model, test_rows, self.names,
                                                                     self.recipe.eval_batch_size)
        say(f"fine-tuned accuracy {self.rows['fine_tuned']['accuracy']:.4f}")

    def save(self, model, tokenizer, out: Path) -> None:
        save_trained(model, tokenizer, out, self.recipe, self.names)

    def predict(self, model, texts) -> list[dict]:
        return predict_texts(self.task, model, texts, self.names, self.recipe.eval_batch_size)

    def predictions(self, test_rows) -> list[dict]:
        return prediction_table(test_rows, self.probs, self.names)

    def summary(self, result, train_rows, test_rows) -> dict:
        return {"mode": self.recipe.mode, "quantized": self.quantized,
                "train": train_summary(result, len(train_rows))}

    def label_names(self) -> list[str]:
        return self.names

    def finish(self, out: Path, metrics: dict) -> None:
        append_markdown(out, cost_markdown({self.recipe.mode: _cost(metrics)}))


def save_trained(model, tokenizer, out: Path, recipe: EncoderRecipe, label_names) -> None:
    """LoRA modes: out/adapter (PEFT files, the head in full) + task.json; full: out/model (HF checkpoint)."""
    meta = {"kind": "sequence-classification", "model": recipe.model, "mode": recipe.mode,
            "label_names": list(label_names), "max_length": recipe.max_length, "columns": recipe.columns,
            "dtype": "fp32" if recipe.mode == "full" else recipe.dtype,
            "quant": {"blocksize": recipe.blocksize, "double_quant": recipe.double_quant,
                      "skip": list(head_skip(model, recipe.modules_to_save))} if recipe.mode == "qlora" else None}
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
