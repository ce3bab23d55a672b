"""Checkpoints for resuming a run: written whole or not at all, read without pickle, found after any crash.

    out_dir/
      checkpoint-000120/           one complete checkpoint (older ones are removed once a newer one is complete)
        trainable.safetensors      the trainable parameters, under their model names
        optimizer.safetensors      AdamW's per-parameter tensors (state.<i>.exp_avg, ...); param_groups as JSON
                                   in the file's metadata
        rng_state.json             torch / CUDA / numpy / python RNG states as plain numbers
        trainer_state.json         step, elapsed time, the run's settings, the log rows
      latest                       the name of the newest checkpoint (a hint: see latest_checkpoint)

Nothing is unpickled: a checkpoint folder handed over by someone else can hold wrong numbers, never code.
A folder is written under a temp name, fsynced and renamed into place (lora.atomic), so `checkpoint-N` exists
only complete; `latest` moves after that and older checkpoints go last. A kill at any moment leaves at least
one complete checkpoint, and `latest_checkpoint` finds the newest one even if `latest` is lost or stale.

Resuming continues the same run or refuses: the settings that decide the batches and the updates (data size,
batch size, accumulation, seed, lr and schedule, weight decay, clipping, precision, epochs / max_steps) are
stored and compared, and a difference is an error that names the setting and both values.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from lora.atomic import atomic_dir, atomic_write
from lora.io import check_finite

FILES = ("trainable.safetensors", "optimizer.safetensors", "rng_state.json", "trainer_state.json")
_NAME = re.compile(r"checkpoint-(\d+)")


def save_checkpoint(out: Path, model, optimizer, rng: dict, state: dict) -> Path:
    """Writes out/checkpoint-STEP as a whole, points out/latest at it, then removes older checkpoints.

    state: JSON-able, with "step"; the loop adds "elapsed_s", "run" (the settings a resume must share) and
    "rows" (the log so far).
    """
    out = Path(out)
    final = out / f"checkpoint-{state['step']:06d}"
    trainable = {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}
    opt_tensors, opt_meta = _optimizer_to_tensors(optimizer)
    with atomic_dir(final) as tmp:
        save_file(trainable, tmp / "trainable.safetensors")
        save_file(opt_tensors, tmp / "optimizer.safetensors", metadata=opt_meta)
        (tmp / "rng_state.json").write_text(json.dumps(_rng_to_json(rng)))
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1))
    atomic_write(out / "latest", final.name)
    for old in out.glob("checkpoint-*"):
        if old != final and _NAME.fullmatch(old.name):
            shutil.rmtree(old, ignore_errors=True)
    for left in out.glob(".checkpoint-*"):         # temp or old-version folders of killed saves of other steps
        shutil.rmtree(left, ignore_errors=True)
    return final


def latest_checkpoint(out: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint in `out`, or None when there is none.

    `latest` names it; when that pointer is missing, unreadable or names a folder that is gone (a crash, a
    copy that left it out), the complete checkpoint folder with the highest step is taken instead.
    """
    out = Path(out)
    pointer = out / "latest"
    if pointer.is_file():
        try:
            named = out / pointer.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError):
            named = None
        if named is not None and _NAME.fullmatch(named.name) and _is_complete(named):
            return named
    found = sorted((int(m.group(1)), p) for p in out.glob("checkpoint-*")
                   if (m := _NAME.fullmatch(p.name)) and _is_complete(p))
    return found[-1][1] if found else None


def resume_point(out: str | os.PathLike) -> Path | None:
    """latest_checkpoint(out) for resume=True; None for a fresh out_dir, an error when there are traces of a
    checkpoint (a `latest` pointer, a checkpoint folder) but none is complete: never a silent restart."""
    found = latest_checkpoint(out)
    out = Path(out)
    if found is None and ((out / "latest").exists() or any(out.glob("checkpoint-*"))):
        present = sorted(p.name for p in out.iterdir())
        raise ValueError(f"{out} holds no complete checkpoint to resume from (found {present}): "
                         "resume=False starts the run over; nothing was deleted")
    return found


