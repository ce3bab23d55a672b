"""Training on the GPU: `python -m train fit --device cuda` as a user types it, and nccl data parallel.

Both run as subprocesses, as users and torchrun start them: a fresh CUDA context each, nothing shared with pytest.
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

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).resolve().parent / "_ddp_cuda_worker.py"
STEPS = 3


def test_fit_cli_runs_two_steps_on_cuda(tmp_path, smol_tok):
    from test_cli import save_folder, write_csv          # tests/test_cli.py's tiny Llama folder and CSVs
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(smol_tok), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1))
    folder = save_folder(tmp_path / "tiny-llama", model, smol_tok)
    train_csv, test_csv = write_csv(tmp_path / "train.csv", 24), write_csv(tmp_path / "test.csv", 12)
    out = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-m", "train", "fit", "--train", str(train_csv), "--test", str(test_csv), "--out", str(out),
         "--model", str(folder), "--text-column", "headline", "--label-column", "tone", "--device", "cuda",
         "--max-steps", "2", "--batch-size", "4"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "TQDM_DISABLE": "1"})
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train"]["steps"] == 2 and metrics["fine_tuned"]["n"] == 12, metrics.get("train")
    assert "cuda" in json.dumps(metrics), "metrics.json does not record that the run used the GPU"
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(out_dir: Path, world: int, batch_size: int) -> dict:
    """Starts `world` ranks as torchrun would (one GPU each) and returns rank 0's summary."""
    port = free_port()
    procs = []
    for rank in range(world):
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(world),
               "RANK": str(rank), "LOCAL_RANK": str(rank), "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, str(WORKER), str(out_dir), str(batch_size), str(STEPS)],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    for rank, proc in enumerate(procs):
        try:
            output, _ = proc.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            pytest.fail(f"rank {rank} of {world} did not finish in 300 s")
        assert proc.returncode == 0, f"rank {rank} of {world} failed:\n{output[-3000:]}"
    return json.loads((out_dir / "result.json").read_text())


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="nccl data parallel needs 2 GPUs; this machine has "
                                                          f"{torch.cuda.device_count()}")
def test_two_nccl_ranks_match_one_process(tmp_path):
    """2 ranks x batch 2 vs 1 process x batch 4 on the same data, fp32. Tolerance 1e-4 (tests/train/test_ddp.py
    has 1e-5 on the CPU): cuBLAS may pick other kernels for 2 rows than for 4, so each gradient differs by a
    few fp32 ulps on top of the reduction order; AdamW at lr 1e-2 moves each weight by ~1e-2 per step."""
    from safetensors.torch import load_file

    single = launch(tmp_path / "single", world=1, batch_size=4)
    ddp = launch(tmp_path / "ddp", world=2, batch_size=2)
    assert single["device"] == "cuda:0" and ddp["world"] == 2 and ddp["steps"] == STEPS
    ref = load_file(tmp_path / "single" / "params_rank0.safetensors")
    rank0, rank1 = (load_file(tmp_path / "ddp" / f"params_rank{r}.safetensors") for r in (0, 1))
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)            # every rank took the same step
    diff = max((rank0[k] - ref[k]).abs().max().item() for k in ref)
    print(f"nccl DDP vs one process: max |param diff| {diff:.2e}")
    assert diff < 1e-4
    assert ddp["losses"] == pytest.approx(single["losses"], abs=1e-4)     # rank 0 logs the mean over ranks
