"""examples/: each script's data and prompt on real rows, and a smoke run of each (2 steps, 16 rows).

The smoke runs are subprocesses, exactly as a user runs the scripts, with --max-steps 2 --limit 16; each
checks the whole report (metrics.json rows, predictions.csv, PNGs, adapter). The SST-2 run also exports the
merged model, which must give the adapter model's probabilities, and feeds `python -m train.predict`.
They need ../shared/datasets and the model packages; without them they skip and say why.
"""
from __future__ import annotations

import csv
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from train import memory, models
from train.data import LABELS, LANGUAGES, load_split
from train.metrics import wilson_interval
from train.recipe import build_task, few_shot_task, group_markdown, group_metrics

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
SHARED = ROOT.parent / "shared" / "datasets"
SMOKE = ["--max-steps", "2", "--limit", "16", "--batch-size", "8"]   # 2 steps of 8
PNGS = ("train_curves.png", "confusion_zero_shot.png", "confusion_fine_tuned.png")
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "task.json")

pytestmark = pytest.mark.real


# ----------------------------------------------------------------------------------------------------------
# helpers

def need_dataset(name: str) -> None:
    if not (SHARED / name).is_dir() and not os.environ.get("LORA_DATA_DIR"):
        pytest.skip(f"dataset {name!r} not found in {SHARED} (the real datasets live in ../shared beside the repo)")


def need_model(name: str) -> None:
    try:
        models.package_dir(models.REGISTRY[name])
    except ModuleNotFoundError as e:
        pytest.skip(f"model {name!r} not installed: {e}")


def example(name: str):
    """examples/<name>.py as a module (examples/ on sys.path, as when the script runs)."""
    if str(EXAMPLES) not in sys.path:
        sys.path.insert(0, str(EXAMPLES))
    return importlib.import_module(name)


def tokenizer(name: str = "smollm2-135m"):
    need_model(name)
    return models.load_tokenizer(name)


def run_script(script: str, out: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(EXAMPLES / script), *SMOKE, "--out", str(out), *extra]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "TQDM_DISABLE": "1"})
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def check_report(out: Path, n_test: int = 16, rows=("zero_shot", "fine_tuned"), adapter: bool = True) -> dict:
    """The files every example writes; returns metrics.json."""
    metrics = json.loads((out / "metrics.json").read_text())
    for row in rows:
        assert 0.0 <= metrics[row]["accuracy"] <= 1.0 and metrics[row]["n"] == n_test, row
        lo, hi = metrics[row]["accuracy_ci95"]
        assert 0.0 <= lo <= metrics[row]["accuracy"] <= hi <= 1.0 and hi - lo > 0.1, row   # 16 rows: a wide one
    with open(out / "predictions.csv", newline="") as f:
        preds = list(csv.DictReader(f))
    assert len(preds) == n_test
    assert {f"{r}_pred" for r in rows if r in ("zero_shot", "fine_tuned")} <= set(preds[0])
    for png in PNGS:
        assert (out / png).stat().st_size > 1000, png
    assert (out / "results.md").read_text().startswith("# Results")
    if adapter:
        for name in ADAPTER_FILES:
            assert (out / "adapter" / name).is_file(), name
    assert metrics["new_texts"] and all(t["label"] in metrics["label_names"] for t in metrics["new_texts"])
    return metrics


# ----------------------------------------------------------------------------------------------------------
# sst2 (one run shared by the smoke, export and predict tests: fp32, so the merged model is comparable)

@pytest.fixture(scope="module")
def sst2_run(tmp_path_factory):
    need_dataset("sst2")
    need_model("smollm2-135m")
    out = tmp_path_factory.mktemp("sst2")
    # lr 2e-3: two steps move the adapter enough for the export test to see, without saturating p
    run_script("sst2.py", out, "--dtype", "fp32", "--lr", "2e-3", "--export-merged", str(out / "merged"))
    return out


def test_sst2_smoke_run_writes_the_report(sst2_run):
    metrics = check_report(sst2_run)
    assert metrics["train"]["steps"] == 2 and metrics["dtype"] == "float32"


def test_sst2_prompt_from_task_json_holds_instruction_and_text(sst2_run):
    from train.tasks import ClassificationTask

    meta = json.loads((sst2_run / "adapter" / "task.json").read_text())
    task = ClassificationTask(tokenizer(meta["model"]), meta["label_words"], instruction=meta["instruction"],
                              system=meta["system"], max_length=meta["max_length"], keep=meta["keep"])
    row = load_split("sst2", "test", limit=1)[0]
    prompt = task.prompt(row["text"])
    assert meta["instruction"] in prompt and row["text"].strip() in prompt
    assert meta["label_names"] == LABELS["sst2"] and len(set(task.label_ids)) == 2


