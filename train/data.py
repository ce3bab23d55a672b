"""Datasets, offline first: `load_split(name, split)` -> a `datasets.Dataset` in one schema per task.

Classification rows are `{"text": str, "label": int}` (plus `language` for multilingual_sentiment), the label
an index into `LABELS[name]`; SQuAD v2 rows are `{"id", "title", "context", "question", "answers": [str],
"is_impossible": bool}`.

Where the files are looked for, in order (the first folder that exists wins):
    1. the `data_dir` argument                          (the dataset's own folder)
    2. $LORA_DATA_DIR/<name>
    3. <repo root>/../shared/datasets/<name>            (the repo root is the folder holding train/)
    4. <cwd>/../shared/datasets/<name>
    5. the Hugging Face Hub (HUB[name]), only when not offline (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE unset)

Splits. The files do not all ship the split we need, so some are made here, always with a fixed seed:
    sst2                   train.tsv / dev.tsv; GLUE hides the test labels, so "test" IS the dev set.
    imdb                   train = all 25,000 (shuffled: the file is sorted neg -> pos); test = a balanced
                           sample of `test_size` (2,500) reviews of the official test set.
    financial_phrasebank   Sentences_<agreement>Agree.txt; exact duplicates kept once, conflicting ones
                           dropped; then per class `n_test_per_class` (300) to test, up to `n_train_per_class`
                           (300) of the rest to train: disjoint by construction.
    multilingual_sentiment train / validation / test per language; `languages` a list or "all".
    squad_v2               only the dev file is public here: its articles (titles) are split with the seed into
                           train / test (`test_fraction` of the articles), so no article is on both sides;
                           "validation" is the whole dev set. `squad_split_sizes()` says the sizes.
`limit=N` returns a seeded random sample of N rows.
"""
from __future__ import annotations

import csv
import gzip
import json
import os
import warnings
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

LABELS: dict[str, list[str]] = {
    "sst2": ["negative", "positive"],
    "imdb": ["negative", "positive"],
    "financial_phrasebank": ["negative", "neutral", "positive"],
    "multilingual_sentiment": ["negative", "neutral", "positive"],
}
HUB: dict[str, str] = {
    "sst2": "stanfordnlp/sst2",
    "imdb": "stanfordnlp/imdb",
    "financial_phrasebank": "takala/financial_phrasebank",
    "multilingual_sentiment": "cardiffnlp/tweet_sentiment_multilingual",
    "squad_v2": "rajpurkar/squad_v2",
}
DATASETS = tuple(HUB)
LANGUAGES = ("arabic", "english", "french", "german", "hindi", "italian", "portuguese", "spanish")
REPO_ROOT = Path(__file__).resolve().parents[1]

_ALIASES = {"val": "validation", "dev": "validation", "valid": "validation"}


def label_names(name: str) -> list[str]:
    if name not in LABELS:
        raise ValueError(f"{name!r} is not a classification dataset; these are: {sorted(LABELS)}")
    return list(LABELS[name])


def load_split(name: str, split: str, *, data_dir: str | os.PathLike | None = None, limit: int | None = None,
               seed: int = 0, **kw):
    """One split of one dataset as a `datasets.Dataset`; see the module docstring for the options (**kw)."""
    if name not in _LOADERS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {list(_LOADERS)}")
    split = _ALIASES.get(split, split)
    source = find_dataset(name, data_dir)
    rows = _LOADERS[name](source, split, seed=seed, **kw)
    if not rows:
        raise ValueError(f"{name}/{split} is empty (source: {source})")
    if limit is not None:
        rows = _sample(rows, limit, seed)
    return _to_dataset(rows)


