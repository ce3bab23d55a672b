"""train.config: nested settings from dicts, files and flags; every bad key or value named."""
from __future__ import annotations

import argparse
import json
import math

import pytest

from train.config import EXAMPLES_SEEN, RunConfig, add_config_flags, auto_epochs, config_from_args, flag_paths


def parse(*argv: str, config: str | None = None) -> RunConfig:
    p = argparse.ArgumentParser()
    add_config_flags(p)
    return config_from_args(p.parse_args(list(argv)), config)


def test_defaults_leave_task_specific_settings_unset():
    c = RunConfig()
    assert c.task == "classify" and c.lora.r == 16 and c.quant.quantize and c.quant.blocksize == 64
    assert c.model.name is None and c.train.lr is None and c.train.epochs is None   # the task picks them


def test_nested_dict_round_trips():
    raw = {"out": "o", "task": "encoder", "data": {"train": "t.csv", "label_words": ["no", "yes"]},
           "lora": {"r": 8, "targets": ["q_proj", "v_proj"]}, "train": {"lr": 1e-3, "epochs": 2.0}}
    c = RunConfig.from_dict(raw)
    assert c.lora.targets == ["q_proj", "v_proj"] and c.train.lr == 1e-3 and c.data.label_words == ["no", "yes"]
    assert RunConfig.from_dict(c.to_dict()) == c


@pytest.mark.parametrize("raw, message", [
    ({"trian": {}}, r"unknown key 'trian'; did you mean 'train'\?"),
    ({"train": {"lrr": 1e-3}}, r"config \[train\]: unknown key 'lrr'; did you mean 'lr'\?"),
    ({"lr": 1e-3}, r"unknown key 'lr'; it is a setting of \[train\]"),
    ({"bach_size": 8}, r"did you mean 'train.batch_size'\?"),
    ({"zzz": 1}, r"unknown key 'zzz'; valid keys: \['data', "),
    ({"train": {"batch_size": 2.5}}, r"\[train\]: batch_size must be int or None, got float 2.5"),
    ({"train": {"lr": math.inf}}, r"lr must be a finite number"),
    ({"train": {"seed": True}}, r"seed must be int, got bool True"),
    ({"lora": {"r": 0}}, r"\[lora\]: r must be >= 1, got 0"),
    ({"lora": {"targets": [1, 2]}}, r"targets must be str or list\[str\]"),
    ({"quant": {"quantize": "yes"}}, r"quantize must be bool"),
    ({"task": "translate"}, r"task must be one of \('classify', 'qa', 'encoder'\)"),
    ({"data": 3}, r"config \[data\]: expected a table of settings, got int 3"),
    ({"data": {"test_size": 1.5}}, r"test_size must be in \(0, 1\)"),
], ids=lambda v: "" if isinstance(v, str) else None)
def test_bad_keys_and_values_are_named(raw, message):
    with pytest.raises(ValueError, match=message):
        RunConfig.from_dict(raw)


def test_every_key_has_a_flag_and_flags_are_unique():
    paths = flag_paths()
    assert "--lr" in paths and paths["--lr"][0] == ("train", "lr")
    assert paths["--model"][0] == ("model", "name") and paths["--text-column"][0] == ("data", "text_column")
    assert len({p for p, _ in paths.values()}) == len(paths)


def test_flags_parse_types_lists_and_booleans():
    c = parse("--lr", "1e-3", "--r", "8", "--targets", "q_proj,v_proj", "--no-quantize", "--label-words",
              "bad,good", "--max-steps", "none", "--model", "smollm2-135m")
    assert c.train.lr == 1e-3 and c.lora.r == 8 and c.lora.targets == ["q_proj", "v_proj"]
    assert not c.quant.quantize and c.data.label_words == ["bad", "good"] and c.train.max_steps is None
    assert parse("--targets", "all-linear").lora.targets == "all-linear"


def test_a_bad_flag_value_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as e:
        parse("--r", "eight")
    assert e.value.code == 2 and "--r wants int, got 'eight'" in capsys.readouterr().err


@pytest.mark.parametrize("suffix", [".toml", ".json"])
def test_file_then_flags_override(tmp_path, suffix):
    path = tmp_path / f"run{suffix}"
    if suffix == ".toml":
        path.write_text('out = "runs/x"\n[train]\nlr = 0.001\nbatch_size = 4\n[lora]\nr = 4\n')
    else:
        path.write_text(json.dumps({"out": "runs/x", "train": {"lr": 0.001, "batch_size": 4}, "lora": {"r": 4}}))
    c = parse("--batch-size", "2", config=str(path))
    assert (c.out, c.train.lr, c.train.batch_size, c.lora.r) == ("runs/x", 0.001, 2, 4)


@pytest.mark.parametrize("text, message", [
    ("[train\nlr = 1", r"run\.toml is not valid TOML"),
    ("[train]\nlrr = 1\n", r"run\.toml \[train\]: unknown key 'lrr'; did you mean 'lr'\?"),
    ("[train]\nepochs = 'two'\n", r"run\.toml \[train\]: epochs must be float or None, got str 'two'"),
])
def test_bad_config_file_is_named(tmp_path, text, message):
    (tmp_path / "run.toml").write_text(text)
    with pytest.raises(ValueError, match=message):
        parse(config=str(tmp_path / "run.toml"))


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="config file .*nope.toml does not exist"):
        parse(config=str(tmp_path / "nope.toml"))


@pytest.mark.parametrize("n, epochs", [(1, 10.0), (300, 10.0), (450, 10.0), (900, 5.0), (2400, 2.0),
                                       (4500, 1.0), (67349, 1.0)])
def test_auto_epochs_follow_the_data_size(n, epochs):
    assert auto_epochs(n) == epochs
    assert n * epochs >= min(EXAMPLES_SEEN, n * 10)           # enough examples seen, at most ten passes
