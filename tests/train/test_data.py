"""train.data: real rows from ../shared/datasets (counts from each SOURCE.md) and the rules on small files."""
import collections
import gzip
import json
import re
from pathlib import Path

import pytest

from train import data

SHARED = data.REPO_ROOT.parent / "shared" / "datasets"


def _need_shared(name: str) -> None:
    if not (SHARED / name).is_dir():
        pytest.skip(f"{SHARED / name} not found (the real datasets live in ../shared beside the repo)")


def _counts(ds) -> dict:
    return dict(sorted(collections.Counter(ds["label"]).items()))


# ----------------------------------------------------------------------------------------------------------
# real data (counts from SOURCE.md)

@pytest.mark.real
def test_sst2_counts_and_test_means_dev():
    _need_shared("sst2")
    train = data.load_split("sst2", "train")
    assert len(train) == 67_349 and _counts(train) == {0: 29_780, 1: 37_569}
    dev = data.load_split("sst2", "validation")
    assert len(dev) == 872 and _counts(dev) == {0: 428, 1: 444}
    assert not dev[0]["text"].endswith(" ")  # GLUE's trailing space before the tab is stripped
    with pytest.warns(UserWarning, match="dev set"):
        test = data.load_split("sst2", "test")
    assert test["text"] == dev["text"]


@pytest.mark.real
def test_imdb_train_is_shuffled_and_test_is_a_fixed_balanced_sample():
    _need_shared("imdb")
    test = data.load_split("imdb", "test", seed=0)
    assert len(test) == 2500 and _counts(test) == {0: 1250, 1: 1250}
    assert data.load_split("imdb", "test", seed=0)["text"] == test["text"]  # fixed by the seed
    assert set(data.load_split("imdb", "test", seed=1)["text"]) != set(test["text"])
    first = test["label"][:50]
    assert 0 < sum(first) < 50  # the file is sorted neg -> pos; the split must not be


@pytest.mark.real
def test_imdb_train_full_size():
    _need_shared("imdb")
    train = data.load_split("imdb", "train")
    assert len(train) == 25_000 and _counts(train) == {0: 12_500, 1: 12_500}
    assert 0 < sum(train["label"][:100]) < 100


@pytest.mark.real
def test_phrasebank_dedup_and_disjoint_balanced_split():
    _need_shared("financial_phrasebank")
    rows = data.read_phrasebank(SHARED / "financial_phrasebank")
    # 4,846 lines, 8 exact duplicates of which 2 conflict: 4,838 distinct sentences, 2 dropped
    assert len(rows) == 4_836
    assert len({r["text"] for r in rows}) == len(rows)
    train = data.load_split("financial_phrasebank", "train")
    test = data.load_split("financial_phrasebank", "test")
    assert _counts(test) == {0: 300, 1: 300, 2: 300} and _counts(train) == {0: 300, 1: 300, 2: 300}
    assert not set(train["text"]) & set(test["text"])
    assert data.load_split("financial_phrasebank", "test")["text"] == test["text"]
    assert all("@" not in t[-12:] for t in test["text"])  # split on the last "@"


@pytest.mark.real
def test_multilingual_counts_and_language_column():
    _need_shared("multilingual_sentiment")
    en = data.load_split("multilingual_sentiment", "train", languages=["english"])
    assert len(en) == 1_839 and _counts(en) == {0: 613, 1: 613, 2: 613}
    assert set(en["language"]) == {"english"}
    val = data.load_split("multilingual_sentiment", "val", languages="all")
    assert len(val) == 8 * 324 and len(set(val["language"])) == 8
    test = data.load_split("multilingual_sentiment", "test", languages=["german", "hindi"])
    assert len(test) == 2 * 870 and _counts(test) == {0: 580, 1: 580, 2: 580}
    with pytest.raises(ValueError, match="languages"):
        data.load_split("multilingual_sentiment", "test", languages=["klingon"])


