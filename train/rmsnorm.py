"""RMSNorm with a hand-written backward: the same forward as transformers' to the bit, fewer passes backward.

transformers' RMSNorm (Llama, Mistral, Qwen2/3, SmolLM2; Gemma's with 1 + weight) is six elementwise ops, and
autograd keeps an fp32 copy of the input and the normalised fp32 tensor for the backward, then runs about ten
passes over the activations to differentiate them. `RMSNormFunction` computes the forward with the same ops in
the same order (the output is bit-identical, in every dtype), keeps only the input and the per-row 1/rms, and
differentiates in closed form:

    y = w * x̂,  x̂ = x * r,  r = 1 / sqrt(mean(x²) + eps)
    dx = r * (g·w - x̂ * mean(g·w * x̂))                           (per row, in fp32, rounded once)

where autograd rounds g·w to the input's dtype first. One norm of SmolLM2's shape, (8, 128, 576) bf16, on a
2-core Xeon: forward 3.6 -> 1.2 ms, forward + backward 12.7 -> 7.8 ms; a training step has 61 of them, run twice
under gradient checkpointing. `use_fast_rmsnorm(model)` switches a model's norms to it (`train.load_model` does).
"""
from __future__ import annotations

import ast
import functools
import hashlib
import inspect
import textwrap
from types import MethodType

import torch
from torch import Tensor, nn

# sha1 of the syntax tree (comments and layout ignored) of the forward RMSNormFunction reproduces:
# transformers' LlamaRMSNorm.forward, `weight * (x32 * rsqrt(mean(x32²) + eps)).to(x.dtype)`, shared by Mistral,
# Qwen2/3, SmolLM3, Phi-3 and ~140 other classes; and Gemma's forward + _norm, `(x̂32 * (1 + weight32)).type_as(x)`
# (Gemma, Gemma-2, Gemma-3). A class whose code differs in any way keeps its own forward.
LLAMA_FORWARD = "e16b9302e1dec65a"
GEMMA_FORWARD = "ea97c7c7a0dfb74f"


class RMSNormFunction(torch.autograd.Function):
    """y = rmsnorm(x) scaled by `weight` (Llama) or by 1 + `weight` (Gemma, `offset=True`); gradients for x and,
    when it requires one, the weight."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float, offset: bool) -> Tensor:
        x32 = x.float()                                               # x itself when x is fp32
        rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)  # (..., 1) fp32
        normed = x32 * rstd if x32 is x else x32.mul_(rstd)          # a fresh fp32 copy is scaled in place
        if offset:                                                    # Gemma: (x̂ * (1 + w)) in fp32, rounded once
            y = normed.mul_(1.0 + weight.float()).type_as(x)
        else:                                                         # Llama: x̂ rounded, then times w
            y = weight * normed.to(x.dtype)
        ctx.offset = offset
        ctx.save_for_backward(x, rstd, weight)
        return y

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, rstd, weight = ctx.saved_tensors
        x_hat = x * rstd if x.dtype == torch.float32 else x.float().mul_(rstd)      # fp32 (..., d)
        grad32 = grad.float()
        gw = grad32 * (1.0 + weight.float() if ctx.offset else weight.float())       # fp32 (..., d)
        grad_x = grad_w = None
        if ctx.needs_input_grad[1]:                       # Llama multiplies w by x̂ rounded to x's dtype
            h = x_hat if ctx.offset else x_hat.to(x.dtype).float()
            grad_w = (grad32 * h).reshape(-1, h.shape[-1]).sum(0).to(weight.dtype)
        if ctx.needs_input_grad[0]:
            dot = (gw * x_hat).mean(-1, keepdim=True)                                 # (..., 1)
            grad_x = gw.sub_(x_hat.mul_(dot)).mul_(rstd).to(x.dtype)
        return grad_x, grad_w, None, None


def _llama_forward(self, hidden_states: Tensor) -> Tensor:
    return RMSNormFunction.apply(hidden_states, self.weight, self.variance_epsilon, False)


def _gemma_forward(self, x: Tensor) -> Tensor:
    return RMSNormFunction.apply(x, self.weight, self.eps, True)


def _fingerprint(*functions) -> str | None:
    try:
        trees = [ast.dump(ast.parse(textwrap.dedent(inspect.getsource(fn)))) for fn in functions]
    except (OSError, TypeError, SyntaxError):          # no source (built at run time, compiled, ...)
        return None
    return hashlib.sha1("".join(trees).encode()).hexdigest()[:16]


@functools.lru_cache(maxsize=None)
def fast_forward_for(cls: type):
    """The replacement forward for norms of class `cls`, or None when its forward is not one of the two known."""
    if _fingerprint(cls.forward) == LLAMA_FORWARD:
        return _llama_forward
    if hasattr(cls, "_norm") and _fingerprint(cls.forward, cls._norm) == GEMMA_FORWARD:
        return _gemma_forward
    return None


def use_fast_rmsnorm(model: nn.Module) -> int:
    """Give every RMSNorm whose class runs one of the two known forwards `RMSNormFunction` (same outputs, a
    cheaper backward); every other module is left alone. Returns how many norms use it (idempotent)."""
    count = 0
    for module in model.modules():
        if not type(module).__name__.endswith("RMSNorm") or not isinstance(getattr(module, "weight", None), Tensor):
            continue
        fast = fast_forward_for(type(module))
        eps = "variance_epsilon" if fast is _llama_forward else "eps"
        if fast is None or not hasattr(module, eps):
            continue
        if getattr(module.forward, "__func__", None) is not fast:
            module.forward = MethodType(fast, module)
        count += 1
    return count
