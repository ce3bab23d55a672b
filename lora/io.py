"""Saving and loading adapters in PEFT's on-disk format.

    adapter_dir/
      adapter_config.json          peft_type "LORA", r, lora_alpha, target_modules, ... (PEFT's LoraConfig)
      adapter_model.safetensors    base_model.model.<module path>.lora_A.weight   (r, in)   fp32
                                   base_model.model.<module path>.lora_B.weight   (out, r)  fp32
                                   base_model.model.<modules_to_save path>.<param>  full tensors

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

from .atomic import atomic_dir, readable_dir
from .inject import (ALL_LINEAR, LoraConfig, _infer_task_type, _nearest, apply, lora_layers, plan_targets,
                     resolve_modules_to_save)

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
PREFIX = "base_model.model."
UNSUPPORTED = {"use_dora": False, "fan_in_fan_out": False, "bias": "none", "lora_bias": False,
               "rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": None, "exclude_modules": None,
               "target_parameters": None, "use_qalora": False, "trainable_token_indices": None}


def _require_config(model: nn.Module) -> LoraConfig:
    config = getattr(model, "lora_config", None)
    if not isinstance(config, LoraConfig) or not lora_layers(model):
        raise ValueError("the model has no LoRA adapters: call lora.inject(model, ...) or lora.load(model, dir)")
    return config


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors under PEFT's names: LoRA A/B for each adapted layer, modules_to_save in full."""
    config = _require_config(model)
    sd = {}
    for name, layer in lora_layers(model):
        sd[f"{PREFIX}{name}.lora_A.weight"] = layer.lora_A.weight.detach()   # (r, in)
        sd[f"{PREFIX}{name}.lora_B.weight"] = layer.lora_B.weight.detach()   # (out, r)
    modules = dict(model.named_modules())
    for name in resolve_modules_to_save(model, config.modules_to_save, strict=False):
        for key, t in modules[name].state_dict().items():
            sd[f"{PREFIX}{name}.{key}"] = t.detach()
    return sd


def _config_json(model: nn.Module, config: LoraConfig, base_model_name_or_path) -> dict:
    targets = config.target_modules
    if targets == ALL_LINEAR:
        targets = sorted(n for n, _ in lora_layers(model))
    name = base_model_name_or_path or config.base_model_name_or_path or getattr(model, "name_or_path", None)
    alpha = int(config.lora_alpha) if float(config.lora_alpha).is_integer() else config.lora_alpha
    return {"peft_type": "LORA", "r": config.r, "lora_alpha": alpha, "lora_dropout": config.lora_dropout,
            "target_modules": targets, "modules_to_save": config.modules_to_save, "use_rslora": config.use_rslora,
            "task_type": config.task_type, "base_model_name_or_path": str(name) if name else None,
            "inference_mode": True, "init_lora_weights": True, "revision": None, "layers_pattern": None,
            **UNSUPPORTED}


def save(model: nn.Module, directory, base_model_name_or_path: str | None = None, *,
         extra_files: dict[str, str | bytes] | None = None) -> Path:
    """Writes adapter_model.safetensors + adapter_config.json (+ `extra_files`, name -> text or bytes) as the
    folder `directory`, replacing what was there as a whole (see the module note)."""
    config = _require_config(model)
    tensors = {k: v.to("cpu").contiguous().clone() for k, v in adapter_state_dict(model).items()}
    meta = _config_json(model, config, base_model_name_or_path)
    directory = Path(directory)
    if directory.is_dir() and any(directory.iterdir()) and not (directory / CONFIG_NAME).is_file():
        raise ValueError(f"{directory} is a folder that holds other files and no {CONFIG_NAME}: saving would replace "
                         "it as a whole; choose a new or an adapter folder")
    with atomic_dir(directory) as tmp:
        save_file(tensors, tmp / WEIGHTS_NAME, metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        for name, data in (extra_files or {}).items():
            if Path(name).name != name or name in (WEIGHTS_NAME, CONFIG_NAME):
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
                          use_rslora=raw.get("use_rslora") or False, task_type=raw.get("task_type"),
                          base_model_name_or_path=raw.get("base_model_name_or_path"))
    except (ValueError, TypeError) as e:
        raise ValueError(f"{path}: {e}") from None


def _expected_shapes(model: nn.Module, targets: list[str], saved: list[str], r: int) -> dict[str, tuple]:
    modules, shapes = dict(model.named_modules()), {}
    for name in targets:
        m = modules[name]
        shapes[f"{PREFIX}{name}.lora_A.weight"] = (r, m.in_features)
        shapes[f"{PREFIX}{name}.lora_B.weight"] = (m.out_features, r)
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


def load(model: nn.Module, directory) -> nn.Module:
    """Loads an adapter (ours or PEFT's) into `model`; a plain model is first injected with the saved config.

    Everything is checked before the model changes: on error a plain model stays plain and an
    injected model keeps its current adapter weights.
    """
    config, tensors = read_adapter(directory)
    existing = getattr(model, "lora_config", None)
    if lora_layers(model):
        _check_compatible(_require_config(model), config, directory)
        saved = resolve_modules_to_save(model, existing.modules_to_save, strict=False)
        targets = [n for n, _ in lora_layers(model)]
        _check_tensors(tensors, _expected_shapes(model, targets, saved, existing.r), str(directory))
    else:
        # PEFT writes both 'classifier' and 'score' for SEQ_CLS; keep the ones this model has.
        saved = resolve_modules_to_save(model, config.modules_to_save, strict=False)
        targets = plan_targets(model, config, saved)
        _check_tensors(tensors, _expected_shapes(model, targets, saved, config.r), str(directory))
        config.task_type = config.task_type or _infer_task_type(model, targets)
        apply(model, config, targets, saved)
    _copy_in(model, tensors)
    return model


def _check_compatible(have: LoraConfig, file: LoraConfig, directory) -> None:
    for field in ("r", "lora_alpha", "use_rslora"):
        a, b = getattr(have, field), getattr(file, field)
        if a != b:
            raise ValueError(f"adapter {str(directory)!r} has {field}={b!r} but the model was injected with "
                             f"{field}={a!r}; load it into a fresh (not injected) model, or inject with {field}={b!r}")


@torch.no_grad()
def _copy_in(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    state = dict(model.named_parameters(remove_duplicate=False))   # tied weights under every name
    state.update(dict(model.named_buffers(remove_duplicate=False)))
    for key, t in tensors.items():
        target = state[key[len(PREFIX):]]
        target.copy_(t.to(device=target.device, dtype=target.dtype))