TEXTS = ["a gorgeous, witty, seductive movie.", "the plot is paper-thin and the acting is worse.",
         "it is a film.", "an ambitious mess that I somehow enjoyed"]


def test_sst2_export_merged_matches_the_adapter_model(sst2_run):
    """merge_and_unload keeps dequantize(W_nf4) + scaling*B@A dense, so the merged checkpoint must give the
    NF4 + adapter model's label logits: both fp32, they differ only by the order of the additions (x@W^T +
    s*(x@A^T)@B^T vs x@(W + s*B@A)^T), measured max 1.1e-5 on logits ~27 through 30 layers. Tolerance 1e-3 on
    logits and 1e-4 on probabilities; the adapter-off model must differ by far more (else this proves nothing)."""
    from transformers import AutoModelForCausalLM

    import lora
    from train.predict import load_classifier

    model, task, _ = load_classifier(sst2_run / "adapter", dtype="fp32")            # NF4 + LoRA
    batch = task.collate([{"text": t} for t in TEXTS])
    merged = AutoModelForCausalLM.from_pretrained(sst2_run / "merged", dtype=torch.float32).eval()
    assert not any(isinstance(m, lora.LoRALinear) for m in merged.modules())
    with torch.no_grad():
        logits_adapter = task.label_logits(model, batch)                               # (4, 2)
        logits_merged = task.label_logits(merged, batch)
        for m in model.modules():
            if isinstance(m, lora.LoRALinear):
                m.disabled = True
        logits_base = task.label_logits(model, batch)
    p_adapter, p_merged, p_base = (x.softmax(-1) for x in (logits_adapter, logits_merged, logits_base))
    dl, dp = (logits_merged - logits_adapter).abs(), (p_merged - p_adapter).abs()
    effect = (p_base - p_adapter).abs().max().item()
    print(f"merged vs adapter: logits max {dl.max():.2e} mean {dl.mean():.2e}, probabilities max {dp.max():.2e}; "
          f"adapter effect on probabilities {effect:.2e}")
    assert dl.max() < 1e-3, f"logits: max {dl.max():.2e} mean {dl.mean():.2e}"
    assert dp.max() < 1e-4, f"probabilities: max {dp.max():.2e} mean {dp.mean():.2e}"
    assert effect > 1e-2, f"the adapter barely changes the output ({effect:.2e}): the test proves nothing"


