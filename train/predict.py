"""Classify new texts with a saved adapter:  python -m train.predict --adapter DIR "some text" ...

The adapter folder holds PEFT's two files plus `task.json` (backbone, label names and words, prompt), which
the recipe writes, so the prompt at inference is exactly the one the adapter was trained with. Encoder
classifiers (train.encoder_recipe) work the same way: DIR is their adapter (LoRA + the head), or the
full fine-tune's model folder.

Several `--adapter`s trained on the same backbone are served from one 4-bit base: the base is loaded and
quantized once, each adapter is added beside the others (lora.load(..., adapter_name=)), and
lora.set_adapter switches between them per request; each answers with its own prompt and labels, exactly as
it would loaded alone.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

import lora
import quant

from .cli import user_errors
from .files import TEXT_COLUMNS, find_column, read_table
from .models import load_model
from .recipe import evaluate, pick_dtype
from .tasks import ClassificationTask, SequenceClassificationTask

TASK_FILE = "task.json"
ENCODER = "sequence-classification"
# the keys each kind of task.json must have (train.recipe / train.encoder_recipe write them all)
REQUIRED = {None: ("model", "label_names", "label_words", "instruction"),
            ENCODER: ("model", "mode", "label_names", "max_length")}
WRITERS = {None: "train.recipe", ENCODER: "train.encoder_recipe"}
_JSON_TYPES = {list: "an array", str: "a string", int: "a number", float: "a number", bool: "a boolean",
               type(None): "null"}


def load_classifier(adapter_dir: str | Path, *, dtype: str = "auto", quantized: bool = True,
                    adapter_name: str = "default"):
    """(model, task, label_names) ready for task.predict_proba, from an adapter folder written by the recipe."""
    adapter_dir = Path(adapter_dir)
    meta = _read_task(adapter_dir / TASK_FILE)
    torch_dtype = pick_dtype(dtype)
    if meta.get("kind") == ENCODER:
        return _load_encoder(adapter_dir, meta, torch_dtype, quantized)
    # 4 bits straight from the checkpoint, one linear at a time: never the dense model in memory
    quantize = (meta.get("quant") or True) if quantized else None
    model, tokenizer = load_model(meta["model"], dtype=torch_dtype, quantize=quantize)
    lora.load(model, adapter_dir, adapter_name=adapter_name)
    return model.eval(), _task(meta, tokenizer), meta["label_names"]


def load_classifiers(adapter_dirs: Sequence[str | Path], *, dtype: str = "auto", quantized: bool = True):
    """(model, {name: (task, label_names)}) for adapters of one backbone, the base held once; the name of an
    adapter is its run's folder (runs/sst2/adapter -> "sst2"). lora.set_adapter(model, name) picks one."""
    dirs = [Path(d) for d in adapter_dirs]
    metas = [_read_task(d / TASK_FILE) for d in dirs]
    _check_one_base(dirs, metas)
    names = adapter_labels(dirs)
    model, first, labels = load_classifier(dirs[0], dtype=dtype, quantized=quantized, adapter_name=names[0])
    served = {names[0]: (first, labels)}
    for folder, meta, name in zip(dirs[1:], metas[1:], names[1:]):
        lora.load(model, folder, adapter_name=name)
        served[name] = (_task(meta, first.tokenizer), meta["label_names"])
    return model.eval(), served


def adapter_labels(dirs: Sequence[Path]) -> list[str]:
    """A short, unique name per adapter folder: the folder's name, or its run's when it is called adapter/."""
    names = []
    for d in dirs:
        base = d.resolve().parent.name if d.resolve().name in ("adapter", "model") else d.resolve().name
        name, k = base or "adapter", 2
        while name in names:
            name, k = f"{base}-{k}", k + 1
        names.append(name.replace(".", "_"))
    return names


def _check_one_base(dirs: Sequence[Path], metas: Sequence[dict]) -> None:
    """Adapters served together must share the backbone and how it was quantized."""
    if any(m.get("kind") == ENCODER for m in metas) and len(metas) > 1:
        raise ValueError("several --adapter folders: supported for the prompt classifiers (train.recipe); "
                         f"{[str(d) for d, m in zip(dirs, metas) if m.get('kind') == ENCODER]} are encoder "
                         "classifiers, serve them one at a time")
    for d, m in zip(dirs[1:], metas[1:]):
        for key in ("model", "quant"):
            if m.get(key) != metas[0].get(key):
                raise ValueError(f"{d} was trained on {key} {m.get(key)!r} but {dirs[0]} on {metas[0].get(key)!r}: "
                                 "adapters served together must share the backbone and its quantization")


def _task(meta: dict, tokenizer) -> ClassificationTask:
    return ClassificationTask(tokenizer, meta["label_words"], instruction=meta["instruction"],
                              system=meta.get("system"), max_length=meta.get("max_length", 256),
                              keep=meta.get("keep", "head"))


