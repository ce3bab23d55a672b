"""Bad input to quant.quantize / Linear4bit / quantize_nf4, and models that must not be quantized.

Every error names the argument, the value it got (with its type) and what would do; a refused call leaves
the model exactly as it was: no Linear4bit anywhere, adapters still trainable.
"""

import ast
from pathlib import Path

import pytest
import torch
from torch import nn

import lora
import quant
from quant import Linear4bit, quantize_nf4
from tiny import tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")

SIZES = r"\(32, 64, 128, 256, 512, 1024, 2048, 4096\)"
DTYPES = r"\(torch.float32, torch.bfloat16, torch.float16\)"

# The settings quantize() and Linear4bit share.
BAD_SETTINGS = [
    pytest.param({"blocksize": "64"}, rf"blocksize must be an int, one of {SIZES}; got the str '64'",
                 id="blocksize-str"),
    pytest.param({"blocksize": 64.0}, r"blocksize must be an int, .*; got the float 64.0", id="blocksize-float"),
    pytest.param({"blocksize": True}, r"blocksize must be an int, .*; got the bool True", id="blocksize-bool"),
    pytest.param({"blocksize": None}, r"blocksize must be an int, .*; got None", id="blocksize-none"),
    pytest.param({"blocksize": 100}, rf"blocksize=100 is not supported; use one of {SIZES}", id="blocksize-100"),
    pytest.param({"blocksize": 16}, rf"blocksize=16 is not supported; use one of {SIZES}", id="blocksize-16"),
    pytest.param({"double_quant": "no"}, r"double_quant must be True \(.*\) or False; got the str 'no'",
                 id="double_quant-str"),
    pytest.param({"double_quant": 1}, r"double_quant must be True .* or False; got the int 1", id="double_quant-int"),
    pytest.param({"double_quant": None}, r"double_quant must be True .* or False; got None", id="double_quant-none"),
    pytest.param({"compute_dtype": "bf16"}, rf"compute_dtype must be a floating torch.dtype, one of {DTYPES}, or "
                                            r"None \(.*\); got the str 'bf16'", id="compute_dtype-str"),
    pytest.param({"compute_dtype": torch.float64}, r"compute_dtype must be .*; got the dtype torch.float64",
                 id="compute_dtype-fp64"),
    pytest.param({"compute_dtype": torch.int8}, r"compute_dtype must be .*; got the dtype torch.int8",
                 id="compute_dtype-int8"),
    pytest.param({"backend": "gpu"}, r"backend must be one of \('torch', 'bnb', 'triton'\) or None \(.*\); "
                                     r"got the str 'gpu'", id="backend-unknown"),
    pytest.param({"backend": "Torch"}, r"backend must be one of .*; got the str 'Torch'", id="backend-case"),
    pytest.param({"backend": 1}, r"backend must be one of .*; got the int 1", id="backend-int"),
]


def n_4bit(model):
    return sum(isinstance(m, Linear4bit) for m in model.modules())


@pytest.mark.parametrize("kwargs, message", BAD_SETTINGS)
def test_quantize_rejects_bad_settings_and_changes_nothing(kwargs, message):
    model = tiny_llama()
    with pytest.raises(ValueError, match=message):
        quant.quantize(model, **kwargs)
    assert n_4bit(model) == 0


@pytest.mark.parametrize("kwargs, message", BAD_SETTINGS)
def test_linear4bit_rejects_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Linear4bit(16, 8, **kwargs)


@pytest.mark.parametrize("kwargs, message", [
    pytest.param({"skip": None}, r"skip must be a module name or an iterable of them .*; got None", id="skip-none"),
    pytest.param({"skip": 5}, r"skip must be a module name or an iterable of them .*; got the int 5", id="skip-int"),
    pytest.param({"skip": ["lm_head", 3]}, r"skip entries must be non-empty module names \(str\).*; got the int 3",
                 id="skip-int-entry"),
    pytest.param({"skip": [""]}, r"skip entries must be non-empty module names .*; got the str ''",
                 id="skip-empty-name"),
    pytest.param({"weights": {"lm_head.weight": 1}}, r"weights must be a function from a parameter name to its tensor "
                                                     r"\(for a dict: its .__getitem__\), or None; got the dict",
                 id="weights-dict"),
])
def test_quantize_rejects_bad_skip_and_weights(kwargs, message):
    model = tiny_llama()
    with pytest.raises(ValueError, match=message):
        quant.quantize(model, **kwargs)
    assert n_4bit(model) == 0


