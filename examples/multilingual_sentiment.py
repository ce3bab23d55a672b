"""QLoRA on multilingual tweet sentiment (8 languages, 3 classes): per-language and overall metrics.

Default model: Gemma-3-270M (a base model, plain-text prompt): its 262k-token vocabulary covers the eight
languages, where SmolLM2's English-centric one spends ~2x the tokens on Arabic and Hindi; the two backbones
cost about the same per token (~100M non-embedding parameters each). `--model smollm2-135m` works too.

Both samples are balanced over language x class: --train-limit tweets in all (default 2,400: 300 per
language), --test-per-language tweets per language (default 150, 50 per class; the full test set is 870 per
language: --test-per-language 870, about +12 min per evaluated row on a 2-core CPU).

    python examples/multilingual_sentiment.py                          # ~25 min on a 2-core CPU
    python examples/multilingual_sentiment.py --model smollm2-135m
    python examples/multilingual_sentiment.py --limit 16 --max-steps 2   # smoke run
"""
from common import parser, recipe_from_args

from train.data import LABELS, LANGUAGES, load_split
from train.recipe import balanced_sample, run_classification

INSTRUCTION = "Is the sentiment of this tweet negative, neutral or positive?"
NEW_TEXTS = [
    "Best concert of my life, thank you @user!!",
    "Quel désastre ce match, je suis dégoûté.",
    "Der Zug hat schon wieder 40 Minuten Verspätung. Danke für nichts.",
    "Hoy empieza el curso de verano en la universidad.",
    "Che bella giornata, finalmente il sole!",
]


def get_parser():
    p = parser(__doc__, train_limit=2400, out_name="multilingual-sentiment")
    p.add_argument("--test-per-language", type=int, default=150, help="balanced over classes; 870: all")
    p.add_argument("--languages", default="all", help="comma-separated subset of " + ",".join(LANGUAGES))
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--eval-batch-size", type=int, default=64)
    p.set_defaults(model="gemma3-270m", few_shot=4)
    return p


def languages(args) -> list[str]:
    return list(LANGUAGES) if args.languages == "all" else args.languages.split(",")


def load_data(args) -> tuple[list[dict], list[dict]]:
    """(train, test), each balanced over language x class; --limit caps both (still spread over languages)."""
    langs = languages(args)
    kw = dict(data_dir=args.data_dir, seed=args.seed, languages=langs)
    train_n = args.train_limit if args.limit is None else min(args.train_limit, args.limit)
    test_n = args.test_per_language * len(langs) if args.limit is None else args.limit
    keys = ("language", "label")
    train_rows = balanced_sample(load_split("multilingual_sentiment", "train", **kw), train_n, keys=keys,
                                 seed=args.seed)
    test_rows = balanced_sample(load_split("multilingual_sentiment", "test", **kw), test_n, keys=keys,
                                seed=args.seed)
    return train_rows, test_rows


def make_recipe(args):
    return recipe_from_args(args, instruction=INSTRUCTION, label_words=("negative", "neutral", "positive"),
                            max_length=args.max_length, eval_batch_size=args.eval_batch_size,
                            group_key="language", extra={"languages": languages(args)})


def main() -> None:
    args = get_parser().parse_args()
    train_rows, test_rows = load_data(args)
    run_classification(make_recipe(args), train_rows, test_rows, LABELS["multilingual_sentiment"],
                       new_texts=NEW_TEXTS)


if __name__ == "__main__":
    from train.cli import user_errors
    from train.memory import run_under_jemalloc

    with user_errors():
        run_under_jemalloc()            # re-executes this script once under jemalloc (train/memory.py)
        main()
