"""Linear4bit: a frozen NF4 linear layer, and `quantize(model)` that swaps a model's nn.Linear for it.

    y = x @ dequantize(W_nf4)^T + b            computed in compute_dtype (default: x.dtype)
    dL/dx = dL/dy @ dequantize(W_nf4)          the only gradient; W is frozen, b is frozen by default

Memory: the autograd Function saves only the packed uint8 weight and dequantizes it again in
backward, so no dense copy of W lives between forward and backward (torchao's NF4 does the same).

Backends (one switch, `backend=`; an unavailable one falls back to "torch" with a warning that says why):
    "torch"   quant.nf4's reference dequantize + F.linear; runs anywhere; bytes and values pinned to bnb.
    "bnb"     bitsandbytes' dequantize kernels + F.linear (what bnb's own matmul_4bit does on CPU).
    "triton"  quant.triton_kernels' fused NF4 matmul (GPU), imported lazily.
Default (`backend=None`): "bnb" on CPU when bitsandbytes' native library loads, else "torch"; on CUDA
"triton" when available, else "bnb", else "torch". Measured on the CPU (AMD EPYC, 2 cores, bf16,
forward + backward to x, min of 10): 1536x576 with 1024 tokens "bnb" 4.4 ms vs "torch" 5.3 ms (bnb's
own matmul_4bit 4.6 ms); 4096x4096 with 256 tokens 40 ms vs 57 ms. bnb's dequantize kernel is 2-6x
faster than the pure-torch one (numbers in quant/nf4.py) and both are exact, so bnb wins.

The state dict uses bitsandbytes' Linear4bit keys and bytes (`weight`, `weight.absmax`,
`weight.quant_map`, `weight.nested_absmax`, `weight.nested_quant_map`,
`weight.quant_state.bitsandbytes__nf4`, `bias`), so checkpoints move between the two libraries.
"""
from __future__ import annotations

import ctypes
import functools
import gc
import importlib
import json
import logging
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from quant.nf4 import (
    NESTED_BLOCKSIZE, NF4_CODE, SUPPORTED_DTYPES, NF4State, check_blocksize, check_double_quant, dequantize_nf4,
    describe, quantize_nf4,
)

BACKENDS = ("torch", "bnb", "triton")
_QS_KEY = "quant_state.bitsandbytes__nf4"


def _drop_kernel_hub_warning(record: logging.LogRecord) -> bool:
    # Note: bitsandbytes 0.50 on a CPU with AVX512-BF16 tries, as it is imported, to fetch a fused gemv kernel
    # from the Hugging Face hub (the `kernels` package, "kernels-community") and logs "Failed to load CPU
    # gemm_4bit_forward ..." when it cannot: every run here, offline. That kernel only serves bnb's gemv_4bit,
    # which this library never calls (it dequantizes and runs F.linear), and nothing may download at run time,
    # so that one message is dropped; every other bitsandbytes log record passes.
    return not str(record.msg).startswith("Failed to load CPU gemm_4bit_forward from kernels-community")


logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_drop_kernel_hub_warning)   # before bnb's import


# ----------------------------------------------------------------------------------------------
# backends: three functions each, all on 2-D inputs


@dataclass(frozen=True)
class _Kernels:
    linear: Callable  # (x2d, packed, state, bias) -> x2d @ W^T + bias
    grad_input: Callable  # (dy2d, packed, state) -> dy2d @ W
    dequantize: Callable  # (packed, state, dtype) -> W


def _torch_linear(x: Tensor, packed: Tensor, state: NF4State, bias: Tensor | None) -> Tensor:
    return F.linear(x, dequantize_nf4(packed, state, x.dtype), bias)  # (N, out)


def _torch_grad_input(dy: Tensor, packed: Tensor, state: NF4State) -> Tensor:
    return dy @ dequantize_nf4(packed, state, dy.dtype)  # (N, out) @ (out, in) -> (N, in)


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
    import bitsandbytes.functional as bnbf

    if not _bnb_has_native_kernel(packed, state):
        return dequantize_nf4(packed, state, dtype)
    return bnbf.dequantize_4bit(packed, _bnb_quant_state(state, dtype)).view(state.shape)


