"""QLoRA on SQuAD 2.0: Gemma-3-270M answers with a span of the passage or says "unanswerable".

Offline only the dev file exists, so train.data splits it BY ARTICLE (seeded): no article is on both sides.
Zero-shot vs fine-tuned vs always-abstain on a fixed sample of test-article questions; see train/qa_recipe.py.

    python examples/squad_v2.py                              # <= 30 min on a 2-core CPU
    python examples/squad_v2.py --model smollm2-135m --lr 3e-4 --n-calib 300 --train-minutes 18   # EM 0.49
    python examples/squad_v2.py --limit 16 --max-steps 2     # smoke run

Gemma-3-270M is the default: with the recipe and budget of that last line, SmolLM2-135M (the other examples'
default) gives the right span on 43% of the answerable test questions and tells unanswerable from answerable
at ROC AUC 0.56 (chance 0.5); Gemma-3-270M with the defaults on 67% and at 0.68 (README, results). lr 5e-4
(the other examples train at 3e-4) was picked on the calibration articles' EM: 60.7 vs 58.3 at 3e-4.
"""
from common import parser

from train.data import load_split, squad_split_sizes
from train.qa_recipe import QARecipe, run_qa

PASSAGE = ("The Millau Viaduct is a cable-stayed bridge that spans the gorge valley of the Tarn near Millau in "
           "southern France. Designed by the structural engineer Michel Virlogeux and the architect Norman "
           "Foster, it opened to traffic on 16 December 2004. Its highest mast reaches 343 metres above the "
           "base of the structure, making it taller than the Eiffel Tower.")
NEW_EXAMPLES = [
    {"context": PASSAGE, "question": "Which river's valley does the Millau Viaduct span?"},
    {"context": PASSAGE, "question": "When did the Millau Viaduct open to traffic?"},
    {"context": PASSAGE, "question": "Who designed the Eiffel Tower?"},
    {"context": PASSAGE, "question": "How much did the Millau Viaduct cost to build?"},
]


def main() -> None:
    p = parser(__doc__, train_limit=0, out_name="squad_v2")
    # batch_size counts packed contexts (~10 questions each)
    p.set_defaults(model="gemma3-270m", batch_size=4, train_limit=None, lr=5e-4)
    p.add_argument("--n-test", type=int, default=500, help="test questions (answerable share as in the split)")
    p.add_argument("--n-calib", type=int, default=600, help="calibration questions (held-out train articles)")
    p.add_argument("--max-length", type=int, default=384, help="prompt tokens (the context is cut to fit)")
    p.add_argument("--max-turns", type=int, default=16, help="questions packed after one context")
    p.add_argument("--abstain", default="calibrated", choices=["calibrated", "greedy"])
    p.add_argument("--train-minutes", type=float, default=17.0,
                   help="stop training after this long (a guard: one epoch of Gemma-3-270M takes ~18.5 min on "
                        "a 2-core CPU, of SmolLM2-135M 11-23; results.md says when the guard stopped it)")
    p.add_argument("--test-fraction", type=float, default=0.3, help="share of the articles on the test side")
    args = p.parse_args()
    if args.few_shot or args.export_merged:
        p.error("--few-shot and --export-merged are classification-only flags")

    split = dict(data_dir=args.data_dir, seed=args.seed, test_fraction=args.test_fraction)
    train_rows = list(load_split("squad_v2", "train", **split))
    test_rows = list(load_split("squad_v2", "test", **split))
    sizes = squad_split_sizes(**split)
    note = (f"SQuAD 2.0 dev-v2.0.json split by article (seed {args.seed}): train {sizes['train']['articles']} "
            f"articles / {sizes['train']['questions']} questions, test {sizes['test']['articles']} articles / "
            f"{sizes['test']['questions']} questions; no article on both sides.")
    limit = args.limit
    recipe = QARecipe(
        out_dir=args.out, model=args.model, max_length=args.max_length, max_turns=args.max_turns,
        n_test=min(args.n_test, limit or args.n_test), n_calib=min(args.n_calib, limit or args.n_calib),
        train_limit=min(filter(None, (args.train_limit, limit)), default=None), abstain=args.abstain,
        train_minutes=args.train_minutes,
        r=args.r, alpha=args.alpha, dropout=args.dropout, targets=args.targets,
        adapter_compute=args.adapter_compute, backend=args.backend,
        dtype=args.dtype, device=args.device, epochs=args.epochs, max_steps=args.max_steps, batch_size=args.batch_size,
        grad_accum=args.grad_accum, lr=args.lr, loraplus_lr_ratio=args.loraplus_lr_ratio, use_dora=args.use_dora,
        grad_checkpointing=args.grad_checkpointing, seed=args.seed,
        resume=args.resume)
    print(note, flush=True)
    run_qa(recipe, train_rows, test_rows, new_examples=NEW_EXAMPLES, split_note=note)


if __name__ == "__main__":
    from train.cli import user_errors
    from train.memory import run_under_jemalloc

    with user_errors():
        run_under_jemalloc()            # re-executes this script once under jemalloc (train/memory.py)
        main()
