"""Folding adapters into the base weights: merge / unmerge in place, and merge_and_unload.

    merge:            W <- W + ΔW                   (dense bases only; idempotent, guarded by `merged`)
    unmerge:          W <- W - ΔW                   (exact up to one rounding of W's dtype)
    merge_and_unload: LoRALinear -> plain layer holding W + ΔW; the model no longer has LoRA

ΔW is the sum over the active adapters (lora.set_adapter): scaling * B @ A for LoRA, and for DoRA
m ⊙ (W + s·B·A) / ||W + s·B·A||_row - W, its norm taken on the unmerged W (lora.dora). merge_and_unload keeps
the active adapters' sum and drops the inactive ones (as PEFT); modules_to_save keep the active copy.

A 4-bit base cannot be edited in place: NF4 has 16 levels per block, and an update ΔW is usually far
smaller than one quantization step, so W + ΔW re-quantized mostly rounds back to W. `merge()` therefore
raises on 4-bit bases (before touching any layer) and points to merge_and_unload, which dequantizes,
adds ΔW in fp32 and keeps a dense nn.Linear (default), or re-quantizes through the base's own
`quantized_copy(W)` and reports, per layer, how much of the update the stored weight lost:

    lost = ||W_stored - (W + ΔW)||_F / ||ΔW||_F        0: all of it kept; ~1: as if never trained

The report (a list of dicts) is attached to the returned model as `model.lora_merge_report`.
"""

import torch
import torch.nn as nn

from .layer import LoRALinear, dense_weight, has_dense_weight, is_quantized, lora_layers


def _require_layers(model: nn.Module, what: str) -> list[tuple[str, LoRALinear]]:
    layers = lora_layers(model)
    if not layers:
        raise ValueError(f"cannot {what}: the model has no LoRA layers (call lora.inject or lora.load first)")
    return layers


def merge(model: nn.Module) -> nn.Module:
    """Folds the active adapters into their dense base weights in place; forward then skips the adapter path."""
    layers = _require_layers(model, "merge")
    packed = [n for n, m in layers if not has_dense_weight(m.base_layer)]
    if packed:
        raise ValueError(f"cannot merge in place: {len(packed)} LoRA layers have a 4-bit base (e.g. {packed[0]!r}) "
                         "that cannot hold W + scaling*B@A exactly. Use lora.merge_and_unload(model) for dense "
                         "merged layers, or merge_and_unload(model, requantize=True) to re-quantize with a "
                         "report of what is lost")
    for _, layer in layers:
        layer.merge()
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Undoes merge(): subtracts every merged adapter from its base weight. Idempotent."""
    for _, layer in _require_layers(model, "unmerge"):
        layer.unmerge()
    return model


@torch.no_grad()
def _fold(layer: LoRALinear, requantize: bool) -> tuple[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(new plain module, intended fp32 weight W + ΔW, the weight it really holds (fp32), ΔW)."""
    layer.unmerge()                               # start from W itself (no-op unless merged in place)
    base = layer.base_layer
    w = dense_weight(base)                                     # (out, in), base dtype
    delta = layer.merged_update(w)                             # (out, in) fp32, the active adapters' ΔW
    intended = w.float() + delta
    if has_dense_weight(base):                    # edit the existing nn.Linear, no second copy
        base.weight.data.copy_(intended.to(w.dtype))
        return base, intended, base.weight.float(), delta
    if requantize:
        new = base.quantized_copy(intended.to(w.dtype))
        return new, intended, new.dequantize().float(), delta
    bias = getattr(base, "bias", None)
    new = nn.Linear(base.in_features, base.out_features, bias=bias is not None, device=w.device, dtype=w.dtype)
    new.weight.data.copy_(intended)
    if bias is not None:
        new.bias = bias if isinstance(bias, nn.Parameter) else nn.Parameter(bias.detach().clone())
    new.weight.requires_grad_(False)
    return new, intended, new.weight.float(), delta


def merge_and_unload(model: nn.Module, requantize: bool = False) -> nn.Module:
    """Replaces every LoRALinear by a plain layer holding W + ΔW; returns the model (see module docstring).

    requantize=False: 4-bit bases become dense nn.Linear (dtype of their dequantized weight).
    requantize=True: 4-bit bases are re-quantized via `base.quantized_copy(W + ΔW)`; dense bases stay dense.
    """
    layers = _require_layers(model, "merge_and_unload")
    if requantize:
        missing = [n for n, m in layers if is_quantized(m.base_layer)
                   and not callable(getattr(m.base_layer, "quantized_copy", None))]
        if missing:
            raise ValueError(f"requantize=True needs base.quantized_copy(weight); {missing[0]!r} "
                             f"({type(dict(layers)[missing[0]].base_layer).__name__}) has none. "
                             "Use requantize=False to keep dense merged weights")
    modules, report = dict(model.named_modules()), []
    for name, layer in layers:
        new, intended, stored, delta = _fold(layer, requantize)
        parent, _, child = name.rpartition(".")
        setattr(modules[parent], child, new)
        report.append(_report_row(name, intended - stored, delta, requantized=requantize and is_quantized(new)))
    for attr in ("lora_config", "lora_registry"):
        if hasattr(model, attr):
            delattr(model, attr)
    model.lora_merge_report = report
    return model


def _report_row(name: str, error: torch.Tensor, delta: torch.Tensor, requantized: bool) -> dict:
    err, dn = error.norm().item(), delta.norm().item()
    lost = err / dn if dn > 0 else (0.0 if err == 0 else float("inf"))
    return {"module": name, "delta_norm": dn, "error_norm": err, "lost": lost, "requantized": requantized}
