"""SST-2 with an encoder: all-MiniLM-L6 (BERT, 22M) + a new classification head, QLoRA vs full fine-tune.

QLoRA: the encoder's linear layers in NF4 (the head stays dense), LoRA on query/key/value/dense (attention,
FFN and pooler), the head trained in full (modules_to_save=["classifier"]). Full fine-tune: every weight
trainable, fp32, no quantization, run in a child process so that its peak RSS is its own. The report puts
accuracy, trainable parameters, training time and peak RSS of the two side by side. The "zero-shot" row is
the untrained head: an encoder has no prompt to answer, so it sits at chance (and there is no k-shot row).

Defaults: one epoch over all 67,349 training phrases, LoRA at lr 1e-3 (full fine-tune: 1e-4), the NF4 matmuls
in bf16 where the CPU runs it fast (`--nf4-compute`). Measured with QLoRA on the Intel Xeon: 20,000 phrases at
lr 5e-4 / 1e-3 / 2e-3 gave 0.858 / 0.864 / 0.843 dev accuracy; all 67,349 at 1e-3 gave 0.885 in 4.8 min of
training (full fine-tune: 0.884 in 7.6 min).

    python examples/sst2_encoder.py                        # QLoRA, then the full fine-tune: ~13 min, 2-core CPU
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

NEW_TEXTS = [
    "a gorgeous, witty, seductive movie.",
    "the plot is paper-thin and the acting is worse.",
    "I expected little and was pleasantly surprised by how moving it was.",
    "two hours of my life I will never get back.",
]


def get_parser():
    p = parser(__doc__, train_limit=67349, out_name="sst2-encoder")      # all of SST-2's training phrases
    p.add_argument("--full-finetune", action="store_true", help="train every weight (fp32, no NF4) instead")
    p.add_argument("--dense-base", action="store_true", help="LoRA on the dense encoder (no NF4)")
    p.add_argument("--no-compare", action="store_true", help="skip the full fine-tune comparison run")
    p.add_argument("--full-lr", type=float, default=1e-4, help="learning rate of the full fine-tune")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--eval-batch-size", type=int, default=128)
    p.add_argument("--nf4-compute", default="auto", choices=["auto", "bf16", "fp32"],
                   help="dtype of the NF4 base's matmuls (the model, adapters and head stay --dtype)")
    p.set_defaults(model="minilm-l6", lr=1e-3, batch_size=32, dtype="fp32", targets="query,key,value,dense")
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
        epochs=args.epochs, max_steps=args.max_steps, batch_size=args.batch_size, grad_accum=args.grad_accum,
        lr=args.full_lr if args.full_finetune else args.lr, eval_batch_size=args.eval_batch_size,
        seed=args.seed, resume=args.resume, export_merged=args.export_merged)


def run_full_finetune_child(args) -> Path:
    """The full fine-tune as a separate process (its own ru_maxrss), into OUT/full-finetune."""
    out = Path(args.out) / "full-finetune"
    cmd = [sys.executable, __file__, "--full-finetune", "--out", str(out), "--model", args.model,
           "--train-limit", str(args.train_limit), "--epochs", str(args.epochs), "--batch-size",
           str(args.batch_size), "--full-lr", str(args.full_lr), "--max-length", str(args.max_length),
           "--eval-batch-size", str(args.eval_batch_size), "--seed", str(args.seed)]
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

    with user_errors():
        main()
