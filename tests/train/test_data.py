"""train.data: real rows from ../shared/datasets (counts from each SOURCE.md) and the rules on small files."""
import collections
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
