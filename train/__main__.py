"""python -m train {fit, eval, predict}: QLoRA on your own data files, from the command line.

    python -m train fit --train reviews.csv --test held_out.csv --out runs/reviews \\
        --text-column review --label-column stars          # zero-shot vs fine-tuned, the adapter, the report
    python -m train eval --adapter runs/reviews/adapter --test more.csv
    python -m train predict --adapter runs/reviews/adapter "great value" "broke in a week"

`fit` takes every setting of train.config.RunConfig as a flag (`--lr`, `--r`, `--epochs`, ...) or from
`--config run.toml` (the same keys in [data], [model], [quant], [lora], [train] sections; flags win). Without
`--test` it holds out `--test-size` of the training file (stratified, seeded). Without `--epochs` it trains
for about 4,500 examples: several epochs for a few hundred rows, one for tens of thousands.
The run folder gets what the examples write: metrics.json (zero-shot and fine-tuned rows), results.md,
predictions.csv, confusion matrices, train_log.jsonl/.csv, train_curves.png, and adapter/ (PEFT's files +
task.json, which `eval` and `predict` read). A user error is one line on stderr and exit status 2.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from . import files
from .cli import user_errors
from .memory import run_under_jemalloc
from .config import RunConfig, add_config_flags, auto_epochs, config_from_args


def main(argv: list[str] | None = None):
    """Runs one verb; returns what it computed (fit and eval: the metrics)."""
    p = argparse.ArgumentParser(prog="python -m train", description=__doc__.splitlines()[0])
    verbs = p.add_subparsers(dest="verb", required=True, metavar="{fit,eval,predict}")
    fit_p = verbs.add_parser("fit", help="zero-shot, QLoRA fine-tune, evaluate, save, report",
                             description=__doc__.split("\n\n")[2])
    fit_p.add_argument("--config", default=None, help="a TOML or JSON file of settings (flags override it)")
    add_config_flags(fit_p)
    eval_p = verbs.add_parser("eval", help="score a saved adapter on a labelled file")
    eval_p.add_argument("--adapter", required=True, help="the adapter/ folder of a run")
    eval_p.add_argument("--test", required=True, help="a labelled data file")
    eval_p.add_argument("--text-column", default=None)
    eval_p.add_argument("--label-column", default=None)
    eval_p.add_argument("--out", default=None, help="also write metrics.json, results.md, predictions.csv here")
    eval_p.add_argument("--eval-batch-size", type=int, default=64)
    from .predict import add_arguments
    add_arguments(verbs.add_parser("predict", help="classify new texts with a saved adapter"))
    args = p.parse_args(argv)
    return {"fit": fit_command, "eval": eval_command, "predict": predict_command}[args.verb](args)


# ----------------------------------------------------------------------------- fit

def fit_command(args: argparse.Namespace) -> dict:
    config = config_from_args(args, args.config)
    source = args.config or "the flags"
    if config.data.train is None or config.out is None:
        raise ValueError(f"fit needs --train FILE and --out DIR (or [data] train and out in a --config file); "
                         f"{source} gave train={config.data.train!r}, out={config.out!r}")
    runner = {"classify": _fit_classify, "encoder": _fit_classify, "qa": _fit_qa}[config.task]
    metrics = runner(config)
    _summary(config, metrics)
    return metrics


def _fit_classify(config: RunConfig) -> dict:
    data = config.data
    train_rows, names = files.classification_rows(data.train, text_column=data.text_column,
                                                  label_column=data.label_column)
    if data.test is not None:
        test_rows, _ = files.classification_rows(data.test, text_column=data.text_column,
                                                 label_column=data.label_column, label_names=names, role="test")
    else:
        train_rows, test_rows = holdout(train_rows, data.test_size, config.train.seed)
    train_rows = sample(train_rows, data.train_limit, config.train.seed)
    test_rows = sample(test_rows, data.test_limit, config.train.seed)
    print(f"{len(train_rows)} training and {len(test_rows)} test rows; labels {names}", flush=True)
    if config.task == "encoder":
        from .encoder_recipe import run_encoder
        return run_encoder(encoder_recipe(config, len(train_rows)), train_rows, test_rows, names)
    from .recipe import run_classification
    return run_classification(classification_recipe(config, names, len(train_rows)), train_rows, test_rows, names)


def _fit_qa(config: RunConfig) -> dict:
    from .qa_recipe import run_qa

    train_rows = files.qa_rows(config.data.train)
    if config.data.test is not None:
        test_rows = files.qa_rows(config.data.test, role="test")
    else:
        train_rows, test_rows = holdout(train_rows, config.data.test_size, config.train.seed, stratify=False)
    train_rows = sample(train_rows, config.data.train_limit, config.train.seed)
    test_rows = sample(test_rows, config.data.test_limit, config.train.seed)
    print(f"{len(train_rows)} training and {len(test_rows)} test questions", flush=True)
    return run_qa(qa_recipe(config, len(train_rows), len(test_rows)), train_rows, test_rows)


def common_settings(config: RunConfig, n_train: int) -> dict:
    """The recipe fields every task shares, from the nested config; unset (None) ones keep the task's default."""
    t, q, a = config.train, config.quant, config.lora
    settings = dict(out_dir=config.out, model=config.model.name, dtype=config.model.dtype, device=config.model.device,
                    max_length=config.data.max_length, r=a.r, alpha=a.alpha, dropout=a.dropout, targets=a.targets,
                    blocksize=q.blocksize, double_quant=q.double_quant, backend=q.backend,
                    epochs=t.epochs if t.epochs is not None else auto_epochs(n_train), max_steps=t.max_steps,
                    batch_size=t.batch_size, grad_accum=t.grad_accum, lr=t.lr, loraplus_lr_ratio=t.loraplus_lr_ratio,
                    warmup_ratio=t.warmup_ratio,
                    weight_decay=t.weight_decay, grad_checkpointing=t.grad_checkpointing, use_rslora=a.use_rslora,
                    use_dora=a.use_dora,
                    eval_batch_size=t.eval_batch_size, seed=t.seed, resume=t.resume,
                    export_merged=config.export_merged, extra={"config": config.to_dict()},
                    columns={"text": config.data.text_column, "label": config.data.label_column})
    return {k: v for k, v in settings.items() if v is not None}


