"""The dtype a 4-bit layer multiplies in on the CPU: bf16/fp16 natively, or in fp32 where this CPU does that faster.

CPUs without AMX (and some with AVX512-BF16) multiply bf16 matrices at half their fp32 rate. `matmul_dtype(x)`
says which dtype the NF4 kernels ("torch" and "bnb", quant/backends.py) dequantize to and multiply in; the
choice is measured once per machine (`half_matmul_choice`) and kept in the cache folder, so every run on a
machine computes the same numbers. `dense_linear` is the matmul itself, for any caller with a dequantized weight.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

HALF = (torch.bfloat16, torch.float16)
HALF_MATMUL_ENV = "QLORA_CPU_HALF_MATMUL"  # "native" | "fp32": overrides the measurement
_HALF_MATMUL: dict[torch.dtype, dict] = {}


def matmul_dtype(t: Tensor) -> torch.dtype:
    """The dtype a 4-bit layer multiplies `t` in: t's own, except bf16/fp16 on a CPU that runs fp32 faster.

    CPUs without AMX (and some with AVX512-BF16) multiply bf16 matrices at half their fp32 speed: a 2-core
    Xeon without AMX, (1024 x 576) @ (576 x 1536): bf16 13.1 ms, fp32 7.1 ms. There the weight is dequantized
    straight to fp32 (code x absmax, not rounded to bf16) and x upcast; the matmul accumulates in fp32 like
    oneDNN's bf16 one and the output is rounded to x's dtype once: more precise than the bf16 matmul, whose
    weight is rounded to bf16 first."""
    return matmul_dtype_for(t.dtype, t.device)


def matmul_dtype_for(dtype: torch.dtype, device: torch.device | str) -> torch.dtype:
    """`matmul_dtype` for a tensor of `dtype` on `device`, without one at hand."""
    if torch.device(device).type != "cpu" or dtype not in HALF:
        return dtype
    return torch.float32 if half_matmul_choice(dtype)["backend"] == "fp32" else dtype


def half_matmul_choice(dtype: torch.dtype) -> dict:
    """{"op": "half matmul", "dtype", "backend": "native" | "fp32", "how", "times_ms"}.

    Measured once per machine and kept in the cache folder (`half_matmul_cache()`, keyed by the CPU's model and
    flags and torch's version), so every run on a machine multiplies the same way and gives the same numbers
    (a run and a later `eval` of its adapter agree to the bit); $QLORA_CPU_HALF_MATMUL overrides it."""
    if dtype not in _HALF_MATMUL:
        forced = os.environ.get(HALF_MATMUL_ENV)
        if forced is not None and forced not in ("native", "fp32"):
            raise ValueError(f"{HALF_MATMUL_ENV}={forced!r}: expected 'native' or 'fp32'")
        record = {"device": "cpu", "op": "half matmul", "dtype": str(dtype).removeprefix("torch.")}
        if forced:
            record |= {"backend": forced, "how": f"${HALF_MATMUL_ENV}"}
        else:
            record |= _cached_half_matmul(dtype)
        _HALF_MATMUL[dtype] = record
    return _HALF_MATMUL[dtype]


def half_matmul_cache() -> Path:
    return Path(os.environ.get("QLORA_CACHE") or Path.home() / ".cache" / "onebox-qlora") / "cpu_half_matmul.json"


def _cpu_key(dtype: torch.dtype) -> str:
    try:
        info = Path("/proc/cpuinfo").read_text().split("\n\n")[0]          # the first core's entry
    except OSError:
        info = platform.processor() + platform.machine()
    lines = [line for line in info.splitlines() if line.startswith(("model name", "flags", "vendor_id"))]
    digest = hashlib.sha1("\n".join(lines).encode()).hexdigest()[:16]
    return f"{digest}/torch-{torch.__version__}/{str(dtype).removeprefix('torch.')}"


def _cached_half_matmul(dtype: torch.dtype) -> dict:
    path, key = half_matmul_cache(), _cpu_key(dtype)
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        known = {}
    if isinstance(known.get(key), dict) and known[key].get("backend") in ("native", "fp32"):
        return {**known[key], "how": f"measured before on this CPU ({path})"}
    found = _time_half_matmul(dtype)
    try:                                              # written whole or not at all; a read-only home still runs
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({**known, key: found}, indent=1))
        os.replace(tmp, path)
    except OSError:
        pass
    return found


def _time_half_matmul(dtype: torch.dtype) -> dict:
    """Times x @ w^T (256 x 512 @ 512 x 512) both ways on one thread, 10 interleaved rounds, the best of each:
    a few ms per run, so a busy machine still leaves each some clean runs (a multi-threaded probe waits for
    every thread's time slice there). fp32 must win by a margin."""
    gen = torch.Generator().manual_seed(0)
    x32, w32 = torch.randn(256, 512, generator=gen), torch.randn(512, 512, generator=gen)
    x, w = x32.to(dtype), w32.to(dtype)
    ways = {"native": lambda: F.linear(x, w), "fp32": lambda: F.linear(x.float(), w32).to(dtype)}
    times = {name: [] for name in ways}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            for round_ in range(11):
                for name, fn in ways.items():
                    t = time.perf_counter()
                    fn()
                    if round_:                              # round 0 warms up: oneDNN picks its kernels
                        times[name].append((time.perf_counter() - t) * 1e3)
    finally:
        torch.set_num_threads(threads)
    best = {name: round(min(ms), 3) for name, ms in times.items()}
    matmul = "fp32" if best["fp32"] < 0.8 * best["native"] else "native"
    return {"backend": matmul, "how": "measured", "times_ms": best}


def dense_linear(x: Tensor, w: Tensor, bias: Tensor | None) -> Tensor:
    """x @ w^T + bias in w's dtype (the matmul dtype, `matmul_dtype(x)`), returned in x's."""
    if w.dtype == x.dtype:
        return F.linear(x, w, bias)
    return F.linear(x.to(w.dtype), w, None if bias is None else bias.to(w.dtype)).to(x.dtype)


def dense_grad_input(dy: Tensor, w: Tensor) -> Tensor:
    """dy @ w (the input gradient of `dense_linear`) in w's dtype, returned in dy's."""
    return dy @ w if w.dtype == dy.dtype else (dy.to(w.dtype) @ w).to(dy.dtype)


def choices() -> list[dict]:
    """The records of this process's choices (listed by `quant.backend_choice()`)."""
    return [dict(r) for r in _HALF_MATMUL.values()]


def reset() -> None:
    """Forget this process's choices (the next call reads the cache, or measures)."""
    _HALF_MATMUL.clear()
