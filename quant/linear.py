"""Linear4bit: a frozen NF4 linear layer, and `quantize(model)` that swaps a model's nn.Linear for it.

    y = x @ dequantize(W_nf4)^T + b            computed in compute_dtype (default: x.dtype)
    dL/dx = dL/dy @ dequantize(W_nf4)          the only gradient; W is frozen, b is frozen by default

Memory: the autograd Function saves only the packed uint8 weight and dequantizes it again in
backward, so no dense copy of W lives between forward and backward (torchao's NF4 does the same).

Backends (one switch, `backend=`: "torch" | "bnb" | "triton", quant/backends.py). The default, None, picks the
fastest correct one per device, op and shape class: on the CPU "bnb" (measured offline: its dequantize kernel is
2-6x faster than quant.nf4's and exact), on CUDA by timing the candidates on the first real call of each shape
class and caching the winner (`quant.backend_choice()` says what was picked, how and why).

Devices: `.to("cuda")` moves the packed weight and the quant state (absmax, double-quant tables) together;
`quantize(model, device="cuda")` quantizes each layer on the GPU from its dense weight, which is freed at once,
so the GPU never holds a dense copy of the model. The bytes do not depend on the device.

The state dict uses bitsandbytes' Linear4bit keys and bytes (`weight`, `weight.absmax`,
`weight.quant_map`, `weight.nested_absmax`, `weight.nested_quant_map`,
`weight.quant_state.bitsandbytes__nf4`, `bias`), so checkpoints move between the two libraries.
"""
from __future__ import annotations

import ctypes
import gc
import logging
import warnings
from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn

from quant import backends  # imports bitsandbytes lazily, after the log filter below is in place
from quant.backends import BACKENDS, default_backend  # noqa: F401 - re-exported
from quant.bnb_format import QS_KEY, pack_quant_state, unpack_quant_state
from quant.nf4 import SUPPORTED_DTYPES, NF4State, check_blocksize, check_double_quant, describe, quantize_nf4



def _drop_kernel_hub_warning(record: logging.LogRecord) -> bool:
    # Note: bitsandbytes 0.50 on a CPU with AVX512-BF16 tries, as it is imported, to fetch a fused gemv kernel
    # from the Hugging Face hub (the `kernels` package, "kernels-community") and logs "Failed to load CPU
    # gemm_4bit_forward ..." when it cannot: every run here, offline. That kernel only serves bnb's gemv_4bit,
    # which this library never calls (it dequantizes and runs F.linear), and nothing may download at run time,
    # so that one message is dropped; every other bitsandbytes log record passes.
    return not str(record.msg).startswith("Failed to load CPU gemm_4bit_forward from kernels-community")


logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_drop_kernel_hub_warning)   # before bnb's import


# ----------------------------------------------------------------------------------------------
# autograd


class _NF4LinearFunction(torch.autograd.Function):
    """y = x W^T + b with W kept as NF4; backward re-dequantizes W and returns no weight gradient."""

    @staticmethod
    def forward(ctx, x, packed, bias, state: NF4State, backend: str | None):
        ctx.save_for_backward(packed)  # only the packed bytes: never a dense W
        ctx.state, ctx.backend = state, backend
        return backends.for_linear(backend, x, packed, state, bias).linear(x, packed, state, bias)  # (N, out)

    @staticmethod
    def backward(ctx, dy):
        (packed,) = ctx.saved_tensors
        dx = None
        if ctx.needs_input_grad[0]:
            dx = backends.for_grad_input(ctx.backend, dy, packed, ctx.state).grad_input(dy, packed, ctx.state)
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
        self.backend = backend  # None: chosen per device and shape class (quant/backends.py)

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
        dtype = dtype or self.quant_state.dtype
        kernels = backends.for_dequantize(self.backend, self.weight, self.quant_state, dtype)
        return kernels.dequantize(self.weight, self.quant_state, dtype)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected input [..., {self.in_features}], got {tuple(x.shape)}")
        dtype = self.compute_dtype or x.dtype
        bias = None if self.bias is None else self.bias.to(dtype)
        x2d = x.reshape(-1, self.in_features).to(dtype)  # (N, in)
        y = _NF4LinearFunction.apply(x2d, self.weight, bias, self.quant_state, self.backend)  # (N, out)
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
        if f"{wkey}.{QS_KEY}" not in entries:
            if not weight.is_floating_point():
                raise ValueError(f"packed {weight.dtype} weight without its '{wkey}.{QS_KEY}' entry")
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
# whole models


def quantize(model: nn.Module, blocksize: int = 64, double_quant: bool = True,
             compute_dtype: torch.dtype | None = None, backend: str | None = None,
             skip: Iterable[str] = ("lm_head",),
             weights: Callable[[str], Tensor] | None = None, device: torch.device | str | None = None) -> nn.Module:
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

    `device` (e.g. "cuda"): each dense weight is moved there alone, quantized there and freed, then the rest of
    the model (embeddings, norms, skipped layers) follows; parameters still on the meta device stay there. The
    GPU holds the 4-bit model plus one dense layer at a time, never the dense model, and the bytes are the
    same as quantizing on the CPU. None: quantize where each weight already is.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"quantize expects a torch.nn.Module, got {type(model).__name__}")
    _check_layer_args(blocksize, double_quant, compute_dtype, backend)
    skip = _check_skip(skip)
    device = _check_device(device)
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
        if device is not None:  # this layer alone goes to the device, dense, for as long as it is quantized
            _move_parameters(linear, device)
        layer = Linear4bit.from_linear(linear, blocksize, double_quant, compute_dtype, backend)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, layer)
        linear.weight = None  # drop the dense weight now (the `targets` list still holds the module)
    del targets
    _return_freed_memory()
    if device is not None:
        model._apply(lambda t: t if t.is_meta else t.to(device))  # the rest; tied parameters stay tied
    return model


def _check_device(device) -> torch.device | None:
    if device is None:
        return None
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be a torch.device or a name like 'cuda', 'cuda:1' or 'cpu', or None "
                         f"(quantize where the weights are); got {describe(device)}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={str(device)!r} but torch sees no CUDA GPU here; use device=None or 'cpu'")
    return device


def _move_parameters(linear: nn.Linear, device: torch.device) -> None:
    for key in ("weight", "bias"):
        p = getattr(linear, key)
        if p is not None and p.device != device:
            setattr(linear, key, nn.Parameter(p.detach().to(device), requires_grad=False))


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
