"""The fault suite: kill -9 at every step of a save and at random moments, then load / resume; pickle payloads.

A child process (tests/_fault_worker.py) saves an adapter or trains, and SIGKILLs itself just before its k-th
file move or tree removal, for every k a complete run makes, or is killed by this process at a random moment.
Afterwards the folder must load as the old version or the new one (every file of the same version, bit for bit),
a resumed run must end exactly where the uninterrupted one does, and the next save must leave no temp file.
"""
from __future__ import annotations

import json
import pickle
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import lora
from lora.atomic import readable_dir
from lora.io import read_adapter

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _fault_worker as worker  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
WORKER = str(Path(__file__).resolve().parent / "_fault_worker.py")
KILLED = -signal.SIGKILL


def child(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, WORKER, *map(str, args)], capture_output=True, text=True, timeout=120)


def events_of(*args) -> int:
    """How many file moves / removals a complete, unkilled run of the worker makes."""
    done = child(*args, 0)
    assert done.returncode == 0, done.stderr
    return int(done.stdout.split()[-1])


def kill_at_random(args, seconds: float) -> None:
    """Starts the worker, waits for its imports, kills it `seconds` into its work."""
    proc = subprocess.Popen([sys.executable, WORKER, *map(str, args)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    time.sleep(seconds)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# ----------------------------------------------------------------------------- lora.save

def adapter_version(directory: Path, references: dict[int, dict]) -> int:
    """The version the folder holds; fails unless config, tensors and task.json all come from that version."""
    config, tensors = read_adapter(directory)
    version = json.loads((readable_dir(directory) / "task.json").read_text())["version"]
    ref_config, ref_tensors = references[version]
    assert config.lora_alpha == ref_config.lora_alpha, f"config of another version beside v{version}'s task.json"
    assert tensors.keys() == ref_tensors.keys()
    assert all(torch.equal(tensors[k], ref_tensors[k]) for k in tensors), f"tensors of another version than v{version}"
    model = lora.load(worker.Toy(), directory)                      # lora.load reads the same folder
    assert model.lora_config.lora_alpha == ref_config.lora_alpha
    return version


@pytest.fixture(scope="module")
def references(tmp_path_factory) -> dict[int, dict]:
    root = tmp_path_factory.mktemp("refs")
    for v in (1, 2, 3):
        worker.save(str(root / f"v{v}"), v)
    return {v: read_adapter(root / f"v{v}") for v in (1, 2, 3)}


def test_adapter_save_killed_before_each_file_move_leaves_old_or_new(tmp_path, references):
    worker.save(str(tmp_path / "count" / "adapter"), 1)
    n = events_of("save", tmp_path / "count" / "adapter", 2)   # replacing an adapter
    assert n >= 3                                           # old aside, new in place, old removed
    seen = []
    for k in range(1, n + 1):
        target = tmp_path / f"k{k}" / "adapter"
        worker.save(str(target), 1)
        assert child("save", target, 2, k).returncode == KILLED
        seen.append(adapter_version(target, references))
        worker.save(str(target), 3)                         # the next save recovers and cleans up
        assert adapter_version(target, references) == 3
        assert leftovers(target.parent) == [], f"kill before event {k}: temp files outlived the next save"
    assert seen[0] == 1 and seen[-1] == 2, seen             # both outcomes occur, nothing else
    assert seen == sorted(seen)


def test_adapter_save_killed_at_random_moments_leaves_old_or_new(tmp_path, references):
    rng = random.Random(0)
    for trial in range(5):
        target = tmp_path / f"t{trial}" / "adapter"
        kill_at_random(("churn", target), rng.uniform(0.05, 0.6))
        if readable_dir(target).exists():                   # a kill during the very first save leaves nothing
            assert adapter_version(target, references) in (1, 2)
        worker.save(str(target), 3)
        assert adapter_version(target, references) == 3 and leftovers(target.parent) == []


# ----------------------------------------------------------------------------- training and resume

@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    model, result = worker.train(str(tmp_path_factory.mktemp("full") / "run"))
    return worker_state(model), [r["loss"] for r in result.history]


def worker_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_resumes_to(out: Path, uninterrupted) -> None:
    state, losses = uninterrupted
    model, result = worker.train(str(out), resume=True)
    assert result.steps == worker.TRAIN_SETTINGS["max_steps"]
    assert [r["loss"] for r in result.history] == losses
    mine = worker_state(model)
    assert all(torch.equal(mine[k], state[k]) for k in state), "resumed weights differ from the uninterrupted run"
    assert leftovers(out) == [], "temp files outlived the resumed run's saves"


def test_training_killed_at_file_moves_resumes_bit_for_bit(tmp_path, uninterrupted):
    n = events_of("train", tmp_path / "count" / "run")
    # every event of the first checkpoint, some of the middle ones, and the last (the final logs)
    points = sorted({1, 2, 3, 4, 5, 6, n // 2, n // 2 + 1, n - 1, n})
    for k in points:
        out = tmp_path / f"k{k}" / "run"
        assert child("train", out, k).returncode == KILLED, f"event {k} of {n}"
        assert_resumes_to(out, uninterrupted)


def test_training_killed_at_random_moments_resumes_bit_for_bit(tmp_path, uninterrupted):
    rng = random.Random(1)
    for trial in range(2):
        out = tmp_path / f"t{trial}" / "run"
        kill_at_random(("train", out, 0), rng.uniform(0.2, 1.5))
        assert_resumes_to(out, uninterrupted)


# ----------------------------------------------------------------------------- pickle payloads never run

class Payload:
    """Unpickling this creates `marker`: proof that a file was unpickled."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


@pytest.mark.parametrize("name", ["trainable.safetensors", "optimizer.safetensors", "rng_state.json",
                                  "trainer_state.json", "optimizer.pt", "rng_state.pt"])
def test_pickle_payload_in_a_checkpoint_file_is_refused_not_run(tmp_path, name):
    out = tmp_path / "run"
    worker.train(str(out), max_steps=3)
    ckpt = next(out.glob("checkpoint-*"))
    marker = tmp_path / "pwned"
    (ckpt / name).write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(ValueError, match=name.replace(".", r"\.")):
        worker.train(str(out), max_steps=3, resume=True)
    assert not marker.exists(), f"a pickle planted in {name} was executed"


@pytest.mark.parametrize("name", ["adapter_model.safetensors", "adapter_config.json"])
def test_pickle_payload_in_an_adapter_file_is_refused_not_run(tmp_path, name):
    target = tmp_path / "adapter"
    worker.save(str(target), 1)
    marker = tmp_path / "pwned"
    (target / name).write_bytes(pickle.dumps(Payload(marker)))
    (target / "adapter_model.bin").write_bytes(pickle.dumps(Payload(marker)))   # PEFT's legacy pickle: never read
    with pytest.raises(ValueError, match=name.replace(".", r"\.")):
        lora.load(worker.Toy(), target)
    assert not marker.exists(), f"a pickle planted in {name} was executed"