def test_skip_accepts_one_name_or_any_iterable_of_names():
    assert n_4bit(quant.quantize(tiny_llama(), skip="lm_head")) == 14
    assert n_4bit(quant.quantize(tiny_llama(), skip=(n for n in ["lm_head", "down_proj"]))) == 12
    assert n_4bit(quant.quantize(tiny_llama(), skip=())) == 15


@pytest.mark.parametrize("args, kwargs, message", [
    pytest.param((16.0, 8), {}, r"in_features must be an int >= 1; got the float 16.0", id="in-float"),
    pytest.param((0, 8), {}, r"in_features must be an int >= 1; got the int 0", id="in-zero"),
    pytest.param((True, 8), {}, r"in_features must be an int >= 1; got the bool True", id="in-bool"),
    pytest.param((16, -8), {}, r"out_features must be an int >= 1; got the int -8", id="out-negative"),
    pytest.param((16, "8"), {}, r"out_features must be an int >= 1; got the str '8'", id="out-str"),
    pytest.param((16, 8), {"bias": "yes"}, r"bias must be a bool .*; got the str 'yes'", id="bias-str"),
    pytest.param((16, 8), {"bias": None}, r"bias must be a bool .*; got None", id="bias-none"),
    pytest.param((2, 1), {"weight": [[1.0, 2.0]]}, r"weight must be a torch.Tensor \[out_features, in_features\] "
                                                   r"or None .*; got the list \[\[1.0, 2.0\]\]", id="weight-list"),
    pytest.param((16, 8), {"dtype": torch.int8}, rf"dtype must be one of {DTYPES} or None .*; got the dtype torch.int8",
                 id="dtype-int8"),
    pytest.param((16, 8), {"dtype": "bf16"}, r"dtype must be one of .*; got the str 'bf16'", id="dtype-str"),
])
def test_linear4bit_rejects_bad_shape_arguments(args, kwargs, message):
    with pytest.raises(ValueError, match=message):
        Linear4bit(*args, **kwargs)


@pytest.mark.parametrize("args, message", [
    pytest.param(([1.0, 2.0],), r"w must be a torch.Tensor \(the weight to quantize\); got the list", id="w-list"),
    pytest.param((torch.ones(8), "64"), rf"blocksize must be an int, one of {SIZES}; got the str '64'",
                 id="blocksize-str"),
    pytest.param((torch.ones(8), 64, "yes"), r"double_quant must be True .* or False; got the str 'yes'", id="dq-str"),
])
def test_quantize_nf4_rejects_bad_arguments(args, message):
    with pytest.raises(ValueError, match=message):
        quantize_nf4(*args)


def test_a_long_value_is_cut_in_the_message():
    with pytest.raises(ValueError, match=r"got the str 'x+\.\.\.x+'$"):
        quant.quantize(tiny_llama(), backend="x" * 500)


@pytest.mark.parametrize("call", [
    pytest.param(lambda: quant.quantize({"model": 1}), id="quantize-dict"),
    pytest.param(lambda: Linear4bit.from_linear(nn.Conv1d(4, 4, 1)), id="from_linear-conv"),
])
def test_a_non_module_is_a_type_error(call):
    with pytest.raises(TypeError, match=r"expects a torch.nn.(Module|Linear), got (dict|Conv1d)"):
        call()


# ---------------------------------------------------------------------------------------------- adapters


def adapter_state(model):
    """What a refused quantize must not change: module types, trainable names and every tensor."""
    return ({n: type(m) for n, m in model.named_modules()},
            sorted(n for n, p in model.named_parameters() if p.requires_grad),
            {k: v.clone() for k, v in model.state_dict().items()})


def assert_unchanged(model, before):
    types, trainable, tensors = adapter_state(model)
    assert types == before[0] and n_4bit(model) == 0
    assert trainable == before[1] and trainable, "the adapters must stay trainable"
    assert all(torch.equal(tensors[k], v) for k, v in before[2].items())


