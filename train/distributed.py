"""Data parallel in a few helpers: torchrun sets the environment, we average the gradients by hand.

    torchrun --nproc_per_node N script.py        # sets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT

Every rank holds the whole (frozen, maybe 4-bit) model and the same adapters. Each rank computes the gradient
of the mean loss over its own slice of the global batch; one all-reduce per optimizer step averages them, so all
ranks take the same step as one process would on the whole global batch (equal slices make the average of the
slice means the global mean). We do not wrap the model in DistributedDataParallel: the trainable parameters
are a few MB of LoRA weights, one flat all-reduce per step is all it needs, and the model keeps its own
class (no `.module` to unwrap before saving). Backend: nccl on CUDA, gloo on CPU.

Every helper also works without a process group (one process): rank 0, world size 1, no-ops.
"""
from __future__ import annotations

import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
from tqdm.auto import tqdm


def init() -> bool:
    """Joins the process group torchrun describes (WORLD_SIZE > 1); True when this call created it."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return False
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend, timeout=timedelta(minutes=30))
    return True


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    """Only rank 0 writes files, prints and shows progress bars."""
    return rank() == 0


def say(message: str) -> None:
    """Prints on rank 0 only, through tqdm so that a progress bar on screen is redrawn below the line, flushed."""
    if is_main():
        tqdm.write(message)
        sys.stdout.flush()


def local_device() -> torch.device:
    """The device this rank should put its model on: cuda:LOCAL_RANK on GPU, else cpu."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """In place: every rank ends with the mean of `t` over ranks (SUM then divide: gloo has no AVG)."""
    if dist.is_initialized() and world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t.div_(world_size())
    return t


def all_reduce_grads(params: list[torch.nn.Parameter]) -> None:
    """Averages the gradients of `params` over ranks with one flat all-reduce.

    A parameter without a gradient gets zeros, so every rank sends a buffer of the same layout.
    """
    if not dist.is_initialized() or world_size() == 1:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in params])  # (sum of numels,)
    all_reduce_mean(flat)
    offset = 0
    for p in params:
        n = p.grad.numel()
        p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
        offset += n


def broadcast_params(params: list[torch.nn.Parameter]) -> None:
    """Copies rank 0's values into every rank, so all ranks start from the same adapters."""
    if not dist.is_initialized() or world_size() == 1:
        return
    with torch.no_grad():
        for p in params:
            dist.broadcast(p.data, src=0)
