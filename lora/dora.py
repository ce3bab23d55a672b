"""DoRA: weight-decomposed low-rank adaptation (Liu et al., "DoRA", 2024); PEFT's `use_dora=True`.

DoRA splits the adapted weight into a direction and a trained magnitude per output row:

    W' = m ⊙ (W + s·B·A) / ||W + s·B·A||_row          m: (out,) trainable, ||.||_row over in_features
    y  = W' x + b = g ⊙ (W x + s·B·A x) + b           g = m / ||W + s·B·A||_row   (out,)

At init B = 0 and m = ||W||_row, so g = 1 and the output is unchanged (as LoRA's). Section 4.3 of the paper
treats the norm as a constant in backward: it is computed under no_grad, so m gets dy/dm = (W x + s·B·A x) /
||.||, and A, B get gradients only through g ⊙ s·B·A x (never through the norm). PEFT does the same.

Forward without forming W' (as PEFT lays it out): base(x) already holds W x + b, and DoRA adds

    Δy = (g - 1) ⊙ (W x) + g ⊙ s·B·A x                   W x = base(x) - b

With dropout active (training, p > 0) PEFT feeds the dropped input to both terms:
Δy = (g - 1) ⊙ (W·drop(x)) + g ⊙ s·B·A·drop(x), with W·drop(x) a separate matmul; we do the same.

Note: the norm needs every row of W + s·B·A. W is the base's weight as it is (a dense weight is read in
place; a 4-bit base's `dequantize()` gives one layer's dense copy at a time), and W + s·B·A is built
CHUNK_ELEMENTS at a time in fp32, so beyond W only a (rows, in) chunk exists: never a second full copy.
It is recomputed every forward (A and B change every step); PEFT recomputes it too. A row of W + s·B·A that
is all zero has norm 0 and gives NaN, in PEFT as here: DoRA is for layers without dead rows.

Merging: W' = g ⊙ W + g ⊙ s·B·A, with g from the unmerged W; unmerge keeps that g (W changes when merged)
and inverts it, W = (W' - g ⊙ s·B·A) / g, which is exact up to rounding of W's dtype.

Several active adapters (lora.set_adapter(model, [..])) add their updates Δy, each computed against the
unadapted base. PEFT instead rescales the running sum with every DoRA adapter, so its result depends on
their order; for one adapter, alone or beside plain LoRA adapters, the two agree.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

CHUNK_ELEMENTS = 1 << 22          # 16 MiB of fp32 per chunk of W + s·B·A


@torch.no_grad()
def weight_norm(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float,
                chunk_rows: int | None = None) -> Tensor:
    """||W + s·B·A|| per output row, fp32 (out,), built `chunk_rows` rows at a time; detached (no grad)."""
    n_out, n_in = weight.shape
    rows = chunk_rows or max(1, CHUNK_ELEMENTS // n_in)
    norms = torch.empty(n_out, dtype=torch.float32, device=weight.device)
    for i in range(0, n_out, rows):
        w = weight[i:i + rows].to(torch.float32, copy=True)             # (c, in); a copy: never W itself
        w.addmm_(lora_B[i:i + rows].float(), lora_A.float(), alpha=scaling)   # + s (c, r) @ (r, in)
        norms[i:i + rows] = torch.linalg.vector_norm(w, dim=1)
    return norms


def magnitude_scale(slot: nn.Module, weight: Tensor) -> Tensor:
    """g = m / ||W + s·B·A||_row, fp32 (out,): differentiable in m, the norm a constant."""
    norm = weight_norm(weight, slot.lora_A.weight, slot.lora_B.weight, slot.scaling)
    return slot.lora_magnitude_vector / norm


def init_magnitude(slot: nn.Module, weight: Tensor) -> None:
    """m <- ||W + s·B·A||_row (= ||W||_row while B = 0): DoRA then starts with exactly the base output."""
    with torch.no_grad():
        slot.lora_magnitude_vector.copy_(weight_norm(weight, slot.lora_A.weight, slot.lora_B.weight, slot.scaling))


def update(slot: nn.Module, weight: Tensor, bias: Tensor | None, x: Tensor, out: Tensor, training: bool,
           base: nn.Module | None = None) -> Tensor:
    """Δy = (g - 1) ⊙ W x + g ⊙ s·B·A x in fp32 (..., out); `out` = base(x) (= W x + b), `weight` = W.

    With dropout, W·drop(x) goes through `base` when given: a 4-bit base keeps only its packed bytes for the
    backward, where F.linear would keep the dense W it is handed (one per layer, all layers without
    checkpointing: a dense copy of the model)."""
    g = magnitude_scale(slot, weight)                                    # (out,)
    x32 = x.to(slot.lora_A.weight.dtype)
    if training and not isinstance(slot.lora_dropout, nn.Identity):
        x32 = slot.lora_dropout(x32)                                     # one mask for both terms (PEFT)
        if base is None:
            wx = F.linear(x32.to(weight.dtype), weight).float()          # (..., out) W drop(x)
        else:
            wx = base(x32.to(x.dtype)).float()                           # (..., out) W drop(x) + b
            wx = wx if bias is None else wx - bias.float()
    else:
        wx = out.float() if bias is None else out.float() - bias.float()  # (..., out) W x = base(x) - b
    lora = slot.lora_B(slot.lora_A(x32))                                 # (..., in) -> (..., r) -> (..., out)
    return _Combine.apply(g, wx, lora, slot.scaling)


class _Combine(torch.autograd.Function):
    """Δy = (g - 1) ⊙ wx + (g·s) ⊙ lora, keeping one (..., out) fp32 tensor for the backward, the direction
    wx + s·lora that g's gradient needs, where autograd would keep wx and lora both (DoRA's activation memory
    without checkpointing: one fp32 (tokens, out) per layer instead of two). The gradients are autograd's:
    dwx = dy ⊙ (g - 1), dlora = dy ⊙ g·s, dg = Σ_tokens dy ⊙ (wx + s·lora)."""

    @staticmethod
    def forward(ctx, g: Tensor, wx: Tensor, lora: Tensor, scaling: float) -> Tensor:
        ctx.scaling = scaling
        ctx.save_for_backward(g, torch.add(wx, lora, alpha=scaling) if ctx.needs_input_grad[0] else None)
        return (g - 1) * wx + (g * scaling) * lora

    @staticmethod
    def backward(ctx, dy: Tensor):
        g, direction = ctx.saved_tensors
        dg = (dy * direction).reshape(-1, dy.shape[-1]).sum(0) if ctx.needs_input_grad[0] else None
        dwx = dy * (g - 1) if ctx.needs_input_grad[1] else None
        dlora = dy * (g * ctx.scaling) if ctx.needs_input_grad[2] else None
        return dg, dwx, dlora, None


def fold(slot: nn.Module, weight: Tensor, g: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(g, g ⊙ s·B·A): the merged weight is g ⊙ W + g ⊙ s·B·A. g from the unmerged `weight` unless given."""
    if g is None:
        g = magnitude_scale(slot, weight).detach()                       # (out,)
    delta = slot.scaling * (slot.lora_B.weight @ slot.lora_A.weight)     # (out, r) @ (r, in)
    return g, delta.mul_(g[:, None])                                     # (out,), (out, in) fp32
