"""Bad input: each error names the problem, and nothing is left half-done (model or disk)."""

import json

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

import lora
from lora import LoraConfig, LoRALinear
from tiny import tiny_llama


def n_lora(model):
    return sum(isinstance(m, LoRALinear) for m in model.modules())


NAN, INF = float("nan"), float("inf")
# Anchored: inject's messages use its own argument names (alpha, dropout), not LoraConfig's (lora_alpha, ...).
RANK = r"r must be a positive integer \(the adapter rank, e.g. 8\); got "
ALPHA = r"^alpha must be a finite number > 0 \(scaling = alpha / r; .*\); got "
DROPOUT = r"^dropout must be a number in \[0, 1\) \(a probability; 0 disables it\); got "
RSLORA = r"^use_rslora must be True \(.*\) or False \(alpha / r\); got "
TARGETS = (r"^targets must be a non-empty list of module names \(e.g. \['q_proj', 'v_proj'\]\), a regex string, "
           r"or 'all-linear'; got ")
SAVE = r"^modules_to_save must be None or a list of module names \(e.g. \['classifier'\]\); got "
BAD_ARGUMENTS = [
    pytest.param({"r": 0}, RANK + "the int 0$", id="r-zero"),
    pytest.param({"r": -4}, RANK + "the int -4$", id="r-negative"),
    pytest.param({"r": 2.5}, RANK + "the float 2.5$", id="r-float"),
    pytest.param({"r": 8.0}, RANK + "the float 8.0$", id="r-whole-float"),
    pytest.param({"r": True}, RANK + "the bool True$", id="r-bool"),
    pytest.param({"r": INF}, RANK + "the float inf$", id="r-inf"),
    pytest.param({"r": NAN}, RANK + "the float nan$", id="r-nan"),
    pytest.param({"r": "8"}, RANK + "the str '8'$", id="r-str"),
    pytest.param({"alpha": 0}, ALPHA + "the int 0$", id="alpha-zero"),
    pytest.param({"alpha": -1.0}, ALPHA + "the float -1.0$", id="alpha-negative"),
    pytest.param({"alpha": NAN}, ALPHA + "the float nan$", id="alpha-nan"),
    pytest.param({"alpha": INF}, ALPHA + "the float inf$", id="alpha-inf"),
    pytest.param({"alpha": True}, ALPHA + "the bool True$", id="alpha-bool"),
    pytest.param({"alpha": "16"}, ALPHA + "the str '16'$", id="alpha-str"),
    pytest.param({"alpha": None}, ALPHA + "None$", id="alpha-none"),
    pytest.param({"dropout": 1.0}, DROPOUT + "the float 1.0$", id="dropout-one"),
    pytest.param({"dropout": -0.1}, DROPOUT + "the float -0.1$", id="dropout-negative"),
    pytest.param({"dropout": NAN}, DROPOUT + "the float nan$", id="dropout-nan"),
    pytest.param({"dropout": INF}, DROPOUT + "the float inf$", id="dropout-inf"),
    pytest.param({"dropout": True}, DROPOUT + "the bool True$", id="dropout-bool"),
    pytest.param({"dropout": "0.1"}, DROPOUT + "the str '0.1'$", id="dropout-str"),
    pytest.param({"use_rslora": "yes"}, RSLORA + "the str 'yes'$", id="rslora-str"),
    pytest.param({"use_rslora": 1}, RSLORA + "the int 1$", id="rslora-int"),
    pytest.param({"use_rslora": None}, RSLORA + "None$", id="rslora-none"),
    pytest.param({"targets": []}, TARGETS + r"the list \[\]$", id="targets-empty"),
    pytest.param({"targets": ""}, TARGETS + "the str ''$", id="targets-empty-str"),
    pytest.param({"targets": None}, TARGETS + "None$", id="targets-none"),
    pytest.param({"targets": 5}, TARGETS + "the int 5$", id="targets-int"),
    pytest.param({"targets": ["q_proj", 3]}, r"targets entries must be module names \(non-empty str, e.g. 'q_proj'\); "
                                             r"got the int 3$", id="targets-int-entry"),
    pytest.param({"targets": [""]}, r"targets entries must be module names .*; got the str ''$",
                 id="targets-empty-name"),
    pytest.param({"targets": "(q_proj"}, r"targets '\(q_proj' is not a valid regex", id="targets-bad-regex"),
    pytest.param({"modules_to_save": 5}, SAVE + "the int 5$", id="save-int"),
    pytest.param({"modules_to_save": {"lm_head": 1}}, SAVE + "the dict", id="save-dict"),
    pytest.param({"modules_to_save": [None]}, r"modules_to_save entries must be module names .*; got None$",
                 id="save-none-entry"),
    pytest.param({"compute_dtype": "fp16"}, r"compute_dtype must be None or 'fp32' .* or 'base' .*; "
                                            r"got the str 'fp16'$", id="compute_dtype-str"),
    pytest.param({"compute_dtype": torch.bfloat16}, r"compute_dtype must be None .*; got the dtype torch.bfloat16$",
                 id="compute_dtype-torch"),
]


