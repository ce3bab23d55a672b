"""Saving and loading adapters in PEFT's on-disk format.

    adapter_dir/
      adapter_config.json          peft_type "LORA", r, lora_alpha, target_modules, use_dora, ... (PEFT's LoraConfig)
      adapter_model.safetensors    base_model.model.<module path>.lora_A.weight   (r, in)   fp32
                                   base_model.model.<module path>.lora_B.weight   (out, r)  fp32
                                   base_model.model.<module path>.lora_magnitude_vector   (out,)  DoRA's m
                                   base_model.model.<modules_to_save path>.<param>  full tensors

The adapter's name is never in the keys (PEFT strips it, and its in-memory `lora_magnitude_vector.<name>.weight`
is saved as plain `lora_magnitude_vector`; checked against peft 0.21). Several adapters saved together are laid
out as PEFT's save_pretrained does: "default" in adapter_dir itself, any other under adapter_dir/<name>/.
`save(model, dir, adapter_name="sst2")` writes that one adapter as the folder `dir` (PEFT:
`save_pretrained(dir, selected_adapters=["sst2"])` would write dir/sst2/), and `load(model, dir, adapter_name=...)`
reads one adapter folder (for PEFT's layout: dir for "default", dir/<name> for the others).

Key format for `modules_to_save`: PEFT keeps a trainable copy under `<path>.modules_to_save.default`,
but get_peft_model_state_dict strips that infix on save, so a saved classifier is plain
`base_model.model.classifier.weight` / `.bias` (checked against peft 0.21). We never wrap those
modules, so their state-dict keys are already the plain path.

target_modules is written as the user gave it (suffix list or regex); "all-linear" is written as the
resolved list of full module names, because PEFT's own all-linear rule differs (it adapts a
classifier head unless task_type is SEQ_CLS) and the file must mean the same modules everywhere.

Note: the folder is replaced as a whole (lora.atomic.atomic_dir): both files (and any `extra_files`, such as a
training recipe's task.json) are written to a temp folder beside it, fsynced, and swapped in with renames. A
kill -9 at any moment of a save leaves the old adapter or the new one, never new weights beside an old config,
and the next save removes what the killed one left behind. Anything else kept in that folder is not carried
over: an adapter folder belongs to its adapter.
"""

import json
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from . import adapters
from .atomic import atomic_dir, readable_dir
from .checks import DEFAULT_ADAPTER, check_adapter_name
from .inject import (ALL_LINEAR, LoraConfig, _infer_task_type, _nearest, apply, check_can_add, plan_targets,
                     resolve_modules_to_save)
from .layer import lora_layers

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
PREFIX = "base_model.model."
LORA_LEAVES = ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector")   # per adapted module
UNSUPPORTED = {"fan_in_fan_out": False, "bias": "none", "lora_bias": False,
               "rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": None, "exclude_modules": None,
               "target_parameters": None, "use_qalora": False, "trainable_token_indices": None}


def _resolve_name(model: nn.Module, adapter_name: str | None) -> str:
    """`adapter_name`, checked; None: the model's only adapter."""
    reg = adapters.registry(model)
    if adapter_name is None:
        if len(reg.configs) > 1:
            raise ValueError(f"the model has several adapters {list(reg.configs)}: pass adapter_name=... (one of them)")
        return next(iter(reg.configs))
    adapters.check_known(reg, adapter_name)
    return adapter_name


