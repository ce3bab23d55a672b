"""Per-rank entry point of the nccl DDP test: tests/train/_ddp_worker.py's toy run, the model on this rank's GPU.

    python tests/gpu/_ddp_cuda_worker.py OUT_DIR BATCH_SIZE STEPS    (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_* set;
                                                                      WORLD_SIZE=1: the one-process reference)
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))   # _ddp_worker (it adds the repo root)

import _ddp_worker  # noqa: E402


def main(out_dir: str, batch_size: int, steps: int) -> None:
    from safetensors.torch import save_file

    from train import distributed
    from train.loop import TrainConfig, fit

    distributed.init()                           # nccl; sets this rank's GPU (fit would call it too, but later)
    model = _ddp_worker.tiny_model().to(distributed.local_device())   # built on the CPU: the same on every rank
    config = TrainConfig(out_dir=out_dir, batch_size=batch_size, max_steps=steps, lr=1e-2, log_every=1,
                         progress=False, precision="fp32")            # no autocast: compare in fp32
    result = fit(model, _ddp_worker.toy_data(), config, loss_fn=_ddp_worker.loss_fn,
                 collate_fn=_ddp_worker.collate)
    rank = distributed.rank()
    params = {k: v.cpu() for k, v in _ddp_worker.trainable_state(model).items()}
    save_file(params, str(Path(out_dir) / f"params_rank{rank}.safetensors"))
    if rank == 0:
        summary = {"steps": result.steps, "world": distributed.world_size(),
                   "losses": [r["loss"] for r in result.history], "device": str(next(model.parameters()).device)}
        (Path(out_dir) / "result.json").write_text(json.dumps(summary))
    distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
