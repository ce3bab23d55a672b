"""save / load: PEFT's file layout, bit-identical round trips, atomic writes."""

import json

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

import lora
import lora.io
from lora import LoRALinear
from tiny import tiny_bert, tiny_llama


def trained(model, seed=2, **kw):
    """Injected, B random (B = 0 would round-trip trivially), and a re-initialised classifier if saved."""
    kw = {"r": 4, "alpha": 8, "dropout": 0.0, **kw}
    lora.inject(model, **kw)
    torch.manual_seed(seed)
    for m in model.modules():
        if isinstance(m, LoRALinear):
            nn.init.normal_(m.lora_B.weight, std=0.05)
    if kw.get("modules_to_save"):
        nn.init.normal_(model.classifier.weight, std=0.5)
    return model


def logits(model):
    ids = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(input_ids=ids).logits


CASES = {"llama-all-linear": (tiny_llama, {}),
         "llama-qv-rslora": (tiny_llama, {"targets": ["q_proj", "v_proj"], "use_rslora": True}),
         "llama-regex": (tiny_llama, {"targets": r".*\.mlp\.down_proj"}),
         "bert-classifier": (tiny_bert, {"targets": ["query", "value"], "modules_to_save": ["classifier"]})}


@pytest.mark.parametrize("case", list(CASES))
def test_save_then_load_into_plain_model_gives_identical_outputs(case, tmp_path):
    build, kw = CASES[case]
    model = trained(build(), **kw)
    lora.save(model, tmp_path)
    fresh = lora.load(build(), tmp_path)
    assert torch.equal(logits(fresh), logits(model))
    assert sorted(n for n, m in fresh.named_modules() if isinstance(m, LoRALinear)) == \
        sorted(model.lora_config.target_names)
    assert {n for n, p in fresh.named_parameters() if p.requires_grad} == \
        {n for n, p in model.named_parameters() if p.requires_grad}, "a loaded adapter trains like the saved one"


def test_load_into_injected_model_overwrites_adapter_weights(tmp_path):
    model = trained(tiny_llama(), targets=["q_proj"])
    lora.save(model, tmp_path)
    other = trained(tiny_llama(), seed=7, targets=["q_proj"])
    assert not torch.equal(logits(other), logits(model))
    lora.load(other, tmp_path)
    assert torch.equal(logits(other), logits(model))


def test_file_layout_is_peft_format(tmp_path):
    model = trained(tiny_bert(), targets=["query", "value"], modules_to_save=["classifier"])
    lora.save(model, tmp_path, base_model_name_or_path="tiny/bert")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    expected = {f"base_model.model.bert.encoder.layer.{i}.attention.self.{m}.lora_{ab}.weight"
                for i in range(2) for m in ("query", "value") for ab in "AB"}
    expected |= {"base_model.model.classifier.weight", "base_model.model.classifier.bias"}
    assert set(tensors) == expected
    assert tensors["base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight"].shape == (4, 32)
    assert tensors["base_model.model.bert.encoder.layer.0.attention.self.query.lora_B.weight"].shape == (32, 4)
    assert all(t.dtype == torch.float32 for t in tensors.values())
    assert torch.equal(tensors["base_model.model.classifier.weight"], model.classifier.weight)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    expected = {
        "peft_type": "LORA", "r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": ["query", "value"],
        "bias": "none", "use_rslora": False, "modules_to_save": ["classifier"], "task_type": "SEQ_CLS",
        "base_model_name_or_path": "tiny/bert", "fan_in_fan_out": False, "init_lora_weights": True,
        "inference_mode": True}
    assert {k: config.get(k) for k in expected} == expected