def find_dataset(name: str, data_dir: str | os.PathLike | None = None) -> Path | str:
    """The folder holding `name`'s files, or "hub" when it may be downloaded; else FileNotFoundError."""
    candidates = []
    if data_dir is not None:
        candidates.append(("data_dir argument", Path(data_dir)))
    if os.environ.get("LORA_DATA_DIR"):
        candidates.append(("$LORA_DATA_DIR", Path(os.environ["LORA_DATA_DIR"]) / name))
    candidates.append(("repo root", REPO_ROOT.parent / "shared" / "datasets" / name))
    candidates.append(("cwd", Path.cwd().parent / "shared" / "datasets" / name))
    for _, folder in candidates:
        if folder.is_dir():
            return folder
    looked = [f"{why}: {folder}" for why, folder in candidates]
    if not _offline():
        return "hub"
    looked.append(f"hub: {HUB[name]} (skipped: offline)")
    raise FileNotFoundError(f"dataset {name!r} not found. Looked in:\n  " + "\n  ".join(looked)
                            + "\nPut the files in one of these folders or set LORA_DATA_DIR to their parent.")


def _offline() -> bool:
    flags = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
    return any(os.environ.get(f, "").strip().lower() in ("1", "true", "yes", "on") for f in flags)


def _sample(rows: list, limit: int, seed: int) -> list:
    if limit <= 0:
        raise ValueError(f"limit must be positive, got {limit}")
    order = np.random.default_rng(seed).permutation(len(rows))[:limit]
    return [rows[i] for i in order]


def _to_dataset(rows: list[dict]):
    import datasets  # lazy: importing it costs ~1 s

    return datasets.Dataset.from_dict({k: [r[k] for r in rows] for k in rows[0]})


def _check_label(label, name: str, where: str, text: str) -> int:
    """The label as an int index into LABELS[name]; a ValueError naming the row otherwise."""
    names = LABELS[name]
    if isinstance(label, str):
        key = label.strip()
        if key.lower() in names:
            return names.index(key.lower())
    try:
        value = int(label)
    except (TypeError, ValueError):
        value = -1
    if 0 <= value < len(names) and str(label).strip() in (str(value), f"{value}.0"):
        return value
    raise ValueError(f"{where}: label {label!r} is not in the label set {names} "
                     f"(ids 0..{len(names) - 1}); text: {text[:80]!r}")


def _read_lines(path: Path, encoding: str = "utf-8") -> list[str]:
    """Lines split on "\\n" only (str.splitlines would also split on U+0085/U+2028 inside a text)."""
    with open(path, encoding=encoding, newline="") as f:
        lines = f.read().split("\n")
    lines = [line.removesuffix("\r") for line in lines]
    return lines[:-1] if lines and lines[-1] == "" else lines


def _need(split: str, allowed: Sequence[str], name: str) -> None:
    if split not in allowed:
        raise ValueError(f"{name} has splits {list(allowed)}, got {split!r}")


# ----------------------------------------------------------------------------------------------------------
# sst2

_SST2_TEST_NOTE = "sst2: GLUE hides the test labels, so split='test' returns the dev set (872 rows)"


def _load_sst2(source, split: str, *, seed: int) -> list[dict]:
    _need(split, ("train", "validation", "test"), "sst2")
    if split == "test":
        warnings.warn(_SST2_TEST_NOTE, stacklevel=3)
    if source == "hub":
        raw = _hub("sst2", None, "train" if split == "train" else "validation")
        return [{"text": r["sentence"].strip(),
                 "label": _check_label(r["label"], "sst2", f"hub row {i}", r["sentence"])}
                for i, r in enumerate(raw)]
    fname = "train.tsv" if split == "train" else "dev.tsv"
    lines = _read_lines(Path(source) / fname)
    rows = []
    for lineno, line in enumerate(lines[1:], start=2):  # line 1 is the header "sentence\tlabel"
        text, _, label = line.rpartition("\t")
        rows.append({"text": text.strip(), "label": _check_label(label, "sst2", f"sst2/{fname} line {lineno}", text)})
    return rows


# ----------------------------------------------------------------------------------------------------------
# imdb

def _load_imdb(source, split: str, *, seed: int, test_size: int | None = 2500) -> list[dict]:
    _need(split, ("train", "test"), "imdb")
    if source == "hub":
        raw = [(r["text"], r["label"]) for r in _hub("imdb", None, split)]
    else:
        with gzip.open(Path(source) / f"{split}.csv.gz", "rt", encoding="utf-8", newline="") as f:
            reader = csv.reader(f)
            header = next(reader)
            if header != ["text", "label"]:
                raise ValueError(f"imdb/{split}.csv.gz: expected header text,label, got {header}")
            raw = [(t, y) for t, y in reader]
    rows = [{"text": t, "label": _check_label(y, "imdb", f"imdb/{split} row {i}", t)} for i, (t, y) in enumerate(raw)]
    rng = np.random.default_rng(seed)
    if split == "test" and test_size is not None:
        rows = _balanced_sample(rows, test_size, 2, rng)
    return [rows[i] for i in rng.permutation(len(rows))]  # the file is sorted neg -> pos


def _balanced_sample(rows: list[dict], size: int, n_classes: int, rng) -> list[dict]:
    if size % n_classes:
        raise ValueError(f"a balanced sample needs a size divisible by {n_classes}, got {size}")
    out = []
    for c in range(n_classes):
        idx = [i for i, r in enumerate(rows) if r["label"] == c]
        if len(idx) < size // n_classes:
            raise ValueError(f"class {c} has {len(idx)} rows, fewer than {size // n_classes}")
        out += [rows[idx[j]] for j in sorted(rng.choice(len(idx), size // n_classes, replace=False))]
    return out


# ----------------------------------------------------------------------------------------------------------
# financial_phrasebank

def read_phrasebank(source, agreement: str = "50") -> list[dict]:
    """All rows of Sentences_<agreement>Agree.txt, deduplicated: one copy per sentence, conflicts dropped."""
    if source == "hub":
        raw = [(r["sentence"], r["label"], f"hub row {i}")
               for i, r in enumerate(_hub("financial_phrasebank", f"sentences_{agreement}agree", "train"))]
    else:
        fname = f"Sentences_{agreement}Agree.txt"
        lines = _read_lines(Path(source) / fname, encoding="latin-1")
        raw = []
        for lineno, line in enumerate(lines, start=1):
            text, sep, label = line.rpartition("@")  # split on the LAST "@": sentences may contain "@"
            if not sep:
                raise ValueError(f"financial_phrasebank/{fname} line {lineno}: no '@label' in {line[:80]!r}")
            raw.append((text, label, f"financial_phrasebank/{fname} line {lineno}"))
    by_text: dict[str, set[int]] = {}
    for text, label, where in raw:
        by_text.setdefault(text.strip(), set()).add(_check_label(label, "financial_phrasebank", where, text))
    return [{"text": t, "label": next(iter(ls))} for t, ls in by_text.items() if len(ls) == 1]


def _load_phrasebank(source, split: str, *, seed: int, agreement: str = "50", n_test_per_class: int = 300,
                     n_train_per_class: int = 300) -> list[dict]:
    _need(split, ("train", "test"), "financial_phrasebank")
    rows = read_phrasebank(source, agreement)
    rng = np.random.default_rng(seed)
    out = []
    for c in range(len(LABELS["financial_phrasebank"])):
        idx = [i for i, r in enumerate(rows) if r["label"] == c]
        idx = [idx[j] for j in rng.permutation(len(idx))]
        if len(idx) <= n_test_per_class:
            raise ValueError(f"financial_phrasebank class {c} has only {len(idx)} rows "
                             f"for n_test_per_class={n_test_per_class}")
        take = idx[:n_test_per_class] if split == "test" else idx[n_test_per_class:n_test_per_class + n_train_per_class]
        out += [rows[i] for i in take]
    return [out[i] for i in rng.permutation(len(out))]


# ----------------------------------------------------------------------------------------------------------
# multilingual_sentiment

def _load_multilingual(source, split: str, *, seed: int, languages: str | Sequence[str] = "all") -> list[dict]:
    _need(split, ("train", "validation", "test"), "multilingual_sentiment")
    langs = list(LANGUAGES) if languages == "all" else ([languages] if isinstance(languages, str) else list(languages))
    unknown = sorted(set(langs) - set(LANGUAGES))
    if unknown or not langs:
        raise ValueError(f"languages must be 'all' or a non-empty subset of {list(LANGUAGES)}, got {languages!r}")
    fsplit = "val" if split == "validation" else split
    rows = []
    for lang in langs:
        if source == "hub":
            pairs = [(r["text"], r["label"]) for r in _hub("multilingual_sentiment", lang, split)]
        else:
            folder = Path(source) / lang
            texts, labels = _read_lines(folder / f"{fsplit}_text.txt"), _read_lines(folder / f"{fsplit}_labels.txt")
            if len(texts) != len(labels):
                raise ValueError(f"{folder}: {len(texts)} texts but {len(labels)} labels in split {fsplit}")
            pairs = list(zip(texts, labels))
        for i, (text, label) in enumerate(pairs):
            where = f"multilingual_sentiment/{lang}/{fsplit} line {i + 1}"
            rows.append({"text": text.strip(), "label": _check_label(label, "multilingual_sentiment", where, text),
                         "language": lang})
    return rows


# ----------------------------------------------------------------------------------------------------------
# squad_v2

def read_squad(source) -> list[dict]:
    """Every question of the SQuAD v2 dev set, flattened, in file order."""
    if source == "hub":
        return [{"id": r["id"], "title": r["title"], "context": r["context"], "question": r["question"],
                 "answers": list(r["answers"]["text"]), "is_impossible": not r["answers"]["text"]}
                for r in _hub("squad_v2", None, "validation")]
    with open(Path(source) / "dev-v2.0.json", encoding="utf-8") as f:
        articles = json.load(f)["data"]
    rows = []
    for art in articles:
        for par in art["paragraphs"]:
            for qa in par["qas"]:
                rows.append({"id": qa["id"], "title": art["title"], "context": par["context"],
                             "question": qa["question"], "answers": [a["text"] for a in qa["answers"]],
                             "is_impossible": bool(qa.get("is_impossible", not qa["answers"]))})
    return rows


def squad_test_titles(titles: Sequence[str], seed: int = 0, test_fraction: float = 0.3) -> set[str]:
    """The articles that go to the test side: a seeded `test_fraction` of the distinct titles."""
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    distinct = sorted(set(titles))
    k = max(1, round(len(distinct) * test_fraction))
    order = np.random.default_rng(seed).permutation(len(distinct))[:k]
    return {distinct[i] for i in order}


def _load_squad(source, split: str, *, seed: int, test_fraction: float = 0.3) -> list[dict]:
    _need(split, ("train", "validation", "test"), "squad_v2")
    rows = read_squad(source)
    if split == "validation":
        return rows
    test = squad_test_titles([r["title"] for r in rows], seed, test_fraction)
    return [r for r in rows if (r["title"] in test) == (split == "test")]


def squad_split_sizes(*, data_dir=None, seed: int = 0, test_fraction: float = 0.3) -> dict:
    """{"train"|"test": {"articles", "questions", "answerable", "unanswerable"}} of the article split."""
    rows = read_squad(find_dataset("squad_v2", data_dir))
    test = squad_test_titles([r["title"] for r in rows], seed, test_fraction)
    sizes = {}
    for side in ("train", "test"):
        part = [r for r in rows if (r["title"] in test) == (side == "test")]
        sizes[side] = {"articles": len({r["title"] for r in part}), "questions": len(part),
                       "answerable": sum(not r["is_impossible"] for r in part),
                       "unanswerable": sum(r["is_impossible"] for r in part)}
    return sizes


# ----------------------------------------------------------------------------------------------------------
# the hub (online only)

def _hub(name: str, config: str | None, split: str):
    import datasets

    return datasets.load_dataset(HUB[name], config, split=split)


_LOADERS: dict[str, Callable[..., list[dict]]] = {
    "sst2": _load_sst2,
    "imdb": _load_imdb,
    "financial_phrasebank": _load_phrasebank,
    "multilingual_sentiment": _load_multilingual,
    "squad_v2": _load_squad,
}
