"""Linear4bit's backends: three kernel sets behind one switch, and what `backend=None` picks, measured.

    "torch"   quant.nf4's reference dequantize + F.linear; runs anywhere; bytes and values pinned to bnb.
    "bnb"     bitsandbytes' dequantize kernel (AVX-512 on CPU, CUDA on GPU) + F.linear (cuBLAS on GPU).
    "triton"  quant.triton_kernels' fused dequantize-matmul, forward and input gradient (CUDA; on the CPU only in
              Triton's interpreter, TRITON_INTERPRET=1, for the tests).
An explicit backend that cannot run falls back to "torch" with a warning that says why.

backend=None: the fastest correct backend per (device, op, dtype, weight shape, bucket of M rows), where op is
the forward ("linear"), the input gradient ("grad_input") or "dequantize"; each op is chosen on its own, so a
layer may run Triton's fused forward and bnb + cuBLAS in backward.
    CPU   "bnb" when its native library loads, else "torch". Measured once, offline, not at run time (AMD EPYC,
          2 cores, bf16, forward + backward to x, min of 10): 1536x576 with 1024 tokens "bnb" 4.4 ms vs "torch"
          5.3 ms (bnb's own matmul_4bit 4.6 ms); 4096x4096 with 256 tokens 40 ms vs 57 ms; bnb's dequantize is
          2-6x faster than quant.nf4's (numbers in quant/nf4.py), and both are exact. A probe per shape would
          cost more than that gap on 2 cores, so the CPU choice is a lookup. What IS measured on the CPU, once
          per machine: whether a bf16/fp16 matmul runs faster as fp32 on this CPU (quant/cpu_matmul.py; 2x
          on CPUs without AMX), which both "torch" and "bnb" then follow.
    CUDA  measured in this process, the first time a key is met, on the real call (its x or dy, at most
          PROBE_ROWS rows): each available backend runs once (Triton compiles and autotunes here), is checked
          against "torch" (dequantize bit for bit; matmuls within a few output ulps of the same dequantized
          weight), then timed with CUDA events (median of REPEATS); the fastest correct one is cached.
          Under torch.compile or CUDA-graph capture nothing is timed: the order triton > bnb > torch applies.
`quant.backend_choice()` lists every decision: how it was made, the times, what was rejected and why.

Note: close timings may pick different backends in two runs of one program; their outputs then differ by
float rounding (bounded by the check above). Pass `backend=` to pin it where bit-reproducible runs matter.
"""
from __future__ import annotations

import functools
import importlib
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from quant import bnb_native, cpu_matmul
from quant.cpu_matmul import dense_grad_input, dense_linear, matmul_dtype
from quant.nf4 import NF4State, dequantize_nf4

BACKENDS = ("torch", "bnb", "triton")
M_BUCKETS = (1, 16, 128, 1024)  # rows of x: decode, small batches, ..., training (the last bucket is > 1024)
PROBE_ROWS = 8192  # a bigger M is timed on its first PROBE_ROWS rows
REPEATS = 5
MEASURED = ("cuda",)  # device types whose choice is measured at run time (the tests add "cpu")
# Matmul check vs "torch", relative to max |torch's output|: both multiply the same dequantized weight with an
# fp32 accumulator, so they differ by summation order and the output's last rounding (bf16 ulp 2^-8, fp16 2^-11).
_TOL = {torch.bfloat16: 2**-6, torch.float16: 2**-9, torch.float32: 1e-4}


# ----------------------------------------------------------------------------------------------
# the kernels: three functions per backend, all on 2-D inputs


@dataclass(frozen=True)
class Kernels:
    linear: Callable  # (x2d, packed, state, bias) -> x2d @ W^T + bias
    grad_input: Callable  # (dy2d, packed, state) -> dy2d @ W
    dequantize: Callable  # (packed, state, dtype) -> W


def _torch_linear(x: Tensor, packed: Tensor, state: NF4State, bias: Tensor | None) -> Tensor:
    return dense_linear(x, dequantize_nf4(packed, state, matmul_dtype(x)), bias)  # (N, out)


def _torch_grad_input(dy: Tensor, packed: Tensor, state: NF4State) -> Tensor:
    return dense_grad_input(dy, dequantize_nf4(packed, state, matmul_dtype(dy)))  # (N, out) @ (out, in) -> (N, in)


