"""Command-line flags every classification example shares; each script only picks data, labels and prompt."""
from __future__ import annotations

import argparse
import sys
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from train.memory import lean_cpu_allocator  # noqa: E402
from train.recipe import ClassificationRecipe  # noqa: E402


class _LeanMemory(argparse.Action):
    """--lean-memory: train.lean_cpu_allocator() as soon as the flag is parsed (it acts process-wide)."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, lean_cpu_allocator())
        if not namespace.lean_memory:
            print("--lean-memory: not applied (jemalloc serves, the C library is not glibc, or "
                  "MALLOC_MMAP_THRESHOLD_ is already set)", flush=True)


def parser(description: str, *, train_limit: int, out_name: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    p.add_argument("--out", default=f"runs/{out_name}-{stamp}", help="output directory")
    p.add_argument("--model", default="smollm2-135m", help="registry name or local HF folder")
    p.add_argument("--data-dir", default=None, help="dataset folder (default: $LORA_DATA_DIR or ../shared)")
    p.add_argument("--train-limit", type=int, default=train_limit, help="training examples (sampled, seeded)")
    p.add_argument("--limit", type=int, default=None, help="cap both train and test rows (smoke runs)")
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--loraplus-lr-ratio", type=float, default=None,
                   help="LoRA+: lora_B learns at this ratio x --lr (its paper: 16); default plain LoRA")
    p.add_argument("--use-dora", action="store_true", help="DoRA: weight-decomposed LoRA (PEFT's use_dora)")
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32.0)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--targets", default="all-linear")
    p.add_argument("--adapter-compute", default="base", choices=["base", "fp32"],
                   help="adapter math in the backbone dtype (fp32 weights, bf16 matmuls) or in fp32")
    p.add_argument("--backend", default=None, choices=[None, "torch", "bnb", "triton"])
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"])
    p.add_argument("--device", default="auto", help="auto (the GPU when there is one) | cpu | cuda | cuda:N")
    p.add_argument("--few-shot", type=int, default=0, help="k for a k-shot baseline row (0: none)")
    p.add_argument("--grad-checkpointing", action=argparse.BooleanOptionalAction, default=True,
                   help="recompute each block in backward: activation memory of one block, not all")
    p.add_argument("--lean-memory", action=_LeanMemory, nargs=0, default=False,
                   help="where jemalloc is missing: freed CPU tensors go straight back to the OS, lower peak "
                        "RSS, slower steps (train/memory.py has the measured trade)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.add_argument("--export-merged", default=None, help="write a merged plain HF checkpoint here")
    p.add_argument("--seed", type=int, default=0)
    return p


def recipe_from_args(args: argparse.Namespace, **task) -> ClassificationRecipe:
    task["extra"] = {**task.get("extra", {}), "lean_memory": args.lean_memory}   # recorded in metrics.json
    return ClassificationRecipe(
        out_dir=args.out, model=args.model, r=args.r, alpha=args.alpha, dropout=args.dropout,
        targets=args.targets, adapter_compute=args.adapter_compute, backend=args.backend, dtype=args.dtype,
        device=args.device,
        epochs=args.epochs, max_steps=args.max_steps, batch_size=args.batch_size, grad_accum=args.grad_accum,
        lr=args.lr, loraplus_lr_ratio=args.loraplus_lr_ratio, use_dora=args.use_dora, few_shot=args.few_shot,
        grad_checkpointing=args.grad_checkpointing, resume=args.resume,
        export_merged=args.export_merged, seed=args.seed, **task)

