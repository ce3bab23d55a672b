"""python -m train {fit, eval, predict} on a user's own files, with a tiny random Llama behind a real tokenizer.

The whole command runs in-process (fit, then eval and predict on its adapter); the error cases run as
subprocesses, exactly as a user types them, and must answer with one line and exit status 2.
"""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from train.__main__ import main
from train.memory import allocator

ROOT = Path(__file__).resolve().parents[1]
LABELS = ("bearish", "neutral", "bullish")
WORDS = {"bearish": "profits fell sharply", "neutral": "the meeting is on friday", "bullish": "sales jumped"}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, smol_tok) -> Path:
    """A 2-layer Llama with SmolLM2's tokenizer, saved as a local Hugging Face folder (what --model takes)."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(smol_tok), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1))
    return save_folder(tmp_path_factory.mktemp("tiny-llama"), model, smol_tok)


def save_folder(folder: Path, model, tokenizer) -> Path:
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_csv(path: Path, n: int, text_key: str = "headline", label_key: str = "tone") -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", text_key, label_key])
        for i in range(n):
            label = LABELS[i % 3]
            writer.writerow([i, f"{WORDS[label]} ({i})", label])
    return path


def cli(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "train", *args], cwd=ROOT, input=stdin, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "TQDM_DISABLE": "1"})


def test_fit_eval_predict_on_a_csv_with_its_own_column_names(tmp_path, tiny_model, capsys):
    train_csv, test_csv = write_csv(tmp_path / "train.csv", 24), write_csv(tmp_path / "test.csv", 12)
    out = tmp_path / "run"
    metrics = main(["fit", "--train", str(train_csv), "--test", str(test_csv), "--out", str(out),
                    "--model", str(tiny_model), "--text-column", "headline", "--label-column", "tone",
                    "--max-steps", "2", "--batch-size", "4", "--dtype", "fp32"]) or json.loads(
        (out / "metrics.json").read_text())
    assert metrics["label_names"] == ["bearish", "bullish", "neutral"]
    assert metrics["allocator"] == allocator()          # this process's: jemalloc only where it re-executed
    for row in ("zero_shot", "fine_tuned"):
        assert metrics[row]["n"] == 12 and 0 <= metrics[row]["accuracy"] <= 1
    assert metrics["config"]["extra"]["config"]["data"]["text_column"] == "headline"
    for name in ("results.md", "predictions.csv", "train_curves.png", "train_log.csv", "confusion_fine_tuned.png",
                 "adapter/adapter_model.safetensors", "adapter/task.json"):
        assert (out / name).is_file(), name
    assert "zero-shot" in capsys.readouterr().out

    scored = main(["eval", "--adapter", str(out / "adapter"), "--test", str(test_csv), "--out", str(tmp_path / "ev")])
    assert scored["accuracy"] == pytest.approx(metrics["fine_tuned"]["accuracy"])   # the same weights, rows
    capsys.readouterr()
    main(["predict", "--adapter", str(out / "adapter"), "--file", str(test_csv), "--text-column", "headline"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 12 and all(line.split("\t")[0] in LABELS for line in lines)


def test_predict_serves_several_adapters_from_one_base(tmp_path, tiny_model, capsys):
    """Two adapters of one backbone (other labels, other prompt) answer together exactly as each does alone."""
    train_csv, test_csv = write_csv(tmp_path / "train.csv", 24), write_csv(tmp_path / "test.csv", 6)
    two = tmp_path / "two.csv"
    two.write_text("".join(line for i, line in enumerate(train_csv.read_text().splitlines(keepends=True))
                           if i == 0 or "neutral" not in line))
    common = ["--model", str(tiny_model), "--text-column", "headline", "--label-column", "tone", "--max-steps", "2",
              "--batch-size", "4", "--dtype", "fp32", "--lr", "0.05"]
    main(["fit", "--train", str(train_csv), "--test", str(test_csv), "--out", str(tmp_path / "tone"), *common])
    main(["fit", "--train", str(two), "--test", str(two), "--out", str(tmp_path / "updown"), *common,
          "--instruction", "Up or down?"])
    capsys.readouterr()
    alone = {}
    for name in ("tone", "updown"):
        main(["predict", "--adapter", str(tmp_path / name / "adapter"), "--file", str(test_csv)])
        alone[name] = capsys.readouterr().out.strip().splitlines()
    main(["predict", "--adapter", str(tmp_path / "tone" / "adapter"), "--adapter", str(tmp_path / "updown" / "adapter"),
          "--file", str(test_csv)])
    together = capsys.readouterr().out.strip().splitlines()
    assert len(together) == 12
    for name in ("tone", "updown"):
        assert [line.split("\t", 1)[1] for line in together if line.startswith(name + "\t")] == alone[name]
    assert alone["tone"] != alone["updown"]                   # two different classifiers, not one twice


def test_several_adapters_must_share_the_backbone(tmp_path, tiny_model):
    from train.predict import _check_one_base

    dirs = [tmp_path / "a", tmp_path / "b"]
    with pytest.raises(ValueError, match="must share the backbone and its quantization"):
        _check_one_base(dirs, [{"model": "smollm2-135m", "quant": {}}, {"model": "gemma3-270m", "quant": {}}])


def test_without_a_test_file_a_stratified_share_is_held_out(tmp_path, tiny_model, capsys):
    train_csv = write_csv(tmp_path / "train.csv", 30, text_key="text", label_key="label")
    main(["fit", "--train", str(train_csv), "--out", str(tmp_path / "run"), "--model", str(tiny_model),
          "--max-steps", "1", "--batch-size", "4", "--dtype", "fp32", "--test-size", "0.2"])
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["zero_shot"]["n"] == 6 and metrics["train"]["examples"] == 24
    assert "6 of the 30 training rows held out" in capsys.readouterr().out


@pytest.mark.parametrize("setup, args, message", [
    (lambda d: write_csv(d / "t.csv", 6), ["--text-column", "body"], r"t\.csv: no column 'body'; its columns are"),
    (lambda d: (d / "t.csv").write_bytes(b"text,label\ngood \xff,pos\nbad,neg\n"), [],
     r"t\.csv line 2: byte 0xff at offset 16 is not UTF-8"),
    (lambda d: (d / "t.csv").write_text("text,label\ngood,pos\n,neg\n"), [],
     r"t\.csv row 2: column 'text' is empty"),
    (lambda d: (d / "t.csv").write_text(""), [], r"t\.csv is empty"),
    (lambda d: write_csv(d / "t.csv", 6), ["--lr", "-1"], r"lr must be > 0, got -1"),
    (lambda d: write_csv(d / "t.csv", 6), ["--config", "nope.toml"], r"config file nope\.toml does not exist"),
    pytest.param(lambda d: write_csv(d / "t.csv", 6), ["--device", "cuda"],
                 r"device 'cuda' asked for, but this machine has no usable CUDA GPU", id="no-gpu",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")),
    (lambda d: write_csv(d / "t.csv", 6), ["--use-dora", "--loraplus-lr-ratio", "0"],
     r"loraplus_lr_ratio must be > 0, got 0"),
], ids=["missing-column", "not-utf8", "empty-text", "empty-file", "bad-lr", "missing-config", "no-gpu",
        "bad-loraplus"])
def test_user_errors_are_one_line_and_exit_2(tmp_path, setup, args, message):
    import re

    setup(tmp_path)
    done = cli("fit", "--train", str(tmp_path / "t.csv"), "--out", str(tmp_path / "run"), *args)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr and re.search(message, lines[0]), done.stderr


def test_unknown_config_key_names_the_nearest(tmp_path):
    (tmp_path / "run.toml").write_text('[train]\nlrr = 0.001\n')
    write_csv(tmp_path / "t.csv", 6)
    done = cli("fit", "--config", str(tmp_path / "run.toml"), "--train", str(tmp_path / "t.csv"), "--out", "x")
    assert done.returncode == 2 and "unknown key 'lrr'; did you mean 'lr'?" in done.stderr


def test_fit_without_train_or_out_says_what_is_missing(tmp_path):
    done = cli("fit", "--out", str(tmp_path))
    assert done.returncode == 2 and "fit needs --train FILE and --out DIR" in done.stderr


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory) -> Path:
    """A 2-layer BERT with MiniLM's real tokenizer, saved as a local folder (what --task encoder --model takes);
    its head has 2 labels, so a 3-class run must replace it."""
    from transformers import BertConfig, BertForSequenceClassification

    from train import models

    try:
        tokenizer = models.load_tokenizer("minilm-l6")
    except ModuleNotFoundError as e:
        pytest.skip(f"MiniLM package not installed: {e}")
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                                     num_hidden_layers=2, num_attention_heads=2, num_labels=2))
    return save_folder(tmp_path_factory.mktemp("tiny-bert"), model, tokenizer)


def test_fit_encoder_task_trains_a_head_and_predicts(tmp_path, tiny_encoder, capsys):
    train_csv = write_csv(tmp_path / "train.csv", 24, text_key="text", label_key="label")
    test_csv = write_csv(tmp_path / "test.csv", 9, text_key="sentence", label_key="label")   # found by name too
    out = tmp_path / "run"
    metrics = main(["fit", "--task", "encoder", "--train", str(train_csv), "--test", str(test_csv), "--out", str(out),
                    "--model", str(tiny_encoder), "--max-steps", "2", "--batch-size", "4"])
    assert metrics["fine_tuned"]["n"] == 9 and (out / "adapter" / "task.json").is_file()
    capsys.readouterr()
    main(["predict", "--adapter", str(out / "adapter"), "profits fell sharply"])
    assert capsys.readouterr().out.split("\t")[0] in LABELS


def test_fit_qa_task_on_question_context_answers_rows(tmp_path, tiny_model):
    rows = [{"question": f"who is {n}?", "context": f"{n} is a doctor. The sky is blue.",
             "answers": "a doctor" if i % 2 else ""} for i, n in enumerate(["ana", "bo", "cy", "di", "ed", "fay"] * 3)]
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    metrics = main(["fit", "--task", "qa", "--train", str(path), "--out", str(out), "--model", str(tiny_model),
                    "--max-steps", "1", "--batch-size", "2", "--test-size", "0.25", "--dtype", "fp32"])
    assert {"zero_shot", "fine_tuned", "always_abstain"} <= set(metrics)
    assert (out / "adapter" / "qa_task.json").is_file() and (out / "results.md").is_file()