def _bnb_quant_state(state: NF4State, dtype: torch.dtype):
    import bitsandbytes.functional as bnbf

    # Note: bnb is handed rows of exactly one block, (numel / blocksize, blocksize), not the weight's
    # shape. bitsandbytes 0.50's CPU dequantize kernel indexes absmax per row and gets it wrong when
    # in_features % blocksize != 0 (e.g. 300x400 at blocksize 64); with one block per row it cannot,
    # and it stays multi-threaded (a flat (numel,) view runs on one thread, 1.6x slower). A partial
    # last block leaves only the flat view. The bytes are the same whatever the view.
    n, bs = state.numel, state.blocksize
    shape = torch.Size([n // bs, bs] if n % bs == 0 else [n])
    nested = None
    if state.double_quant:
        nested = bnbf.QuantState(absmax=state.nested_absmax, code=state.nested_code,
                                 blocksize=state.nested_blocksize, dtype=torch.float32)
    return bnbf.QuantState(absmax=state.absmax, shape=shape, code=state.code, blocksize=bs, quant_type="nf4",
                           dtype=dtype, offset=state.offset, state2=nested)


def _bnb_has_native_kernel(packed: Tensor, state: NF4State) -> bool:
    # Note: on CPU, bnb 0.50 has no native kernel for an odd element count or for blocksize >= 2048 on
    # AVX-512 machines; it runs a torch.compile()d Python fallback instead (seconds of compilation
    # per new shape, then recompile-limit warnings). That fallback is the same math as quant.nf4, so
    # those layers use quant.nf4 directly: identical values, no compiler in the training loop.
    return packed.device.type != "cpu" or (state.numel % 2 == 0 and state.blocksize < 2048)


def _bnb_dequantize(packed: Tensor, state: NF4State, dtype: torch.dtype) -> Tensor:
    if not _bnb_has_native_kernel(packed, state):
        return dequantize_nf4(packed, state, dtype)
    if packed.device.type == "cpu" and bnb_native.library() is not None:
        return bnb_native.dequantize(packed, state, dtype)     # the same C kernel, without importing the package
    import bitsandbytes.functional as bnbf

    return bnbf.dequantize_4bit(packed, _bnb_quant_state(state, dtype)).view(state.shape)


def _bnb_linear(x: Tensor, packed: Tensor, state: NF4State, bias: Tensor | None) -> Tensor:
    return dense_linear(x, _bnb_dequantize(packed, state, matmul_dtype(x)), bias)


def _bnb_grad_input(dy: Tensor, packed: Tensor, state: NF4State) -> Tensor:
    return dense_grad_input(dy, _bnb_dequantize(packed, state, matmul_dtype(dy)))


TORCH = Kernels(_torch_linear, _torch_grad_input, dequantize_nf4)
BNB = Kernels(_bnb_linear, _bnb_grad_input, _bnb_dequantize)
_WARNED: set[tuple[str, str]] = set()


def load(backend: str, device: torch.device) -> tuple[Kernels | None, str]:
    """(kernels, "") or (None, why the backend cannot run on `device`)."""
    if backend == "torch":
        return TORCH, ""
    if backend == "bnb":
        if device.type == "cpu" and bnb_native.library() is not None:
            return BNB, ""
        try:
            import bitsandbytes  # noqa: F401
        except Exception as e:  # ImportError, or a broken native library
            return None, f"bitsandbytes cannot be imported: {e}"
        return BNB, ""
    try:
        tk = importlib.import_module("quant.triton_kernels")  # lazy: triton is an optional extra
    except Exception as e:
        return None, f"quant.triton_kernels cannot be imported: {e}"
    ok, reason = tk.is_available()
    if not ok:
        return None, reason
    if device.type == "cpu" and not getattr(tk, "INTERPRET", False):
        return None, "the tensors are on the CPU and the Triton interpreter (TRITON_INTERPRET=1) is off"
    return Kernels(tk.nf4_linear, tk.nf4_linear_grad_input, tk.dequantize), ""


def kernels(backend: str, device: torch.device) -> Kernels:
    """An explicit backend's kernels, or "torch"'s with a warning (once per reason) when it cannot run."""
    found, reason = load(backend, device)
    if found is not None:
        return found
    if (backend, reason) not in _WARNED:
        _WARNED.add((backend, reason))
        warnings.warn(f"Linear4bit backend {backend!r} is unavailable ({reason}); falling back to 'torch'",
                      RuntimeWarning, stacklevel=4)
    return TORCH


@functools.cache
def native_ok(backend: str, device_type: str) -> bool:
    """Whether `backend` runs natively on this device type (so is worth choosing automatically)."""
    if load(backend, torch.device(device_type))[0] is None:
        return False
    if backend == "bnb" and device_type == "cpu" and bnb_native.library() is not None:
        return True                                   # its compiled CPU library, loaded without the package
    if backend == "bnb":  # without its compiled library bnb runs slow Python fallbacks: prefer ours
        from bitsandbytes.cextension import ErrorHandlerMockBNBNativeLibrary, lib

        return not isinstance(lib, ErrorHandlerMockBNBNativeLibrary)
    return True


def static_order(device: torch.device | str) -> list[str]:
    """The candidates for `device`, in the order used when nothing is measured (CPU: the offline measurement)."""
    device = torch.device(device)
    preferred = ("triton", "bnb") if device.type == "cuda" else ("bnb",)
    return [b for b in preferred if native_ok(b, device.type)] + ["torch"]


def default_backend(device: torch.device | str = "cpu") -> str:
    """The backend chosen without a measurement on `device` (the CPU's choice; CUDA's when it cannot time)."""
    return static_order(device)[0]


# ----------------------------------------------------------------------------------------------
# backend=None: the choice per (device, op, dtype, shape, rows), cached in this process

_CHOICES: dict[tuple, tuple[Kernels, dict]] = {}


def backend_choice() -> list[dict]:
    """Every choice `backend=None` made in this process: device, op, dtype, shape, rows, backend, how, times."""
    return [dict(record) for _, record in _CHOICES.values()] + cpu_matmul.choices()


def reset() -> None:
    """Forget every choice (the next call measures again); for benchmarks and tests."""
    _CHOICES.clear()
    cpu_matmul.reset()


def rows_bucket(m: int) -> str:
    """M rows -> its bucket's name: "1", "2-16", "17-128", "129-1024", ">1024"."""
    low = 1
    for high in M_BUCKETS:
        if m <= high:
            return str(high) if low == high else f"{low}-{high}"
        low = high + 1
    return f">{M_BUCKETS[-1]}"


def for_linear(backend: str | None, x: Tensor, packed: Tensor, state: NF4State, bias: Tensor | None) -> Kernels:
    if backend is not None:
        return kernels(backend, x.device)
    key = (str(x.device), "linear", x.dtype, tuple(state.shape), rows_bucket(x.shape[0]))
    probe = x[:PROBE_ROWS]
    return _pick(key, x.device, lambda k: k.linear(probe, packed, state, bias), exact=False)


def for_grad_input(backend: str | None, dy: Tensor, packed: Tensor, state: NF4State) -> Kernels:
    if backend is not None:
        return kernels(backend, dy.device)
    key = (str(dy.device), "grad_input", dy.dtype, tuple(state.shape), rows_bucket(dy.shape[0]))
    probe = dy[:PROBE_ROWS]
    return _pick(key, dy.device, lambda k: k.grad_input(probe, packed, state), exact=False)


def for_dequantize(backend: str | None, packed: Tensor, state: NF4State, dtype: torch.dtype) -> Kernels:
    if backend is not None:
        return kernels(backend, packed.device)
    key = (str(packed.device), "dequantize", dtype, tuple(state.shape), "-")
    return _pick(key, packed.device, lambda k: k.dequantize(packed, state, dtype), exact=True)


def _pick(key: tuple, device: torch.device, call: Callable[[Kernels], Tensor], exact: bool) -> Kernels:
    hit = _CHOICES.get(key)
    if hit is not None:
        return hit[0]
    order = static_order(device)
    record = {"device": key[0], "op": key[1], "dtype": str(key[2]).removeprefix("torch."), "shape": list(key[3]),
              "rows": key[4], "backend": order[0]}
    if device.type not in MEASURED or len(order) == 1:
        why = "the only one" if len(order) == 1 else "offline CPU measurement (quant/backends.py)"
        record |= {"how": "static", "why": why}
    else:
        busy = _cannot_time()
        if busy:  # not cached: the next eager call measures
            return load(order[0], device)[0]
        record |= _measure(order, device, call, exact)
    chosen = load(record["backend"], device)[0]
    _CHOICES[key] = (chosen, record)
    return chosen


def _cannot_time() -> str:
    if torch.compiler.is_compiling():
        return "inside torch.compile"
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        return "during CUDA graph capture"
    return ""


def _measure(order: list[str], device: torch.device, call: Callable[[Kernels], Tensor], exact: bool) -> dict:
    """Runs, checks and times each backend in `order` on the real call; the fastest correct one wins."""
    times, rejected = {}, {}
    with torch.no_grad(), torch.autocast(device.type, enabled=False):
        want = call(TORCH)
        for name in order:
            k = load(name, device)[0]
            try:
                why = _mismatch(call(k), want, exact)  # the first call compiles / autotunes Triton
                if why:
                    rejected[name] = why
                    continue
                times[name] = _time_ms(lambda: call(k), device)
            except Exception as e:  # noqa: BLE001 - a backend that fails here is recorded and not chosen
                rejected[name] = f"{type(e).__name__}: {str(e)[:200]}"
    if not times:
        return {"backend": "torch", "how": "measured", "why": "every backend failed", "rejected": rejected}
    best = min(times, key=times.get)
    return {"backend": best, "how": "measured", "why": "fastest correct", "times_ms": times, "rejected": rejected}


def _mismatch(got: Tensor, want: Tensor, exact: bool) -> str:
    """"" when `got` agrees with the torch reference `want`, else what differs."""
    if got.shape != want.shape or got.dtype != want.dtype:
        return f"returned {got.dtype} {tuple(got.shape)}, torch {want.dtype} {tuple(want.shape)}"
    if exact:
        return "" if torch.equal(got, want) else "dequantize is not bit-exact with torch's"
    diff = (got.float() - want.float()).abs().max().item()
    scale = want.float().abs().max().item()
    tol = 1e-2 if want.dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 else _TOL[want.dtype]
    if not diff <= tol * scale:  # also catches NaN
        return f"max |diff| {diff:.3g} vs torch's output > {tol:.3g} x max |output| {scale:.3g}"
    return ""


def _time_ms(fn: Callable[[], object], device: torch.device) -> float:
    """Median milliseconds of fn() over REPEATS runs: CUDA events on `device`, else the wall clock."""
    if device.type != "cuda":
        times = []
        for _ in range(REPEATS):
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
        return statistics.median(times)
    with torch.cuda.device(device):
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(REPEATS)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in events)
