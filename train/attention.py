"""Attention for short sequences on the CPU: transformers' SDPA path, with bf16/fp16 inputs run in fp32.

torch's CPU flash-attention kernel is slow in bf16 for short sequences, its backward above all: for SmolLM2's
attention shape (9 query / 3 key-value heads of 64, batch 16, causal) one forward + backward of one layer,
measured on this project's 2-core AVX-512 CPU (torch 2.13):

    tokens          32     64    128    192    256    320    512   1024
    bf16 ms        5.7   12.1   34.5   42.1   60.2   81.5    218    511
    fp32 ms        3.0    6.1   20.5   36.9   58.5   92.6    235    676    (inputs cast up, output cast back)

so up to 256 keys `sdpa_fp32_short` casts query, key and value to fp32, runs the same SDPA call and casts the
output back (a whole QLoRA training step of SmolLM2 at 128 tokens: ~20% faster). Longer sequences, fp32 models,
and every other device go through transformers' `sdpa_attention_forward` unchanged. The fp32 path is also the
more precise one (fp32 softmax and accumulation); memory stays O(tokens), as with any flash kernel, unlike
"eager" attention, which keeps (batch, heads, T, T) probabilities for the backward.

Registered under NAME in transformers' AttentionInterface, with SDPA's mask builder (same masks, same padding and
sliding-window handling), and switched on by `use_fast_attention(model)` (`train.load_model` does it).
"""
from __future__ import annotations

import torch

NAME = "sdpa_fp32_short"
MAX_UPCAST_KEYS = 256        # measured crossover (table above): beyond it bf16 flash wins
_HALF = (torch.bfloat16, torch.float16)


def sdpa_fp32_short(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None, **kwargs):
    """transformers' attention signature: (batch, heads, T, head_dim) in; ((batch, T, heads, head_dim), None) out."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if query.device.type != "cpu" or query.dtype not in _HALF or key.shape[2] > MAX_UPCAST_KEYS:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if attention_mask is not None and attention_mask.is_floating_point():   # additive masks follow the query
        attention_mask = attention_mask.float()
    if kwargs.get("position_bias") is not None:
        kwargs["position_bias"] = kwargs["position_bias"].float()
    out, weights = sdpa_attention_forward(module, query.float(), key.float(), value.float(), attention_mask,
                                          **kwargs)
    return out.to(query.dtype), weights


def register() -> None:
    """Make NAME a valid `attn_implementation` (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    if NAME not in AttentionInterface._global_mapping:
        AttentionInterface.register(NAME, sdpa_fp32_short)
        ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)


def use_fast_attention(model) -> bool:
    """Switch a transformers model from "sdpa" to NAME. Models on eager, flash or flex attention are left alone.
    Returns True when the model now uses NAME."""
    config = getattr(model, "config", None)
    current = getattr(config, "_attn_implementation", None)
    if current == NAME:
        return True
    if current != "sdpa" or not hasattr(model, "set_attn_implementation"):
        return False
    register()
    model.set_attn_implementation(NAME)
    return model.config._attn_implementation == NAME
