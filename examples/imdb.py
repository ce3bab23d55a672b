"""QLoRA on IMDB: SmolLM2-135M, zero-shot vs fine-tuned on long movie reviews (2 classes).

Reviews average ~300 tokens and a fifth exceed 500; each is cut to --max-length prompt tokens keeping its
first quarter and its last three quarters (the verdict is often at the end; Sun et al. 2019). The test set is
the fixed balanced 2,500-review sample of train.data; by default a balanced 1,000 of it, because on a 2-core
CPU every evaluation of 2,500 x 256 tokens costs ~5 min (use --test-size 2500 for the whole sample).
The default 256 tokens keep attention on the CPU's fast fp32 path (train/attention.py) and buy more reviews
in the same time: 3,000 reviews at 256 tokens reach 88.8% in 20 min, 2,000 at 320 reached 87.9% in 26 min.

    python examples/imdb.py                          # ~20 min on a 2-core CPU (see README: examples)
    python examples/imdb.py --train-limit 4000       # ~28 min: 89.2%
    python examples/imdb.py --test-size 2500         # + ~6 min: the full balanced test sample
    python examples/imdb.py --few-shot 4             # + a 4-shot row: shots cut to 128 tokens each, ~900-token
                                                     #   prompts, ~12 min more on a 2-core CPU
    python examples/imdb.py --limit 16 --max-steps 2   # smoke run
"""
from common import parser, recipe_from_args

from train.data import LABELS, load_split
from train.recipe import balanced_sample, run_classification

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
    p.add_argument("--eval-batch-size", type=int, default=32)
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
                            max_length=args.max_length, keep="head+tail", eval_batch_size=args.eval_batch_size)


def main() -> None:
    args = get_parser().parse_args()
    train_rows, test_rows = load_data(args)
    run_classification(make_recipe(args), train_rows, test_rows, LABELS["imdb"], new_texts=NEW_TEXTS)


if __name__ == "__main__":
    main()
