"""Several adapters on one base: each active alone gives exactly its outputs loaded alone; set, add, delete,
save and load them (PEFT's layout both ways); modules_to_save kept per adapter; errors that name the problem."""

import json

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

import lora
from lora import LoRALinear
from tiny import assert_close, tiny_bert, tiny_llama

try:
    import peft                     # test-only, imported at collection: the library never imports it
except ImportError:
    peft = None

pytestmark = pytest.mark.usefixtures("one_thread")

# Different targets, ranks, alphas, rsLoRA and DoRA, so nothing can be shared by mistake.
ADAPTERS = {"default": {"r": 4, "alpha": 8, "targets": ["q_proj", "v_proj"]},
            "sst2": {"r": 2, "alpha": 16, "targets": ["v_proj", "down_proj"], "use_rslora": True},
            "dora": {"r": 3, "alpha": 6, "targets": ["o_proj"], "use_dora": True}}
# Summing fp32 updates in another order than one adapter at a time: ~1e-7 of max|logit| (measured ~2e-7).
FP32_REL = 1e-5


def randomize(model, name, seed):
    """Random B (and DoRA's m off ||W||) for adapter `name`: at init every adapter would equal the base."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear) and m.has_adapter(name):
                slot = m.adapter(name)
                slot.lora_B.weight.copy_(0.05 * torch.randn(slot.lora_B.weight.shape, generator=g))
                if slot.use_dora:
                    m_shape = slot.lora_magnitude_vector.shape
                    slot.lora_magnitude_vector.mul_(1 + 0.2 * torch.randn(m_shape, generator=g))
    return model


def logits(model):
    ids = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture(scope="module")
def alone(tmp_path_factory):
    """Each adapter trained alone on the same base and saved: name -> (folder, logits of that model)."""
    out = {}
    for i, (name, kw) in enumerate(ADAPTERS.items()):
        model = randomize(lora.inject(tiny_llama(), dropout=0.0, **kw), "default", seed=i)
        folder = tmp_path_factory.mktemp(name)
        lora.save(model, folder)
        out[name] = (folder, logits(model))
    return out


def loaded_together(alone):
    model = tiny_llama()
    for name in ADAPTERS:
        lora.load(model, alone[name][0], adapter_name=name)
    return model


def test_each_adapter_active_alone_gives_its_outputs_exactly(alone):
    outs = [alone[n][1] for n in ADAPTERS] + [logits(tiny_llama())]
    assert all(not torch.equal(a, b) for i, a in enumerate(outs) for b in outs[i + 1:]), "the check must bite"
    model = loaded_together(alone)
    assert lora.adapter_names(model) == list(ADAPTERS) and lora.active_adapters(model) == ["default"]
    for name in [*ADAPTERS, *reversed(ADAPTERS)]:          # there and back: switching leaves no trace
        lora.set_adapter(model, name)
        assert torch.equal(logits(model), alone[name][1]), f"{name} active must equal {name} loaded alone"


def test_loading_beside_keeps_the_active_adapter_and_its_outputs(alone):
    model = lora.load(tiny_llama(), alone["default"][0])
    before = logits(model)
    lora.load(model, alone["sst2"][0], adapter_name="sst2")
    assert torch.equal(logits(model), before) and lora.active_adapters(model) == ["default"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_adapters." not in n for n in trainable), "an added adapter waits, frozen"


def test_rank_and_alpha_are_kept_per_adapter(alone):
    model = loaded_together(alone)
    v_proj = model.model.layers[0].self_attn.v_proj
    assert v_proj.adapter_names == ["default", "sst2"]
    assert (v_proj.r, v_proj.scaling) == (4, 2.0)
    sst2 = v_proj.adapter("sst2")
    assert (sst2.r, sst2.lora_alpha, sst2.scaling) == (2, 16, pytest.approx(16 / 2 ** 0.5))
    assert sst2.lora_A.weight.shape == (2, 64)
    configs = model.lora_registry.configs
    assert (configs["dora"].r, configs["dora"].use_dora, configs["sst2"].use_rslora) == (3, True, True)
    assert model.lora_config is configs["default"]


def test_default_keys_unchanged_and_named_keys_hold_the_name(alone):
    model = loaded_together(alone)
    keys = set(model.state_dict())
    assert "model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "model.layers.0.self_attn.v_proj.lora_adapters.sst2.lora_B.weight" in keys
    assert "model.layers.1.self_attn.o_proj.lora_adapters.dora.lora_magnitude_vector" in keys
    for name in ADAPTERS:                                   # the saved keys carry no adapter name (PEFT)
        ours = lora.adapter_state_dict(model, name)
        file = load_file(alone[name][0] / "adapter_model.safetensors")
        assert set(ours) == set(file) and all(torch.equal(ours[k], file[k]) for k in file)


def test_active_list_adds_the_updates_of_each_adapter():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(24, 40), r=4, alpha=8)
    layer.add_adapter("b", r=2, alpha=2)
    layer.add_adapter("d", r=3, alpha=6, use_dora=True)
    model = randomize(randomize(randomize(nn.Sequential(layer), "default", 0), "b", 1), "d", 2)
    x = torch.randn(5, 24)
    base = layer.base_layer(x)
    deltas = []
    for name in ("default", "b", "d"):
        layer.active_adapters = [name]
        deltas.append(model(x) - base)
    layer.active_adapters = ["default", "b", "d"]
    assert_close(model(x), base + sum(deltas), 1e-6, "three active adapters vs the sum of their updates")


def test_several_active_adapters_merge_to_the_same_outputs(alone):
    model = loaded_together(alone)
    lora.set_adapter(model, ["default", "sst2", "dora"])
    summed = logits(model)
    w0 = {n: m.base_layer.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    lora.merge(model)
    assert_close(logits(model), summed, FP32_REL, "merged three adapters vs their summed updates")
    with pytest.raises(ValueError, match=r"cannot switch adapters while adapters are merged .*lora\.unmerge"):
        lora.set_adapter(model, "sst2")
    lora.unmerge(model)
    for n, m in model.named_modules():
        if isinstance(m, LoRALinear):
            assert_close(m.base_layer.weight, w0[n], 2 ** -20, f"unmerged {n}")
    plain = lora.merge_and_unload(model)
    assert not hasattr(plain, "lora_registry") and not hasattr(plain, "lora_config")
    assert_close(logits(plain), summed, FP32_REL, "merge_and_unload of three adapters")


def test_inject_adds_a_fresh_adapter_that_waits_inactive(alone):
    model = lora.load(tiny_llama(), alone["default"][0])
    before = logits(model)
    lora.inject(model, r=2, alpha=4, targets=["k_proj", "q_proj"], adapter_name="fresh")
    assert torch.equal(logits(model), before)
    fresh = {n for n, p in model.named_parameters() if ".fresh." in n or "k_proj.lora_" in n}
    assert len(fresh) == 8 and not any(p.requires_grad for n, p in model.named_parameters() if n in fresh)
    lora.set_adapter(model, "fresh")
    assert torch.equal(logits(model), logits(tiny_llama())), "B = 0: a fresh adapter adds exactly nothing"
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == fresh, "set_adapter trains the active adapter and freezes the others"
    with pytest.raises(ValueError, match=r"already has LoRA \(6 LoRALinear layers.*named 'fresh'.*adapter_name="):
        lora.inject(model, targets=["q_proj"], adapter_name="fresh")


def test_save_one_named_adapter_as_a_peft_folder(alone, tmp_path):
    model = loaded_together(alone)
    lora.save(model, tmp_path / "sst2", adapter_name="sst2")
    assert sorted(p.name for p in (tmp_path / "sst2").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((tmp_path / "sst2" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["use_rslora"], config["use_dora"]) == (2, 16, True, False)
    assert torch.equal(logits(lora.load(tiny_llama(), tmp_path / "sst2")), alone["sst2"][1])


def test_save_all_lays_out_default_on_top_and_others_in_subfolders(alone, tmp_path):
    model = loaded_together(alone)
    lora.set_adapter(model, "dora")
    lora.save(model, tmp_path, extra_files={"task.json": "{}"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors", "dora",
                                                          "sst2", "task.json"]
    again = lora.load(tiny_llama(), tmp_path)
    for name in ("sst2", "dora"):
        lora.load(again, tmp_path / name, adapter_name=name)
    for name in ADAPTERS:
        lora.set_adapter(again, name)
        assert torch.equal(logits(again), alone[name][1]), name
    lora.save(model, tmp_path)                               # a multi-adapter folder may be replaced


def _need_peft():
    if peft is None:
        pytest.skip("peft is not installed: multi-adapter interop with PEFT is untested (pip install peft)")


def test_peft_loads_our_adapters_saved_together(alone, tmp_path):
    _need_peft()
    lora.save(loaded_together(alone), tmp_path)
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path))
    theirs.load_adapter(str(tmp_path / "sst2"), adapter_name="sst2")
    for name in ("default", "sst2"):
        theirs.set_adapter(name)
        assert_close(logits(theirs.eval()), alone[name][1], 1e-6, f"PEFT with {name} active")


def test_peft_multi_adapter_save_loads_here(tmp_path):
    _need_peft()
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                               target_modules=["q_proj"]))
    theirs.add_adapter("sst2", peft.LoraConfig(r=2, lora_alpha=4, lora_dropout=0.0, target_modules=["v_proj"]))
    torch.manual_seed(3)
    for n, p in theirs.named_parameters():
        if "lora_B" in n:
            nn.init.normal_(p, std=0.05)
    theirs.eval().save_pretrained(str(tmp_path))
    ours = lora.load(tiny_llama(), tmp_path)
    lora.load(ours, tmp_path / "sst2", adapter_name="sst2")
    for name in ("default", "sst2"):
        theirs.set_adapter(name)
        lora.set_adapter(ours, name)
        assert_close(logits(ours), logits(theirs), 1e-6, f"ours vs PEFT with {name} active")


def test_modules_to_save_are_kept_per_adapter(tmp_path):
    """Each adapter trains its own classifier; the module holds the active one's, the base's when none owns it."""
    cases = {"default": {"targets": ["query"], "modules_to_save": ["classifier"]},
             "b": {"targets": ["value"], "modules_to_save": ["classifier"]}, "c": {"targets": ["key"]}}
    ids = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(1))
    expected, model = {}, tiny_bert()
    for i, (name, kw) in enumerate(cases.items()):
        single = randomize(lora.inject(tiny_bert(), r=2, alpha=4, dropout=0.0, **kw), "default", seed=i)
        if "modules_to_save" in kw:
            nn.init.normal_(single.classifier.weight, std=0.5 + i)
        lora.save(single, tmp_path / name)
        expected[name] = single(input_ids=ids).logits.detach()
        lora.load(model, tmp_path / name, adapter_name=name)
    for name in ["b", "c", "default", "c", "b"]:
        lora.set_adapter(model, name)
        assert torch.equal(model(input_ids=ids).logits, expected[name]), name
        assert model.classifier.weight.requires_grad == (name != "c"), "trained iff an active adapter owns it"
    key = "base_model.model.classifier.weight"
    assert torch.equal(lora.adapter_state_dict(model, "default")[key],
                       load_file(tmp_path / "default" / "adapter_model.safetensors")[key]), "saved from the stash"
    with pytest.raises(ValueError, match=r"adapters \['default', 'b'\] each train their own copy of 'classifier'"):
        lora.set_adapter(model, ["default", "b"])
    assert lora.active_adapters(model) == ["b"], "a refused switch changes nothing"


def test_delete_adapter_unwraps_layers_left_without_one(alone):
    model = loaded_together(alone)
    lora.set_adapter(model, ["sst2", "dora"])
    lora.delete_adapter(model, "dora")                       # active: the rest of the active list stays
    assert lora.active_adapters(model) == ["sst2"] and lora.adapter_names(model) == ["default", "sst2"]
    assert type(model.model.layers[0].self_attn.o_proj) is nn.Linear, "o_proj had only 'dora': unwrapped"
    assert torch.equal(logits(model), alone["sst2"][1])
    lora.delete_adapter(model, "sst2")                       # the only active one: the first left takes over
    assert lora.active_adapters(model) == ["default"] and torch.equal(logits(model), alone["default"][1])
    assert type(model.model.layers[0].mlp.down_proj) is nn.Linear
    with pytest.raises(ValueError, match=r"cannot delete 'default': it is the model's only adapter"):
        lora.delete_adapter(model, "default")


def test_deleting_default_keeps_the_others(alone):
    model = loaded_together(alone)
    lora.delete_adapter(model, "default")
    assert lora.active_adapters(model) == ["sst2"] and model.lora_config is model.lora_registry.configs["sst2"]
    assert not hasattr(model.model.layers[0].self_attn.v_proj, "lora_A")
    assert torch.equal(logits(model), alone["sst2"][1])
    lora.load(model, alone["default"][0])                     # and back, under its own name
    lora.set_adapter(model, "default")
    assert torch.equal(logits(model), alone["default"][1])


@pytest.mark.parametrize("call, message", [
    pytest.param(lambda m: lora.set_adapter(m, "mnli"), "unknown adapter 'mnli'; the model has "
                 r"\['default', 'sst2', 'dora'\]", id="set-unknown"),
    pytest.param(lambda m: lora.set_adapter(m, ["sst2", "sst"]), r"unknown adapter 'sst'; the model has",
                 id="set-list"),
    pytest.param(lambda m: lora.set_adapter(m, []), r"set_adapter takes an adapter name or a non-empty list",
                 id="set-empty"),
    pytest.param(lambda m: lora.set_adapter(m, ["sst2", "sst2"]), r"names an adapter twice", id="set-twice"),
    pytest.param(lambda m: lora.delete_adapter(m, "x"), r"unknown adapter 'x'; the model has", id="delete-unknown"),
    pytest.param(lambda m: lora.save(m, "/nonexistent/x", adapter_name="x"), r"unknown adapter 'x'", id="save-unknown"),
    pytest.param(lambda m: lora.adapter_state_dict(m), r"several adapters \['default', 'sst2', 'dora'\]: pass "
                 r"adapter_name=", id="state-dict-ambiguous"),
    pytest.param(lambda m: lora.inject(m, adapter_name="a.b"), r"adapter_name must be a non-empty str of letters",
                 id="name-dot"),
    pytest.param(lambda m: lora.load(m, "/x", adapter_name=3), r"adapter_name must be .*; got the int 3$",
                 id="name-int"),
])
def test_errors_name_the_problem_and_change_nothing(alone, call, message):
    model = loaded_together(alone)
    before = logits(model)
    with pytest.raises(ValueError, match=message):
        call(model)
    assert lora.active_adapters(model) == ["default"] and lora.adapter_names(model) == list(ADAPTERS)
    assert torch.equal(logits(model), before)


def test_load_over_a_named_adapter_checks_its_own_rank(alone):
    model = loaded_together(alone)
    with pytest.raises(ValueError, match=r"has r=4 but the model was injected with r=2 for adapter 'sst2'"):
        lora.load(model, alone["default"][0], adapter_name="sst2")


def test_a_module_cannot_be_adapted_by_one_adapter_and_saved_in_full_by_another():
    model = lora.inject(tiny_bert(), r=2, alpha=4, targets=["query"], modules_to_save=["classifier"])
    with pytest.raises(ValueError, match=r"'classifier' is adapted \(LoRA\) by one adapter and inside 'classifier'"):
        lora.inject(model, r=2, alpha=4, targets=["classifier"], adapter_name="b")
    with pytest.raises(ValueError, match=r"'bert.encoder.layer.0.attention.self.query' is adapted .* inside "
                                         r"'bert.encoder.layer.0'"):
        lora.inject(model, r=2, alpha=4, targets=["value"], modules_to_save=["layer.0"], adapter_name="b")
    assert lora.adapter_names(model) == ["default"] and type(model.classifier) is nn.Linear