@pytest.mark.parametrize("kwargs, message", BAD_ARGUMENTS)
def test_bad_arguments_raise_and_leave_model_untouched(kwargs, message):
    model = tiny_llama()
    with pytest.raises(ValueError, match=message):
        lora.inject(model, **kwargs)
    assert n_lora(model) == 0 and all(p.requires_grad for p in model.parameters())
    assert not hasattr(model, "lora_config")


@pytest.mark.parametrize("kwargs", [
    pytest.param({"r": 1, "alpha": 1, "dropout": 0, "use_rslora": True}, id="smallest-ints"),
    pytest.param({"alpha": 0.5, "dropout": 0.999, "targets": ("q_proj",), "modules_to_save": "lm_head"},
                 id="float-alpha-tuple-targets-one-saved-name"),
])
def test_good_edge_arguments_pass(kwargs):
    assert n_lora(lora.inject(tiny_llama(), **kwargs)) > 0


@pytest.mark.parametrize("kwargs, message", [
    pytest.param({"lora_alpha": NAN}, r"^lora_alpha must be a finite number > 0 .*; got the float nan$",
                 id="lora_alpha"),
    pytest.param({"lora_dropout": INF}, r"^lora_dropout must be a number in \[0, 1\) .*; got the float inf$",
                 id="lora_dropout"),
    pytest.param({"target_modules": None}, r"^target_modules must be a non-empty list .*; got None$",
                 id="target_modules"),
    pytest.param({"task_type": 3}, r"^task_type must be PEFT's task type name .* or None; got the int 3$",
                 id="task_type"),
    pytest.param({"base_model_name_or_path": 1.5}, r"^base_model_name_or_path must be a str or path .*; "
                                                   r"got the float 1.5$", id="base_model_name_or_path"),
    pytest.param({"target_names": "q_proj"}, r"^target_names must be a list of module names \(str\); got the str",
                 id="target_names"),
])
def test_lora_config_names_its_own_fields(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LoraConfig(**kwargs)


@pytest.mark.parametrize("kwargs, message", [
    pytest.param({"r": 2.5}, RANK + "the float 2.5$", id="r-float"),
    pytest.param({"alpha": NAN}, ALPHA + "the float nan$", id="alpha-nan"),
    pytest.param({"dropout": 1}, DROPOUT + "the int 1$", id="dropout-one"),
    pytest.param({"use_rslora": "no"}, RSLORA + "the str 'no'$", id="rslora-str"),
])
def test_lora_linear_checks_its_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LoRALinear(nn.Linear(4, 4), **({"r": 2, "alpha": 4} | kwargs))


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
    _rewrite_config(adapter, fan_in_fan_out=True)
    _expect_load_error(adapter, ValueError, r"features this library does not implement: \{'fan_in_fan_out': True\}")


def test_load_dora_config_without_magnitudes_names_them(adapter):
    _rewrite_config(adapter, use_dora=True)     # a LoRA file relabelled: DoRA's m per layer is missing
    _expect_load_error(adapter, ValueError, r"missing from the file, e.g. \['base_model\.model\.model\.layers\.0"
                                            r"\.self_attn\.q_proj\.lora_magnitude_vector'")


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


@pytest.mark.parametrize("changes, message", [
    pytest.param({"r": 2.5}, r"r must be a positive integer .*; got the float 2.5$", id="r-float"),
    pytest.param({"lora_alpha": "16"}, r"lora_alpha must be a finite number > 0 .*; got the str '16'$",
                 id="alpha-str"),
    pytest.param({"lora_dropout": float("nan")}, r"lora_dropout must be a number in \[0, 1\) .*; got the float nan$",
                 id="dropout-nan"),
    pytest.param({"target_modules": 7}, r"target_modules must be a non-empty list .*; got the int 7$",
                 id="targets-int"),
])
def test_load_config_with_a_bad_value_names_the_file_and_field(adapter, changes, message):
    _rewrite_config(adapter, **changes)
    _expect_load_error(adapter, ValueError, r"adapter_config\.json: " + message)


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
