"""Gradient (activation) checkpointing of the repeated blocks: keep each block's input, recompute its inside.

Without it, backward needs every activation of every layer: memory grows as L x (B, T, hidden) x ~20 tensors.
With it, the forward keeps only each block's input; the backward runs the block's forward again (with the same
RNG state, so dropout masks match) and then its backward. About one extra forward (~30% more compute) buys
activation memory of one block instead of all of them.

    forward:   x0 -[block 0]-> x1 -[block 1]-> x2 ...   keep x0, x1, x2, drop what is inside the blocks
    backward:  recompute block 1 from x1, backprop through it; recompute block 0 from x0, ...

Note: we use the non-reentrant implementation, `checkpoint(fn, *args, use_reentrant=False, **kwargs)`.
The old reentrant one returns outputs that do not require grad when no *input* requires grad, which is exactly
the QLoRA case (frozen embeddings feed the first block; only the LoRA weights inside the blocks are trainable),
hence Hugging Face's `enable_input_require_grads` hack. The non-reentrant one tracks the parameters used inside,
takes keyword arguments as they are (HF decoder layers get `attention_mask=`, `position_embeddings=` ...), and
works with custom autograd Functions such as the 4-bit matmul, which save only the packed weight.

Note: the recompute draws the same dropout masks (same RNG state); LoRA's CheapDropout keeps the forward's masks,
bit-packed, and the recompute unpacks them instead of drawing the bits again (`context_fn=replayable_masks`,
lora/dropout.py): on SmolLM2-135M with dropout 0.05, 7% of a QLoRA step.
Note: a KV cache cannot be checkpointed: the recompute would append the keys a second time. While
checkpointing, `use_cache` is forced off and the cache argument (`cache`, `past_key_values`) to None (training
does not need a cache).

We wrap each block's `forward` as an instance attribute, so `disable_gradient_checkpointing` restores the class
method and nothing else in the model changes. Checkpointing is active only in training mode with grad enabled;
`model.eval()` or `torch.no_grad()` runs the plain forward.
"""
from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from lora.dropout import replayable_masks

_ORIGINAL = "_grad_ckpt_original_forward"   # attribute on a wrapped block: its forward before wrapping
_CACHE_KWARGS = ("cache", "past_key_values", "past_key_value", "layer_past")


def find_blocks(model: nn.Module) -> nn.ModuleList:
    """The repeated block list: the nn.ModuleList of one module type holding the most parameters.

    Llama/Gemma/Qwen: `model.model.layers`; GPT-2: `transformer.h`; BERT: `encoder.layer`. The parameter count
    picks the decoder stack over smaller lists (MoE experts inside a layer, a short vision tower).
    """
    best, best_size = None, -1
    for module in model.modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(block) for block in module}) != 1:
            continue
        size = sum(p.numel() for p in module.parameters())
        if size > best_size:
            best, best_size = module, size
    if best is None:
        raise ValueError(f"no nn.ModuleList of repeated blocks found in {type(model).__name__}; "
                         "pass blocks=... (e.g. model.model.layers) to enable_gradient_checkpointing")
    return best


def enable_gradient_checkpointing(model: nn.Module, blocks: nn.ModuleList | None = None) -> int:
    """Checkpoints every block of `blocks` (default: `find_blocks(model)`); returns how many. Idempotent."""
    blocks = find_blocks(model) if blocks is None else blocks
    for block in blocks:
        if not hasattr(block, _ORIGINAL):
            setattr(block, _ORIGINAL, block.__dict__.get("forward"))  # None: the class method
            block.forward = _checkpointed(block, block.forward)
    return len(blocks)


def disable_gradient_checkpointing(model: nn.Module) -> int:
    """Undoes `enable_gradient_checkpointing` on every wrapped module; returns how many."""
    count = 0
    for module in model.modules():
        if hasattr(module, _ORIGINAL):
            original = getattr(module, _ORIGINAL)
            del module.forward
            if original is not None:
                module.forward = original
            delattr(module, _ORIGINAL)
            count += 1
    return count


def is_gradient_checkpointing(model: nn.Module) -> bool:
    return any(hasattr(m, _ORIGINAL) for m in model.modules())


def _checkpointed(block: nn.Module, forward):
    """`forward` run under non-reentrant checkpoint when `block` trains with grad enabled."""
    @functools.wraps(forward)
    def forward_with_checkpointing(*args, **kwargs):
        if not (block.training and torch.is_grad_enabled()):
            return forward(*args, **kwargs)
        if kwargs.get("use_cache"):
            kwargs["use_cache"] = False
        for name in _CACHE_KWARGS:
            if kwargs.get(name) is not None:
                kwargs[name] = None
        return checkpoint(forward, *args, use_reentrant=False, context_fn=replayable_masks, **kwargs)
    return forward_with_checkpointing
