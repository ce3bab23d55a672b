"""QLoRA on SST-2: SmolLM2-135M, zero-shot vs fine-tuned on the 872-sentence dev set (the main job).

    python examples/sst2.py                       # ~14 min on a 2-core CPU: 12,000 sentences, one epoch
    python examples/sst2.py --train-limit 6000    # ~8 min
    python examples/sst2.py --limit 16 --max-steps 2   # smoke run
"""
from common import parser, recipe_from_args

from train.data import LABELS, load_split
from train.recipe import run_classification

NEW_TEXTS = [
    "a gorgeous, witty, seductive movie.",
    "the plot is paper-thin and the acting is worse.",
    "I expected little and was pleasantly surprised by how moving it was.",
    "two hours of my life I will never get back.",
]


def main() -> None:
    p = parser(__doc__, train_limit=12000, out_name="sst2")
    p.set_defaults(grad_checkpointing=False)      # short prompts: without it the run stays far inside 4 GB
    args = p.parse_args()
    train_n = args.train_limit if args.limit is None else min(args.train_limit, args.limit)
    train_rows = load_split("sst2", "train", data_dir=args.data_dir, limit=train_n, seed=args.seed)
    test_rows = load_split("sst2", "test", data_dir=args.data_dir, limit=args.limit, seed=args.seed)
    recipe = recipe_from_args(args, instruction="Is the sentiment of this movie review negative or positive?",
                              label_words=("negative", "positive"))
    run_classification(recipe, train_rows, test_rows, LABELS["sst2"], new_texts=NEW_TEXTS)


if __name__ == "__main__":
    from train.cli import user_errors
    from train.memory import run_under_jemalloc

    with user_errors():
        run_under_jemalloc()            # re-executes this script once under jemalloc (train/memory.py)
        main()