@pytest.mark.real
def test_squad_split_is_by_article():
    _need_shared("squad_v2")
    dev = data.load_split("squad_v2", "validation")
    assert len(dev) == 11_873 and sum(dev["is_impossible"]) == 5_945
    assert len(set(dev["id"])) == 11_873 and len(set(dev["title"])) == 35
    train, test = data.load_split("squad_v2", "train"), data.load_split("squad_v2", "test")
    assert not set(train["title"]) & set(test["title"])
    assert len(train) + len(test) == 11_873
    sizes = data.squad_split_sizes()
    assert sizes["train"]["questions"] == len(train) and sizes["test"]["questions"] == len(test)
    assert sizes["train"]["articles"] + sizes["test"]["articles"] == 35
    row = test[0]
    assert set(row) == {"id", "title", "context", "question", "answers", "is_impossible"}
    assert all(a in r["context"] for r in test.select(range(50)) for a in r["answers"])
    assert all(bool(r["answers"]) != r["is_impossible"] for r in test.select(range(200)))


# ----------------------------------------------------------------------------------------------------------
# rules, on small files written here

def _write_sst2(folder: Path, train_lines, dev_lines=("a fine film \t1",)) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.tsv").write_text("sentence\tlabel\n" + "".join(f"{l}\n" for l in train_lines))
    (folder / "dev.tsv").write_text("sentence\tlabel\n" + "".join(f"{l}\n" for l in dev_lines))
    return folder


def test_resolution_order_data_dir_then_env(tmp_path, monkeypatch):
    explicit = _write_sst2(tmp_path / "explicit", ["explicit one \t1"])
    _write_sst2(tmp_path / "env" / "sst2", ["from env \t0"])
    monkeypatch.setenv("LORA_DATA_DIR", str(tmp_path / "env"))
    assert data.load_split("sst2", "train", data_dir=explicit)["text"] == ["explicit one"]
    assert data.load_split("sst2", "train")["text"] == ["from env"]


def test_missing_dataset_lists_every_place(tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_DATA_DIR", str(tmp_path / "env"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(data, "REPO_ROOT", tmp_path / "repo")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError) as err:
        data.load_split("sst2", "train", data_dir=tmp_path / "nope")
    msg = str(err.value)
    for where in ("data_dir", str(tmp_path / "nope"), "$LORA_DATA_DIR", str(tmp_path / "env" / "sst2"),
                  "repo root", "cwd", "stanfordnlp/sst2", "offline"):
        assert where in msg


def test_hub_fallback_when_online(tmp_path, monkeypatch):
    for flag in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "LORA_DATA_DIR"):
        monkeypatch.delenv(flag, raising=False)
    monkeypatch.setattr(data, "REPO_ROOT", tmp_path / "repo")
    monkeypatch.chdir(tmp_path)
    calls = []

    def fake_hub(name, config, split):
        calls.append((name, config, split))
        return [{"sentence": "hub text ", "label": 1}]

    monkeypatch.setattr(data, "_hub", fake_hub)
    ds = data.load_split("sst2", "validation")
    assert ds["text"] == ["hub text"] and calls == [("sst2", None, "validation")]


def test_empty_split_is_an_error(tmp_path):
    folder = _write_sst2(tmp_path / "sst2", [])
    with pytest.raises(ValueError, match="empty"):
        data.load_split("sst2", "train", data_dir=folder)


def test_label_outside_the_set_names_the_row(tmp_path):
    folder = _write_sst2(tmp_path / "sst2", ["good \t1", "bad row text \t7"])
    with pytest.raises(ValueError, match=r"train.tsv line 3.*'7'.*bad row text"):
        data.load_split("sst2", "train", data_dir=folder)


def test_phrasebank_rules_on_a_small_file(tmp_path):
    lines = ["Profit rose @ 5 % .@positive", "Sales fell .@negative", "Sales fell .@negative",
             "Outlook unclear .@neutral", "Outlook unclear .@positive", "Flat quarter .@neutral"]
    (tmp_path / "Sentences_50Agree.txt").write_bytes("\r\n".join(lines).encode("latin-1") + b"\r\n")
    rows = data.read_phrasebank(tmp_path)
    assert {r["text"]: r["label"] for r in rows} == {"Profit rose @ 5 % .": 2, "Sales fell .": 0, "Flat quarter .": 1}
    (tmp_path / "Sentences_50Agree.txt").write_bytes(b"A sentence .@bullish\r\n")
    with pytest.raises(ValueError, match="line 1.*bullish"):
        data.read_phrasebank(tmp_path)