def _bnb_linear(x: Tensor, packed: Tensor, state: NF4State, bias: Tensor | None) -> Tensor:
    return F.linear(x, _bnb_dequantize(packed, state, x.dtype), bias)


def _bnb_grad_input(dy: Tensor, packed: Tensor, state: NF4State) -> Tensor:
    return dy @ _bnb_dequantize(packed, state, dy.dtype)


_TORCH = _Kernels(_torch_linear, _torch_grad_input, dequantize_nf4)
_BNB = _Kernels(_bnb_linear, _bnb_grad_input, _bnb_dequantize)
_WARNED: set[tuple[str, str]] = set()


def _load_kernels(backend: str, device: torch.device) -> tuple[_Kernels | None, str]:
    """(kernels, "") or (None, why the backend cannot run on `device`)."""
    if backend == "torch":
        return _TORCH, ""
    if backend == "bnb":
        try:
            import bitsandbytes  # noqa: F401
        except Exception as e:  # ImportError, or a broken native library
            return None, f"bitsandbytes cannot be imported: {e}"
        return _BNB, ""
    try:
        tk = importlib.import_module("quant.triton_kernels")  # lazy: triton is an optional extra
    except Exception as e:
        return None, f"quant.triton_kernels cannot be imported: {e}"
    ok, reason = tk.is_available()
    if not ok:
        return None, reason
    if device.type == "cpu" and not getattr(tk, "INTERPRET", False):
        return None, "the tensors are on the CPU and the Triton interpreter (TRITON_INTERPRET=1) is off"
    return _Kernels(tk.nf4_linear, tk.nf4_linear_grad_input, tk.dequantize), ""


def _kernels(backend: str, device: torch.device) -> _Kernels:
    kernels, reason = _load_kernels(backend, device)
    if kernels is not None:
        return kernels
    if (backend, reason) not in _WARNED:
        _WARNED.add((backend, reason))
        warnings.warn(f"Linear4bit backend {backend!r} is unavailable ({reason}); falling back to 'torch'",
                      RuntimeWarning, stacklevel=3)
    return _TORCH


def default_backend(device: torch.device | str = "cpu") -> str:
    """The backend `backend=None` picks for weights on `device` (see the module docstring)."""
    device = torch.device(device)
    order = ("bnb",) if device.type == "cpu" else ("triton", "bnb")
    for backend in order:
        if _native_backend_ok(backend, device.type):
            return backend
    return "torch"


@functools.cache
def _native_backend_ok(backend: str, device_type: str) -> bool:
    if _load_kernels(backend, torch.device(device_type))[0] is None:
        return False
    if backend == "bnb":  # without its compiled library bnb runs slow Python fallbacks: prefer ours
        from bitsandbytes.cextension import ErrorHandlerMockBNBNativeLibrary, lib

        return not isinstance(lib, ErrorHandlerMockBNBNativeLibrary)
    return True


# ----------------------------------------------------------------------------------------------
# autograd


class _NF4LinearFunction(torch.autograd.Function):
    """y = x W^T + b with W kept as NF4; backward re-dequantizes W and returns no weight gradient."""

    @staticmethod
    def forward(ctx, x, packed, bias, state: NF4State, kernels: _Kernels):
        ctx.save_for_backward(packed)  # only the packed bytes: never a dense W
        ctx.state, ctx.kernels = state, kernels
        return kernels.linear(x, packed, state, bias)  # (N, out)

    @staticmethod
    def backward(ctx, dy):
        (packed,) = ctx.saved_tensors
        dx = ctx.kernels.grad_input(dy, packed, ctx.state) if ctx.needs_input_grad[0] else None
        dbias = dy.sum(0) if ctx.needs_input_grad[2] else None  # only when a bias was unfrozen
        return dx, None, dbias, None, None