def test_all_linear_is_saved_as_explicit_module_names(tmp_path):
    model = trained(tiny_llama())
    lora.save(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["target_modules"] == sorted(model.lora_config.target_names)


def test_adapter_state_dict_names_and_values():
    model = trained(tiny_llama(), targets=["v_proj"])
    sd = lora.adapter_state_dict(model)
    assert sorted(sd) == sorted(f"base_model.model.model.layers.{i}.self_attn.v_proj.lora_{ab}.weight"
                                for i in range(2) for ab in "AB")
    assert sd["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"] is not None
    assert torch.equal(sd["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"],
                       model.model.layers[1].self_attn.v_proj.lora_B.weight)


def _snapshot(path):
    return {p.name: p.read_bytes() for p in path.iterdir()}


@pytest.mark.parametrize("failing", ["weights", "config"])
def test_failed_save_leaves_previous_adapter_intact(failing, tmp_path, monkeypatch):
    model = trained(tiny_llama(), targets=["q_proj"])
    lora.save(model, tmp_path)
    before, old_logits = _snapshot(tmp_path), logits(model)
    nn.init.normal_(model.model.layers[0].self_attn.q_proj.lora_B.weight, std=1.0)   # a newer adapter

    def half_written(*args, **kwargs):
        path = args[1] if failing == "weights" else args[0]
        open(path, "wb").write(b"partial")
        raise OSError("disk full (simulated)")

    if failing == "weights":
        monkeypatch.setattr(lora.io, "save_file", half_written)
    else:
        monkeypatch.setattr(lora.io.Path, "write_text", lambda self, *a, **k: half_written(self))
    with pytest.raises(OSError, match="simulated"):
        lora.save(model, tmp_path)
    monkeypatch.undo()
    assert _snapshot(tmp_path) == before, "old files unchanged and no temp files left behind"
    assert torch.equal(logits(lora.load(tiny_llama(), tmp_path)), old_logits)


def test_save_overwrites_atomically_and_creates_folders(tmp_path):
    model = trained(tiny_llama(), targets=["q_proj"])
    target = tmp_path / "a" / "b"
    lora.save(model, target)
    nn.init.normal_(model.model.layers[0].self_attn.q_proj.lora_B.weight, std=1.0)
    lora.save(model, target)
    assert sorted(p.name for p in target.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert torch.equal(logits(lora.load(tiny_llama(), target)), logits(model))


def test_extra_files_are_written_with_the_adapter(tmp_path):
    model = trained(tiny_llama(), targets=["q_proj"])
    lora.save(model, tmp_path / "a", extra_files={"task.json": '{"x": 1}', "notes.bin": b"\x00\x01"})
    assert (tmp_path / "a" / "task.json").read_text() == '{"x": 1}'
    assert (tmp_path / "a" / "notes.bin").read_bytes() == b"\x00\x01"
    lora.save(model, tmp_path / "a")                         # the folder is replaced whole: no stale task.json
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


@pytest.mark.parametrize("name", ["../escape.json", "adapter_config.json", "sub/task.json"])
def test_extra_file_names_must_be_plain_and_new(tmp_path, name):
    model = trained(tiny_llama(), targets=["q_proj"])
    lora.save(model, tmp_path / "a")
    before = _snapshot(tmp_path / "a")
    with pytest.raises(ValueError, match="plain file name"):
        lora.save(model, tmp_path / "a", extra_files={name: "{}"})
    assert _snapshot(tmp_path / "a") == before and sorted(p.name for p in tmp_path.iterdir()) == ["a"]


def test_save_refuses_to_replace_a_folder_that_is_not_an_adapter(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("years of work")
    with pytest.raises(ValueError, match="holds other files and no adapter_config.json"):
        lora.save(trained(tiny_llama(), targets=["q_proj"]), tmp_path / "mine")
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "years of work"


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
def test_load_refuses_non_finite_tensors_naming_the_tensor(tmp_path, value):
    model = trained(tiny_llama(), targets=["q_proj"])
    with torch.no_grad():
        model.model.layers[1].self_attn.q_proj.lora_A.weight[0, 0] = value
    lora.save(model, tmp_path / "a")
    plain = tiny_llama()
    with pytest.raises(ValueError, match=r"'base_model\.model\.model\.layers\.1\.self_attn\.q_proj\.lora_A\.weight' "
                                         r"holds NaN or Inf"):
        lora.load(plain, tmp_path / "a")
    assert not any(isinstance(m, LoRALinear) for m in plain.modules())   # the model was left untouched
