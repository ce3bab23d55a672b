"""Classify new texts with a saved adapter:  python -m train.predict --adapter DIR "some text" ...

The adapter folder holds PEFT's two files plus `task.json` (backbone, label names and words, prompt), which
the recipe writes, so the prompt at inference is exactly the one the adapter was trained with. Encoder
classifiers (train.encoder_recipe) work the same way: DIR is their adapter (LoRA + the head), or the
full fine-tune's model folder.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

import lora
import quant

from .models import load_model
from .recipe import evaluate, pick_dtype
from .task import ClassificationTask, SequenceClassificationTask

TASK_FILE = "task.json"


def load_classifier(adapter_dir: str | Path, *, dtype: str = "auto", quantized: bool = True):
    """(model, task, label_names) ready for task.predict_proba, from an adapter folder written by the recipe."""
    adapter_dir = Path(adapter_dir)
    meta_path = adapter_dir / TASK_FILE
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path} not found: is {adapter_dir} an adapter written by train.recipe?")
    meta = json.loads(meta_path.read_text())
    torch_dtype = pick_dtype(dtype)
    if meta.get("kind") == "sequence-classification":
        return _load_encoder(adapter_dir, meta, torch_dtype, quantized)
    model, tokenizer = load_model(meta["model"], dtype=torch_dtype)
    if quantized:
        quant.quantize(model, compute_dtype=torch_dtype, **meta.get("quant", {}))
    lora.load(model, adapter_dir)
    model.eval()
    task = ClassificationTask(tokenizer, meta["label_words"], instruction=meta["instruction"],
                              system=meta.get("system"), max_length=meta.get("max_length", 256),
                              keep=meta.get("keep", "head"))
    return model, task, meta["label_names"]


def _load_encoder(folder: Path, meta: dict, compute_dtype, quantized: bool):
    """An encoder classifier as train.encoder_recipe saved it: the model in the dtype it trained in, the NF4
    matmuls (qlora adapters) in `compute_dtype`, the head never quantized."""
    labels, full = meta["label_names"], meta["mode"] == "full"
    model, tokenizer = load_model(folder if full else meta["model"], dtype=pick_dtype(meta.get("dtype", "fp32")),
                                  kind="sequence-classification", num_labels=len(labels))
    if not full:
        if quantized and meta.get("quant"):
            q = dict(meta["quant"])
            quant.quantize(model, compute_dtype=compute_dtype, skip=tuple(q.pop("skip", ("classifier",))), **q)
        lora.load(model, folder)
    task = SequenceClassificationTask(tokenizer, len(labels), max_length=meta["max_length"])
    return model.eval(), task, labels


def evaluate_lengths(adapter_dir: str | Path, rows: Sequence[dict], lengths: Sequence[int], *,
                     batch_size: int = 32, dtype: str = "auto") -> list[dict]:
    """One saved adapter scored on labelled rows ({"text", "label"}) with the prompt cut to each of `lengths`
    tokens (the adapter's own `keep`): what reading more or less of each text is worth, the weights fixed.
    The adapter math runs in the backbone's dtype, as the recipe evaluates. One dict of metrics per length."""
    model, task, label_names = load_classifier(adapter_dir, dtype=dtype)
    lora.set_compute_dtype(model, "base")
    out = []
    for n in lengths:
        cut_task = ClassificationTask(task.tokenizer, task.label_words, instruction=task.instruction,
                                      system=task.system, max_length=n, keep=task.keep)
        m, _ = evaluate(cut_task, model, rows, label_names, batch_size)
        out.append({"max_length": n, "accuracy": m["accuracy"], "accuracy_ci95": m["accuracy_ci95"],
                    "f1_macro": m["f1_macro"], "roc_auc": m["roc_auc"], "n": m["n"],
                    "texts_truncated": cut_task.n_truncated, "seconds": m["eval_seconds"]})
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--adapter", required=True, help="adapter folder (adapter_config.json, task.json, ...)")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"])
    p.add_argument("--dense", action="store_true", help="keep the backbone dense instead of NF4")
    p.add_argument("texts", nargs="*", help="texts to classify (default: one per line on stdin)")
    args = p.parse_args(argv)
    texts = args.texts or [line.strip() for line in sys.stdin if line.strip()]
    if not texts:
        p.error("no texts given")
    model, task, label_names = load_classifier(args.adapter, dtype=args.dtype, quantized=not args.dense)
    probs = task.predict_proba(model, texts)  # (N, C)
    for text, pr in zip(texts, probs):
        scores = "  ".join(f"{n}={v:.3f}" for n, v in zip(label_names, pr))
        print(f"{label_names[int(pr.argmax())]}\t{scores}\t{text}")


if __name__ == "__main__":
    main()
