"""merge / unmerge round trips and merge_and_unload on dense bases (4-bit bases: test_lora_quantized_base.py)."""

import pytest
import torch
import torch.nn as nn

import lora
from lora import LoRALinear
from tiny import assert_close, tiny_bert, tiny_llama

# Merged vs adapted outputs differ only by summation order: x @ (W + ΔW)^T vs x @ W^T + (x @ A^T) @ B^T.
# fp32 logits of a 2-layer model: measured ~1e-7 relative to max|logit|; 1e-5 allows other CPUs' kernels.
FP32_REL = 1e-5


def trained(model, **kw):
    """Injected, with B set randomly so the adapters change the outputs (B = 0 would test nothing)."""
    lora.inject(model, r=4, alpha=8, dropout=0.0, **kw)
    torch.manual_seed(2)
    for m in model.modules():
        if isinstance(m, LoRALinear):
            nn.init.normal_(m.lora_B.weight, std=0.05)
    return model


def logits(model):
    ids = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(input_ids=ids).logits


def base_weights(model):
    return {n: m.base_layer.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def test_merge_gives_adapted_outputs_and_unmerge_restores_weights():
    model = trained(tiny_llama())
    w0, adapted = base_weights(model), logits(model)
    assert not torch.equal(adapted, logits(tiny_llama())), "random B must change the outputs"
    lora.merge(model)
    assert all(m.merged for m in model.modules() if isinstance(m, LoRALinear))
    assert_close(logits(model), adapted, FP32_REL, "merged vs adapted logits")
    lora.unmerge(model)
    for name, w in base_weights(model).items():
        # (W + ΔW) - ΔW in fp32: at most one rounding of |W + ΔW| (~2^-24 relative), here < 1e-6 absolute.
        assert_close(w, w0[name], 2 ** -20, f"unmerged {name}")
    assert_close(logits(model), adapted, FP32_REL, "unmerged vs adapted logits")


def test_merge_is_idempotent():
    model = trained(tiny_llama())
    lora.merge(model)
    once = base_weights(model)
    lora.merge(model)
    lora.merge(model)
    assert all(torch.equal(w, once[n]) for n, w in base_weights(model).items()), "merge 3x must equal merge 1x"
    lora.unmerge(model)
    after_one = base_weights(model)
    lora.unmerge(model)
    assert all(torch.equal(w, after_one[n]) for n, w in base_weights(model).items()), "unmerge must be idempotent"


@pytest.mark.parametrize("dtype, rel", [pytest.param(torch.float32, 2 ** -22, id="fp32"),
                                        pytest.param(torch.bfloat16, 2 ** -7, id="bf16")])
def test_merge_round_trip_on_one_layer(dtype, rel):
    # One rounding when merging and one when unmerging, each half an ulp of |W + ΔW|: 2 * 2^-(mantissa+1).
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(40, 24, dtype=dtype), r=4, alpha=8)
    nn.init.normal_(layer.lora_B.weight, std=0.1)
    x = torch.randn(3, 40).to(dtype)
    w0, y = layer.base_layer.weight.clone(), layer(x)
    layer.merge()
    assert torch.equal(layer(x), layer.base_layer(x)), "a merged layer must skip the adapter path"
    assert_close(layer(x), y, 2 * rel if dtype == torch.bfloat16 else 1e-5, "merged forward")
    layer.unmerge()
    assert_close(layer.base_layer.weight, w0, rel, "weight after merge + unmerge")


def test_disabling_a_merged_layer_raises():
    layer = LoRALinear(nn.Linear(8, 8), r=2, alpha=4)
    layer.merge()
    layer.disabled = True
    with pytest.raises(RuntimeError, match="unmerge"):
        layer(torch.randn(1, 8))


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_merge_and_unload_returns_plain_model_with_same_outputs(arch):
    model = trained(tiny_llama()) if arch == "llama" else trained(tiny_bert(), modules_to_save=["classifier"])
    n_layers, adapted = len(base_weights(model)), logits(model)
    plain = lora.merge_and_unload(model)
    assert not any(isinstance(m, LoRALinear) for m in plain.modules())
    assert not any("lora_" in n or "base_layer" in n for n, _ in plain.named_parameters())
    assert not hasattr(plain, "lora_config")
    assert_close(logits(plain), adapted, FP32_REL, "merge_and_unload vs adapted logits")
    report = plain.lora_merge_report
    assert len(report) == n_layers
    assert all(r["delta_norm"] > 0 and r["lost"] == 0.0 and not r["requantized"] for r in report), \
        "an fp32 dense merge stores W + ΔW exactly"


def test_merge_and_unload_after_in_place_merge():
    model = trained(tiny_llama())
    adapted = logits(model)
    lora.merge(model)
    plain = lora.merge_and_unload(model)
    assert_close(logits(plain), adapted, FP32_REL, "merge then merge_and_unload")


def test_merge_keys_match_a_plain_model_state_dict():
    model = trained(tiny_llama())
    plain = lora.merge_and_unload(model)
    assert set(plain.state_dict()) == set(tiny_llama().state_dict())
