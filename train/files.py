"""A user's own data files, read with Hugging Face `datasets`, checked row by row, with errors that say where.

    rows, label_names = classification_rows("reviews.csv", text_column="review", label_column="stars")
    rows = qa_rows("questions.jsonl")        # question, context, answers ("" or [] when unanswerable)

Formats (by the name's ending): .csv, .tsv/.tab (optionally .gz/.bz2/.xz/.zst compressed), .jsonl/.ndjson,
.json (JSON lines or an array of objects), .parquet, or a folder written by `Dataset.save_to_disk` (a
DatasetDict folder gives its "train" split for training, its "test" or "validation" split for testing).

Columns: when not named, the text column is the first one called text, sentence, review, ... and the label
column the first one called label, sentiment, class, ... (case-insensitive; TEXT_COLUMNS / LABEL_COLUMNS).
Labels may be strings ("positive") or integers (0, 1, 2); the label names are the training file's distinct
values, sorted. Rows are counted from 1, the header not counted (for JSON lines: the line number).
Every problem is a ValueError (FileNotFoundError for a missing path) that names the file, the row and the fix.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

TEXT_COLUMNS = ("text", "sentence", "review", "content", "tweet", "document", "comment", "body", "utterance",
                "input", "question")
LABEL_COLUMNS = ("label", "labels", "sentiment", "class", "category", "target", "output", "y")
_BUILDERS = {".csv": ("csv", {}), ".tsv": ("csv", {"delimiter": "\t"}), ".tab": ("csv", {"delimiter": "\t"}),
             ".jsonl": ("json", {}), ".ndjson": ("json", {}), ".json": ("json", {}), ".parquet": ("parquet", {})}
_COMPRESSED = (".gz", ".bz2", ".xz", ".zst")
_TEXT_FORMATS = (".csv", ".tsv", ".tab", ".jsonl", ".ndjson", ".json")


def read_table(path: str | os.PathLike, role: str = "train") -> list[dict]:
    """Every row of a data file (or saved dataset folder) as a dict; `role` picks a DatasetDict's split."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data file {path} does not exist")
    if path.is_dir():
        return _read_saved(path, role)
    builder, options = _builder(path)
    if path.stat().st_size == 0:
        raise ValueError(f"{path} is empty: expected a header row and one row per example")
    if _suffix(path) in _TEXT_FORMATS and not path.name.endswith(_COMPRESSED):
        _check_text(path, header=builder == "csv")
    dataset = _load(builder, path, options)
    if len(dataset) == 0:
        raise ValueError(f"{path} has a header but no rows")
    return dataset.to_list()


def classification_rows(path, *, text_column: str | None = None, label_column: str | None = None,
                        label_names: Sequence[str] | None = None, role: str = "train",
                        ) -> tuple[list[dict], list[str]]:
    """[{"text", "label": class index}] and the label names (given, or the file's sorted distinct labels)."""
    table = read_table(path, role)
    text_key = find_column(path, table, text_column, TEXT_COLUMNS, "text")
    label_key = find_column(path, table, label_column, LABEL_COLUMNS, "label")
    values = [_label_value(path, i, row[label_key], label_key) for i, row in enumerate(table, 1)]
    names = list(label_names) if label_names is not None else _label_names(path, values)
    index = _label_index(names)
    rows = []
    for i, (row, value) in enumerate(zip(table, values), 1):
        text = _text(path, i, row[text_key], text_key)
        rows.append({"text": text, "label": _lookup(path, i, value, index, names)})
    return rows, names


def qa_rows(path, *, role: str = "train") -> list[dict]:
    """SQuAD-v2-shaped rows from columns question, context, answers (a string, a list of strings, or SQuAD's
    {"text": [...]}; empty when unanswerable), and optional id and title; or a SQuAD v2 JSON file itself."""
    if _is_squad_json(Path(path)):
        from .data import read_squad_file
        return read_squad_file(Path(path))
    table = read_table(path, role)
    keys = {name: find_column(path, table, None, names, name) for name, names in
            (("question", ("question", "query")), ("context", ("context", "passage", "document")),
             ("answers", ("answers", "answer")))}
    rows = []
    for i, row in enumerate(table, 1):
        answers = _answers(path, i, row[keys["answers"]])
        rows.append({"id": str(row.get("id", i)), "title": str(row.get("title") or f"row-{i}"),
                     "context": _text(path, i, row[keys["context"]], keys["context"]),
                     "question": _text(path, i, row[keys["question"]], keys["question"]),
                     "answers": answers, "is_impossible": not answers})
    return rows