def test_limit_is_a_seeded_sample(tmp_path):
    folder = _write_sst2(tmp_path / "sst2", [f"text {i} \t{i % 2}" for i in range(50)])
    a = data.load_split("sst2", "train", data_dir=folder, limit=10, seed=3)
    assert len(a) == 10 and a["text"] == data.load_split("sst2", "train", data_dir=folder, limit=10, seed=3)["text"]
    assert a["text"] != data.load_split("sst2", "train", data_dir=folder, limit=10, seed=4)["text"]


def test_unknown_names_and_splits():
    with pytest.raises(ValueError, match="unknown dataset"):
        data.load_split("mnist", "train")
    with pytest.raises(ValueError, match="not a classification dataset"):
        data.label_names("squad_v2")
    assert data.label_names("multilingual_sentiment") == ["negative", "neutral", "positive"]


def test_squad_article_split_helper_is_disjoint_and_seeded():
    titles = [f"t{i}" for i in range(35)]
    test = data.squad_test_titles(titles, seed=0, test_fraction=0.3)
    assert len(test) == 10 and test == data.squad_test_titles(titles, seed=0, test_fraction=0.3)
    assert test != data.squad_test_titles(titles, seed=1, test_fraction=0.3)


# ----------------------------------------------------------------------------------------------------------
# bad inputs: every error names the file (and the line) and the problem

def _write_imdb(folder: Path, split: str, content: bytes) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{split}.csv.gz").write_bytes(gzip.compress(content))
    return folder / f"{split}.csv.gz"


def _write_multilingual(folder: Path, texts: bytes, labels: bytes, lang: str = "english") -> Path:
    (folder / lang).mkdir(parents=True, exist_ok=True)
    (folder / lang / "train_text.txt").write_bytes(texts)
    (folder / lang / "train_labels.txt").write_bytes(labels)
    return folder


def _write_squad(folder: Path, doc) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "dev-v2.0.json").write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return folder / "dev-v2.0.json"


def _squad_doc(**qa_changes) -> dict:
    qa = {"id": "q1", "question": "Who?", "answers": [{"text": "Ann", "answer_start": 0}], "is_impossible": False}
    qa.update(qa_changes)
    return {"version": "v2.0", "data": [{"title": "T", "paragraphs": [{"context": "Ann wrote it.", "qas": [qa]}]}]}


def _raises(exc, path: Path, problem: str):
    """pytest.raises whose match needs the file's full path, then the problem, in the message."""
    return pytest.raises(exc, match=re.escape(str(path)) + ".*" + problem)


def test_missing_data_dir_is_an_error_even_when_another_copy_exists(tmp_path, monkeypatch):
    _write_sst2(tmp_path / "env" / "sst2", ["from env \t0"])
    monkeypatch.setenv("LORA_DATA_DIR", str(tmp_path / "env"))
    typo = tmp_path / "typo"
    with _raises(FileNotFoundError, typo, r"does not exist; it should be .* train.tsv and dev.tsv"):
        data.load_split("sst2", "train", data_dir=typo)


def test_data_dir_that_is_a_file_is_an_error(tmp_path):
    (tmp_path / "train.tsv").write_text("sentence\tlabel\na \t1\n")
    with _raises(FileNotFoundError, tmp_path / "train.tsv", "is a file, not a folder"):
        data.load_split("sst2", "train", data_dir=tmp_path / "train.tsv")


def test_data_dir_without_the_file_names_it_and_hints_at_the_subfolder(tmp_path):
    _write_sst2(tmp_path / "sst2", ["a \t1"])
    with _raises(FileNotFoundError, tmp_path / "train.tsv", r"not found.*pass that folder as data_dir"):
        data.load_split("sst2", "train", data_dir=tmp_path)


def _bad_utf8_sst2(folder: Path):
    (folder / "train.tsv").write_bytes(b"sentence\tlabel\ngood \t1\ncaf\xe9 film \t1\n")
    return lambda: data.load_split("sst2", "train", data_dir=folder), folder / "train.tsv", "line 3.*offset 26"


def _bad_utf8_imdb(folder: Path):
    path = _write_imdb(folder, "train", b"text,label\ngood,1\ncaf\xe9,1\n")
    return lambda: data.load_split("imdb", "train", data_dir=folder), path, "line 3.*offset 21 of the uncompressed"


