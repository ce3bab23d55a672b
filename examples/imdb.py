"""QLoRA on IMDB: SmolLM2-135M, zero-shot vs fine-tuned on long movie reviews (2 classes).

Reviews average ~300 tokens and a fifth exceed 500; each is cut keeping its first quarter and its last three
quarters (the verdict is often at the end; Sun et al. 2019): to --max-length (256) tokens for training, to
--eval-max-length (512) for evaluation and prediction. Training at 256 keeps attention on the CPU's fast fp32
path (train/attention.py) and buys more reviews in the same time (3,000 at 256 tokens beat 2,000 at 320); reading
up to 512 at test time costs ~1 min per evaluation pass and, for one and the same adapter, gave 0.885 / 0.887 /
0.892 accuracy at 256 / 384 / 512 test tokens (AUC 0.953 / 0.957 / 0.958). The test set is the fixed balanced
2,500-review sample of train.data; by default a balanced 1,000 of it, because on a 2-core CPU every evaluation
of 2,500 reviews costs ~6-13 min (use --test-size 2500 for the whole sample).

    python examples/imdb.py                          # ~16 min on a 2-core CPU (see README: examples)
    python examples/imdb.py --eval-max-length 256    # test prompts cut like the training ones (~2 min less)
    python examples/imdb.py --eval-adapter runs/imdb/adapter --out runs/imdb-lengths   # one adapter scored at
                                                     #   256 / 384 / 512 test tokens (--eval-lengths), ~8 min
    python examples/imdb.py --test-size 2500         # the whole balanced test sample: 0.903 [0.891, 0.914];
                                                     #   ~13 min more (passes of 339 + 762 s vs 148 + 199 s)
    python examples/imdb.py --few-shot 4             # + a 4-shot row: shots cut to 128 tokens each, ~1,100-token
                                                     #   prompts, ~12 min more on a 2-core CPU
    python examples/imdb.py --limit 16 --max-steps 2   # smoke run
"""
import json
from pathlib import Path

from common import parser, recipe_from_args

from train.data import LABELS, load_split
from train.predict import evaluate_lengths
from train.recipe import balanced_sample, run_classification
from lora.atomic import atomic_write

INSTRUCTION = "Is the sentiment of this movie review negative or positive?"
NEW_TEXTS = [
    "I went in with low expectations. The first hour drags, the dialogue is clunky, and yet by the end I was "
    "in tears: a flawed but deeply moving film that I will watch again.",
    "Beautiful cinematography and a great cast, all wasted on a script that makes no sense. Skip it.",
    "A masterpiece of suspense; Hitchcock would have been proud.",
]


def get_parser():
    p = parser(__doc__, train_limit=3000, out_name="imdb")
    p.add_argument("--test-size", type=int, default=1000,
                   help="balanced sample of the fixed 2,500-review test sample (2500: all of it)")
    p.add_argument("--max-length", type=int, default=256, help="prompt tokens; longer reviews keep head + tail")
    p.add_argument("--eval-max-length", type=int, default=512,
                   help="prompt tokens when evaluating and predicting: more of each test review, no training cost")
    p.add_argument("--eval-batch-size", type=int, default=32)
    p.add_argument("--eval-adapter", default=None,
                   help="no training: score this saved adapter on the test sample at each --eval-lengths")
    p.add_argument("--eval-lengths", type=int, nargs="+", default=[256, 384, 512])
    return p


def load_data(args) -> tuple[list[dict], list[dict]]:
    """(balanced training sample, balanced test sample), both capped by --limit."""
    train_n = args.train_limit if args.limit is None else min(args.train_limit, args.limit)
    test_n = args.test_size if args.limit is None else min(args.test_size, args.limit)
    train_rows = balanced_sample(load_split("imdb", "train", data_dir=args.data_dir, seed=args.seed), train_n,
                                 seed=args.seed)
    test_rows = load_split("imdb", "test", data_dir=args.data_dir, seed=args.seed)   # the fixed 2,500
    return train_rows, balanced_sample(test_rows, test_n, seed=args.seed)


def make_recipe(args):
    return recipe_from_args(args, instruction=INSTRUCTION, label_words=("negative", "positive"),
                            max_length=args.max_length, eval_max_length=args.eval_max_length, keep="head+tail",
                            eval_batch_size=args.eval_batch_size)


def eval_lengths(args, test_rows) -> list[dict]:
    """--eval-adapter: the adapter's test metrics per test prompt length, printed and in OUT/eval_lengths.json."""
    results = evaluate_lengths(args.eval_adapter, test_rows, args.eval_lengths, batch_size=args.eval_batch_size)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "eval_lengths.json",
                 json.dumps({"adapter": args.eval_adapter, "results": results}, indent=2))
    print("| test tokens | accuracy | 95% CI | macro F1 | AUC | reviews cut | seconds |\n"
          "|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        lo, hi = r["accuracy_ci95"]
        print(f"| {r['max_length']} | {r['accuracy']:.4f} | [{lo:.4f}, {hi:.4f}] | {r['f1_macro']:.4f} | "
              f"{r['roc_auc']:.4f} | {r['texts_truncated']} | {r['seconds']} |")
    return results


def main() -> None:
    args = get_parser().parse_args()
    train_rows, test_rows = load_data(args)
    if args.eval_adapter:
        eval_lengths(args, test_rows)
        return
    run_classification(make_recipe(args), train_rows, test_rows, LABELS["imdb"], new_texts=NEW_TEXTS)


if __name__ == "__main__":
    from train.cli import user_errors
    from train.memory import run_under_jemalloc

    with user_errors():
        run_under_jemalloc()            # re-executes this script once under jemalloc (train/memory.py)
        main()
