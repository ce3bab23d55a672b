"""QLoRA on Financial PhraseBank (Sentences_50Agree): SmolLM2-135M, 3 classes, zero-shot vs 4-shot vs fine-tuned.

train.data makes the split with a fixed seed: 300 sentences per class to test, 300 others per class to train
(disjoint; duplicates kept once, conflicting ones dropped). 900 short sentences train fast, so the default
is 5 epochs (3 epochs: 84.1% on the test split, 5: 87.0%; see the README).

    python examples/financial_phrasebank.py                    # ~11-15 min on a 2-core CPU (4-shot row: ~6.5)
    python examples/financial_phrasebank.py --limit 16 --max-steps 2   # smoke run
"""
from common import parser, recipe_from_args

from train.data import LABELS, load_split
from train.recipe import balanced_sample, run_classification

INSTRUCTION = "Is the sentiment of this financial news sentence negative, neutral or positive?"
NEW_TEXTS = [
    "Operating profit rose to EUR 13.1 mn from EUR 8.7 mn in the corresponding period in 2007.",
    "The company will cut 250 jobs after quarterly sales fell by a third.",
    "The annual general meeting will be held in Helsinki on 15 March.",
]


def get_parser():
    p = parser(__doc__, train_limit=900, out_name="financial-phrasebank")
    p.add_argument("--agreement", default="50", choices=["50", "66", "75", "All"],
                   help="Sentences_<agreement>Agree.txt: the share of annotators who agreed")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--eval-batch-size", type=int, default=64)
    p.set_defaults(epochs=5.0, few_shot=4, grad_checkpointing=False)   # short sentences: well inside 4 GB without
    return p


def load_data(args) -> tuple[list[dict], list[dict]]:
    """(train, test): 300 per class each, disjoint; --train-limit / --limit take balanced subsets."""
    kw = dict(data_dir=args.data_dir, seed=args.seed, agreement=args.agreement)
    train_rows = list(load_split("financial_phrasebank", "train", **kw))
    test_rows = list(load_split("financial_phrasebank", "test", **kw))
    train_n = min(args.train_limit, len(train_rows), args.limit or len(train_rows))
    if train_n < len(train_rows):
        train_rows = balanced_sample(train_rows, train_n, seed=args.seed)
    if args.limit is not None and args.limit < len(test_rows):
        test_rows = balanced_sample(test_rows, args.limit, seed=args.seed)
    return train_rows, test_rows


def make_recipe(args):
    return recipe_from_args(args, instruction=INSTRUCTION, label_words=("negative", "neutral", "positive"),
                            max_length=args.max_length, eval_batch_size=args.eval_batch_size)


def main() -> None:
    args = get_parser().parse_args()
    train_rows, test_rows = load_data(args)
    run_classification(make_recipe(args), train_rows, test_rows, LABELS["financial_phrasebank"],
                       new_texts=NEW_TEXTS)


if __name__ == "__main__":
    from train.cli import user_errors
    from train.memory import run_under_jemalloc

    with user_errors():
        run_under_jemalloc()            # re-executes this script once under jemalloc (train/memory.py)
        main()
