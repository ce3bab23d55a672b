"""The run's settings in one nested, typed config: what `python -m train fit` reads from flags and files.

    RunConfig
      task, out, export_merged
      data    files, columns, prompt                 (DataConfig)
      model   backbone and its dtype                 (ModelConfig)
      quant   NF4 settings, or none for plain LoRA   (QuantConfig)
      lora    rank, alpha, dropout, targets          (LoraSettings)
      train   length, batch, lr, seed, ...           (TrainSettings)

The same keys everywhere: a TOML or JSON file nests them by section (`[train] lr = 3e-4`), a flag names the
key alone (`--lr 3e-4`, `--text-column review`; every key is unique across sections), and defaults < file <
flags. Every value is checked by type and range here, once: an unknown key is an error that names the nearest
valid one, a wrong type names the key, the value and the type wanted (bool is not an int, 2.5 is not an int,
floats must be finite).
"""
from __future__ import annotations

import argparse
import difflib
import json
import math
import os
import tomllib
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass
from pathlib import Path

TASKS = ("classify", "qa", "encoder")


@dataclass
class DataConfig:
    train: str | None = None                # the training file: CSV, TSV, JSONL, JSON, Parquet, or a saved dataset
    test: str | None = None                 # the held-out file; None: hold out test_size of train (stratified)
    test_size: float = 0.2                  # the share of train held out when there is no test file
    text_column: str | None = None          # None: the column named text, sentence, review, ... (see train.files)
    label_column: str | None = None         # None: the column named label, labels, sentiment, class, ...
    label_words: list[str] | None = None    # what the model answers per label (None: the label names)
    instruction: str | None = None          # None: "Classify the text as one of: <label words>."
    system: str | None = "You are a text classifier."
    max_length: int | None = None           # tokens per example, longer texts cut (None: the task's default)
    train_limit: int | None = None          # use at most this many training rows (seeded sample)
    test_limit: int | None = None           # ... and test rows

    def __post_init__(self):
        check_fields(self)
        _at_least(self, "max_length", 8)
        _check(0 < self.test_size < 1, f"test_size must be in (0, 1), got {self.test_size}")
        _check(self.label_words is None or len(self.label_words) >= 2, "label_words needs two or more words")
        for name in ("train_limit", "test_limit"):
            _at_least(self, name, 1)


@dataclass
class ModelConfig:
    name: str | None = None                 # a registry name, a local Hugging Face folder or a .gguf file;
                                            # None: the task's default (SmolLM2-135M; MiniLM for "encoder")
    dtype: str | None = None                # "auto" (bf16 where fast) | "bf16" | "fp32" (None: the task's default)
    device: str = "auto"                    # "auto" (the GPU when there is one) | "cpu" | "cuda" | "cuda:N"

    def __post_init__(self):
        check_fields(self)
        _one_of(self, "dtype", (None, "auto", "bf16", "fp32"))
        from .devices import resolve_device
        resolve_device(self.device)         # a device this machine lacks fails here, before any data is read


@dataclass
class QuantConfig:
    quantize: bool = True                   # False: plain LoRA on the dense backbone
    blocksize: int = 64                     # NF4 block (bitsandbytes' default)
    double_quant: bool = True               # the block scales in 8 bits too
    backend: str | None = None              # None: the fastest correct one | "torch" | "bnb" | "triton"

    def __post_init__(self):
        check_fields(self)
        _one_of(self, "backend", (None, "torch", "bnb", "triton"))


@dataclass
class LoraSettings:
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    targets: str | list[str] = "all-linear" # module names (q_proj,v_proj), a regex, or every linear layer
    use_rslora: bool = False
    use_dora: bool = False                  # DoRA: weight-decomposed LoRA (PEFT's use_dora)

    def __post_init__(self):
        check_fields(self)
        _at_least(self, "r", 1)
        _check(self.alpha > 0, f"alpha must be > 0, got {self.alpha}")
        _check(0 <= self.dropout < 1, f"dropout must be in [0, 1), got {self.dropout}")