def _read_json_object(path: Path) -> dict:
    """task.json's object, or an error that names the file, what is wrong with it and what to do."""
    folder, again = path.parent, "restore it or re-run the training that wrote it"
    give = "give the adapter/ folder inside a training run's --out (model/ for a full fine-tune)"
    if not folder.exists():
        raise FileNotFoundError(f"{folder} does not exist: {give}")
    if not folder.is_dir():
        raise NotADirectoryError(f"{folder} is a file: {give}")
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing, so {folder} was not written by train.recipe or "
                                f"train.encoder_recipe: {give}")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        where = f"{e.msg}: line {e.lineno}, column {e.colno}"
        raise ValueError(f"{path} is not valid JSON ({where}): {again}") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text (bad byte at offset {e.start}): {again}") from None
    if not isinstance(meta, dict):
        got = _JSON_TYPES.get(type(meta), type(meta).__name__)
        raise ValueError(f'{path} holds {got}, not a JSON object {{"model": ..., "label_names": [...], ...}}: '
                         f"{again}")
    return meta


def _read_task(path: Path) -> dict:
    """task.json checked for what load_classifier reads: its kind, the keys of that kind, the label lists."""
    meta = _read_json_object(path)
    kind = meta.get("kind")
    if kind not in (None, ENCODER):                   # a tuple, not REQUIRED's keys: "kind" may be unhashable
        raise ValueError(f'{path}: unknown "kind" {kind!r}; expected {ENCODER!r}, or no "kind" for a causal LM')
    missing = [k for k in REQUIRED[kind] if k not in meta]
    if missing:
        raise ValueError(f"{path} lacks the key(s) {', '.join(missing)} ({WRITERS[kind]} writes "
                         f"{', '.join(REQUIRED[kind])}): add them or re-run the training")
    _check_labels(path, meta)
    return meta


def _check_labels(path: Path, meta: dict) -> None:
    """Label lists as the tasks need them: a string here would be read letter by letter, silently."""
    for key in ("label_names", "label_words"):
        value = meta.get(key)
        ok = isinstance(value, list) and len(value) >= 2 and all(isinstance(v, str) for v in value)
        if key in meta and not ok:
            raise ValueError(f'{path}: "{key}" must be a list of two or more strings, got {value!r}')
    if "label_words" in meta and len(meta["label_words"]) != len(meta["label_names"]):
        raise ValueError(f'{path}: {len(meta["label_names"])} "label_names" but {len(meta["label_words"])} '
                         '"label_words": give one word per label')


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


def saved_columns(adapter_dir) -> dict:
    """The column names the adapter was trained on ({"text", "label"}; {} when not recorded)."""
    return _read_task(Path(adapter_dir) / TASK_FILE).get("columns") or {}


def _file_texts(path: str, column: str | None) -> list[str]:
    table = read_table(path, role="test")
    key = find_column(path, table, column, TEXT_COLUMNS, "text")
    return [str(row[key]).strip() for row in table]


def _stdin_texts() -> list[str]:
    """One text per non-blank line of stdin: a file piped in, or lines typed and ended with Ctrl-D."""
    texts = [line.strip() for line in sys.stdin if line.strip()] if sys.stdin else []
    if not texts:
        raise ValueError("no texts: none given as arguments and stdin was empty (or only blank lines); "
                         "give texts as arguments or one per line on stdin (... < texts.txt)")
    return texts


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--adapter", required=True, action="append",
                   help="adapter folder (adapter_config.json, task.json, ...); repeat it to serve several adapters "
                        "of one backbone from one 4-bit base")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"])
    p.add_argument("--dense", action="store_true", help="keep the backbone dense instead of NF4")
    p.add_argument("--file", default=None, help="texts from a data file (CSV, JSONL, ...; see train.files)")
    p.add_argument("--text-column", default=None, help="the --file column to classify (default: found by name)")
    p.add_argument("texts", nargs="*", help="texts to classify (default: --file, else one per line on stdin)")
    return p


def main(argv: list[str] | None = None) -> None:
    p = add_arguments(argparse.ArgumentParser(prog="python -m train.predict", description=__doc__.splitlines()[0]))
    run(p.parse_args(argv))


def run(args: argparse.Namespace) -> None:
    """Prints `label<TAB>p per label<TAB>text` for each text; with several adapters, `adapter<TAB>` first."""
    dirs = [args.adapter] if isinstance(args.adapter, (str, Path)) else list(args.adapter)
    for d in dirs:
        _read_task(Path(d) / TASK_FILE)             # a bad --adapter fails now, not after reading stdin
    column = args.text_column or (saved_columns(dirs[0]).get("text"))
    texts = args.texts or (_file_texts(args.file, column) if args.file else _stdin_texts())
    if len(dirs) == 1:
        model, task, label_names = load_classifier(dirs[0], dtype=args.dtype, quantized=not args.dense)
        served, prefix = {None: (task, label_names)}, False
    else:
        (model, served), prefix = load_classifiers(dirs, dtype=args.dtype, quantized=not args.dense), True
    for name, (task, label_names) in served.items():
        if prefix:
            lora.set_adapter(model, name)
        probs = task.predict_proba(model, texts)  # (N, C)
        for text, pr in zip(texts, probs):
            scores = "  ".join(f"{n}={v:.3f}" for n, v in zip(label_names, pr))
            print(f"{name}\t" * prefix + f"{label_names[int(pr.argmax())]}\t{scores}\t{text}")


if __name__ == "__main__":
    with user_errors():
        main()