def adapter_state_dict(model: nn.Module, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
    """One adapter's tensors under PEFT's names: LoRA A/B (+ DoRA's magnitude) for each layer it adapts,
    its modules_to_save in full. adapter_name=None: the model's only adapter."""
    name = _resolve_name(model, adapter_name)
    sd = {}
    for path, layer in lora_layers(model):
        if layer.has_adapter(name):
            slot = layer.adapter(name)
            sd[f"{PREFIX}{path}.lora_A.weight"] = slot.lora_A.weight.detach()   # (r, in)
            sd[f"{PREFIX}{path}.lora_B.weight"] = slot.lora_B.weight.detach()   # (out, r)
            if slot.use_dora:
                sd[f"{PREFIX}{path}.lora_magnitude_vector"] = slot.lora_magnitude_vector.detach()   # (out,)
    sd.update({PREFIX + k: t for k, t in adapters.saved_values(model, name).items()})
    return sd


def _config_json(model: nn.Module, config: LoraConfig, base_model_name_or_path) -> dict:
    targets = sorted(config.target_names) if config.target_modules == ALL_LINEAR else config.target_modules
    name = base_model_name_or_path or config.base_model_name_or_path or getattr(model, "name_or_path", None)
    alpha = int(config.lora_alpha) if float(config.lora_alpha).is_integer() else config.lora_alpha
    return {"peft_type": "LORA", "r": config.r, "lora_alpha": alpha, "lora_dropout": config.lora_dropout,
            "target_modules": targets, "modules_to_save": config.modules_to_save, "use_rslora": config.use_rslora,
            "use_dora": config.use_dora, "task_type": config.task_type,
            "base_model_name_or_path": str(name) if name else None, "inference_mode": True,
            "init_lora_weights": True, "revision": None, "layers_pattern": None, **UNSUPPORTED}


def _folders(model: nn.Module, adapter_name: str | None) -> dict[str, str]:
    """adapter -> sub-folder ('' = the folder itself): one adapter at the top, several as PEFT lays them out."""
    names = list(adapters.registry(model).configs)
    if adapter_name is not None or len(names) == 1:
        return {_resolve_name(model, adapter_name): ""}
    return {n: "" if n == DEFAULT_ADAPTER else n for n in names}


def _is_adapter_folder(directory: Path) -> bool:
    return (directory / CONFIG_NAME).is_file() or any((p / CONFIG_NAME).is_file() for p in directory.iterdir())


def save(model: nn.Module, directory, base_model_name_or_path: str | None = None, *,
         adapter_name: str | None = None, extra_files: dict[str, str | bytes] | None = None) -> Path:
    """Writes adapter_model.safetensors + adapter_config.json (+ `extra_files`, name -> text or bytes) as the
    folder `directory`, replacing what was there as a whole (see the module note).

    adapter_name: that adapter alone, as the folder itself. None: the model's only adapter, or, with several,
    all of them in PEFT's layout ("default" at the top, the others in sub-folders named after them)."""
    folders = _folders(model, adapter_name)
    configs = adapters.registry(model).configs
    payload = {sub: ({k: v.to("cpu").contiguous().clone() for k, v in adapter_state_dict(model, n).items()},
                     _config_json(model, configs[n], base_model_name_or_path)) for n, sub in folders.items()}
    directory = Path(directory)
    if directory.is_dir() and any(directory.iterdir()) and not _is_adapter_folder(directory):
        raise ValueError(f"{directory} is a folder that holds other files and no {CONFIG_NAME}: saving would replace "
                         "it as a whole; choose a new or an adapter folder")
    with atomic_dir(directory) as tmp:
        for sub, (tensors, meta) in payload.items():
            (tmp / sub).mkdir(exist_ok=True)
            save_file(tensors, tmp / sub / WEIGHTS_NAME, metadata={"format": "pt"})
            (tmp / sub / CONFIG_NAME).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        for name, data in (extra_files or {}).items():
            if Path(name).name != name or name in (WEIGHTS_NAME, CONFIG_NAME, *payload):
                raise ValueError(f"extra_files: {name!r} must be a plain file name other than the adapter's own")
            (tmp / name).write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    return directory


def read_adapter(directory) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """Reads and validates an adapter folder; errors name the file and what is wrong with it."""
    directory = readable_dir(directory)   # the old version while a killed save is not yet recovered
    if not directory.is_dir():
        raise FileNotFoundError(f"adapter directory {str(directory)!r} does not exist")
    config = _read_config(directory / CONFIG_NAME)
    path = directory / WEIGHTS_NAME
    if not path.is_file():
        present = sorted(p.name for p in directory.iterdir())
        raise FileNotFoundError(f"{path} is missing (the folder holds {present}); adapters are read from "
                                f"{WEIGHTS_NAME} only")
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ValueError(f"{path} is corrupt or not a safetensors file: {e}") from None
    check_finite(path, tensors)
    return config, tensors


def check_finite(path, tensors: dict[str, torch.Tensor]) -> None:
    """A ValueError naming the file and the first tensor that holds NaN or Inf (weights read from `path`)."""
    for key, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise ValueError(f"{path}: tensor {key!r} holds NaN or Inf values; refusing to load it")


def _read_config(path: Path) -> LoraConfig:
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; is {path.parent} an adapter folder written by "
                                "lora.save or PEFT's save_pretrained?")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is corrupt (not valid JSON: {e})") from None
    if not isinstance(raw, dict) or raw.get("peft_type") != "LORA":
        kind = raw.get("peft_type") if isinstance(raw, dict) else type(raw).__name__
        raise ValueError(f"{path}: peft_type is {kind!r}; only LoRA adapters ('LORA') can be loaded")
    missing = [k for k in ("r", "lora_alpha", "target_modules") if raw.get(k) is None]
    if missing:
        raise ValueError(f"{path} lacks required field(s) {missing}")
    odd = {k: raw[k] for k, ok in UNSUPPORTED.items() if raw.get(k) not in (None, ok)}
    if odd:
        raise ValueError(f"{path} uses LoRA features this library does not implement: {odd}")
    try:
        return LoraConfig(r=raw["r"], lora_alpha=raw["lora_alpha"], lora_dropout=raw.get("lora_dropout", 0.0),
                          target_modules=raw["target_modules"], modules_to_save=raw.get("modules_to_save"),
                          use_rslora=raw.get("use_rslora") or False, use_dora=raw.get("use_dora") or False,
                          task_type=raw.get("task_type"),
                          base_model_name_or_path=raw.get("base_model_name_or_path"))
    except (ValueError, TypeError) as e:
        raise ValueError(f"{path}: {e}") from None