# ----------------------------------------------------------------------------------------------
# the layer


class Linear4bit(nn.Module):
    """A frozen NF4 linear layer. `weight` is the packed uint8 [(out*in+1)//2, 1] (no grad)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, weight: Tensor | None = None,
                 blocksize: int = 64, double_quant: bool = True, compute_dtype: torch.dtype | None = None,
                 backend: str | None = None, device=None, dtype: torch.dtype | None = None):
        super().__init__()
        _check_shape_args(in_features, out_features, bias, weight, dtype)
        _check_layer_args(blocksize, double_quant, compute_dtype, backend)
        self.in_features, self.out_features = in_features, out_features
        if weight is None:  # placeholder to load a state dict into, like nn.Linear's empty init
            weight = torch.zeros(out_features, in_features, device=device, dtype=dtype or torch.float32)
        if tuple(weight.shape) != (out_features, in_features):
            raise ValueError(f"weight has shape {tuple(weight.shape)}, expected ({out_features}, {in_features})")
        packed, self.quant_state = quantize_nf4(weight, blocksize, double_quant)
        self.weight = nn.Parameter(packed, requires_grad=False)
        b = torch.zeros(out_features, device=weight.device, dtype=weight.dtype) if bias else None
        self.bias = None if b is None else nn.Parameter(b, requires_grad=False)
        self.compute_dtype = compute_dtype
        self.backend = backend or default_backend(weight.device)

    @classmethod
    def from_linear(cls, linear: nn.Linear, blocksize: int = 64, double_quant: bool = True,
                    compute_dtype: torch.dtype | None = None, backend: str | None = None) -> Linear4bit:
        """Quantize `linear`'s weight; the bias is shared (frozen), not copied."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear expects a torch.nn.Linear, got {type(linear).__name__}")
        layer = cls(linear.in_features, linear.out_features, bias=False, weight=linear.weight.detach(),
                    blocksize=blocksize, double_quant=double_quant, compute_dtype=compute_dtype, backend=backend)
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach(), requires_grad=False)
        return layer

    def quantized_copy(self, weight: Tensor) -> Linear4bit:
        """A new layer with this one's config and bias and `weight` [out, in] quantized (lora's merge)."""
        new = Linear4bit(self.in_features, self.out_features, bias=False, weight=weight.detach(),
                         blocksize=self.quant_state.blocksize, double_quant=self.quant_state.double_quant,
                         compute_dtype=self.compute_dtype, backend=self.backend)
        if self.bias is not None:
            new.bias = nn.Parameter(self.bias.detach().clone(), requires_grad=self.bias.requires_grad)
        return new

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        """The dense weight [out, in] in `dtype` (default: the dtype it was quantized from)."""
        kernels = _kernels(self.backend, self.weight.device)
        return kernels.dequantize(self.weight, self.quant_state, dtype or self.quant_state.dtype)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected input [..., {self.in_features}], got {tuple(x.shape)}")
        dtype = self.compute_dtype or x.dtype
        kernels = _kernels(self.backend, x.device)
        bias = None if self.bias is None else self.bias.to(dtype)
        x2d = x.reshape(-1, self.in_features).to(dtype)  # (N, in)
        y = _NF4LinearFunction.apply(x2d, self.weight, bias, self.quant_state, kernels)  # (N, out)
        return y.view(*x.shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        s = self.quant_state
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"blocksize={s.blocksize}, dq={s.double_quant}, compute_dtype={self.compute_dtype}, "
                f"backend={self.backend!r}")

    def _apply(self, fn, recurse=True):
        # Note: .to()/.cuda() move the packed weight through nn.Module; the quant state follows it
        # to the new device but keeps its dtypes (a .half() must not touch the fp32 absmax).
        super()._apply(fn, recurse)
        if self.quant_state.absmax.device != self.weight.device:
            self.quant_state = self.quant_state.to(self.weight.device)
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)  # weight, bias
        for key, value in pack_quant_state(self.quant_state).items():
            destination[prefix + "weight." + key] = value

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        wkey = prefix + "weight"
        ours = {k: v for k, v in state_dict.items() if k == wkey or k.startswith(wkey + ".")}
        rest = {k: v for k, v in state_dict.items() if k not in ours}
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)  # the bias
        if wkey in missing_keys:
            missing_keys.remove(wkey)
        if wkey not in ours:
            missing_keys.append(wkey)
            return
        try:
            self._load_weight(ours, wkey)
        except ValueError as e:
            error_msgs.append(f"{wkey}: {e}")

    def _load_weight(self, entries: dict[str, Tensor], wkey: str) -> None:
        weight = entries[wkey]
        if f"{wkey}.{_QS_KEY}" not in entries:
            if not weight.is_floating_point():
                raise ValueError(f"packed {weight.dtype} weight without its '{wkey}.{_QS_KEY}' entry")
            new = self.quantized_copy(weight.to(self.weight.device))  # a dense nn.Linear checkpoint
            self.weight, self.quant_state = new.weight, new.quant_state
            return
        state = unpack_quant_state({k[len(wkey) + 1:]: v for k, v in entries.items() if k != wkey},
                                   self.weight.device)
        if tuple(state.shape) != (self.out_features, self.in_features):
            raise ValueError(f"checkpoint weight shape {tuple(state.shape)} != "
                             f"({self.out_features}, {self.in_features})")
        # bnb may store the packed bytes in another dtype (quant_storage, for FSDP): view them as bytes
        packed = weight.to(self.weight.device).contiguous().view(torch.uint8).reshape(-1, 1).clone()
        self.weight = nn.Parameter(packed, requires_grad=False)
        self.quant_state = state


