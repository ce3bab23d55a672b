"""LoRALinear: a frozen linear layer plus a trainable low-rank update.

    x ──┬──> base_layer (frozen W [out, in]; nn.Linear or a 4-bit layer) ─────────┐
        │                                                                         (+)──> y
        └──> dropout ──> lora_A (r x in, Kaiming) ──> lora_B (out x r, zeros) ──> * scaling

    y = base_layer(x) + scaling * lora_B(lora_A(dropout(x)))      scaling = alpha / r
                                                                   (rsLoRA: alpha / sqrt(r))

The update ΔW = scaling * B @ A is never formed during training: the adapter path costs two
thin matmuls, (..., in) -> (..., r) -> (..., out), and works the same whatever the base layer
stores (a dense weight, or packed NF4 codes that only the base knows how to multiply by).
Hu et al., "LoRA" (2021), and Kalajdzievski, "rsLoRA" (2023), for the sqrt(r) scaling.

Design choices
- Wrap, don't subclass (as torchtune): the base is any module with `in_features`, `out_features`
  and `forward`; the names `base_layer`, `lora_A`, `lora_B`, `lora_dropout` are PEFT's, so state-dict
  keys read `...q_proj.lora_A.weight` exactly as PEFT writes them.
- Init as PEFT: A ~ kaiming_uniform_(a=sqrt(5)) (nn.Linear's default), B = 0, so at init
  the adapter adds exactly 0 and the wrapped model's outputs are bit-identical.
- Note: adapters are fp32 even when the base computes in bf16. x is cast to fp32 for the adapter
  path, the base output is added to the fp32 update in fp32, and the sum is cast back to the base
  output's dtype: one rounding instead of two, and downstream layers still see the base dtype. (The
  add goes through an explicit fp32 copy: the same bits as a mixed-dtype add, at half its CPU time.)
- compute_dtype="base" is the mixed-precision alternative, what torch.autocast does: the fp32 weights
  are cast to the base output's dtype on the fly, both thin matmuls and the add run in it (bf16), and
  the gradients reach the fp32 weights through the casts. The update is rounded to bf16 before the add
  (the sum is rounded either way), and the weight gradients come out of bf16 matmuls (accumulated in
  fp32 inside, rounded once). On the CPU it saves the fp32 copies of every (tokens, out_features)
  activation: a QLoRA step of SmolLM2-135M at bf16 runs ~15% faster (docs/design.md).
- Dropout on the CPU draws its keep-mask from 16 random bits per element (`CheapDropout`): torch's
  Bernoulli sampler costs ~40 ns per element there, a fifth of a whole QLoRA training step.
- Merging folds ΔW into a dense base weight in place (`merge`/`unmerge`, idempotent, guarded by
  `merged`). A 4-bit base cannot hold W + ΔW exactly, so `merge` refuses it; `lora.merge_and_unload`
  dequantizes instead and reports what re-quantizing would lose.
"""

import itertools
import math
import reprlib

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


def is_linear_like(module: nn.Module) -> bool:
    """nn.Linear, or a duck-typed linear (a 4-bit layer): in/out features and a weight or dequantize()."""
    if isinstance(module, LoRALinear):
        return False
    if isinstance(module, nn.Linear):
        return True
    has_shape = hasattr(module, "in_features") and hasattr(module, "out_features")
    return has_shape and (hasattr(module, "weight") or callable(getattr(module, "dequantize", None)))


def has_dense_weight(module: nn.Module) -> bool:
    """True when `module.weight` is a floating-point [out, in] tensor that can be edited in place."""
    if not (hasattr(module, "in_features") and hasattr(module, "out_features")):
        return False
    w = getattr(module, "weight", None)
    return (isinstance(w, Tensor) and w.is_floating_point()
            and tuple(w.shape) == (module.out_features, module.in_features))


def is_quantized(module: nn.Module) -> bool:
    """A linear whose weight is stored packed (4-bit): no dense weight, but a dequantize()."""
    if not (hasattr(module, "in_features") and hasattr(module, "out_features")):
        return False
    return not has_dense_weight(module) and callable(getattr(module, "dequantize", None))


def dense_weight(module: nn.Module) -> Tensor:
    """The base layer's weight as a dense [out, in] tensor in its own dtype (dequantized if 4-bit)."""
    if has_dense_weight(module):
        return module.weight.detach()
    if is_quantized(module):
        return module.dequantize()
    raise TypeError(f"{type(module).__name__} has neither a dense float weight [out, in] nor dequantize(); "
                    "cannot read its weight")


class CheapDropout(nn.Dropout):
    """nn.Dropout whose CPU mask costs 16 random bits per element instead of a Bernoulli draw.

    The keep-mask is `u >= t` for u uniform on the int16 range, so p is rounded to a multiple of 2^-16
    (0.05 -> 0.0500031) and the survivors are scaled by 1 / (1 - that p): E[output] = x exactly. 10x
    faster than torch's CPU Bernoulli sampler; seeded by torch's generator like any dropout. On other
    devices (fast Philox dropout there) and with p = 0 it is nn.Dropout."""

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0 or x.device.type != "cpu" or self.inplace:
            return super().forward(x)
        cut = round(self.p * 65536)                                   # drop where u < cut - 32768
        n = x.numel()
        bits = torch.randint(-2**63, 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64)   # 4 x 16 bits each
        keep = bits.view(torch.int16)[:n].view(x.shape) >= cut - 32768                # (..., in) bool
        return torch.where(keep, x, 0.0) * (65536 / (65536 - cut))


