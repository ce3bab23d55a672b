"""Argument checks shared by LoRALinear, inject(), load() and LoraConfig.

Each check raises ValueError naming the argument, what it must be (with an example) and the value it got.
`name` is the caller's spelling: "alpha" in inject, "lora_alpha" in LoraConfig and adapter_config.json.
bool is an int and nan/inf pass every `>` or `<` test, so numbers are checked for both explicitly.
"""

import math
import re
import reprlib

DEFAULT_ADAPTER = "default"       # PEFT's name for the adapter that inject / load create unless told otherwise
COMPUTE_DTYPES = (None, "fp32", "base")   # None / "fp32": adapter math in fp32; "base": in the base output's dtype
_ADAPTER_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]*")
_RESERVED = {"__base__", "training", "keys", "items", "values", "update", "pop", "clear"}   # ModuleDict attributes


def describe(value) -> str:
    """`the float nan`: a wrong argument's type and value, for error messages (reprlib cuts a long repr)."""
    return "None" if value is None else f"the {type(value).__name__} {reprlib.repr(value)}"


def _is_finite_number(x) -> bool:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return False
    return isinstance(x, int) or math.isfinite(x)


def check_rank(r, name: str = "r") -> None:
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"{name} must be a positive integer (the adapter rank, e.g. 8); got {describe(r)}")


def check_alpha(alpha, name: str = "alpha") -> None:
    if not (_is_finite_number(alpha) and alpha > 0):
        raise ValueError(f"{name} must be a finite number > 0 (scaling = alpha / r; e.g. alpha = 2 * r); "
                         f"got {describe(alpha)}")


def check_dropout(dropout, name: str = "dropout") -> None:
    if not (_is_finite_number(dropout) and 0 <= dropout < 1):
        raise ValueError(f"{name} must be a number in [0, 1) (a probability; 0 disables it); got {describe(dropout)}")


def check_use_rslora(use_rslora) -> None:
    if not isinstance(use_rslora, bool):
        raise ValueError(f"use_rslora must be True (scaling alpha / sqrt(r), rank-stabilised) or False "
                         f"(alpha / r); got {describe(use_rslora)}")


def check_use_dora(use_dora) -> None:
    if not isinstance(use_dora, bool):
        raise ValueError(f"use_dora must be True (DoRA: a trained magnitude per output row times the normalised "
                         f"W + scaling*B@A) or False (plain LoRA); got {describe(use_dora)}")


def check_compute_dtype(compute_dtype) -> None:
    if not (compute_dtype is None or isinstance(compute_dtype, str) and compute_dtype in COMPUTE_DTYPES):
        raise ValueError(f"compute_dtype must be None or 'fp32' (the adapter's fp32) or 'base' (the base layer's "
                         f"output dtype, autocast-style); got {describe(compute_dtype)}")


def check_adapter_name(name) -> None:
    """A name is a module name and a folder name: letters, digits, '_' and '-' (no '.', no '/')."""
    if not (isinstance(name, str) and _ADAPTER_NAME.fullmatch(name) and name not in _RESERVED):
        raise ValueError(f"adapter_name must be a non-empty str of letters, digits, '_' and '-' (e.g. 'default', "
                         f"'sst2'; not one of {sorted(_RESERVED)}); got {describe(name)}")