def _check_layer_args(blocksize, double_quant, compute_dtype, backend) -> None:
    """The quantization settings Linear4bit and quantize() share; each error names the argument and the choices."""
    check_blocksize(blocksize)
    check_double_quant(double_quant)
    if compute_dtype is not None and not (isinstance(compute_dtype, torch.dtype) and compute_dtype in SUPPORTED_DTYPES):
        raise ValueError(f"compute_dtype must be a floating torch.dtype, one of {SUPPORTED_DTYPES}, or "
                         f"None (compute in the input's dtype); got {describe(compute_dtype)}")
    if backend is not None and not (isinstance(backend, str) and backend in BACKENDS):
        raise ValueError(f"backend must be one of {BACKENDS} or None (the device's fastest); got {describe(backend)}")


def _check_shape_args(in_features, out_features, bias, weight, dtype) -> None:
    for name, n in (("in_features", in_features), ("out_features", out_features)):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"{name} must be an int >= 1; got {describe(n)}")
    if not isinstance(bias, bool):
        raise ValueError(f"bias must be a bool (True adds a frozen bias, zeros until loaded); got {describe(bias)}")
    if weight is not None and not isinstance(weight, Tensor):
        raise ValueError(f"weight must be a torch.Tensor [out_features, in_features] or None (a placeholder to "
                         f"load a state dict into); got {describe(weight)}")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype in SUPPORTED_DTYPES):
        raise ValueError(f"dtype must be one of {SUPPORTED_DTYPES} or None (float32), the "
                         f"placeholder weight's dtype; got {describe(dtype)}")


# ----------------------------------------------------------------------------------------------
# bitsandbytes' serialized quant state