def _bad_utf8_multilingual(folder: Path):
    _write_multilingual(folder, b"ok\nnot \xff ok\n", b"0\n1\n")
    def call():
        return data.load_split("multilingual_sentiment", "train", data_dir=folder, languages="english")
    return call, folder / "english" / "train_text.txt", "line 2.*offset 7"


def _bad_utf8_squad(folder: Path):
    (folder / "dev-v2.0.json").write_bytes(b'{"data": [{"title": "Caf\xe9"}]}')
    return lambda: data.read_squad(folder), folder / "dev-v2.0.json", "line 1.*offset 24"


@pytest.mark.parametrize("make", [_bad_utf8_sst2, _bad_utf8_imdb, _bad_utf8_multilingual, _bad_utf8_squad],
                         ids=["sst2", "imdb", "multilingual", "squad"])
def test_non_utf8_bytes_name_the_file_line_and_offset(tmp_path, make):
    call, path, where = make(tmp_path)
    with _raises(ValueError, path, where + ".*not valid UTF-8; the file must be UTF-8"):
        call()


def test_utf8_bom_is_not_part_of_the_header(tmp_path):
    (tmp_path / "train.tsv").write_bytes(b"\xef\xbb\xbfsentence\tlabel\na fine film \t1\n")
    assert data.load_split("sst2", "train", data_dir=tmp_path)["text"] == ["a fine film"]


def test_sst2_without_a_header_is_an_error_not_a_lost_row(tmp_path):
    (tmp_path / "train.tsv").write_text("a fine film \t1\na bad film \t0\n")
    with _raises(ValueError, tmp_path / "train.tsv", r"line 1: expected the header row 'sentence\\tlabel'"):
        data.load_split("sst2", "train", data_dir=tmp_path)


def test_sst2_empty_file_names_the_expected_header(tmp_path):
    (tmp_path / "train.tsv").write_text("")
    with _raises(ValueError, tmp_path / "train.tsv", "is empty; expected the header row"):
        data.load_split("sst2", "train", data_dir=tmp_path)


@pytest.mark.parametrize("lines, message", [
    (["good \t1", "no tab here 1"], "line 3: no tab; expected 'sentence<TAB>label'"),
    (["good \t1", " \t0"], "line 3: the text is empty"),
    (["good \tpostive"], r"line 2: label 'postive' is not one of \['negative', 'positive'\]"),
], ids=["no-tab", "empty-text", "misspelt-label"])
def test_sst2_bad_row_names_the_line(tmp_path, lines, message):
    folder = _write_sst2(tmp_path, lines)
    with _raises(ValueError, folder / "train.tsv", message):
        data.load_split("sst2", "train", data_dir=folder)


@pytest.mark.parametrize("content, message", [
    (b"", "is empty; expected the header row 'text,label'"),
    (b"review,sentiment\ngood,1\n", "line 1: expected the header row 'text,label', got 'review,sentiment'"),
    (b'text,label\n"two\nlines",1\ngood,1,extra\n', r"line 4: expected 2 fields \(text,label\), got 3"),
    (b'text,label\ngood,1\n"never closed,1\nbad,0\n', "malformed CSV in the row starting at line 3"),
    (b"text,label\ngood,1\nbad,2\n", "line 3: label '2' is not one of"),
], ids=["empty", "wrong-header", "field-count-first-line", "unclosed-quote", "bad-label"])
def test_imdb_bad_file_names_the_problem(tmp_path, content, message):
    path = _write_imdb(tmp_path, "train", content)
    with _raises(ValueError, path, message):
        data.load_split("imdb", "train", data_dir=tmp_path)


def test_imdb_file_that_is_not_gzip_is_an_error(tmp_path):
    (tmp_path / "train.csv.gz").write_bytes(b"text,label\ngood,1\n")
    with _raises(ValueError, tmp_path / "train.csv.gz", "not a readable gzip file"):
        data.load_split("imdb", "train", data_dir=tmp_path)


def test_imdb_test_size_too_large_names_the_file_and_the_fix(tmp_path):
    path = _write_imdb(tmp_path, "test", b"text,label\ngood,1\nbad,0\n")
    with _raises(ValueError, path, "class 0 has 1 rows, fewer than the 1250 .* pass a smaller test_size"):
        data.load_split("imdb", "test", data_dir=tmp_path)
    assert len(data.load_split("imdb", "test", data_dir=tmp_path, test_size=2)) == 2


