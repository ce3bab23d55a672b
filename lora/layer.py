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
  activation: a QLoRA step of SmolLM2-135M at bf16 runs ~15% faster (docs/design.md). There the B matmul
  accumulates onto the base output (`torch.addmm`, one GEMM: no (tokens, out) temporary, and the backward
  scales only the thin gradients), and dropout's survivor scale 1/(1-p) joins `scaling` in that GEMM: the
  mask alone touches x, one multiply instead of two, forward and backward.
- Dropout on the CPU draws its keep-mask from 16 random bits per element (`CheapDropout`, lora/dropout.py): torch's
  Bernoulli sampler costs ~40 ns per element there, a fifth of a whole QLoRA training step. Under the library's
  gradient checkpointing the recompute unpacks the forward's masks instead of drawing them again.
- Merging folds ΔW into a dense base weight in place (`merge`/`unmerge`, idempotent, guarded by
  `merged`). A 4-bit base cannot hold W + ΔW exactly, so `merge` refuses it; `lora.merge_and_unload`
  dequantizes instead and reports what re-quantizing would lose.
- Several adapters on one base (PEFT's adapter names): the "default" adapter's weights live on the layer
  itself, so its keys stay `...q_proj.lora_A.weight`; any other named adapter is an `Adapter` (the same
  attribute names) in `lora_adapters[name]`. `active_adapters` lists what forward uses; the updates of
  several active adapters add, in fp32. One active LoRA adapter runs exactly the single-adapter code, so its
  outputs are bit-identical to that adapter loaded alone; a layer that lacks an active adapter skips it.
- DoRA (`use_dora=True`, lora.dora): y = g ⊙ (W x + s·B·A x) + b with g = m / ||W + s·B·A||_row. Its
  update is computed in fp32 whatever compute_dtype says.
"""

import itertools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from . import dora
from .dropout import CheapDropout
from .checks import (COMPUTE_DTYPES, DEFAULT_ADAPTER, check_adapter_name, check_alpha, check_compute_dtype,  # noqa: F401
                     check_dropout, check_rank, check_use_dora, check_use_rslora, describe)


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


def _device_of(module: nn.Module) -> torch.device:
    t = next(itertools.chain(module.parameters(), module.buffers()), None)
    return t.device if t is not None else torch.device("cpu")




def _check_adapter_args(name, r, alpha, dropout, use_rslora, use_dora) -> None:
    check_adapter_name(name)
    check_rank(r)
    check_alpha(alpha)
    check_dropout(dropout)
    check_use_rslora(use_rslora)
    check_use_dora(use_dora)


# one adapter's attributes, under PEFT's names; the "default" adapter keeps them on the LoRALinear itself
ADAPTER_ATTRS = ("lora_dropout", "lora_A", "lora_B", "lora_magnitude_vector", "r", "lora_alpha", "use_rslora",
                 "use_dora", "scaling")


def _build(owner: nn.Module, in_features: int, out_features: int, r: int, alpha: float, dropout: float,
           use_rslora: bool, use_dora: bool, device: torch.device) -> None:
    """Gives `owner` one adapter: lora_dropout, lora_A (r x in, Kaiming), lora_B (out x r, zeros), fp32;
    with DoRA also lora_magnitude_vector (out,), set by the caller to ||W||_row (lora.dora)."""
    owner.r, owner.lora_alpha, owner.use_rslora, owner.use_dora = r, alpha, use_rslora, use_dora
    owner.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
    owner.lora_dropout = CheapDropout(dropout) if dropout > 0 else nn.Identity()
    owner.lora_A = nn.Linear(in_features, r, bias=False, device=device, dtype=torch.float32)
    owner.lora_B = nn.Linear(r, out_features, bias=False, device=device, dtype=torch.float32)
    _reset(owner)
    magnitude = torch.ones(out_features, device=device, dtype=torch.float32) if use_dora else None
    owner.lora_magnitude_vector = None if magnitude is None else nn.Parameter(magnitude)


def _reset(slot: nn.Module) -> None:
    nn.init.kaiming_uniform_(slot.lora_A.weight, a=math.sqrt(5))  # U(-1/sqrt(in), 1/sqrt(in))
    nn.init.zeros_(slot.lora_B.weight)


class Adapter(nn.Module):
    """A named adapter other than "default", in LoRALinear.lora_adapters[name]: the same attributes under the
    same names (lora_A, lora_B, lora_dropout, lora_magnitude_vector, r, lora_alpha, scaling, use_dora)."""

    def __init__(self, in_features: int, out_features: int, r: int, alpha: float, dropout: float,
                 use_rslora: bool, use_dora: bool, device: torch.device):
        super().__init__()
        _build(self, in_features, out_features, r, alpha, dropout, use_rslora, use_dora, device)

    def extra_repr(self) -> str:
        return f"r={self.r}, lora_alpha={self.lora_alpha}, scaling={self.scaling:.4g}, use_dora={self.use_dora}"


class LoRALinear(nn.Module):
    """`y = base_layer(x) + scaling * lora_B(lora_A(lora_dropout(x)))`; see the module docstring."""

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False,
                 compute_dtype: str | None = None, use_dora: bool = False, adapter_name: str = DEFAULT_ADAPTER):
        super().__init__()
        if not is_linear_like(base):
            raise TypeError(f"LoRALinear wraps a linear layer (nn.Linear or a module with in_features, "
                            f"out_features and a weight or dequantize()); got {type(base).__name__}")
        _check_adapter_args(adapter_name, r, alpha, dropout, use_rslora, use_dora)
        check_compute_dtype(compute_dtype)
        self.base_layer = base.requires_grad_(False)             # frozen: only the adapters train
        self.in_features, self.out_features = base.in_features, base.out_features
        self.lora_adapters = nn.ModuleDict()     # named adapters other than "default" (which lives on self)
        self.active_adapters = [adapter_name]    # what forward adds; set by lora.set_adapter
        self.merged_adapters: list[str] = []     # what merge() folded into base_layer.weight
        self.merge_scales: dict[str, Tensor] = {}   # DoRA's g of each merged adapter, which unmerge divides by
        self.compute_dtype = compute_dtype   # None / "fp32": adapter math in fp32 | "base": in the base dtype
        self.disabled = False                # True: forward is base_layer(x) alone
        self.add_adapter(adapter_name, r, alpha, dropout, use_rslora, use_dora)

    # --- the adapters this layer holds ---------------------------------------------------------------

    def add_adapter(self, name: str, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False,
                    use_dora: bool = False, init_magnitude: bool = True) -> None:
        """Adds adapter `name` (A Kaiming, B zero, DoRA's m = ||W||_row: no output change); not made active."""
        _check_adapter_args(name, r, alpha, dropout, use_rslora, use_dora)
        if self.has_adapter(name):
            raise ValueError(f"this layer already has an adapter named {name!r} (it has {self.adapter_names})")
        if self.merged:
            raise ValueError(f"cannot add adapter {name!r} to a merged layer; call lora.unmerge(model) first")
        weight = dense_weight(self.base_layer) if use_dora and init_magnitude else None   # raises before changes
        args = (self.in_features, self.out_features, r, alpha, dropout, use_rslora, use_dora,
                _device_of(self.base_layer))
        if name == DEFAULT_ADAPTER:
            _build(self, *args)
            slot = self
        else:
            slot = self.lora_adapters[name] = Adapter(*args)
        if weight is not None:
            dora.init_magnitude(slot, weight)
        for m in (slot.lora_dropout, slot.lora_A, slot.lora_B, slot):
            if m is not self:
                m.train(self.training)                              # follow the layer's train/eval mode

    def delete_adapter(self, name: str) -> None:
        self.adapter(name)                                          # unknown name: a ValueError naming the known
        if self.merged:
            raise ValueError(f"cannot delete adapter {name!r} from a merged layer; call lora.unmerge(model) first")
        if name == DEFAULT_ADAPTER:
            for attr in ADAPTER_ATTRS:
                delattr(self, attr)
        else:
            del self.lora_adapters[name]
        self.active_adapters = [n for n in self.active_adapters if n != name]

    def has_adapter(self, name: str) -> bool:
        return "lora_A" in self._modules if name == DEFAULT_ADAPTER else name in self.lora_adapters

    @property
    def adapter_names(self) -> list[str]:
        return ([DEFAULT_ADAPTER] if self.has_adapter(DEFAULT_ADAPTER) else []) + list(self.lora_adapters)

    def adapter(self, name: str) -> nn.Module:
        """The module holding adapter `name`'s lora_A, lora_B, ...: this layer for "default", else an Adapter."""
        if not self.has_adapter(name):
            raise ValueError(f"unknown adapter {name!r}; this layer has {self.adapter_names}")
        return self if name == DEFAULT_ADAPTER else self.lora_adapters[name]

    def _active(self) -> list[str]:
        return [n for n in self.active_adapters if self.has_adapter(n)]   # a layer may lack some adapters

    def reset_lora_parameters(self, adapter_name: str = DEFAULT_ADAPTER) -> None:
        _reset(self.adapter(adapter_name))

    @property
    def weight(self) -> Tensor:
        """The base layer's weight (some model code reads `proj.weight.dtype` / `.device`)."""
        return self.base_layer.weight

    @property
    def bias(self) -> Tensor | None:
        return getattr(self.base_layer, "bias", None)

    @property
    def merged(self) -> bool:
        """True while the active adapters' ΔW is folded into base_layer.weight."""
        return bool(self.merged_adapters)

    # --- forward ----------------------------------------------------------------------------------------

    def forward(self, x: Tensor) -> Tensor:
        out = self.base_layer(x)                                   # (..., out), base dtype
        if self.merged:
            if self.disabled:
                raise RuntimeError("this LoRA layer is merged into its base weight, so it cannot be disabled; "
                                   "call lora.unmerge(model) first")
            return out
        slots = [] if self.disabled else [self.adapter(n) for n in self._active()]
        if len(slots) == 1 and not slots[0].use_dora:
            return self._add_lora(slots[0], x, out)                # one LoRA adapter: the single-adapter path
        update = None
        for slot in slots:                                         # several: their fp32 updates add
            u = self._update(slot, x, out)                         # (..., out) fp32
            update = u if update is None else update.add_(u)
        if update is None:
            return out
        return out + update if out.dtype == update.dtype else out.float().add_(update).to(out.dtype)

    def _add_lora(self, slot: nn.Module, x: Tensor, out: Tensor) -> Tensor:
        if self.compute_dtype == "base" and out.dtype != slot.lora_A.weight.dtype:
            dtype = out.dtype                                      # autocast-style: fp32 weights, bf16 math
            x_kept, keep_scale = _dropped(slot.lora_dropout, x.to(dtype))                  # scale folded below
            h = F.linear(x_kept, slot.lora_A.weight.to(dtype))                             # (..., r)
            return _add_product(out, h, slot.lora_B.weight.to(dtype), slot.scaling * keep_scale)
        h = slot.lora_A(slot.lora_dropout(x.to(slot.lora_A.weight.dtype)))  # (..., r), fp32
        delta = slot.lora_B(h)                                     # (..., out), fp32
        if out.dtype == delta.dtype:
            return torch.add(out, delta, alpha=slot.scaling)
        return out.float().add_(delta, alpha=slot.scaling).to(out.dtype)   # add in fp32, one rounding

    def _update(self, slot: nn.Module, x: Tensor, out: Tensor) -> Tensor:
        """One adapter's Δy in fp32 (..., out); `out` = base_layer(x). DoRA: lora.dora.update."""
        if slot.use_dora:
            return dora.update(slot, dense_weight(self.base_layer), self.bias, x, out, self.training,
                               base=self.base_layer)
        h = slot.lora_A(slot.lora_dropout(x.to(slot.lora_A.weight.dtype)))  # (..., r), fp32
        return slot.lora_B(h).mul_(slot.scaling)                   # (..., out), fp32

    # --- merging ----------------------------------------------------------------------------------------

    def delta_weight(self, adapter_name: str = DEFAULT_ADAPTER) -> Tensor:
        """scaling * B @ A, fp32 [out, in] (DoRA's whole update: merged_update). Forward never builds it."""
        slot = self.adapter(adapter_name)
        return slot.scaling * (slot.lora_B.weight @ slot.lora_A.weight)  # (out, r) @ (r, in)

    def _fold_terms(self, weight: Tensor | None, names: list[str], gains: dict | None = None):
        """(c, D, gains): adapters `names` merged into the unmerged W give c ⊙ W + D (c None: 1), fp32.
        LoRA adds D = s·B·A; DoRA makes c = 1 + Σ (g - 1) and adds g ⊙ s·B·A (g: from `gains` if given)."""
        scale, delta, used = None, None, {}
        for name in names:
            slot = self.adapter(name)
            if slot.use_dora:
                g, d = dora.fold(slot, weight, None if gains is None else gains[name])
                used[name] = g
                scale = g if scale is None else scale + (g - 1)    # (out,)
            else:
                d = self.delta_weight(name)                        # (out, in)
            delta = d if delta is None else delta.add_(d)
        return scale, delta, used

    def merged_update(self, weight: Tensor) -> Tensor:
        """ΔW, fp32 [out, in], that merging the active adapters adds to the unmerged `weight` [out, in]."""
        names = self._active()
        if not names:
            return torch.zeros(self.out_features, self.in_features, device=weight.device)
        scale, delta, _ = self._fold_terms(weight, names)
        return delta if scale is None else delta.addcmul_(weight.float(), (scale - 1)[:, None])

    @torch.no_grad()
    def merge(self) -> None:
        """W <- W + ΔW of the active adapters, in place (dense base only). Idempotent."""
        names = self._active()
        if self.merged or not names:
            return
        w = self._editable_weight("merge")
        scale, delta, gains = self._fold_terms(w, names)
        merged = w.float() + delta if scale is None else torch.addcmul(delta, w.float(), scale[:, None])
        w.copy_(merged.to(w.dtype))
        self.merged_adapters, self.merge_scales = names, gains

    @torch.no_grad()
    def unmerge(self) -> None:
        """W <- W - ΔW in place (DoRA: (W - g ⊙ s·B·A) / g). Idempotent. Exact in fp32 up to rounding."""
        if not self.merged:
            return
        w = self._editable_weight("unmerge")
        scale, delta, _ = self._fold_terms(None, self.merged_adapters, self.merge_scales)
        restored = w.float() - delta if scale is None else (w.float() - delta).div_(scale[:, None])
        w.copy_(restored.to(w.dtype))
        self.merged_adapters, self.merge_scales = [], {}

    def _editable_weight(self, what: str) -> Tensor:
        if not has_dense_weight(self.base_layer):
            raise ValueError(f"cannot {what} in place into a {type(self.base_layer).__name__} base: a 4-bit "
                             "weight cannot hold W + scaling*B@A exactly. Use lora.merge_and_unload(model) "
                             "for dense merged layers, or merge_and_unload(model, requantize=True) to "
                             "re-quantize with a report of what is lost")
        return self.base_layer.weight.data

    def extra_repr(self) -> str:
        own = (f"r={self.r}, lora_alpha={self.lora_alpha}, scaling={self.scaling:.4g}, use_dora={self.use_dora}, "
               if self.has_adapter(DEFAULT_ADAPTER) else "")
        return (f"in_features={self.in_features}, out_features={self.out_features}, {own}"
                f"compute_dtype={self.compute_dtype}, active={self.active_adapters}, merged={self.merged}, "
                f"disabled={self.disabled}")


def _dropped(dropout: nn.Module, x: Tensor) -> tuple[Tensor, float]:
    """(x after dropout's mask, the factor its survivors still owe): CheapDropout leaves the scale to the caller."""
    return dropout.masked(x) if isinstance(dropout, CheapDropout) else (dropout(x), 1.0)


def _add_product(out: Tensor, h: Tensor, w: Tensor, alpha: float) -> Tensor:
    """out + alpha * h @ w^T as one GEMM that accumulates onto out (torch.addmm): no (..., out) temporary, and
    the backward scales only the (..., r) and (out, r) gradients, not a (..., out) one."""
    if out.dim() < 2 or not out.is_contiguous():
        return torch.add(out, F.linear(h, w), alpha=alpha)
    flat = torch.addmm(out.view(-1, out.shape[-1]), h.reshape(-1, h.shape[-1]), w.t(), alpha=alpha)
    return flat.view(out.shape)


def lora_layers(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


def adapter_parameters(slot: nn.Module) -> list[nn.Parameter]:
    """One adapter's own trainable tensors: lora_A, lora_B (and DoRA's magnitude)."""
    params = [slot.lora_A.weight, slot.lora_B.weight]
    return params + ([slot.lora_magnitude_vector] if slot.lora_magnitude_vector is not None else [])