def load_checkpoint(path: Path, model, optimizer, run: dict) -> dict:
    """Restores trainable parameters, AdamW state and RNG states; returns the trainer state.

    `run` is this run's settings; the checkpoint's must be the same (see the module note).
    """
    path = Path(path)
    _refuse_legacy(path)
    state = _read_json(path / "trainer_state.json")
    if not isinstance(state, dict) or not {"step", "run", "rows"} <= set(state):
        raise ValueError(f"{path / 'trainer_state.json'} lacks step/run/rows: not a checkpoint of this library")
    _check_same_run(path, state["run"], run)
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    tensors = _read_safetensors(path / "trainable.safetensors")
    if set(tensors) != set(named):
        raise ValueError(f"{path / 'trainable.safetensors'} holds trainable parameters "
                         f"{sorted(set(tensors) ^ set(named))[:5]} that do not match the model's: build the "
                         "model the same way (same targets, r, modules_to_save)")
    check_finite(path / "trainable.safetensors", tensors)
    with torch.no_grad():
        for name, p in named.items():
            p.copy_(tensors[name])
    optimizer.load_state_dict(_optimizer_from_file(path / "optimizer.safetensors"))
    set_rng_state(_rng_from_json(_read_json(path / "rng_state.json"), path / "rng_state.json"))
    return state


def _check_same_run(path: Path, saved: dict, run: dict) -> None:
    changed = [f"{k}: checkpoint {saved.get(k)!r}, now {v!r}" for k, v in run.items() if saved.get(k) != v]
    if changed:
        raise ValueError(f"{path} was written by a run with other settings ({'; '.join(changed)}): resuming would "
                         "not continue that run. Use the same settings, or resume=False (or another out_dir) to "
                         "start over")


def _is_complete(folder: Path) -> bool:
    return folder.is_dir() and all((folder / f).is_file() for f in FILES)


def _refuse_legacy(path: Path) -> None:
    legacy = [f for f in ("optimizer.pt", "rng_state.pt") if (path / f).exists()]
    if legacy:
        raise ValueError(f"{path} holds {legacy}, pickle files of an older checkpoint format, which are never "
                         "loaded (unpickling can run code): start over with resume=False")


# ----------------------------------------------------------------------------- optimizer state as tensors

def _optimizer_to_tensors(optimizer) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """AdamW's state_dict as safetensors: tensors under state.<param index>.<key>, the rest as JSON strings."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, entry in sd["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{index}.{key}"] = value.detach().contiguous().cpu()
            else:
                scalars[f"{index}.{key}"] = value
    try:
        meta = {"param_groups": json.dumps(sd["param_groups"]), "scalars": json.dumps(scalars)}
    except TypeError as e:
        raise TypeError(f"the optimizer's param_groups are not plain numbers/strings ({e}); checkpoints store "
                        "them as JSON") from None
    return tensors, meta


def _optimizer_from_file(path: Path) -> dict:
    """The state_dict back; load_state_dict moves each tensor to its parameter's device and dtype."""
    tensors = _read_safetensors(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        groups, scalars = json.loads(meta["param_groups"]), json.loads(meta["scalars"])
    except (KeyError, json.JSONDecodeError, SafetensorError) as e:
        raise ValueError(f"{path}: its metadata lacks valid param_groups/scalars ({e}); the file is damaged") from None
    state: dict[int, dict] = {}
    for key, t in tensors.items():
        index, name = key.removeprefix("state.").split(".", 1)
        state.setdefault(int(index), {})[name] = t
    for key, value in scalars.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    return {"state": state, "param_groups": groups}


# ----------------------------------------------------------------------------- RNG states as numbers

def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)                 # CUDA too


def _rng_to_json(state: dict) -> dict:
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    version, internal, gauss_next = state["python"]
    return {"torch": state["torch"].tolist(),
            "cuda": None if state["cuda"] is None else [t.tolist() for t in state["cuda"]],
            "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(gauss)],
            "python": [version, list(internal), gauss_next]}


def _rng_from_json(raw, path: Path) -> dict:
    try:
        kind, keys, pos, has_gauss, gauss = raw["numpy"]
        version, internal, gauss_next = raw["python"]
        return {"torch": torch.tensor(raw["torch"], dtype=torch.uint8),
                "cuda": None if raw["cuda"] is None else [torch.tensor(t, dtype=torch.uint8) for t in raw["cuda"]],
                "numpy": (kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss),
                "python": (version, tuple(internal), gauss_next)}
    except (KeyError, TypeError, ValueError, OverflowError) as e:
        raise ValueError(f"{path} does not hold valid RNG states ({type(e).__name__}: {e})") from None


# ----------------------------------------------------------------------------- reading with named errors

def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} is missing: the checkpoint folder is incomplete") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is corrupt or truncated (not valid JSON: {e})") from None


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} is missing: the checkpoint folder is incomplete") from None
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ValueError(f"{path} is corrupt or truncated (not a readable safetensors file: {e})") from None
