"""train.attention: short bf16/fp16 attention on the CPU is the fp32 SDPA of the same inputs, rounded once.

The reference is transformers' own `sdpa_attention_forward` on the inputs cast to fp32, so the short path must
match it bit for bit (values and gradients); everything else must be exactly transformers' SDPA."""
import pytest
import torch
import torch.nn as nn
from tiny import assert_close, tiny_bert, tiny_gemma3, tiny_llama
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from train.attention import MAX_UPCAST_KEYS, NAME, sdpa_fp32_short, use_fast_attention

pytestmark = pytest.mark.usefixtures("one_thread")
B, H, HKV, D = 2, 4, 2, 16


class _Attention(nn.Module):
    """What the attention functions read off the module: GQA groups, causality."""
    num_key_value_groups = H // HKV
    is_causal = True


def _qkv(q_len: int, kv_len: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, h, n, D, generator=g).to(dtype) for h, n in ((H, q_len), (HKV, kv_len), (HKV, kv_len))]


def _padding_mask(q_len: int, kv_len: int) -> torch.Tensor:
    """(B, 1, q, kv) bool, True = attend: causal (queries are the last q_len positions), row 1 with its last 3
    keys padded (key 0 always visible, so no query row is fully masked)."""
    q_pos = torch.arange(kv_len - q_len, kv_len)[:, None]
    mask = (q_pos >= torch.arange(kv_len)[None, :]).expand(B, 1, q_len, kv_len).clone()
    mask[1, :, :, max(1, kv_len - 3):] = False
    return mask


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("q_len,kv_len", [(7, 7), (64, 64), (MAX_UPCAST_KEYS, MAX_UPCAST_KEYS), (1, 40)])
@pytest.mark.parametrize("masked", [False, True])
def test_short_half_precision_is_fp32_sdpa_rounded_once(dtype, q_len, kv_len, masked):
    q, k, v = _qkv(q_len, kv_len, dtype)
    mask = _padding_mask(q_len, kv_len) if masked else None
    module = _Attention()
    out, _ = sdpa_fp32_short(module, q, k, v, mask, scaling=D ** -0.5)
    ref, _ = sdpa_attention_forward(module, q.float(), k.float(), v.float(), mask, scaling=D ** -0.5)
    assert out.dtype == dtype and out.shape == (B, q_len, H, D)
    assert torch.equal(out, ref.to(dtype))


@pytest.mark.parametrize("masked", [False, True])
def test_short_path_gradients_are_fp32_gradients_rounded_once(masked):
    q_len = kv_len = 32
    inputs = _qkv(q_len, kv_len, torch.bfloat16)
    mask = _padding_mask(q_len, kv_len) if masked else None
    grad_out = torch.randn(B, q_len, H, D, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    module = _Attention()

    ours = [t.clone().requires_grad_() for t in inputs]
    sdpa_fp32_short(module, *ours, mask, scaling=D ** -0.5)[0].backward(grad_out)
    ref = [t.float().requires_grad_() for t in inputs]
    sdpa_attention_forward(module, *ref, mask, scaling=D ** -0.5)[0].backward(grad_out.float())
    for name, a, b in zip("qkv", ours, ref):
        assert a.grad.dtype == torch.bfloat16
        assert torch.equal(a.grad, b.grad.to(torch.bfloat16)), f"d{name} differs"


@pytest.mark.parametrize("dtype,kv_len", [(torch.bfloat16, MAX_UPCAST_KEYS + 1), (torch.float32, 16)])
def test_long_or_fp32_attention_is_plain_sdpa(dtype, kv_len):
    q, k, v = _qkv(kv_len, kv_len, dtype)
    module = _Attention()
    out, _ = sdpa_fp32_short(module, q, k, v, None, scaling=D ** -0.5)
    ref, _ = sdpa_attention_forward(module, q, k, v, None, scaling=D ** -0.5)
    assert out.dtype == dtype and torch.equal(out, ref)


@pytest.mark.parametrize("build", [tiny_llama, lambda: tiny_gemma3_sliding(window=3)], ids=["llama", "gemma3-sliding"])
def test_model_logits_with_padding_match_fp32(build):
    """A bf16 model on the fast attention gives the fp32 model's logits (padding, GQA, sliding windows)."""
    reference = build()
    model = build().to(torch.bfloat16)
    assert use_fast_attention(model) and model.config._attn_implementation == NAME
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    attention_mask = torch.ones_like(ids)
    attention_mask[1, -4:] = 0                                    # right padding in row 1
    with torch.no_grad():
        expected = reference(input_ids=ids, attention_mask=attention_mask).logits
        actual = model(input_ids=ids, attention_mask=attention_mask).logits.float()
    keep = attention_mask.bool()
    assert_close(actual[keep], expected[keep], rel=2e-2, what="bf16 logits on the fast attention vs fp32")


def tiny_gemma3_sliding(window: int):
    model = tiny_gemma3()
    model.config.sliding_window = window
    for layer in model.model.layers:
        if getattr(layer.self_attn, "sliding_window", None):
            layer.self_attn.sliding_window = window
    return model


def test_use_fast_attention_leaves_other_implementations_alone():
    model = tiny_llama()
    model.set_attn_implementation("eager")
    assert not use_fast_attention(model) and model.config._attn_implementation == "eager"
    bert = tiny_bert()
    assert use_fast_attention(bert) and use_fast_attention(bert)      # idempotent; encoders too
    assert bert.config._attn_implementation == NAME
    assert NAME not in bert.config.to_json_string()                   # never written into a saved config