COMPUTE_DTYPES = (None, "fp32", "base")   # None / "fp32": adapter math in fp32; "base": in the base output's dtype


# ----------------------------------------------------------------------------------------------
# argument checks, shared by LoRALinear, inject() and LoraConfig; `name` is the caller's spelling
# ("alpha" in inject, "lora_alpha" in LoraConfig and adapter_config.json)


def describe(value) -> str:
    """`the float nan`: a wrong argument's type and value, for error messages (reprlib cuts a long repr)."""
    return "None" if value is None else f"the {type(value).__name__} {reprlib.repr(value)}"


def _is_finite_number(x) -> bool:
    # bool is an int, and nan/inf pass every `>` or `<` test we would write; an int is always finite
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


def check_compute_dtype(compute_dtype) -> None:
    if not (compute_dtype is None or isinstance(compute_dtype, str) and compute_dtype in COMPUTE_DTYPES):
        raise ValueError(f"compute_dtype must be None or 'fp32' (the adapter's fp32) or 'base' (the base layer's "
                         f"output dtype, autocast-style); got {describe(compute_dtype)}")


def _device_of(module: nn.Module) -> torch.device:
    t = next(itertools.chain(module.parameters(), module.buffers()), None)
    return t.device if t is not None else torch.device("cpu")


class LoRALinear(nn.Module):
    """`y = base_layer(x) + scaling * lora_B(lora_A(lora_dropout(x)))`; see the module docstring."""

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False,
                 compute_dtype: str | None = None):
        super().__init__()
        if not is_linear_like(base):
            raise TypeError(f"LoRALinear wraps a linear layer (nn.Linear or a module with in_features, "
                            f"out_features and a weight or dequantize()); got {type(base).__name__}")
        check_rank(r)
        check_alpha(alpha)
        check_dropout(dropout)
        check_use_rslora(use_rslora)
        check_compute_dtype(compute_dtype)
        self.base_layer = base.requires_grad_(False)             # frozen: only A and B train
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r, self.lora_alpha, self.use_rslora = r, alpha, use_rslora
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        self.lora_dropout = CheapDropout(dropout) if dropout > 0 else nn.Identity()
        device = _device_of(base)
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=device, dtype=torch.float32)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=device, dtype=torch.float32)
        self.reset_lora_parameters()
        self.compute_dtype = compute_dtype   # None / "fp32": adapter math in fp32 | "base": in the base dtype
        self.merged = False     # True while ΔW is folded into base_layer.weight
        self.disabled = False   # True: forward is base_layer(x) alone

    def reset_lora_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # U(-1/sqrt(in), 1/sqrt(in))
        nn.init.zeros_(self.lora_B.weight)

    @property
    def weight(self) -> Tensor:
        """The base layer's weight (some model code reads `proj.weight.dtype` / `.device`)."""
        return self.base_layer.weight

    @property
    def bias(self) -> Tensor | None:
        return getattr(self.base_layer, "bias", None)

    def forward(self, x: Tensor) -> Tensor:
        out = self.base_layer(x)                                   # (..., out), base dtype
        if self.merged:
            if self.disabled:
                raise RuntimeError("this LoRA layer is merged into its base weight, so it cannot be disabled; "
                                   "call lora.unmerge(model) first")
            return out
        if self.disabled:
            return out
        if self.compute_dtype == "base" and out.dtype != self.lora_A.weight.dtype:
            dtype = out.dtype                                      # autocast-style: fp32 weights, bf16 math
            h = F.linear(self.lora_dropout(x.to(dtype)), self.lora_A.weight.to(dtype))       # (..., r)
            return torch.add(out, F.linear(h, self.lora_B.weight.to(dtype)), alpha=self.scaling)
        h = self.lora_A(self.lora_dropout(x.to(self.lora_A.weight.dtype)))  # (..., r), fp32
        delta = self.lora_B(h)                                     # (..., out), fp32
        if out.dtype == delta.dtype:
            return torch.add(out, delta, alpha=self.scaling)
        return out.float().add_(delta, alpha=self.scaling).to(out.dtype)   # add in fp32, one rounding

    def delta_weight(self) -> Tensor:
        """ΔW = scaling * B @ A, fp32 [out, in]. For merging only: forward never builds it."""
        return self.scaling * (self.lora_B.weight @ self.lora_A.weight)  # (out, r) @ (r, in)

    @torch.no_grad()
    def merge(self) -> None:
        """W <- W + ΔW in place (dense base only). Idempotent."""
        if self.merged:
            return
        w = self._editable_weight("merge")
        w.copy_((w.float() + self.delta_weight()).to(w.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """W <- W - ΔW in place. Idempotent. Exact in fp32 up to rounding; bf16 loses ~1 ulp."""
        if not self.merged:
            return
        w = self._editable_weight("unmerge")
        w.copy_((w.float() - self.delta_weight()).to(w.dtype))
        self.merged = False

    def _editable_weight(self, what: str) -> Tensor:
        if not has_dense_weight(self.base_layer):
            raise ValueError(f"cannot {what} in place into a {type(self.base_layer).__name__} base: a 4-bit "
                             "weight cannot hold W + scaling*B@A exactly. Use lora.merge_and_unload(model) "
                             "for dense merged layers, or merge_and_unload(model, requantize=True) to "
                             "re-quantize with a report of what is lost")
        return self.base_layer.weight.data

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"lora_alpha={self.lora_alpha}, scaling={self.scaling:.4g}, compute_dtype={self.compute_dtype}, "
                f"merged={self.merged}, disabled={self.disabled}")
