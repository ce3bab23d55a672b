"""Resume continues the same run or refuses: lost pointers, changed settings, damaged files, non-finite values."""
from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from _ddp_worker import trainable_state
from test_loop import LossAt, losses, max_abs_diff, run
from train.loop import TrainConfig, latest_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")
KW = dict(epochs=3, max_steps=6, save_every=2, warmup_steps=1)


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    result, model = run(tmp_path_factory.mktemp("full"), **KW)
    return result, trainable_state(model)


def cut_at_4(tmp_path) -> Path:
    """The run stopped inside step 5, its step-4 checkpoint saved."""
    result, _ = run(tmp_path, loss=LossAt(4, "interrupt"), **KW)
    assert result.steps == 4
    return tmp_path / "run"


def resumes_like_full(tmp_path, full) -> None:
    result, model = run(tmp_path, resume=True, **KW)
    assert result.steps == 6 and losses(result) == losses(full[0])
    assert max_abs_diff(trainable_state(model), full[1]) == 0.0


# ----------------------------------------------------------------------------- the latest pointer

def test_lost_latest_pointer_resumes_from_newest_complete_checkpoint(tmp_path, full):
    out = cut_at_4(tmp_path)
    (out / "latest").unlink()
    assert latest_checkpoint(out).name == "checkpoint-000004"
    resumes_like_full(tmp_path, full)


@pytest.mark.parametrize("pointer", ["checkpoint-000009", "garbage\n", "", "../../etc"], ids=repr)
def test_stale_latest_pointer_resumes_from_newest_complete_checkpoint(tmp_path, full, pointer):
    out = cut_at_4(tmp_path)
    (out / "latest").write_text(pointer)
    resumes_like_full(tmp_path, full)


def test_incomplete_checkpoint_folders_are_skipped(tmp_path, full):
    out = cut_at_4(tmp_path)
    (out / "checkpoint-000005").mkdir()                     # a folder without its files is not a checkpoint
    (out / "latest").write_text("checkpoint-000005")
    resumes_like_full(tmp_path, full)


def test_pointer_without_any_checkpoint_refuses_and_deletes_nothing(tmp_path):
    out = cut_at_4(tmp_path)
    shutil.move(out / "checkpoint-000004", tmp_path / "moved")
    (out / "checkpoint-000002").mkdir()
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(ValueError, match=r"no complete checkpoint.*checkpoint-000002.*resume=False"):
        run(tmp_path, resume=True, **KW)
    assert sorted(p.name for p in out.iterdir()) == before


# ----------------------------------------------------------------------------- changed settings

@pytest.mark.parametrize("setting, value, saved", [
    ("lr", 0.25, 1e-2), ("epochs", 5.0, 3), ("max_steps", 8, 6), ("warmup_steps", 3, 1),
    ("weight_decay", 0.1, 0.0), ("min_lr_ratio", 0.1, 0.0), ("max_grad_norm", 0.5, 1.0), ("grad_accum", 2, 1),
    ("batch_size", 2, 4), ("seed", 1, 0), ("precision", "bf16", "auto"),
])
def test_resume_with_another_setting_names_it_and_both_values(tmp_path, setting, value, saved):
    run(tmp_path, **{**KW, "max_steps": 6})
    kw = {**KW, setting: value}
    with pytest.raises(ValueError, match=rf"{setting}: checkpoint {saved!r}, now {value!r}"):
        run(tmp_path, resume=True, **kw)


def test_resume_with_other_logging_and_saving_settings_continues(tmp_path, full):
    out = cut_at_4(tmp_path)
    result, model = run(tmp_path, resume=True, **{**KW, "save_every": 3, "log_every": 2})
    assert result.steps == 6 and max_abs_diff(trainable_state(model), full[1]) == 0.0
    assert latest_checkpoint(out).name == "checkpoint-000006"


# ----------------------------------------------------------------------------- damaged checkpoint files

@pytest.mark.parametrize("name, damage", [
    ("trainable.safetensors", "truncate"), ("optimizer.safetensors", "truncate"),
    ("optimizer.safetensors", "garbage"), ("trainer_state.json", "truncate"), ("rng_state.json", "truncate"),
    ("rng_state.json", "wrong"),
])
def test_damaged_checkpoint_file_is_named(tmp_path, name, damage):
    out = cut_at_4(tmp_path)
    path = out / "checkpoint-000004" / name
    data = path.read_bytes()
    path.write_bytes({"truncate": data[: len(data) // 2], "garbage": b"\x00\x01garbage" * 10,
                      "wrong": b'{"torch": [1, 2], "numpy": 3}'}[damage])
    with pytest.raises(ValueError, match=rf"{name.replace('.', '[.]')}.*(corrupt|truncated|damaged|not hold)"):
        run(tmp_path, resume=True, **KW)


def test_checkpoint_with_nan_weights_is_refused_naming_the_tensor(tmp_path):
    out = cut_at_4(tmp_path)
    path = out / "checkpoint-000004" / "trainable.safetensors"
    from safetensors.torch import save_file
    tensors = load_file(path)
    first = sorted(tensors)[0]
    tensors[first][0, 0] = math.nan
    save_file(tensors, path)
    with pytest.raises(ValueError, match=rf"'{first}' holds NaN or Inf"):
        run(tmp_path, resume=True, **KW)


# ----------------------------------------------------------------------------- config guards

@pytest.mark.parametrize("field, value, problem", [
    ("lr", math.inf, "lr must be a finite number"), ("lr", math.nan, "lr must be a finite number"),
    ("epochs", math.inf, "epochs must be a finite number"), ("batch_size", 2.5, "batch_size must be int"),
    ("batch_size", True, "batch_size must be int"), ("grad_accum", "2", "grad_accum must be int"),
    ("max_steps", 10.0, "max_steps must be int or None"), ("seed", -1, "seed must be in"),
    ("weight_decay", math.nan, "weight_decay must be a finite"), ("max_grad_norm", math.inf, "max_grad_norm must"),
    ("grad_checkpointing", 1, "grad_checkpointing must be bool"), ("precision", None, "precision must not be None"),
    ("out_dir", 3, "out_dir must be str"),
], ids=lambda v: repr(v) if not isinstance(v, str) or len(v) < 20 else "")
def test_config_rejects_wrong_types_and_non_finite_values(tmp_path, field, value, problem):
    with pytest.raises(ValueError, match=problem):
        TrainConfig(**{"out_dir": str(tmp_path), field: value})


def test_update_that_makes_weights_non_finite_stops_before_saving(tmp_path, capsys, monkeypatch):
    """The third AdamW step leaves an Inf in a weight (as an overflowing update would): the loop stops there,
    saves nothing of it, and the step-2 checkpoint stays the last one."""
    step, calls = torch.optim.AdamW.step, []

    def overflowing_step(self, *args, **kwargs):
        out = step(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == 3:
            self.param_groups[0]["params"][0].data[0, 0] = math.inf
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", overflowing_step)
    result, _ = run(tmp_path, max_steps=6, save_every=1)
    assert result.stopped == "nan" and result.steps == 2
    assert "NaN/Inf" in capsys.readouterr().out
    ckpt = latest_checkpoint(tmp_path / "run")
    assert ckpt.name == "checkpoint-000002"
    assert all(torch.isfinite(t).all() for t in load_file(ckpt / "trainable.safetensors").values())
