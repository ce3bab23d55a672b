"""train.files: a user's CSV / TSV / JSONL / JSON / Parquet / saved dataset, read the same, errors that say where."""
from __future__ import annotations

import gzip
import json
import re

import pytest

from train import files

ROWS = [{"review": "great value", "stars": "good"}, {"review": "broke in a week", "stars": "bad"},
        {"review": "it is fine", "stars": "meh"}, {"review": "love it", "stars": "good"}]
EXPECTED = ([{"text": "great value", "label": 1}, {"text": "broke in a week", "label": 0},
             {"text": "it is fine", "label": 2}, {"text": "love it", "label": 1}], ["bad", "good", "meh"])


def write(path, rows=ROWS):
    """rows in the format the file name asks for."""
    name = path.name
    if name.endswith((".csv", ".tsv", ".csv.gz")):
        sep = "\t" if name.endswith(".tsv") else ","
        text = sep.join(rows[0]) + "\n" + "".join(sep.join(map(str, r.values())) + "\n" for r in rows)
        path.write_bytes(gzip.compress(text.encode()) if name.endswith(".gz") else text.encode())
    elif name.endswith(".jsonl"):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif name.endswith(".json"):
        path.write_text(json.dumps(rows))
    elif name.endswith(".parquet"):
        import pandas as pd
        pd.DataFrame(rows).to_parquet(path)
    return path


@pytest.mark.parametrize("name", ["d.csv", "d.tsv", "d.csv.gz", "d.jsonl", "d.json", "d.parquet"])
def test_every_format_gives_the_same_rows(tmp_path, name):
    path = write(tmp_path / name)
    assert files.classification_rows(path, text_column="review", label_column="stars") == EXPECTED


def test_saved_dataset_folders_are_read_by_split(tmp_path):
    import datasets

    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "one"))
    split = datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS),
                                  "validation": datasets.Dataset.from_list(ROWS[:2])})
    split.save_to_disk(str(tmp_path / "two"))
    assert files.classification_rows(tmp_path / "one", text_column="review", label_column="stars") == EXPECTED
    rows, _ = files.classification_rows(tmp_path / "two", text_column="review", label_column="stars",
                                        label_names=EXPECTED[1], role="test")
    assert rows == EXPECTED[0][:2]


def test_columns_are_found_by_common_names(tmp_path):
    path = write(tmp_path / "d.csv", [{"Sentence": r["review"], "Label": r["stars"]} for r in ROWS])
    assert files.classification_rows(path) == EXPECTED


def test_integer_labels_are_sorted_numerically(tmp_path):
    path = write(tmp_path / "d.jsonl", [{"text": t, "label": v} for t, v in [("a", 10), ("b", 2), ("c", 2)]])
    rows, names = files.classification_rows(path)
    assert names == ["2", "10"] and [r["label"] for r in rows] == [1, 0, 0]


def test_test_file_labels_map_to_the_training_names(tmp_path):
    path = write(tmp_path / "d.jsonl", [{"text": "a", "label": "meh"}, {"text": "b", "label": 0}])
    rows, names = files.classification_rows(path, label_names=["bad", "good", "meh"], role="test")
    assert [r["label"] for r in rows] == [2, 0] and names == ["bad", "good", "meh"]


def test_an_index_is_not_taken_for_a_numeric_label_name(tmp_path):
    path = write(tmp_path / "d.jsonl", [{"text": "a", "label": 0}])
    with pytest.raises(ValueError, match=r"row 1: label 0 is not one of \['1', '2', '3'\]"):
        files.classification_rows(path, label_names=["1", "2", "3"], role="test")


@pytest.mark.parametrize("rows, kw, message", [
    (ROWS, {"text_column": "body"}, r"no column 'body'; its columns are \['review', 'stars'\]"),
    ([{"a": "x", "b": "y"}] * 2, {}, r"no text column found \(looked for text, sentence, .*\['a', 'b'\]: "
                                     r"pass --text-column NAME"),
    (ROWS[:3] + [{"review": "", "stars": "good"}], {"text_column": "review", "label_column": "stars"},
     r"row 4: column 'review' is empty or not text"),
    (ROWS[:1] + [{"review": "x", "stars": None}], {"text_column": "review", "label_column": "stars"},
     r"row 2: label None in column 'stars' is missing"),
    ([{"text": "a", "label": "x"}, {"text": "b", "label": "x"}], {}, r"every row has the label 'x'"),
    (ROWS, {"text_column": "review", "label_column": "stars", "label_names": ["bad", "good"]},
     r"row 3: label 'meh' is not one of \['bad', 'good'\]"),
], ids=["named-column-missing", "no-text-column", "empty-text", "missing-label", "one-class", "unknown-label"])
def test_bad_rows_name_the_file_row_and_problem(tmp_path, rows, kw, message):
    path = write(tmp_path / "d.jsonl", rows)
    with pytest.raises(ValueError, match=re.escape(str(path)) + ".*" + message):
        files.classification_rows(path, **kw)


@pytest.mark.parametrize("name, data, message", [
    ("d.csv", b"", r"is empty"),
    ("d.csv", b"text,label\n", r"has a header but no rows|is empty"),
    ("d.csv", b"text,label\ngood \xff,1\n", r"line 2: byte 0xff at offset 16 is not UTF-8"),
    ("d.txt", b"text,label\na,1\n", r"unknown format '.txt'; use one of .csv, .tsv"),
    ("d.jsonl", b'{"text": "a", "label": 1}\n{"text": \n', r"could not be read as JSON"),
], ids=["empty", "header-only", "not-utf8", "unknown-format", "broken-jsonl"])
def test_bad_files_are_named(tmp_path, name, data, message):
    (tmp_path / name).write_bytes(data)
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / name)) + ".*" + message):
        files.read_table(tmp_path / name)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="data file .*nope.csv does not exist"):
        files.read_table(tmp_path / "nope.csv")


def test_qa_rows_take_every_answer_form(tmp_path):
    rows = [{"question": "q1", "context": "c", "answers": "Paris"}, {"question": "q2", "context": "c", "answers": ""},
            {"question": "q3", "context": "c", "answers": ["a", "b"]},
            {"question": "q4", "context": "c", "answers": {"text": [], "answer_start": []}}]
    got = files.qa_rows(write(tmp_path / "q.jsonl", rows))
    assert [r["answers"] for r in got] == [["Paris"], [], ["a", "b"], []]
    assert [r["is_impossible"] for r in got] == [False, True, False, True]
    assert [r["id"] for r in got] == ["1", "2", "3", "4"]


def test_qa_rows_read_a_squad_v2_json_file(tmp_path):
    doc = {"version": "v2.0", "data": [{"title": "Paris", "paragraphs": [{"context": "Paris is in France.", "qas": [
        {"id": "a", "question": "Where is Paris?", "answers": [{"text": "France", "answer_start": 12}],
         "is_impossible": False},
        {"id": "b", "question": "Who built it?", "answers": [], "is_impossible": True}]}]}]}
    (tmp_path / "squad.json").write_text(json.dumps(doc))
    rows = files.qa_rows(tmp_path / "squad.json")
    assert [(r["id"], r["title"], r["answers"], r["is_impossible"]) for r in rows] == [
        ("a", "Paris", ["France"], False), ("b", "Paris", [], True)]
