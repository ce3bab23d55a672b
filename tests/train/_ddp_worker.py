"""The toy model and task the train tests share, and the per-rank entry point of the DDP test.

    python tests/train/_ddp_worker.py OUT_DIR BATCH_SIZE STEPS     (RANK, WORLD_SIZE, MASTER_* in the environment)

Toy task: windows of a fixed 8-token cycle, so the next token is a function of the current one; a tiny random
Llama with LoRA (r=4) on every linear layer learns it within a few dozen steps.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))   # the repo root, for `train` and `lora`

import lora  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

PATTERN = [5, 17, 42, 9, 77, 3, 61, 28]
SEQ_LEN = 16


def tiny_model(seed: int = 0, dropout: float = 0.0, quantize=None) -> LlamaForCausalLM:
    """2-layer Llama (hidden 64, vocab 128), frozen, with LoRA r=4 on all linear layers (B = 0 at init);
    `quantize(model)` (e.g. quant.quantize) runs before the injection, as in QLoRA."""
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128)
    model = LlamaForCausalLM(config)
    if quantize is not None:
        quantize(model)
    lora.inject(model, r=4, alpha=8, dropout=dropout, targets="all-linear")
    return model


def toy_data(n: int = 32) -> list[dict]:
    cycle = PATTERN * (SEQ_LEN // len(PATTERN) + 2)
    return [{"input_ids": torch.tensor(cycle[i % 8:i % 8 + SEQ_LEN])} for i in range(n)]


def collate(examples: list[dict]) -> dict:
    return {"input_ids": torch.stack([e["input_ids"] for e in examples])}  # (B, T)


def loss_fn(model, batch: dict):
    """Mean next-token cross-entropy over the micro-batch (fixed length: every item weighs the same)."""
    ids = batch["input_ids"]
    out = model(input_ids=ids, labels=ids, use_cache=False)
    return out.loss, {"n_tokens": ids.numel()}


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def run(out_dir: str, batch_size: int, steps: int):
    """The run the DDP test compares: fit the toy task for `steps` steps of `batch_size` per process."""
    from train.loop import TrainConfig, fit

    model = tiny_model()
    config = TrainConfig(out_dir=out_dir, batch_size=batch_size, max_steps=steps, lr=1e-2, log_every=1,
                         progress=False)
    return model, fit(model, toy_data(), config, loss_fn=loss_fn, collate_fn=collate)


def main(out_dir: str, batch_size: int, steps: int) -> None:
    from safetensors.torch import save_file
    from train import distributed

    torch.set_num_threads(1)
    model, result = run(out_dir, batch_size, steps)
    rank = distributed.rank()
    save_file(trainable_state(model), str(Path(out_dir) / f"params_rank{rank}.safetensors"))
    if rank == 0:
        summary = {"steps": result.steps, "world": distributed.world_size(),
                   "losses": [r["loss"] for r in result.history]}
        (Path(out_dir) / "result.json").write_text(json.dumps(summary))
    distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