def test_predict_cli_prints_a_label_per_text(sst2_run):
    proc = subprocess.run([sys.executable, "-m", "train.predict", "--adapter", str(sst2_run / "adapter"),
                           *TEXTS[:2]], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 2
    for line, text in zip(lines, TEXTS):
        label, _, rest = line.partition("\t")
        assert label in LABELS["sst2"] and rest.endswith(text), line


# ----------------------------------------------------------------------------------------------------------
# imdb

def test_imdb_data_is_balanced_and_long_reviews_keep_head_and_tail():
    need_dataset("imdb")
    imdb = example("imdb")
    args = imdb.get_parser().parse_args(["--limit", "8", "--out", "unused", "--eval-max-length", "384"])
    train_rows, test_rows = imdb.load_data(args)
    assert [r["label"] for r in train_rows].count(0) == 4 and [r["label"] for r in test_rows].count(1) == 4
    fixed = {r["text"] for r in load_split("imdb", "test")}
    assert all(r["text"] in fixed for r in test_rows)            # a subset of train.data's fixed 2,500
    task = build_task(imdb.make_recipe(args), tokenizer())
    review = max((r["text"] for r in train_rows), key=len)
    with pytest.warns(UserWarning, match="cut"):
        ids = task.encode(review)
    assert len(ids) == args.max_length
    words = review.split()
    prompt = task.prompt(review)
    assert " ".join(words[:3]) in prompt and " ".join(words[-3:]) in prompt
    assert prompt.count(imdb.INSTRUCTION) == 1
    eval_task = build_task(imdb.make_recipe(args), tokenizer(), evaluation=True)   # reads more of each review
    longer = review + " " + review                                          # > 2 x 256 tokens
    with pytest.warns(UserWarning, match="cut"):
        short_ids, long_ids = task.encode(longer), eval_task.encode(longer)
    assert len(long_ids) == 384 and eval_task.prefix_ids == task.prefix_ids
    same = len(task.prefix_ids) + task.budget // 4                          # the prompt up to the review's head
    assert long_ids[:same] == short_ids[:same] and long_ids[-20:] == short_ids[-20:]   # ... and the same tail


def test_imdb_smoke_run(tmp_path):
    need_dataset("imdb")
    need_model("smollm2-135m")
    run_script("imdb.py", tmp_path, "--eval-batch-size", "8", "--lean-memory",    # + the opt-in allocator
               "--max-length", "96", "--eval-max-length", "128")
    metrics = check_report(tmp_path)
    assert metrics["config"]["keep"] == "head+tail" and metrics["test"]["max_length"] == 128
    assert 0 < metrics["test"]["texts_truncated"] <= metrics["test"]["examples"]   # most reviews exceed 128
    assert metrics["train"]["texts_truncated"] > 0
    from train.predict import load_classifier

    _, task, _ = load_classifier(tmp_path / "adapter", dtype="fp32")    # inference cuts reviews as evaluation did
    assert (task.max_length, task.keep) == (128, "head+tail")
    lengths = tmp_path / "lengths"                          # the same adapter scored at two test prompt lengths
    run_script("imdb.py", lengths, "--eval-adapter", str(tmp_path / "adapter"), "--eval-lengths", "64", "128",
               "--eval-batch-size", "8")
    results = json.loads((lengths / "eval_lengths.json").read_text())["results"]
    assert [r["max_length"] for r in results] == [64, 128] and all(r["n"] == 16 for r in results)
    assert results[0]["texts_truncated"] >= results[1]["texts_truncated"] > 0
    # at the run's own test length it reproduces the run's fine-tuned row (same adapter, prompts and math)
    assert results[1]["accuracy"] == metrics["fine_tuned"]["accuracy"]
    assert results[1]["accuracy_ci95"] == metrics["fine_tuned"]["accuracy_ci95"]
    assert abs(results[1]["roc_auc"] - metrics["fine_tuned"]["roc_auc"]) < 1e-6
    applies = (memory._glibc() is not None and "MALLOC_MMAP_THRESHOLD_" not in os.environ
               and memory.find_jemalloc() is None)       # under jemalloc (the scripts' default) glibc is not serving
    assert metrics["config"]["extra"]["lean_memory"] is applies


# ----------------------------------------------------------------------------------------------------------
# financial_phrasebank

def test_financial_phrasebank_split_and_few_shot_prompt():
    need_dataset("financial_phrasebank")
    fpb = example("financial_phrasebank")
    args = fpb.get_parser().parse_args(["--out", "unused"])
    train_rows, test_rows = fpb.load_data(args)
    for rows in (train_rows, test_rows):
        assert sorted(np.bincount([r["label"] for r in rows]).tolist()) == [300, 300, 300]
    assert not {r["text"] for r in train_rows} & {r["text"] for r in test_rows}
    recipe = fpb.make_recipe(args)
    assert recipe.few_shot == 4 and recipe.epochs == 5.0 and recipe.adapter_compute == "base"
    tok = tokenizer()
    task = build_task(recipe, tok)
    assert len(set(task.label_ids)) == 3
    k_task = few_shot_task(recipe, tok, train_rows, 3, task.budget)
    assert len(k_task.few_shot) == 4 and {w for _, w in k_task.few_shot} == set(recipe.label_words)
    assert k_task.budget == task.budget                          # the test text is cut the same way
    assert test_rows[0]["text"] in k_task.prompt(test_rows[0]["text"])


def test_financial_phrasebank_smoke_run(tmp_path):
    need_dataset("financial_phrasebank")
    need_model("smollm2-135m")
    run_script("financial_phrasebank.py", tmp_path)
    check_report(tmp_path, rows=("zero_shot", "few_shot_4", "fine_tuned"))
    assert (tmp_path / "confusion_few_shot_4.png").is_file()


# ----------------------------------------------------------------------------------------------------------
# multilingual_sentiment

def test_multilingual_samples_are_balanced_over_language_and_class():
    need_dataset("multilingual_sentiment")
    ml = example("multilingual_sentiment")
    args = ml.get_parser().parse_args(["--limit", "48", "--out", "unused"])
    train_rows, test_rows = ml.load_data(args)
    for rows in (train_rows, test_rows):
        pairs = [(r["language"], r["label"]) for r in rows]
        assert len(rows) == 48 and len(set(pairs)) == 24 and all(pairs.count(p) == 2 for p in set(pairs))
    args = ml.get_parser().parse_args(["--out", "unused"])
    assert args.model == "gemma3-270m" and args.test_per_language * len(LANGUAGES) == 1200


@pytest.mark.parametrize("model", ["smollm2-135m", "gemma3-270m"])
def test_multilingual_prompt_and_label_words(model):
    need_dataset("multilingual_sentiment")
    if model == "gemma3-270m" and not models._is_cached(models.cache_root() / model):
        pytest.skip("gemma3-270m is not converted yet (45-75 s, 1 GB): run examples/multilingual_sentiment.py "
                    "once to cache it")
    ml = example("multilingual_sentiment")
    args = ml.get_parser().parse_args(["--out", "unused", "--model", model])
    task = build_task(ml.make_recipe(args), tokenizer(model))
    assert len(set(task.label_ids)) == 3
    row = load_split("multilingual_sentiment", "test", languages=["hindi"], limit=1)[0]
    assert row["text"] in task.prompt(row["text"]) and row["language"] == "hindi"


def test_group_metrics_per_language():
    rows = [{"label": y, "language": g} for g in ("de", "fr") for y in (0, 1, 2, 0)]
    probs = np.eye(3)[[0, 1, 2, 0, 0, 0, 0, 0]] * 0.8 + 0.2 / 3                  # de all right, fr half
    per = group_metrics(rows, probs, ["negative", "neutral", "positive"], "language")
    assert per["de"]["accuracy"] == 1.0 and per["fr"]["accuracy"] == 0.5 and per["fr"]["n"] == 4
    assert per["fr"]["accuracy_ci95"] == list(wilson_interval(2, 4)) and per["de"]["accuracy_ci95"][1] == 1.0
    md = group_markdown({"fine_tuned": {"accuracy": 0.75, "f1_macro": 0.5, "roc_auc": 0.8, "n": 8,
                                        "per_group": per}}, "language")
    assert "| de | 4 | 1.0000 |" in md and "| all | 8 | 0.7500 |" in md


def test_multilingual_smoke_run(tmp_path):
    need_dataset("multilingual_sentiment")
    need_model("smollm2-135m")
    # SmolLM2 (cached by the other tests): the default Gemma-3 needs a 45-75 s conversion on first use
    run_script("multilingual_sentiment.py", tmp_path, "--model", "smollm2-135m", "--few-shot", "0")
    metrics = check_report(tmp_path)
    per = metrics["fine_tuned"]["per_group"]
    assert set(per) <= set(LANGUAGES) and sum(g["n"] for g in per.values()) == 16
    assert "Per language" in (tmp_path / "results.md").read_text()
    with open(tmp_path / "predictions.csv", newline="") as f:
        assert "language" in next(csv.DictReader(f))


# ----------------------------------------------------------------------------------------------------------
# sst2_encoder

def test_encoder_data_recipe_and_tokens():
    need_dataset("sst2")
    enc = example("sst2_encoder")
    args = enc.get_parser().parse_args(["--limit", "4", "--out", "unused"])
    train_rows, test_rows = enc.load_data(args)
    assert len(train_rows) == len(test_rows) == 4
    recipe = enc.make_recipe(args)
    assert recipe.mode == "qlora" and list(recipe.targets) == ["query", "key", "value", "dense"]
    assert enc.make_recipe(enc.get_parser().parse_args(["--full-finetune", "--out", "u"])).mode == "full"
    with pytest.raises(ValueError, match="--few-shot"):
        enc.make_recipe(enc.get_parser().parse_args(["--few-shot", "4", "--out", "u"]))
    from train.tasks import SequenceClassificationTask

    tok = tokenizer("minilm-l6")
    ids = SequenceClassificationTask(tok, 2, max_length=recipe.max_length).encode(train_rows[0]["text"])
    assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id


def test_encoder_smoke_run_compares_qlora_with_full_finetune(tmp_path):
    need_dataset("sst2")
    need_model("mpnet-base")
    run_script("sst2_encoder.py", tmp_path, "--eval-batch-size", "16")
    metrics = check_report(tmp_path, rows=("zero_shot", "fine_tuned", "full_fine_tune"))
    assert metrics["mode"] == "qlora" and metrics["quantized"]
    cmp = metrics["comparison"]
    assert cmp["full"]["trainable"] == cmp["full"]["total"] > 10 * cmp["qlora"]["trainable"]
    assert cmp["full"]["peak_rss_mb"] > 0 and cmp["qlora"]["train_seconds"] > 0
    assert "Cost" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "full-finetune" / "model" / "config.json").is_file()
    assert (tmp_path / "confusion_full_fine_tune.png").is_file()
    # train.predict reloads both (the adapter onto a fresh NF4 base; the full fine-tune's HF folder) and gives
    # the probabilities the run printed for the new texts
    from train.predict import load_classifier

    enc = example("sst2_encoder")
    for folder in (tmp_path / "adapter", tmp_path / "full-finetune" / "model"):
        model, task, labels = load_classifier(folder)
        probs = task.predict_proba(model, enc.NEW_TEXTS)
        run = json.loads((folder.parent / "metrics.json").read_text())["new_texts"]
        assert [labels[int(p.argmax())] for p in probs] == [e["label"] for e in run]
        assert np.allclose(probs.max(1), [e["p"] for e in run], atol=1e-3), folder