def _is_squad_json(path: Path) -> bool:
    """A .json file holding one object with a "data" list (SQuAD's own layout), not rows."""
    if not (path.is_file() and path.name.lower().endswith(".json")):
        return False
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False                          # JSON lines, or broken: read_table says what is wrong
    return isinstance(doc, dict) and isinstance(doc.get("data"), list)


def find_column(path, table: list[dict], given: str | None, candidates: Sequence[str], what: str) -> str:
    """The column the user named (which must exist), else the first candidate present, case-insensitively."""
    columns = list(table[0])
    if given is not None:
        if given not in columns:
            raise ValueError(f"{path}: no column {given!r}; its columns are {columns}")
        return given
    lower = {c.lower(): c for c in columns}
    for name in candidates:
        if name in lower:
            return lower[name]
    raise ValueError(f"{path}: no {what} column found (looked for {', '.join(candidates)}); its columns are "
                     f"{columns}: pass --{what}-column NAME")


# ----------------------------------------------------------------------------- reading

def _builder(path: Path) -> tuple[str, dict]:
    suffix = _suffix(path)
    if suffix not in _BUILDERS:
        raise ValueError(f"{path}: unknown format {suffix or '(no ending)'!r}; use one of "
                         f"{', '.join(_BUILDERS)} (optionally compressed), or a saved dataset folder")
    return _BUILDERS[suffix]


def _suffix(path: Path) -> str:
    name = path.name.lower()
    for ending in _COMPRESSED:
        name = name.removesuffix(ending)
    return Path(name).suffix


def _load(builder: str, path: Path, options: dict):
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    try:
        return datasets.load_dataset(builder, data_files=str(path), split="train", **options)
    except (datasets.exceptions.DatasetGenerationError, ValueError, TypeError) as e:
        cause = e.__cause__ or e.__context__ or e
        raise ValueError(f"{path} could not be read as {builder.upper()}: {' '.join(str(cause).split())[:300]}"
                         ) from None


def _read_saved(path: Path, role: str) -> list[dict]:
    import datasets

    try:
        saved = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as e:
        raise ValueError(f"{path} is a folder but not a dataset saved with save_to_disk ({e})") from None
    if isinstance(saved, datasets.DatasetDict):
        wanted = ("train",) if role == "train" else ("test", "validation")
        split = next((s for s in wanted if s in saved), None)
        if split is None:
            raise ValueError(f"{path} holds the splits {list(saved)}, none of {wanted}: pass the split's folder")
        saved = saved[split]
    if len(saved) == 0:
        raise ValueError(f"{path} holds no rows")
    return saved.to_list()


def _check_text(path: Path, header: bool) -> None:
    """UTF-8 throughout (the reader's own error names no line), and a row below the header."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ValueError(f"{path} line {line}: byte {data[e.start]:#04x} at offset {e.start} is not UTF-8; "
                         "save the file as UTF-8") from None
    if header and len([line for line in text.splitlines() if line.strip()]) < 2:
        raise ValueError(f"{path} has a header but no rows")


# ----------------------------------------------------------------------------- values

def _text(path, row: int, value, column: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{path} row {row}: column {column!r} is empty or not text ({value!r})")
    return value.strip()


def _label_value(path, row: int, value, column: str):
    """A label as str or int (1.0 from a column that pandas made float is 1); None is an error."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or value is None or not isinstance(value, (str, int)) or value == "":
        raise ValueError(f"{path} row {row}: label {value!r} in column {column!r} is missing or not a "
                         "string/integer")
    return value.strip() if isinstance(value, str) else value


def _label_names(path, values: list) -> list[str]:
    distinct = sorted(set(values), key=lambda v: (isinstance(v, str), v))
    if len(distinct) < 2:
        raise ValueError(f"{path}: every row has the label {distinct[0]!r}; a classifier needs two or more")
    return [str(v) for v in distinct]


def _label_index(names: Sequence[str]) -> dict:
    return {name: i for i, name in enumerate(names)}


def _lookup(path, row: int, value, index: dict, names: Sequence[str]) -> int:
    """A label's class index: by name (ints by their text); an int that names no class is taken as an index."""
    if str(value) in index:
        return index[str(value)]
    numeric_names = any(n.lstrip("-").isdigit() for n in names)
    if isinstance(value, int) and not numeric_names and 0 <= value < len(names):
        return value
    raise ValueError(f"{path} row {row}: label {value!r} is not one of {list(names)}")


def _answers(path, row: int, value) -> list[str]:
    if isinstance(value, dict):
        value = value.get("text", [])
    if value is None or isinstance(value, str):
        value = [value] if value else []
    if not isinstance(value, list) or not all(isinstance(a, str) for a in value):
        raise ValueError(f"{path} row {row}: answers must be a string, a list of strings or {{'text': [...]}}, "
                         f"got {value!r}")
    return [a.strip() for a in value if a.strip()]
