"""Bad input: each error names the problem, and nothing is left half-done (model or disk)."""

import json

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

import lora
from lora import LoRALinear
from tiny import tiny_llama


def n_lora(model):
    return sum(isinstance(m, LoRALinear) for m in model.modules())


@pytest.mark.parametrize("kwargs, message", [
    pytest.param({"r": 0}, r"r must be a positive integer.*got 0", id="r-zero"),
    pytest.param({"r": -4}, r"r must be a positive integer.*got -4", id="r-negative"),
    pytest.param({"r": 2.5}, r"r must be a positive integer.*got 2.5", id="r-float"),
    pytest.param({"alpha": 0}, r"alpha must be > 0.*got 0", id="alpha-zero"),
    pytest.param({"alpha": -1.0}, r"alpha must be > 0.*got -1.0", id="alpha-negative"),
    pytest.param({"dropout": 1.0}, r"dropout must be in \[0, 1\).*got 1.0", id="dropout-one"),
    pytest.param({"dropout": -0.1}, r"dropout must be in \[0, 1\).*got -0.1", id="dropout-negative"),
    pytest.param({"targets": []}, r"targets must be a non-empty list", id="targets-empty"),
    pytest.param({"targets": "(q_proj"}, r"not a valid regex", id="targets-bad-regex"),
])
def test_bad_hyperparameters_raise_and_leave_model_untouched(kwargs, message):
    model = tiny_llama()
    with pytest.raises(ValueError, match=message):
        lora.inject(model, **kwargs)
    assert n_lora(model) == 0 and all(p.requires_grad for p in model.parameters())


def test_target_matching_nothing_lists_nearest_names():
    model = tiny_llama()
    with pytest.raises(ValueError, match=r"'q_prj' matches no module of LlamaForCausalLM; nearest names: 'q_proj'"):
        lora.inject(model, targets=["v_proj", "q_prj"])
    assert n_lora(model) == 0, "v_proj must not have been wrapped before the error"


def test_regex_matching_nothing_says_it_must_match_the_full_name():
    with pytest.raises(ValueError, match=r"regex 'q_proj' matches no module name \(it must match the full name"):
        lora.inject(tiny_llama(), targets="q_proj")


@pytest.mark.parametrize("targets, kind", [pytest.param(["self_attn"], "LlamaAttention", id="attention"),
                                           pytest.param(["embed_tokens"], "Embedding", id="embedding"),
                                           pytest.param(r"model\.layers\.0\.mlp", "LlamaMLP", id="regex-mlp")])
def test_targeting_a_non_linear_module_names_its_type(targets, kind):
    model = tiny_llama()
    with pytest.raises(ValueError, match=rf"is a {kind}, not a linear layer"):
        lora.inject(model, targets=targets)
    assert n_lora(model) == 0


def test_injecting_twice_raises():
    model = lora.inject(tiny_llama(), targets=["q_proj"])
    with pytest.raises(ValueError, match=r"already has LoRA \(2 LoRALinear layers"):
        lora.inject(model, targets=["v_proj"])
    assert n_lora(model) == 2


def test_modules_to_save_matching_nothing():
    with pytest.raises(ValueError, match=r"modules_to_save entry 'clasifier' matches no module of "
                                         r"LlamaForCausalLM; nearest names:"):
        lora.inject(tiny_llama(), modules_to_save=["clasifier"])


def test_targets_only_inside_modules_to_save():
    with pytest.raises(ValueError, match="inside modules_to_save"):
        lora.inject(tiny_llama(), targets=["lm_head"], modules_to_save=["lm_head"])


def test_lora_linear_rejects_a_non_linear_base():
    with pytest.raises(TypeError, match="got LayerNorm"):
        LoRALinear(nn.LayerNorm(8), r=2, alpha=4)


@pytest.mark.parametrize("fn", [lora.merge, lora.unmerge, lora.merge_and_unload])
def test_merge_without_lora_raises(fn):
    with pytest.raises(ValueError, match="no LoRA layers"):
        fn(tiny_llama())


def test_save_without_lora_raises(tmp_path):
    with pytest.raises(ValueError, match="no LoRA adapters"):
        lora.save(tiny_llama(), tmp_path / "a")
    assert not (tmp_path / "a").exists()


# --- loading --------------------------------------------------------------------------------------------