REFUSED = r"already has LoRA adapters \((\d+) layers?, e.g. '{}'\): quantizing would freeze their lora_A/lora_B"
FIX = r".*Call quant.quantize\(model\) before lora.inject or lora.load"


def test_quantize_after_inject_is_refused_and_keeps_the_adapters():
    model = lora.inject(tiny_llama(), r=4, alpha=8, targets=["q_proj", "v_proj"])
    before = adapter_state(model)
    with pytest.raises(ValueError, match=REFUSED.format(r"model\.layers\.0\.self_attn\.q_proj") + FIX) as err:
        quant.quantize(model)
    assert err.match(r"\(4 layers,")
    assert_unchanged(model, before)
    # 2 layers x r=4 x (q_proj 64 -> 64, v_proj 64 -> 32): what quantizing used to drop to 0
    assert lora.trainable_parameters(model)["trainable"] == 2 * 4 * ((64 + 64) + (64 + 32))


def test_quantize_after_load_is_refused(tmp_path):
    lora.save(lora.inject(tiny_llama(), r=4, targets=["q_proj"]), tmp_path / "adapter")
    model = lora.load(tiny_llama(), tmp_path / "adapter")
    before = adapter_state(model)
    with pytest.raises(ValueError, match=REFUSED.format(r"model\.layers\.0\.self_attn\.q_proj") + FIX):
        quant.quantize(model)
    assert_unchanged(model, before)


def test_load_onto_a_quantized_model_gives_trainable_fp32_adapters(tmp_path):
    dense = lora.inject(tiny_llama(), r=4, targets=["q_proj", "v_proj"])
    lora.save(dense, tmp_path / "adapter")
    model = lora.load(quant.quantize(tiny_llama()), tmp_path / "adapter")
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer.base_layer, Linear4bit) and type(layer.lora_A) is nn.Linear
    assert layer.lora_A.weight.dtype == torch.float32 and layer.lora_A.weight.requires_grad
    assert lora.trainable_parameters(model)["trainable"] == lora.trainable_parameters(dense)["trainable"]


def test_quantize_of_a_peft_model_is_refused():
    peft = pytest.importorskip("peft", reason="peft is not installed: the PEFT-model refusal is untested")
    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=["q_proj"]))
    before = adapter_state(model)
    with pytest.raises(ValueError, match=REFUSED.format(r"base_model\.model\.model\.layers\.0\.self_attn\.q_proj")
                       + r".*PEFT: before get_peft_model"):
        quant.quantize(model)
    assert_unchanged(model, before)


class DuckAdapter(nn.Module):
    """Any module with lora_A and lora_B submodules is an adapter to quant: it never imports lora."""

    def __init__(self):
        super().__init__()
        self.base = nn.Linear(8, 8)
        self.lora_A, self.lora_B = nn.Linear(8, 2, bias=False), nn.Linear(2, 8, bias=False)


@pytest.mark.parametrize("model, name", [
    pytest.param(nn.Sequential(DuckAdapter()), "0", id="inside"),
    pytest.param(DuckAdapter(), "DuckAdapter", id="the-model-itself"),
])
def test_adapters_are_found_by_their_shape_not_their_class(model, name):
    with pytest.raises(ValueError, match=REFUSED.format(name)):
        quant.quantize(model)
    assert n_4bit(model) == 0


def test_skipping_the_adapters_quantizes_only_the_bases():
    model = lora.inject(tiny_llama(), r=4, targets=["q_proj"])
    quant.quantize(model, skip=("lm_head", "lora_A", "lora_B"))
    layer = model.model.layers[1].self_attn.q_proj
    assert isinstance(layer.base_layer, Linear4bit) and type(layer.lora_B) is nn.Linear
    assert sorted(n for n, p in model.named_parameters() if p.requires_grad) == [
        f"model.layers.{i}.self_attn.q_proj.lora_{ab}.weight" for i in (0, 1) for ab in "AB"]


def test_quant_does_not_import_lora():
    # House rule: arrows point train -> lora, quant. quant finds adapters by duck typing instead.
    root = Path(quant.__file__).parent
    for path in root.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n.split(".")[0] in ("lora", "train", "peft") for n in names), f"{path.name} imports {names}"