def classification_recipe(config: RunConfig, names: list[str], n_train: int):
    from .recipe import ClassificationRecipe

    _dense_unsupported(config)
    words = config.data.label_words or names
    if len(words) != len(names):
        raise ValueError(f"--label-words gives {len(words)} words for {len(names)} labels {names}")
    instruction = config.data.instruction or f"Classify the text as one of: {', '.join(words)}."
    return ClassificationRecipe(instruction=instruction, system=config.data.system, label_words=tuple(words),
                                **common_settings(config, n_train))


def encoder_recipe(config: RunConfig, n_train: int):
    from .encoder_recipe import EncoderRecipe

    settings = common_settings(config, n_train)
    if config.lora.targets == "all-linear":
        settings.pop("targets")                       # the encoder recipe's own: query, key, value, dense
    settings["max_length"] = min(settings.get("max_length", EncoderRecipe.max_length), 512)
    return EncoderRecipe(mode="qlora" if config.quant.quantize else "lora", **settings)


def qa_recipe(config: RunConfig, n_train: int, n_test: int):
    from .qa_recipe import QARecipe

    _dense_unsupported(config)
    settings = common_settings(config, n_train)
    settings.pop("columns")
    return QARecipe(n_test=n_test, n_calib=max(1, min(600, n_train // 5)), **settings)


def _dense_unsupported(config: RunConfig) -> None:
    if not config.quant.quantize:
        raise ValueError("--no-quantize (plain LoRA on a dense backbone) is available for --task encoder only")


def holdout(rows: list[dict], share: float, seed: int, stratify: bool = True) -> tuple[list[dict], list[dict]]:
    """(train, test): `share` of the rows held out, seeded, per class when `stratify`."""
    from sklearn.model_selection import train_test_split

    labels = [r["label"] for r in rows] if stratify else None
    try:
        train, test = train_test_split(rows, test_size=share, random_state=seed, stratify=labels)
    except ValueError as e:
        raise ValueError(f"cannot hold out {share:.0%} of {len(rows)} rows as a test set ({e}): "
                         "pass --test FILE or another --test-size") from None
    print(f"no --test file: {len(test)} of the {len(rows)} training rows held out as the test set", flush=True)
    return list(train), list(test)


def sample(rows: list[dict], limit: int | None, seed: int) -> list[dict]:
    if limit is None or limit >= len(rows):
        return rows
    keep = np.random.default_rng(seed).permutation(len(rows))[:limit]
    return [rows[i] for i in sorted(keep)]


def _summary(config: RunConfig, metrics: dict) -> None:
    key = "exact" if config.task == "qa" else "accuracy"
    zero, tuned = metrics["zero_shot"][key], metrics["fine_tuned"][key]
    print(f"{key}: zero-shot {zero:.4f} -> fine-tuned {tuned:.4f}; report in {Path(config.out) / 'results.md'}, "
          f"adapter in {Path(config.out) / 'adapter'}", flush=True)


# ----------------------------------------------------------------------------- eval and predict

def eval_command(args: argparse.Namespace) -> dict:
    from .predict import load_classifier, saved_columns
    from .recipe import evaluate, prediction_table
    from .report import write_report

    columns = saved_columns(args.adapter)
    model, task, names = load_classifier(args.adapter)
    rows, _ = files.classification_rows(args.test, text_column=args.text_column or columns.get("text"),
                                        label_column=args.label_column or columns.get("label"),
                                        label_names=names, role="test")
    metrics, probs = evaluate(task, model, rows, names, args.eval_batch_size)
    print(json.dumps({k: metrics[k] for k in ("n", "accuracy", "accuracy_ci95", "f1_macro", "roc_auc")}))
    if args.out:
        write_report(args.out, rows={"fine_tuned": metrics}, label_names=names,
                     predictions=prediction_table(rows, {"fine_tuned": probs}, names),
                     extra={"adapter": str(args.adapter), "test": str(args.test)})
    return metrics


def predict_command(args: argparse.Namespace) -> None:
    from .predict import run
    run(args)


if __name__ == "__main__":
    with user_errors():
        run_under_jemalloc()            # re-executes this command once under jemalloc (train/memory.py)
        main(sys.argv[1:])