def pack_quant_state(state: NF4State) -> dict[str, Tensor]:
    """NF4State -> bnb's `QuantState.as_dict(packed=True)`: same keys, order and bytes."""
    # Note: bnb packs the non-tensor fields as UTF-8 JSON in a uint8 tensor; we write the same keys in
    # the same order so the bytes match, which lets a checkpoint be diffed against bnb's.
    out = {"absmax": state.absmax, "quant_map": state.code}
    meta = {"quant_type": "nf4", "blocksize": state.blocksize, "dtype": _dtype_name(state.dtype),
            "shape": list(state.shape)}
    if state.double_quant:
        out |= {"nested_absmax": state.nested_absmax, "nested_quant_map": state.nested_code.clone()}
        meta |= {"nested_blocksize": state.nested_blocksize, "nested_dtype": "float32",
                 "nested_offset": state.offset.item()}
    out[_QS_KEY] = torch.tensor(list(json.dumps(meta).encode("utf-8")), dtype=torch.uint8)
    return out


def unpack_quant_state(entries: dict[str, Tensor], device: torch.device | str = "cpu") -> NF4State:
    """bnb's serialized quant state (keys without the `weight.` prefix) -> NF4State."""
    if _QS_KEY not in entries:
        raise ValueError(f"no '{_QS_KEY}' entry: not an NF4 bitsandbytes checkpoint (keys: {sorted(entries)})")
    meta = json.loads(bytes(entries[_QS_KEY].cpu().tolist()).decode("utf-8"))
    if meta.get("quant_type") != "nf4":
        raise ValueError(f"quant_type {meta.get('quant_type')!r} is not supported, only 'nf4'")
    if "quant_map" in entries and not torch.equal(entries["quant_map"].cpu().float(), NF4_CODE):
        raise ValueError("quant_map is not the NF4 table: this checkpoint was not written as NF4")
    nested = "nested_absmax" in entries
    if nested and meta.get("nested_blocksize") != NESTED_BLOCKSIZE:
        raise ValueError(f"nested_blocksize {meta.get('nested_blocksize')} is not supported, only {NESTED_BLOCKSIZE}")
    move = lambda k: entries[k].to(device)  # noqa: E731
    return NF4State(
        shape=torch.Size(meta["shape"]), dtype=getattr(torch, meta["dtype"]), blocksize=meta["blocksize"],
        absmax=move("absmax"), code=NF4_CODE.to(device),
        offset=torch.tensor(float(meta["nested_offset"]), device=device) if nested else None,
        nested_absmax=move("nested_absmax") if nested else None,
        nested_code=move("nested_quant_map") if nested else None,
    )


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")  # torch.bfloat16 -> "bfloat16", as bnb writes it


# ----------------------------------------------------------------------------------------------
# whole models


