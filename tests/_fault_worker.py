"""The child process of the fault suite (tests/test_faults.py): saves or trains, and may SIGKILL itself.

    python tests/_fault_worker.py save  DIR VERSION KILL_AT     lora.save of adapter VERSION into DIR
    python tests/_fault_worker.py churn DIR                     saves versions 1 and 2 in turn until killed
    python tests/_fault_worker.py train DIR KILL_AT             the toy training run of the suite into DIR

KILL_AT = k > 0: the process kills itself with SIGKILL just before its k-th file move (os.rename, os.replace)
or tree removal (shutil.rmtree), so every step of a save can be cut deterministically; 0: never. A run that
is not killed prints the number of such events it made. "ready" is printed once the imports are done, so the
parent can time random kills to land inside the work.
"""
from __future__ import annotations

import importlib
import os
import shutil
import signal
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))          # the repo root
sys.path.insert(0, str(Path(__file__).resolve().parent / "train"))    # _ddp_worker

import lora  # noqa: E402

EVENTS = 0


def kill_before_event(kill_at: int) -> None:
    """Counts every os.rename / os.replace / shutil.rmtree; SIGKILLs the process before number `kill_at`."""
    def hooked(original):
        def call(*args, **kwargs):
            global EVENTS
            EVENTS += 1
            if EVENTS == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return original(*args, **kwargs)
        return call

    os.rename, os.replace, shutil.rmtree = hooked(os.rename), hooked(os.replace), hooked(shutil.rmtree)


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.v, self.out = nn.Linear(32, 32), nn.Linear(32, 32), nn.Linear(32, 8)


def adapter(version: int) -> nn.Module:
    """Version v: alpha 8v, B filled from seed v, task.json "v": every file tells which version it is from."""
    torch.manual_seed(0)
    model = lora.inject(Toy(), r=4, alpha=8 * version, targets=["q", "v"])
    torch.manual_seed(version)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    return model


def save(directory: str, version: int) -> None:
    lora.save(adapter(version), directory, extra_files={"task.json": f'{{"version": {version}}}\n'})


def train(directory: str, **overrides):
    """The suite's toy run (also called in-process by the suite, for the reference and the resumes)."""
    from _ddp_worker import collate, loss_fn, tiny_model, toy_data
    from train.loop import TrainConfig, fit

    model = tiny_model(dropout=0.1)
    config = TrainConfig(out_dir=directory, **{**TRAIN_SETTINGS, **overrides})
    return model, fit(model, toy_data(), config, loss_fn=loss_fn, collate_fn=collate)


# The run the suite kills and resumes: dropout (the RNG state matters), accumulation, a checkpoint every step.
TRAIN_SETTINGS = dict(batch_size=4, grad_accum=2, lr=1e-2, epochs=3, max_steps=8, warmup_steps=2, save_every=1,
                      log_every=1, progress=False, seed=0)


def main(mode: str, directory: str, *args: str) -> None:
    torch.set_num_threads(1)
    if mode == "train":
        for module in ("_ddp_worker", "train.loop"):    # imported before "ready": kills land in the work
            importlib.import_module(module)
    print("ready", flush=True)
    if mode == "churn":
        version = 1
        while True:
            save(directory, version)
            version = 3 - version
    kill_before_event(int(args[-1]))
    if mode == "save":
        save(directory, int(args[0]))
    elif mode == "train":
        train(directory)
    print(EVENTS, flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
