"""Data parallel on CPU: 2 gloo processes x batch 2 train exactly like 1 process x batch 4 on the same data.

The ranks are started the way torchrun starts them (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT in the
environment), as plain subprocesses: no torchrun agent to start, and a free port picked here.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import _ddp_worker

WORKER = Path(_ddp_worker.__file__)
STEPS = 3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(out_dir: Path, world: int, batch_size: int, steps: int) -> None:
    port = free_port()
    procs = []
    for rank in range(world):
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(world),
               "RANK": str(rank), "LOCAL_RANK": str(rank), "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, str(WORKER), str(out_dir), str(batch_size), str(steps)],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    for rank, proc in enumerate(procs):
        try:
            output, _ = proc.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            pytest.fail(f"rank {rank} did not finish in 180 s")
        assert proc.returncode == 0, f"rank {rank} failed:\n{output[-3000:]}"


@pytest.fixture
def single_process(tmp_path):
    """The reference: one process, batch 4, in this interpreter (one thread, like the ranks)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, result = _ddp_worker.run(str(tmp_path / "single"), batch_size=4, steps=STEPS)
    finally:
        torch.set_num_threads(threads)
    return _ddp_worker.trainable_state(model), [r["loss"] for r in result.history]


@pytest.mark.slow   # 8 s on an idle 2-core box, 20 s when shared: two interpreters import torch + transformers
def test_two_gloo_ranks_match_one_process(tmp_path, single_process):
    """Tolerance 1e-5: the ranks average two half-batch gradients where one process averages the whole
    batch, so fp32 sums differ in order (~1e-7 relative); AdamW then moves each weight by ~lr = 1e-2."""
    ref_params, ref_losses = single_process
    out = tmp_path / "ddp"
    launch(out, world=2, batch_size=2, steps=STEPS)
    summary = json.loads((out / "result.json").read_text())
    assert summary["world"] == 2 and summary["steps"] == STEPS
    rank0, rank1 = (load_file(out / f"params_rank{r}.safetensors") for r in (0, 1))
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)            # every rank took the same step
    diff = max((rank0[k] - ref_params[k]).abs().max().item() for k in ref_params)
    mean = sum((rank0[k] - ref_params[k]).abs().mean().item() for k in ref_params) / len(ref_params)
    print(f"DDP vs single process: max |param diff| {diff:.2e}, mean {mean:.2e}")
    assert diff < 1e-5
    assert summary["losses"] == pytest.approx(ref_losses, abs=1e-5)        # rank 0 logs the mean over ranks
    assert [p.name for p in out.glob("checkpoint-*")] == [f"checkpoint-{STEPS:06d}"]