def _expected_shapes(model: nn.Module, targets: list[str], saved: list[str], config: LoraConfig) -> dict[str, tuple]:
    modules, shapes = dict(model.named_modules()), {}
    for name in targets:
        m = modules[name]
        shapes[f"{PREFIX}{name}.lora_A.weight"] = (config.r, m.in_features)
        shapes[f"{PREFIX}{name}.lora_B.weight"] = (m.out_features, config.r)
        if config.use_dora:
            shapes[f"{PREFIX}{name}.lora_magnitude_vector"] = (m.out_features,)
    for name in saved:
        for key, t in modules[name].state_dict().items():
            shapes[f"{PREFIX}{name}.{key}"] = tuple(t.shape)
    return shapes


def _check_tensors(tensors: dict, shapes: dict, where: str) -> None:
    missing = sorted(set(shapes) - set(tensors))
    unexpected = sorted(set(tensors) - set(shapes))
    bad = [f"{k}: file {tuple(tensors[k].shape)} vs model {shapes[k]}" for k in sorted(set(tensors) & set(shapes))
           if tuple(tensors[k].shape) != shapes[k]]
    problems = []
    if missing:
        problems.append(f"{len(missing)} tensor(s) the model expects are missing from the file, e.g. {missing[:3]}")
    if unexpected:
        hint = _nearest(unexpected[0], sorted(shapes))
        problems.append(f"{len(unexpected)} tensor(s) in the file match no module of the model, "
                        f"e.g. {unexpected[:3]} (nearest expected: {hint})")
    if bad:
        problems.append(f"{len(bad)} shape mismatch(es): {'; '.join(bad[:3])}")
    if problems:
        raise ValueError(f"adapter {where} does not fit this model: " + " | ".join(problems))


def load(model: nn.Module, directory, adapter_name: str = DEFAULT_ADAPTER) -> nn.Module:
    """Loads an adapter (ours or PEFT's) into `model` as `adapter_name`: into a plain model (injected first with
    the saved config; it becomes active), beside the adapters already there (inactive until lora.set_adapter),
    or over the weights of the adapter of that name (same r / alpha / targets).

    Everything is checked before the model changes: on error a plain model stays plain and an
    injected model keeps its current adapters and weights.
    """
    check_adapter_name(adapter_name)
    config, tensors = read_adapter(directory)
    reg = adapters.find_registry(model)
    if reg is not None and adapter_name in reg.configs:
        have = reg.configs[adapter_name]
        _check_compatible(have, config, directory, adapter_name)
        adapters.check_not_merged(model, f"load over adapter {adapter_name!r}")   # unmerge would subtract the new
        targets = [n for n, m in lora_layers(model) if m.has_adapter(adapter_name)]
        _check_tensors(tensors, _expected_shapes(model, targets, reg.saved[adapter_name], have), str(directory))
    else:
        check_can_add(model, adapter_name)
        # PEFT writes both 'classifier' and 'score' for SEQ_CLS; keep the ones this model has.
        saved = resolve_modules_to_save(model, config.modules_to_save, strict=False)
        targets = plan_targets(model, config, saved)
        _check_tensors(tensors, _expected_shapes(model, targets, saved, config), str(directory))
        config.task_type = config.task_type or _infer_task_type(model, targets)
        apply(model, config, targets, saved, adapter_name)
    _copy_in(model, adapter_name, tensors)
    return model


def _check_compatible(have: LoraConfig, file: LoraConfig, directory, adapter_name: str) -> None:
    for field in ("r", "lora_alpha", "use_rslora", "use_dora"):
        a, b = getattr(have, field), getattr(file, field)
        if a != b:
            raise ValueError(f"adapter {str(directory)!r} has {field}={b!r} but the model was injected with "
                             f"{field}={a!r} for adapter {adapter_name!r}; load it into a fresh (not injected) model "
                             f"or under another adapter_name, or inject with {field}={b!r}")


def _split_key(path: str) -> tuple[str | None, str | None]:
    """'m.q_proj.lora_A.weight' -> ('m.q_proj', 'lora_A.weight'); (None, None) for a modules_to_save tensor."""
    for leaf in LORA_LEAVES:
        if path.endswith("." + leaf):
            return path[:-len(leaf) - 1], leaf
    return None, None


@torch.no_grad()
def _copy_in(model: nn.Module, adapter_name: str, tensors: dict[str, torch.Tensor]) -> None:
    layers, heads = dict(lora_layers(model)), {}
    saved = adapters.registry(model).saved[adapter_name]
    for key, t in tensors.items():
        path = key[len(PREFIX):]
        module, leaf = _split_key(path)
        if module in layers:
            slot = layers[module].adapter(adapter_name)
            target = {"lora_A.weight": slot.lora_A.weight, "lora_B.weight": slot.lora_B.weight,
                      "lora_magnitude_vector": slot.lora_magnitude_vector}[leaf]
            target.copy_(t.to(device=target.device, dtype=target.dtype))
            continue
        owner = next(m for m in saved if path.startswith(m + "."))
        heads.setdefault(owner, {})[path[len(owner) + 1:]] = t
    for owner, values in heads.items():
        adapters.write_saved(model, adapter_name, owner, values)
