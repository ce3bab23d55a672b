"""inject(): which modules get adapters, what stays trainable, and that outputs do not move at init."""

import re

import pytest
import torch

import lora
from lora import LoRALinear
from tiny import tiny_bert, tiny_gemma3, tiny_llama

LLAMA_LINEARS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
BERT_LINEARS = ["attention.self.query", "attention.self.key", "attention.self.value",
                "attention.output.dense", "intermediate.dense", "output.dense"]


MODELS = {"llama": tiny_llama, "gemma3": tiny_gemma3, "bert": tiny_bert,
          "llama-bf16": lambda: tiny_llama().to(torch.bfloat16)}


def logits(model):
    ids = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(input_ids=ids).logits


def adapted(model):
    return sorted(n for n, m in model.named_modules() if isinstance(m, LoRALinear))


def layers(prefix, suffixes, n=2):
    return sorted(f"{prefix}.{i}.{s}" for i in range(n) for s in suffixes)


@pytest.mark.parametrize("arch", list(MODELS))
def test_inject_leaves_outputs_unchanged_exactly(arch):
    model = MODELS[arch]()
    before = logits(model)
    lora.inject(model, r=4, alpha=8, dropout=0.05)
    after = logits(model)
    assert torch.equal(before, after), f"max diff {(before - after).abs().max():.3e}"
    assert after.dtype == before.dtype
    assert all(m.lora_A.weight.dtype == torch.float32 for m in model.modules() if isinstance(m, LoRALinear))


@pytest.mark.parametrize("arch, targets, expected", [
    pytest.param("llama", ["q_proj", "v_proj"], layers("model.layers", LLAMA_LINEARS[0:3:2]), id="llama-suffixes"),
    pytest.param("llama", r".*\.mlp\.(gate|up)_proj", layers("model.layers", LLAMA_LINEARS[4:6]), id="llama-regex"),
    pytest.param("llama", ["model.layers.1.self_attn.o_proj"], ["model.layers.1.self_attn.o_proj"],
                 id="llama-full-name"),
    pytest.param("llama", "all-linear", layers("model.layers", LLAMA_LINEARS), id="llama-all-linear"),
    pytest.param("gemma3", "all-linear", layers("model.layers", LLAMA_LINEARS), id="gemma3-all-linear"),
    pytest.param("bert", ["query", "value"], layers("bert.encoder.layer", BERT_LINEARS[0:3:2]), id="bert-suffixes"),
    pytest.param("bert", "ALL-LINEAR", layers("bert.encoder.layer", BERT_LINEARS) + ["bert.pooler.dense"],
                 id="bert-all-linear"),
])
def test_targets_select_expected_modules(arch, targets, expected):
    model = lora.inject(MODELS[arch](), r=2, alpha=4, targets=targets)
    assert adapted(model) == sorted(expected)


def test_all_linear_skips_output_head():
    model = lora.inject(tiny_llama(), r=2, alpha=4)
    assert isinstance(model.lm_head, torch.nn.Linear) and not isinstance(model.lm_head, LoRALinear)
    bert = lora.inject(tiny_bert(), r=2, alpha=4)
    assert type(bert.classifier) is torch.nn.Linear


def test_suffix_matches_whole_name_components_only():
    # "proj" must not match "q_proj": PEFT's rule is name == t or name.endswith("." + t).
    model = tiny_llama()
    with pytest.raises(ValueError, match="'proj' matches no module"):
        lora.inject(model, targets=["proj"])


@pytest.mark.parametrize("arch, modules_to_save", [pytest.param("llama", None, id="llama"),
                                                   pytest.param("bert", ["classifier"], id="bert-classifier")])
def test_only_adapters_and_modules_to_save_are_trainable(arch, modules_to_save):
    model = lora.inject(MODELS[arch](), r=4, alpha=8, modules_to_save=modules_to_save)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {f"{m}.lora_{ab}.weight" for m in adapted(model) for ab in "AB"}
    if modules_to_save:
        expected |= {"classifier.weight", "classifier.bias"}
    assert trainable == expected


def test_modules_to_save_are_not_adapted():
    model = lora.inject(tiny_bert(), r=2, alpha=4, targets=["dense", "classifier"], modules_to_save=["classifier"])
    assert type(model.classifier) is torch.nn.Linear and model.classifier.weight.requires_grad


def test_trainable_parameters_counts_and_line():
    model = tiny_llama()
    total_before = sum(p.numel() for p in model.parameters())
    lora.inject(model, r=4, alpha=8)
    expected = sum(4 * (m.in_features + m.out_features) for m in model.modules() if isinstance(m, LoRALinear))
    counts = lora.trainable_parameters(model)
    assert counts["trainable"] == expected
    assert counts["total"] == total_before + expected
    assert counts["percent"] == pytest.approx(100 * expected / (total_before + expected))
    assert re.fullmatch(r"trainable params: [\d,]+ \|\| all params: [\d,]+ \|\| trainable%: \d+\.\d{4}", str(counts))
    assert f"{expected:,}" in str(counts)


def test_config_is_stored_on_the_model():
    model = lora.inject(tiny_llama(), r=4, alpha=16, dropout=0.1, targets=["q_proj"], use_rslora=True)
    cfg = model.lora_config
    assert isinstance(cfg, lora.LoraConfig)
    assert (cfg.r, cfg.lora_alpha, cfg.lora_dropout, cfg.use_rslora, cfg.task_type) == (4, 16, 0.1, True, "CAUSAL_LM")
    assert cfg.target_modules == ["q_proj"] and cfg.scaling == pytest.approx(16 / 2)
    assert cfg.target_names == layers("model.layers", ["self_attn.q_proj"])


def test_new_layers_follow_the_model_train_mode():
    model = tiny_llama().train()
    lora.inject(model, targets=["q_proj"])
    assert all(m.training for m in model.modules() if isinstance(m, LoRALinear))
    model = lora.inject(tiny_llama().eval(), targets=["q_proj"])
    assert not any(m.training for m in model.modules())


def test_adapter_gets_gradients_through_a_frozen_model():
    model = lora.inject(tiny_llama(), r=4, alpha=8, dropout=0.0)
    for m in model.modules():
        if isinstance(m, LoRALinear):
            torch.nn.init.normal_(m.lora_B.weight, std=0.02)
    ids = torch.randint(0, 128, (2, 5))
    model(input_ids=ids, labels=ids).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all(".lora_" in n for n in grads)
    assert all(g.abs().sum() > 0 for g in grads.values())


def test_compute_dtype_reaches_every_layer_and_bad_values_change_nothing():
    model = tiny_llama().to(torch.bfloat16)
    with pytest.raises(ValueError, match="compute_dtype"):
        lora.inject(model, r=2, alpha=4, compute_dtype="fp16")
    assert not adapted(model), "a rejected inject must leave the model as it was"
    lora.inject(model, r=2, alpha=4, compute_dtype="base")
    layers_ = [m for m in model.modules() if isinstance(m, LoRALinear)]
    assert layers_ and all(m.compute_dtype == "base" for m in layers_)
    lora.set_compute_dtype(model, None)
    assert all(m.compute_dtype is None for m in layers_)