def quantize(model: nn.Module, blocksize: int = 64, double_quant: bool = True,
             compute_dtype: torch.dtype | None = None, backend: str | None = None,
             skip: Iterable[str] = ("lm_head",),
             weights: Callable[[str], Tensor] | None = None) -> nn.Module:
    """Replace every nn.Linear of `model` (in place) by a Linear4bit, except names matching `skip`.

    A skip entry matches a module whose dotted name equals it or ends with "." + it. Each dense weight
    is released right after its layer is quantized, so peak memory is one model plus one layer.
    Call it before adding LoRA adapters: their lora_A/lora_B are nn.Linear too, so a model that already has
    adapters (ours or PEFT's: any module with `lora_A` and `lora_B` submodules) is refused, unless `skip`
    keeps them dense (skip=("lm_head", "lora_A", "lora_B") quantizes only the wrapped base layers).

    `weights`: for a model built on the meta device (no memory behind its parameters), a function from a
    parameter's full name ("model.layers.0.mlp.up_proj.weight") to its tensor, e.g. read from a safetensors
    file: each linear's weight (and bias) is read when its turn comes, quantized and dropped, so the dense
    model never exists (train.load_model(..., quantize=...) builds models this way).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"quantize expects a torch.nn.Module, got {type(model).__name__}")
    _check_layer_args(blocksize, double_quant, compute_dtype, backend)
    skip = _check_skip(skip)
    if weights is not None and not callable(weights):
        raise ValueError(f"weights must be a function from a parameter name to its tensor (for a dict: its "
                         f".__getitem__), or None; got {describe(weights)}")
    targets = [(name, m) for name, m in model.named_modules()
               if isinstance(m, nn.Linear) and not _matches(name, skip)]
    if targets and targets[0][0] == "":
        raise ValueError("model is itself an nn.Linear and cannot be replaced in place; "
                         "use Linear4bit.from_linear(model)")
    _check_no_adapters(model, [name for name, _ in targets])
    uses = _parameter_use_counts(model)
    for name, linear in targets:
        if linear.weight.is_meta:
            linear.weight = nn.Parameter(_read(weights, name + ".weight"), requires_grad=False)
        if linear.bias is not None and linear.bias.is_meta:
            linear.bias = nn.Parameter(_read(weights, name + ".bias"), requires_grad=False)
        if uses.get(id(linear.weight), 1) > 1:
            warnings.warn(f"{name}.weight is shared with another module; its 4-bit copy unties it", stacklevel=2)
        layer = Linear4bit.from_linear(linear, blocksize, double_quant, compute_dtype, backend)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, layer)
        linear.weight = None  # drop the dense weight now (the `targets` list still holds the module)
    del targets
    _return_freed_memory()
    return model


def _check_skip(skip) -> tuple[str, ...]:
    skip = (skip,) if isinstance(skip, str) else skip
    if skip is None or not isinstance(skip, Iterable):
        raise ValueError(f"skip must be a module name or an iterable of them (e.g. ('lm_head',); () skips "
                         f"nothing); got {describe(skip)}")
    skip = tuple(skip)  # once: a generator is read here, not on every module
    bad = [s for s in skip if not isinstance(s, str) or not s]
    if bad:
        raise ValueError(f"skip entries must be non-empty module names (str), e.g. 'lm_head'; got {describe(bad[0])}")
    return skip


def _check_no_adapters(model: nn.Module, targets: list[str]) -> None:
    """Refuse to quantize LoRA adapters: frozen 4-bit lora_A/lora_B leave nothing to train or save."""
    # Note: duck-typed (a module with `lora_A` and `lora_B` submodules) because quant does not import lora;
    # it also catches PEFT's layers, whose lora_A/lora_B are ModuleDicts of nn.Linear.
    hit = [name or type(model).__name__ for name, m in model.named_modules() if _is_lora_layer(m)
           and any(_under(t, _join(name, "lora_A")) or _under(t, _join(name, "lora_B")) for t in targets)]
    if hit:
        raise ValueError(f"the model already has LoRA adapters ({len(hit)} layer{'s' * (len(hit) > 1)}, e.g. "
                         f"{hit[0]!r}): quantizing would freeze their lora_A/lora_B in 4 bits, leaving nothing to "
                         "train and an adapter that cannot be loaded. Call quant.quantize(model) before lora.inject "
                         "or lora.load (PEFT: before get_peft_model)")


def _is_lora_layer(m: nn.Module) -> bool:
    return isinstance(getattr(m, "lora_A", None), nn.Module) and isinstance(getattr(m, "lora_B", None), nn.Module)


def _join(parent: str, child: str) -> str:
    return f"{parent}.{child}" if parent else child


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _read(weights: Callable[[str], Tensor] | None, name: str) -> Tensor:
    if weights is None:
        raise ValueError(f"{name} is on the meta device (no data): pass `weights=` to read it, or load the "
                         "model's weights first")
    return weights(name)


def _return_freed_memory() -> None:
    """Hand the freed dense weights back to the OS.

    # Note: glibc keeps freed blocks in its arenas, so without this the process RSS stays at the dense
    # model's size after quantizing (measured on SmolLM2-135M: 1003 MiB before, 753 MiB after). No-op
    # where there is no glibc.
    """
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _matches(name: str, skip: tuple[str, ...]) -> bool:
    return any(name == s or name.endswith("." + s) for s in skip)


def _parameter_use_counts(model: nn.Module) -> dict[int, int]:
    counts: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        counts[id(p)] = counts.get(id(p), 0) + 1
    return counts
