"""Which device a run uses, and which dtype computes fastest there.

    device "auto" -> cuda:LOCAL_RANK when CUDA is available (torchrun sets LOCAL_RANK), else cpu
    dtype  "auto" -> bf16 on a GPU that has it and on an x86 CPU with avx512_bf16 / AMX, else fp32

A device the machine lacks is a ValueError that says what this torch build can see, so `--device cuda` on a
CPU-only box is one clear line, not a CUDA traceback from the first tensor moved.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """"auto" | "cpu" | "cuda" | "cuda:N" (or a torch.device) -> a torch.device that exists here."""
    if isinstance(name, torch.device):
        name = str(name)
    if name is None or name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cpu")
    if not isinstance(name, str):
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N'; got the {type(name).__name__} {name!r}")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N'; got {name!r}") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise ValueError(f"device {name!r}: only 'cpu' and 'cuda' devices are supported")
    if not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
        raise ValueError(f"device {name!r} asked for, but this machine has no usable CUDA GPU (torch "
                         f"{torch.__version__}, {build}); use --device cpu or auto")
    index = device.index if device.index is not None else int(os.environ.get("LOCAL_RANK", "0"))
    if index >= torch.cuda.device_count():
        raise ValueError(f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return torch.device("cuda", index)


def pick_dtype(name: str, device: torch.device | str | None = None) -> torch.dtype:
    """"bf16" | "fp32" | "auto": bf16 where `device` (default: the "auto" device) runs it fast, else fp32."""
    if name == "bf16":
        return torch.bfloat16
    if name == "fp32":
        return torch.float32
    if name != "auto":
        raise ValueError(f"dtype must be 'auto', 'bf16' or 'fp32', got {name!r}")
    device = resolve_device(device if device is not None else "auto")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if _cpu_has_fast_bf16() else torch.float32


def _cpu_has_fast_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags
