"""Datasets, offline first: `load_split(name, split)` -> a `datasets.Dataset` in one schema per task.

Classification rows are `{"text": str, "label": int}` (plus `language` for multilingual_sentiment), the label
an index into `LABELS[name]`; SQuAD v2 rows are `{"id", "title", "context", "question", "answers": [str],
"is_impossible": bool}`.

Where the files are looked for:
    1. the `data_dir` argument (the dataset's own folder). When given it is the ONLY place: a mistyped path
       must fail, not quietly load another copy. With data_dir=None, in order (the first folder that exists wins):
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

Bad files (train/datafiles.py reads and checks them). Every problem in a file is a ValueError (FileNotFoundError
for a missing path) that names the file, the 1-based line (or the JSON path in SQuAD) and what was expected.
"""
from __future__ import annotations

import functools
import os
import warnings
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .datafiles import check_header, check_label, json_field, read_json, read_lines, read_text_label_csv

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
_FILES = {  # what a dataset's folder holds, for the error messages
    "sst2": "train.tsv and dev.tsv (UTF-8, tab-separated, header 'sentence\\tlabel')",
    "imdb": "train.csv.gz and test.csv.gz (gzip-compressed UTF-8 CSV, header 'text,label')",
    "financial_phrasebank": "Sentences_<agreement>Agree.txt (one 'sentence@label' a line)",
    "multilingual_sentiment": "a folder per language with {train,val,test}_text.txt and {train,val,test}_labels.txt",
    "squad_v2": "dev-v2.0.json (UTF-8, the SQuAD v2 JSON layout)",
}


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
    defaults = []
    if os.environ.get("LORA_DATA_DIR"):
        defaults.append(("$LORA_DATA_DIR", Path(os.environ["LORA_DATA_DIR"]) / name))
    defaults.append(("repo root", REPO_ROOT.parent / "shared" / "datasets" / name))
    defaults.append(("cwd", Path.cwd().parent / "shared" / "datasets" / name))
    if data_dir is not None:
        folder = Path(data_dir)
        if folder.is_dir():
            return folder
        state = "is a file, not a folder" if folder.exists() else "does not exist"
        raise FileNotFoundError(f"data_dir {folder} {state}; it should be the folder holding the {name} files: "
                                f"{_FILES[name]}. Fix the path, or pass data_dir=None to use the default places:"
                                "\n  " + _places(name, defaults))
    for _, folder in defaults:
        if folder.is_dir():
            return folder
    if not _offline():
        return "hub"
    raise FileNotFoundError(f"dataset {name!r} not found. Looked in:\n  " + _places(name, defaults)
                            + "\nPut the files in one of these folders or set LORA_DATA_DIR to their parent.")


def _places(name: str, defaults: list[tuple[str, Path]]) -> str:
    lines = [f"{why}: {folder}" + (" (exists)" if folder.is_dir() else "") for why, folder in defaults]
    lines.append(f"hub: {HUB[name]}" + (" (skipped: offline)" if _offline() else ""))
    return "\n  ".join(lines)


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


def _need(split: str, allowed: Sequence[str], name: str) -> None:
    if split not in allowed:
        raise ValueError(f"{name} has splits {list(allowed)}, got {split!r}")


# ----------------------------------------------------------------------------------------------------------
# the dataset's files (read and checked by train/datafiles.py: every error names the file and the line)

def _data_file(source, fname: str, name: str) -> Path:
    """source/fname, or a FileNotFoundError saying what the folder should hold."""
    path = Path(source) / fname
    if path.is_file():
        return path
    hint = ""
    if (Path(source) / name).is_dir():  # the parent of the dataset folder was passed
        hint = f"; the dataset seems to be in {Path(source) / name}: pass that folder as data_dir"
    raise FileNotFoundError(f"{path} not found; the {name} folder should hold {_FILES[name]}{hint}")


def _row(text: str, label, name: str, where: str) -> dict:
    if not text.strip():
        raise ValueError(f"{where}: the text is empty")
    return {"text": text, "label": check_label(label, LABELS[name], where, text)}


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
                 "label": check_label(r["label"], LABELS["sst2"], f"hub row {i}", r["sentence"])}
                for i, r in enumerate(raw)]
    path = _data_file(source, "train.tsv" if split == "train" else "dev.tsv", "sst2")
    lines = read_lines(path)
    check_header(path, lines[0] if lines else None, "sentence\tlabel")
    rows = []
    for lineno, line in enumerate(lines[1:], start=2):
        text, tab, label = line.rpartition("\t")
        if not tab:
            raise ValueError(f"{path} line {lineno}: no tab; expected 'sentence<TAB>label', got {line[:80]!r}")
        rows.append(_row(text.strip(), label, "sst2", f"{path} line {lineno}"))
    return rows


# ----------------------------------------------------------------------------------------------------------
# imdb

def _load_imdb(source, split: str, *, seed: int, test_size: int | None = 2500) -> list[dict]:
    _need(split, ("train", "test"), "imdb")
    if source == "hub":
        rows = [{"text": r["text"], "label": check_label(r["label"], LABELS["imdb"], f"hub row {i}", r["text"])}
                for i, r in enumerate(_hub("imdb", None, split))]
        what = f"{HUB['imdb']} {split}"
    else:
        path = _data_file(source, f"{split}.csv.gz", "imdb")
        rows = [_row(text, label, "imdb", f"{path} line {n}") for text, label, n in read_text_label_csv(path)]
        what = str(path)
    rng = np.random.default_rng(seed)
    if split == "test" and test_size is not None:
        rows = _balanced_sample(rows, test_size, 2, rng, what)
    return [rows[i] for i in rng.permutation(len(rows))]  # the file is sorted neg -> pos


def _balanced_sample(rows: list[dict], size: int, n_classes: int, rng, what: str) -> list[dict]:
    if size % n_classes:
        raise ValueError(f"a balanced sample needs a size divisible by {n_classes}, got {size}")
    out = []
    for c in range(n_classes):
        idx = [i for i, r in enumerate(rows) if r["label"] == c]
        if len(idx) < size // n_classes:
            raise ValueError(f"{what}: class {c} has {len(idx)} rows, fewer than the {size // n_classes} a "
                             f"balanced test_size={size} needs; pass a smaller test_size (or None for all rows)")
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
        raw = _read_phrasebank_file(_data_file(source, f"Sentences_{agreement}Agree.txt", "financial_phrasebank"))
    by_text: dict[str, set[int]] = {}
    for text, label, where in raw:
        row = _row(text.strip(), label, "financial_phrasebank", where)
        by_text.setdefault(row["text"], set()).add(row["label"])
    return [{"text": t, "label": next(iter(ls))} for t, ls in by_text.items() if len(ls) == 1]


def _read_phrasebank_file(path: Path) -> list[tuple[str, str, str]]:
    # The release is latin-1 (never valid UTF-8); UTF-8 re-encodings circulate too (SOURCE.md), and reading
    # those as latin-1 would turn every accent into mojibake, so UTF-8 is tried first.
    lines = read_lines(path, fallback="latin-1")
    if not lines:
        raise ValueError(f"{path} is empty; expected one 'sentence@label' a line")
    raw = []
    for lineno, line in enumerate(lines, start=1):
        text, sep, label = line.rpartition("@")  # split on the LAST "@": sentences may contain "@"
        if not sep:
            raise ValueError(f"{path} line {lineno}: no '@label' at the end of {line[:80]!r}; "
                             "expected 'sentence@label'")
        raw.append((text, label, f"{path} line {lineno}"))
    return raw


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
    rows = []
    for lang in langs:
        if source == "hub":
            triples = [(r["text"], r["label"], f"hub {lang} row {i}")
                       for i, r in enumerate(_hub("multilingual_sentiment", lang, split))]
        else:
            triples = _read_multilingual(source, lang, "val" if split == "validation" else split)
        for text, label, where in triples:
            label = check_label(label, LABELS["multilingual_sentiment"], where, text)
            rows.append({"text": text.strip(), "label": label, "language": lang})
    return rows


def _read_multilingual(source, lang: str, fsplit: str) -> list[tuple[str, str, str]]:
    """(text, label, where) of one language: line i of <split>_labels.txt is the label of <split>_text.txt's."""
    text_path = _data_file(source, f"{lang}/{fsplit}_text.txt", "multilingual_sentiment")
    label_path = _data_file(source, f"{lang}/{fsplit}_labels.txt", "multilingual_sentiment")
    texts, labels = read_lines(text_path), read_lines(label_path)
    if len(texts) != len(labels):
        raise ValueError(f"{text_path} has {len(texts)} lines but {label_path} has {len(labels)}; "
                         "they must pair up line by line")
    for lineno, text in enumerate(texts, start=1):
        if not text.strip():
            raise ValueError(f"{text_path} line {lineno}: the text is empty")
    return [(text, label, f"{label_path} line {i}") for i, (text, label) in enumerate(zip(texts, labels), start=1)]


# ----------------------------------------------------------------------------------------------------------
# squad_v2

_field = functools.partial(json_field, layout="the SQuAD v2 layout {'data': [{'title', 'paragraphs': [{'context', "
                                              "'qas': [{'id', 'question', 'answers': [{'text'}]}]}]}]}")


def read_squad(source) -> list[dict]:
    """Every question of the SQuAD v2 dev set, flattened, in file order."""
    if source == "hub":
        return [{"id": r["id"], "title": r["title"], "context": r["context"], "question": r["question"],
                 "answers": list(r["answers"]["text"]), "is_impossible": not r["answers"]["text"]}
                for r in _hub("squad_v2", None, "validation")]
    return read_squad_file(_data_file(source, "dev-v2.0.json", "squad_v2"))


def read_squad_file(path: Path) -> list[dict]:
    """Every question of a SQuAD v2 JSON file ({"data": [articles]}), flattened, in file order."""
    doc = read_json(path, "the SQuAD v2 JSON (an object with a 'data' array)")
    rows = []
    for a, art in enumerate(_field(doc, "data", list, path, "the top level")):
        title = _field(art, "title", str, path, f"data[{a}]")
        for p, par in enumerate(_field(art, "paragraphs", list, path, f"data[{a}]")):
            at = f"data[{a}].paragraphs[{p}]"
            context = _field(par, "context", str, path, at)
            rows += [_squad_row(qa, title, context, path, f"{at}.qas[{q}]")
                     for q, qa in enumerate(_field(par, "qas", list, path, at))]
    return rows


def _squad_row(qa, title: str, context: str, path: Path, at: str) -> dict:
    answers = [_field(ans, "text", str, path, f"{at}.answers[{i}]")
               for i, ans in enumerate(_field(qa, "answers", list, path, at))]
    impossible = qa.get("is_impossible", not answers)
    if not isinstance(impossible, bool):
        raise ValueError(f"{path}: {at}.is_impossible should be true/false, got {impossible!r}")
    if impossible == bool(answers):
        raise ValueError(f"{path}: {at} has is_impossible={str(impossible).lower()} but {len(answers)} answers; "
                         "an unanswerable question has none, an answerable one at least one")
    return {"id": _field(qa, "id", str, path, at), "title": title, "context": context,
            "question": _field(qa, "question", str, path, at), "answers": answers, "is_impossible": impossible}


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