@dataclass
class TrainSettings:
    epochs: float | None = None             # None: from the data size, about EXAMPLES_SEEN examples (1 to 10 epochs)
    max_steps: int | None = None
    batch_size: int | None = None           # None (here and below): the task's default
    grad_accum: int = 1
    lr: float | None = None
    loraplus_lr_ratio: float | None = None  # LoRA+: lora_B learns at ratio x lr (~16 in its paper); None: off
    warmup_ratio: float | None = None
    weight_decay: float = 0.0               # AdamW's decoupled weight decay
    grad_checkpointing: bool | None = None  # None: the task's (on)
    eval_batch_size: int | None = None
    seed: int = 0
    resume: bool = False                    # continue the run in `out` from its newest checkpoint

    def __post_init__(self):
        check_fields(self)
        _check(self.epochs is None or self.epochs > 0, f"epochs must be > 0, got {self.epochs}")
        for name in ("max_steps", "batch_size", "grad_accum", "eval_batch_size"):
            _at_least(self, name, 1)
        _check(self.lr is None or self.lr > 0, f"lr must be > 0, got {self.lr}")
        _check(self.loraplus_lr_ratio is None or self.loraplus_lr_ratio > 0,
               f"loraplus_lr_ratio must be > 0, got {self.loraplus_lr_ratio}")
        _check(self.warmup_ratio is None or 0 <= self.warmup_ratio < 1,
               f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        _check(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")


@dataclass
class RunConfig:
    out: str | None = None                  # the run folder: metrics.json, results.md, adapter/, ...
    task: str = "classify"                  # "classify" (causal LM, label words) | "qa" | "encoder"
    export_merged: str | None = None        # also write a merged plain Hugging Face checkpoint here
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    train: TrainSettings = field(default_factory=TrainSettings)

    def __post_init__(self):
        check_fields(self)
        _one_of(self, "task", TASKS)

    @classmethod
    def from_dict(cls, raw: dict, where: str = "config") -> "RunConfig":
        """From nested dicts; an unknown key or a wrong type is a ValueError naming `where` and the key."""
        return _build(cls, raw, where)

    def to_dict(self) -> dict:
        return asdict(self)


EXAMPLES_SEEN = 4500   # a few hundred rows get several epochs, tens of thousands one


def auto_epochs(n_train: int) -> float:
    """The training length when none is given: about EXAMPLES_SEEN examples, at least 1 epoch, at most 10
    (900 short sentences: 5 epochs, as the Financial PhraseBank example found best; 12,000: 1)."""
    return float(min(10, max(1, math.ceil(EXAMPLES_SEEN / max(1, n_train)))))


# ----------------------------------------------------------------------------- files and flags

FLAG_NAMES = {("model", "name"): "--model"}   # the flags not spelled like their key

def load_config_file(path: str | os.PathLike) -> dict:
    """A TOML (.toml) or JSON (.json) file's nested dict; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
        raw = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid {'TOML' if path.suffix == '.toml' else 'JSON'}: {e}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path} must hold a table/object of settings, got {type(raw).__name__}")
    return raw


def flag_paths(cls=RunConfig, prefix: tuple = ()) -> dict[str, tuple[tuple, str]]:
    """{"--lr": (("train", "lr"), "float"), ...}: a flag per leaf key, named by the key alone."""
    out = {}
    for f in fields(cls):
        if _section(f) is not None:
            out.update(flag_paths(f.default_factory, prefix + (f.name,)))
        else:
            flag = FLAG_NAMES.get(prefix + (f.name,), "--" + f.name.replace("_", "-"))
            assert flag not in out, f"two config keys named {f.name}"
            out[flag] = (prefix + (f.name,), f.type)
    return out


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per config key; values left unset do not override the file or the defaults."""
    for flag, (path, annotation) in flag_paths().items():
        kinds = _kinds(annotation)
        kw = dict(dest="/".join(path), default=argparse.SUPPRESS, help=f"[{'.'.join(path)}] {annotation}")
        if "bool" in kinds:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        else:
            parser.add_argument(flag, type=_parser_of(kinds, flag), metavar=path[-1].upper(), **kw)


def config_from_args(args: argparse.Namespace, config_file: str | None = None) -> RunConfig:
    """Defaults, then the config file's values, then the flags given."""
    raw = load_config_file(config_file) if config_file else {}
    where = str(config_file) if config_file else "flags"
    dests = {"/".join(path) for path, _ in flag_paths().values()}
    for dest, value in vars(args).items():
        if dest in dests:
            node = raw
            *sections, key = dest.split("/")
            for s in sections:
                node = node.setdefault(s, {})
                _check(isinstance(node, dict), f"{where}: [{s}] must be a table of settings")
            node[key] = value
    return RunConfig.from_dict(raw, where)


# ----------------------------------------------------------------------------- checking

def check_type(name: str, value, annotation: str) -> None:
    """`value` against a field's annotation ("int", "float | None", "list[str] | None", ...)."""
    kinds = _kinds(annotation)
    if value is None:
        _check("None" in kinds, f"{name} must not be None")
        return
    if "bool" in kinds and isinstance(value, bool):
        return
    if "int" in kinds and isinstance(value, int) and not isinstance(value, bool):
        return
    if "float" in kinds and isinstance(value, (int, float)) and not isinstance(value, bool):
        _check(math.isfinite(value), f"{name} must be a finite number, got {value}")
        return
    if ("str" in kinds and isinstance(value, str)) or ("os.PathLike" in kinds and isinstance(value, os.PathLike)):
        return
    if ({"list[str]", "Sequence[str]"} & set(kinds) and isinstance(value, (list, tuple))
            and all(isinstance(v, str) for v in value)):
        return
    if "dict" in kinds and isinstance(value, dict):
        return
    wanted = " or ".join(k for k in kinds if k != "None")
    raise ValueError(f"{name} must be {wanted}{' or None' if 'None' in kinds else ''}, got "
                     f"{type(value).__name__} {value!r}")


def check_fields(obj) -> None:
    """check_type on every field of a dataclass instance."""
    for f in fields(obj):
        if _section(f) is None:
            check_type(f.name, getattr(obj, f.name), f.type)


def _build(cls, raw, where: str):
    _check(isinstance(raw, dict), f"{where}: expected a table of settings, got {type(raw).__name__} {raw!r}")
    known = {f.name: f for f in fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        if key not in known:
            raise ValueError(f"{where}: unknown key {key!r}{_nearest(cls, str(key), known)}")
        sub = _section(known[key])
        if sub is not None:
            kwargs[key] = _build(sub, value, f"{where} [{key}]")
        else:
            kwargs[key] = list(value) if isinstance(value, tuple) else value
    try:
        return cls(**kwargs)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def _section(f):
    """The dataclass a field holds when it is a section ([data], [train], ...), else None."""
    factory = f.default_factory
    return factory if factory is not MISSING and is_dataclass(factory) else None


def _nearest(cls, key: str, known: dict) -> str:
    """The hint after an unknown key: its section when the key is a setting of one, else the closest key."""
    leaves = {path[-1]: ".".join(path) for path, _ in flag_paths(cls).values() if len(path) > 1}
    if key in leaves:
        return f"; it is a setting of [{leaves[key].split('.')[0]}]: write it under that section"
    near = difflib.get_close_matches(key, list(known) + list(leaves), n=1, cutoff=0.5)
    if not near:
        return f"; valid keys: {sorted(known)}"
    return f"; did you mean {near[0] if near[0] in known else leaves[near[0]]!r}?"


def _kinds(annotation: str) -> list[str]:
    return [k.strip() for k in annotation.split("|")]


def _parser_of(kinds: list[str], flag: str):
    def parse(text: str):
        if "None" in kinds and text.lower() in ("none", "null", ""):
            return None
        if "list[str]" in kinds and ("," in text or "str" not in kinds):
            return [t.strip() for t in text.split(",") if t.strip()]
        for kind, convert in (("int", int), ("float", float)):
            if kind in kinds:
                try:
                    return convert(text)
                except ValueError:
                    raise argparse.ArgumentTypeError(f"{flag} wants {kind}, got {text!r}") from None
        return text
    return parse


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _at_least(obj, name: str, low: int) -> None:
    value = getattr(obj, name)
    _check(value is None or value >= low, f"{name} must be >= {low}, got {value}")


def _one_of(obj, name: str, choices: tuple) -> None:
    value = getattr(obj, name)
    _check(value in choices, f"{name} must be one of {choices}, got {value!r}")
