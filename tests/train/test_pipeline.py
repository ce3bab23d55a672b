"""train.pipeline: the recipes' shared settings and how they become a TrainConfig; device and dtype choice."""
import dataclasses

import pytest
import torch

from train.devices import pick_dtype, resolve_device
from train.encoder_recipe import EncoderRecipe
from train.loop import TrainConfig
from train.pipeline import Recipe
from train.qa_recipe import QARecipe
from train.recipe import ClassificationRecipe

RECIPES = {"classify": ClassificationRecipe, "encoder": EncoderRecipe, "qa": QARecipe}


@pytest.mark.parametrize("kind", list(RECIPES))
def test_train_config_takes_every_shared_field(tmp_path, kind):
    cls = RECIPES[kind]
    recipe = cls(out_dir=str(tmp_path), epochs=2.5, max_steps=7, batch_size=3, grad_accum=2, lr=1.5e-3, seed=11,
                 warmup_ratio=0.2, weight_decay=0.01, grad_checkpointing=True, resume=True)
    config = recipe.train_config(batch_size=5)
    shared = {f.name for f in dataclasses.fields(TrainConfig)} & {f.name for f in dataclasses.fields(cls)}
    assert {"out_dir", "epochs", "max_steps", "batch_size", "grad_accum", "lr", "loraplus_lr_ratio", "weight_decay",
            "warmup_ratio", "grad_checkpointing", "seed", "resume"} == shared
    for name in shared - {"batch_size"}:
        assert getattr(config, name) == getattr(recipe, name), name
    assert config.batch_size == 5                                   # the override wins
    assert config.log_every == TrainConfig(out_dir="x").log_every   # fields the recipe lacks keep their default


def test_train_config_rejects_unknown_overrides(tmp_path):
    with pytest.raises(ValueError, match=r"not TrainConfig fields: \['lr_max'\]"):
        ClassificationRecipe(out_dir=str(tmp_path)).train_config(lr_max=1.0)


@pytest.mark.parametrize("kind", list(RECIPES))
def test_every_recipe_is_a_recipe_with_the_shared_fields(kind):
    """The shared settings are declared once (train.pipeline.Recipe): a task recipe may change their defaults
    but cannot drop or misspell one."""
    cls = RECIPES[kind]
    assert issubclass(cls, Recipe)
    assert {f.name for f in dataclasses.fields(Recipe)} <= {f.name for f in dataclasses.fields(cls)}


@pytest.mark.parametrize("kind,options", [
    ("classify", {"r": 16, "alpha": 32.0, "dropout": 0.0, "targets": "all-linear", "use_rslora": False,
                  "use_dora": False, "compute_dtype": "base"}),
    ("encoder", {"r": 16, "alpha": 32.0, "dropout": 0.0, "targets": ["query", "key", "value", "dense"],
                 "use_rslora": False, "use_dora": False, "compute_dtype": "fp32"}),
])
def test_lora_options_are_inject_keywords(tmp_path, kind, options):
    import inspect

    import lora
    got = RECIPES[kind](out_dir=str(tmp_path)).lora_options()
    assert got == options
    assert set(got) <= set(inspect.signature(lora.inject).parameters)


def test_qa_recipe_refuses_a_merged_export(tmp_path):
    with pytest.raises(ValueError, match="export_merged is for the classification tasks"):
        QARecipe(out_dir=str(tmp_path), export_merged=str(tmp_path / "merged"))


@pytest.mark.parametrize("name", ["auto", "cpu", None, torch.device("cpu")], ids=["auto", "cpu", "none", "torch"])
def test_resolve_device_on_this_machine(name):
    expected = "cuda" if torch.cuda.is_available() and name in ("auto", None) else "cpu"
    assert resolve_device(name).type == expected


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message a machine without CUDA gives")
@pytest.mark.parametrize("name", ["cuda", "cuda:1"])
def test_cuda_without_a_gpu_is_one_clear_error(name):
    with pytest.raises(ValueError, match=rf"device '{name}' asked for, but this machine has no usable CUDA GPU.*"
                                         "use --device cpu or auto"):
        resolve_device(name)


@pytest.mark.parametrize("name,match", [("mps", "only 'cpu' and 'cuda'"), ("gpu", "device must be"),
                                        (3, "got the int 3")])
def test_unknown_device_names_the_choices(name, match):
    with pytest.raises(ValueError, match=match):
        resolve_device(name)


@pytest.mark.parametrize("name,dtype", [("bf16", torch.bfloat16), ("fp32", torch.float32)])
def test_pick_dtype_explicit(name, dtype):
    assert pick_dtype(name, "cpu") is dtype


def test_pick_dtype_auto_on_cpu_follows_the_cpu_flags(monkeypatch):
    import train.devices as devices
    monkeypatch.setattr(devices, "_cpu_has_fast_bf16", lambda: True)
    assert pick_dtype("auto", "cpu") is torch.bfloat16
    monkeypatch.setattr(devices, "_cpu_has_fast_bf16", lambda: False)
    assert pick_dtype("auto", "cpu") is torch.float32
    with pytest.raises(ValueError, match="dtype must be 'auto', 'bf16' or 'fp32', got 'fp16'"):
        pick_dtype("fp16", "cpu")


@pytest.mark.parametrize("kind", list(RECIPES))
@pytest.mark.parametrize("bad,match", [
    ({"lr": "3e-4"}, "lr must be float, got str '3e-4'"),
    ({"r": 2.5}, "r must be int, got float 2.5"),
    ({"resume": 1}, "resume must be bool, got int 1"),
    ({"targets": 7}, "targets must be str or Sequence"),
    ({"dtype": "fp16"}, "dtype must be 'auto', 'bf16' or 'fp32'"),
], ids=["lr-str", "r-float", "resume-int", "targets-int", "dtype"])
def test_recipe_fields_are_checked_by_type(tmp_path, kind, bad, match):
    with pytest.raises(ValueError, match=match):
        RECIPES[kind](out_dir=str(tmp_path), **bad)