@pytest.fixture
def adapter(tmp_path):
    model = lora.inject(tiny_llama(), r=4, alpha=8, targets=["q_proj", "v_proj"])
    lora.save(model, tmp_path / "adapter")
    return tmp_path / "adapter"


def _rewrite_weights(path, edit):
    tensors = load_file(path / "adapter_model.safetensors")
    save_file(edit(tensors), path / "adapter_model.safetensors")


def _rewrite_config(path, **changes):
    config = json.loads((path / "adapter_config.json").read_text())
    (path / "adapter_config.json").write_text(json.dumps(config | changes))


def _expect_load_error(adapter_dir, exc, message, model=None):
    model = model or tiny_llama()
    before = n_lora(model)
    with pytest.raises(exc, match=message):
        lora.load(model, adapter_dir)
    assert n_lora(model) == before, "a failed load must not inject"


def test_load_missing_directory(tmp_path):
    _expect_load_error(tmp_path / "nope", FileNotFoundError, r"adapter directory .*nope' does not exist")


def test_load_missing_config(adapter):
    (adapter / "adapter_config.json").unlink()
    _expect_load_error(adapter, FileNotFoundError, r"adapter_config.json is missing")


def test_load_missing_weights(adapter):
    (adapter / "adapter_model.safetensors").unlink()
    _expect_load_error(adapter, FileNotFoundError, r"adapter_model.safetensors is missing \(the folder holds")


def test_load_corrupt_json(adapter):
    (adapter / "adapter_config.json").write_text('{"peft_type": "LORA", "r": ')
    _expect_load_error(adapter, ValueError, r"adapter_config.json is corrupt \(not valid JSON")


def test_load_corrupt_safetensors(adapter):
    data = (adapter / "adapter_model.safetensors").read_bytes()
    (adapter / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    _expect_load_error(adapter, ValueError, r"adapter_model.safetensors is corrupt or not a safetensors file")


def test_load_other_peft_type(adapter):
    _rewrite_config(adapter, peft_type="IA3")
    _expect_load_error(adapter, ValueError, r"peft_type is 'IA3'; only LoRA")


def test_load_unsupported_lora_variant(adapter):
    _rewrite_config(adapter, use_dora=True)
    _expect_load_error(adapter, ValueError, r"features this library does not implement: \{'use_dora': True\}")


def test_load_shape_mismatch_names_the_tensor(adapter):
    _expect_load_error(adapter, ValueError, r"shape mismatch.*q_proj.lora_A.weight: file \(4, 64\) vs model \(4, 32\)",
                       model=tiny_llama(hidden=32))


def test_load_unknown_module_names_it(adapter):
    def rename(t):
        return {k.replace("layers.1.self_attn.v_proj", "layers.1.self_attn.vproj"): v for k, v in t.items()}
    _rewrite_weights(adapter, rename)
    _expect_load_error(adapter, ValueError, r"match no module of the model, e.g. \['base_model.model.model.layers.1"
                                            r".self_attn.vproj.lora_A.weight'")


def test_load_missing_tensor_names_it(adapter):
    _rewrite_weights(adapter, lambda t: {k: v for k, v in t.items() if "layers.0.self_attn.q_proj.lora_B" not in k})
    _expect_load_error(adapter, ValueError, r"missing from the file, e.g. \['base_model.model.model.layers.0"
                                            r".self_attn.q_proj.lora_B.weight'\]")


def test_load_target_that_matches_nothing_in_this_model(adapter):
    _rewrite_config(adapter, target_modules=["query"])
    _expect_load_error(adapter, ValueError, r"target 'query' matches no module")


def test_load_into_injected_model_with_other_rank(adapter):
    model = lora.inject(tiny_llama(), r=8, alpha=8, targets=["q_proj", "v_proj"])
    _expect_load_error(adapter, ValueError, r"has r=4 but the model was injected with r=8", model=model)


def test_load_into_injected_model_with_other_targets(adapter):
    model = lora.inject(tiny_llama(), r=4, alpha=8, targets=["q_proj"])
    before = model.model.layers[0].self_attn.q_proj.lora_A.weight.clone()
    _expect_load_error(adapter, ValueError, r"match no module of the model", model=model)
    assert torch.equal(model.model.layers[0].self_attn.q_proj.lora_A.weight, before), "no partial copy"
