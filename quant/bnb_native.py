"""bitsandbytes' CPU dequantize kernels, called through their C functions without importing the package.

`import bitsandbytes` (0.50) imports torch._dynamo, Triton and SymPy on its way in: +190 MB of resident memory
in a process that only needs two C functions of libbitsandbytes_cpu.so (a 2-core Xeon: 251 MB -> 443 MB RSS
for the import alone, a fifth of a SmolLM2-135M QLoRA step's peak). So on the CPU the "bnb" backend finds the
package's folder (importlib.util.find_spec imports nothing), loads the library with ctypes and calls what
bitsandbytes' own CPU op calls, with the same arguments:

    double quant   cdequantize_blockwise_cpu_fp32(code, absmax_q, nested_absmax, out, nested_blocksize, n) + offset
    NF4            cdequantize_blockwise_cpu_nf4_{fp32,bf16,fp16}(packed, absmax, out, blocksize, rows, cols)

The bytes out are bitsandbytes' (tests/quant compare them with bnb.functional.dequantize_4bit). When the library
or a symbol is missing (another bitsandbytes layout), `library()` is None and the backend imports bitsandbytes
as before.
"""
from __future__ import annotations

import ctypes
import functools
import importlib.util
from pathlib import Path

import torch
from torch import Tensor

from quant.nf4 import NF4State

_NF4 = {torch.float32: "cdequantize_blockwise_cpu_nf4_fp32", torch.bfloat16: "cdequantize_blockwise_cpu_nf4_bf16",
        torch.float16: "cdequantize_blockwise_cpu_nf4_fp16"}
_BLOCKWISE = "cdequantize_blockwise_cpu_fp32"


@functools.cache
def library() -> ctypes.CDLL | None:
    """libbitsandbytes_cpu.so with the dequantize functions typed, or None when it is not there as expected."""
    spec = importlib.util.find_spec("bitsandbytes")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "libbitsandbytes_cpu.so"
    try:
        lib = ctypes.CDLL(str(path))
        for name in (*_NF4.values(), _BLOCKWISE):
            fn = getattr(lib, name)
            n_ptrs = 4 if name == _BLOCKWISE else 3
            fn.argtypes = [ctypes.c_void_p] * n_ptrs + [ctypes.c_longlong] * (2 if name == _BLOCKWISE else 3)
            fn.restype = None
    except (OSError, AttributeError):
        return None
    return lib


def _ptr(t: Tensor) -> ctypes.c_void_p:
    return ctypes.c_void_p(t.data_ptr())


def absmax_fp32(state: NF4State) -> Tensor:
    """The per-block absmax in fp32: as stored, or (double quant) its 8-bit codes dequantized + offset."""
    if not state.double_quant:
        return state.absmax.float().contiguous()
    # every tensor a pointer is taken from stays referenced by a name until the call returns
    codes, code = state.absmax.contiguous(), state.nested_code.float().contiguous()
    nested = state.nested_absmax.float().contiguous()
    out = torch.empty(codes.shape, dtype=torch.float32)
    library().cdequantize_blockwise_cpu_fp32(_ptr(code), _ptr(codes), _ptr(nested), _ptr(out),
                                             state.nested_blocksize, codes.numel())
    return out.add_(state.offset)


def dequantize(packed: Tensor, state: NF4State, dtype: torch.dtype) -> Tensor:
    """W [out, in] in `dtype` from the packed NF4 bytes (CPU tensors; `library()` must not be None).

    Handed one block per row, (numel / blocksize, blocksize), as the "bnb" backend hands bitsandbytes (see the
    note there): the kernel's per-row absmax indexing is then right for every weight shape."""
    n, bs = state.numel, state.blocksize
    rows, cols = (n // bs, bs) if n % bs == 0 else (1, n)
    packed, absmax = packed.contiguous(), absmax_fp32(state)       # referenced until the call returns
    out = torch.empty(rows, cols, dtype=dtype)
    getattr(library(), _NF4[dtype])(_ptr(packed), _ptr(absmax), _ptr(out), bs, rows, cols)
    return out.view(state.shape)