def test_phrasebank_empty_file_is_an_error(tmp_path):
    (tmp_path / "Sentences_50Agree.txt").write_bytes(b"")
    with _raises(ValueError, tmp_path / "Sentences_50Agree.txt", "is empty; expected one 'sentence@label'"):
        data.read_phrasebank(tmp_path)


def test_phrasebank_line_without_a_label_names_the_line(tmp_path):
    (tmp_path / "Sentences_50Agree.txt").write_bytes(b"Sales fell .@negative\r\nno label here\r\n")
    with _raises(ValueError, tmp_path / "Sentences_50Agree.txt", "line 2: no '@label'"):
        data.read_phrasebank(tmp_path)


@pytest.mark.parametrize("encoding", ["latin-1", "utf-8"])
def test_phrasebank_reads_latin1_and_utf8_copies_alike(tmp_path, encoding):
    (tmp_path / "Sentences_50Agree.txt").write_bytes("Seppälä grew .@positive\r\n".encode(encoding))
    assert data.read_phrasebank(tmp_path) == [{"text": "Seppälä grew .", "label": 2}]


@pytest.mark.parametrize("texts, labels, bad_file, message", [
    (b"a\nb\nc\n", b"0\n1\n", "train_text.txt", "has 3 lines but .*train_labels.txt has 2"),
    (b"a\nb\n", b"0\n3\n", "train_labels.txt", "line 2: label '3' is not one of"),
    (b"a\n\n", b"0\n1\n", "train_text.txt", "line 2: the text is empty"),
], ids=["line-counts-differ", "bad-label", "empty-text"])
def test_multilingual_bad_files_name_the_file_and_line(tmp_path, texts, labels, bad_file, message):
    folder = _write_multilingual(tmp_path, texts, labels)
    with _raises(ValueError, folder / "english" / bad_file, message):
        data.load_split("multilingual_sentiment", "train", data_dir=folder, languages="english")


def test_multilingual_missing_language_folder_names_the_file(tmp_path):
    folder = _write_multilingual(tmp_path, b"a\n", b"0\n")
    missing = folder / "german" / "train_text.txt"
    with _raises(FileNotFoundError, missing, "not found; the multilingual_sentiment folder should hold a folder per"):
        data.load_split("multilingual_sentiment", "train", data_dir=folder, languages=["english", "german"])


@pytest.mark.parametrize("cut", [2, 20], ids=["between-values", "inside-a-string"])
def test_squad_truncated_json_names_line_and_column(tmp_path, cut):
    path = _write_squad(tmp_path, json.dumps(_squad_doc())[:-cut])
    with _raises(ValueError, path, r"line 1, column \d+: invalid JSON: .*truncated\?"):
        data.read_squad(tmp_path)


def test_squad_empty_file_is_an_error(tmp_path):
    path = _write_squad(tmp_path, "")
    with _raises(ValueError, path, "is empty; expected the SQuAD v2 JSON"):
        data.read_squad(tmp_path)


@pytest.mark.parametrize("doc, problem", [
    ([], "the top level should be an object, got an array"),
    ({"version": "v2.0"}, "the top level has no 'data'"),
    (_squad_doc(question=None), r"data\[0\].paragraphs\[0\].qas\[0\].question should be a string, got null"),
    (_squad_doc(answers="Ann"), r"qas\[0\].answers should be an array, got a string"),
    (_squad_doc(answers=[{"start": 0}]), r"qas\[0\].answers\[0\] has no 'text'"),
    (_squad_doc(is_impossible="false"), "is_impossible should be true/false, got 'false'"),
    (_squad_doc(is_impossible=True), "has is_impossible=true but 1 answers"),
], ids=["top-level-array", "no-data", "null-question", "answers-string", "answer-no-text", "flag-string",
        "flag-contradicts-answers"])
def test_squad_layout_errors_name_the_json_path(tmp_path, doc, problem):
    path = _write_squad(tmp_path, doc)
    with _raises(ValueError, path, problem):
        data.read_squad(tmp_path)
