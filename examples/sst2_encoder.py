"""SST-2 with an encoder: all-mpnet-base-v2 (MPNet, 110M) + a new classification head, QLoRA vs full fine-tune.

QLoRA: the encoder's linear layers in NF4 (the head stays dense), LoRA on every linear layer of attention and
FFN (BERT's query/key/value/dense; MPNet's attn.q/k/v/o and dense, the encoder recipe maps the names), the
head trained in full (modules_to_save=["classifier"]). Full fine-tune: every weight trainable, fp32, no
quantization, run in a child process so that its peak RSS is its own. The report puts accuracy, trainable
parameters, training time and peak RSS of the two side by side. The "zero-shot" row is the untrained head: an
encoder has no prompt to answer, so it sits near chance (and there is no k-shot row).

Defaults, sized so that QLoRA and its full fine-tune fit ~30 min on the 2-core CPU: one epoch over 20,000 of
the 67,349 training phrases (625 steps of 32), LoRA at lr 5e-4 (full fine-tune: 5e-5), max_length 64 (SST-2's
phrases: median 10 tokens, longest 66: 4 of 67,349 are cut), the NF4 matmuls in bf16 where the CPU is taken to
run it fast (`--nf4-compute`; on a CPU without AMX fp32 is faster: measured here, an MPNet QLoRA step costs 2/3
of the bf16 one). Per step of 32 phrases, calibrated against MiniLM's timings below: QLoRA ~1.0 s (bf16) /
~0.7 s (fp32), full fine-tune ~1.05 s; each evaluation of the 872 dev sentences 20-45 s.

all-MiniLM-L6 (BERT, 22M) is `--model minilm-l6`; its measured run (QLoRA 0.885 in 4.8 min of training, full
fine-tune 0.884 in 7.6 min, ~13 min in all; 20,000 phrases at lr 5e-4 / 1e-3 / 2e-3 gave 0.858 / 0.864 / 0.843):

    python examples/sst2_encoder.py --model minilm-l6 --train-limit 67349 --lr 1e-3 --full-lr 1e-4 --max-length 128

    python examples/sst2_encoder.py                        # MPNet: QLoRA, then the full fine-tune: ~25 min
    python examples/sst2_encoder.py --no-compare           # QLoRA only
    python examples/sst2_encoder.py --full-finetune        # the full fine-tune only
    python examples/sst2_encoder.py --limit 16 --max-steps 2   # smoke run
"""
import subprocess
import sys
from pathlib import Path

from common import parser

from train.data import LABELS, load_split
from train.encoder_recipe import EncoderRecipe, add_comparison, run_encoder

TRAIN_LIMIT, LR, FULL_LR = 20_000, 5e-4, 5e-5    # MPNet, ~30 min with the comparison (docstring)
NEW_TEXTS = [
    "a gorgeous, witty, seductive movie.",
    "the plot is paper-thin and the acting is worse.",
    "I expected little and was pleasantly surprised by how moving it was.",
    "two hours of my life I will never get back.",
]


def get_parser():
    p = parser(__doc__, train_limit=TRAIN_LIMIT, out_name="sst2-encoder")
    p.add_argument("--full-finetune", action="store_true", help="train every weight (fp32, no NF4) instead")
    p.add_argument("--dense-base", action="store_true", help="LoRA on the dense encoder (no NF4)")
    p.add_argument("--no-compare", action="store_true", help="skip the full fine-tune comparison run")
    p.add_argument("--full-lr", type=float, default=FULL_LR, help="learning rate of the full fine-tune")
    p.add_argument("--max-length", type=int, default=64, help="tokens with <s> and </s> (SST-2's longest: 66)")
    p.add_argument("--eval-batch-size", type=int, default=128)
    p.add_argument("--nf4-compute", default="auto", choices=["auto", "bf16", "fp32"],
                   help="dtype of the NF4 base's matmuls (the model, adapters and head stay --dtype)")
    p.set_defaults(model="mpnet-base", lr=LR, batch_size=32, dtype="fp32", targets="query,key,value,dense")
    return p


def load_data(args) -> tuple[list[dict], list[dict]]:
    train_n = args.train_limit if args.limit is None else min(args.train_limit, args.limit)
    train_rows = load_split("sst2", "train", data_dir=args.data_dir, limit=train_n, seed=args.seed)
    test_rows = load_split("sst2", "test", data_dir=args.data_dir, limit=args.limit, seed=args.seed)
    return list(train_rows), list(test_rows)


def make_recipe(args) -> EncoderRecipe:
    if args.few_shot:
        raise ValueError("--few-shot: an encoder classifier has no prompt to put examples in; use a causal LM")
    mode = "full" if args.full_finetune else "lora" if args.dense_base else "qlora"
    targets = args.targets if args.targets == "all-linear" else args.targets.split(",")
    return EncoderRecipe(
        out_dir=args.out, model=args.model, mode=mode, max_length=args.max_length, r=args.r, alpha=args.alpha,
        dropout=args.dropout, targets=targets, backend=args.backend, dtype=args.dtype, nf4_compute=args.nf4_compute,
        device=args.device,
        epochs=args.epochs, max_steps=args.max_steps, batch_size=args.batch_size, grad_accum=args.grad_accum,
        lr=args.full_lr if args.full_finetune else args.lr, loraplus_lr_ratio=args.loraplus_lr_ratio,
        use_dora=args.use_dora, eval_batch_size=args.eval_batch_size,
        seed=args.seed, resume=args.resume, export_merged=args.export_merged)


def run_full_finetune_child(args) -> Path:
    """The full fine-tune as a separate process (its own ru_maxrss), into OUT/full-finetune."""
    out = Path(args.out) / "full-finetune"
    cmd = [sys.executable, __file__, "--full-finetune", "--out", str(out), "--model", args.model,
           "--train-limit", str(args.train_limit), "--epochs", str(args.epochs), "--batch-size",
           str(args.batch_size), "--full-lr", str(args.full_lr), "--max-length", str(args.max_length),
           "--eval-batch-size", str(args.eval_batch_size), "--seed", str(args.seed), "--device", args.device]
    for flag, value in (("--data-dir", args.data_dir), ("--limit", args.limit), ("--max-steps", args.max_steps)):
        if value is not None:
            cmd += [flag, str(value)]
    subprocess.run(cmd, check=True)
    return out


def main() -> None:
    args = get_parser().parse_args()
    train_rows, test_rows = load_data(args)
    recipe = make_recipe(args)
    run_encoder(recipe, train_rows, test_rows, LABELS["sst2"], new_texts=NEW_TEXTS)
    if recipe.mode != "full" and not args.no_compare:
        metrics = add_comparison(args.out, run_full_finetune_child(args))
        print(f"fine-tuned accuracy: {recipe.mode} {metrics['fine_tuned']['accuracy']:.4f}, "
              f"full fine-tune {metrics['full_fine_tune']['accuracy']:.4f}  (report: {args.out}/results.md)")


if __name__ == "__main__":
    from train.cli import user_errors
    from train.memory import run_under_jemalloc

    with user_errors():
        run_under_jemalloc()            # re-executes this script once under jemalloc (train/memory.py)
        main()
