"""Several adapters on one base, by name (PEFT's adapter names): which exist, which are active.

    lora.inject(model, r=8)                                  # adapter "default", active
    lora.load(model, "runs/sst2/adapter", adapter_name="sst2")   # beside it, inactive; the base is held once
    lora.set_adapter(model, "sst2")                          # forward uses sst2 only
    lora.set_adapter(model, ["default", "sst2"])             # both: their updates add
    lora.delete_adapter(model, "default")

The model keeps a `Registry` at `model.lora_registry`: each adapter's LoraConfig (r, alpha, targets: all per
adapter), the full names of its modules_to_save, and the active list. `model.lora_config` stays the
config of "default" (or of the first adapter when there is no "default"), for single-adapter code.

Rules (PEFT's where it has one)
- The first adapter a model gets is active; adapters added later are inactive (and frozen) until
  set_adapter. set_adapter makes the active adapters' weights trainable and freezes the others.
- Adapters may target different modules and have their own r / alpha / DoRA; a layer that lacks an active
  adapter runs without it, so each adapter active alone gives exactly its outputs when loaded alone.
- modules_to_save (e.g. a classifier head) are trained in full per adapter. The module in the model holds
  the values of the active adapter that owns it, or the base's when no active adapter does; the other
  copies wait on the CPU in `Registry.stash` and are swapped in by set_adapter (so the state-dict keys stay
  `classifier.weight`). Two active adapters cannot both own the same module: set_adapter refuses.
- delete_adapter(active one): the others of the active list stay active, or, if none, the first remaining
  adapter (in the order added) becomes active, as PEFT does. Deleting the only adapter is refused (fold it
  in with lora.merge_and_unload, or reload the base model). Layers left without any adapter are unwrapped.
- Adding, deleting or switching adapters while merged is refused: lora.unmerge(model) first.
"""

from dataclasses import dataclass, field

import torch
import torch.nn as nn
from torch import Tensor

from .checks import DEFAULT_ADAPTER, describe
from .layer import adapter_parameters, lora_layers

BASE = "__base__"      # the owner of a modules_to_save module's original values in the stash


@dataclass
class Registry:
    configs: dict = field(default_factory=dict)     # name -> LoraConfig, in the order added
    saved: dict = field(default_factory=dict)       # name -> full names of its modules_to_save
    active: list = field(default_factory=list)      # the adapters forward uses; their updates add
    stash: dict = field(default_factory=dict)       # owner -> module name -> {key: CPU tensor}, not live now


def find_registry(model: nn.Module) -> Registry | None:
    reg = getattr(model, "lora_registry", None)
    return reg if isinstance(reg, Registry) and reg.configs and lora_layers(model) else None


def registry(model: nn.Module) -> Registry:
    reg = find_registry(model)
    if reg is None:
        raise ValueError("the model has no LoRA adapters: call lora.inject(model, ...) or lora.load(model, dir)")
    return reg


def adapter_names(model: nn.Module) -> list[str]:
    """The model's adapters, in the order they were added."""
    return list(registry(model).configs)


def active_adapters(model: nn.Module) -> list[str]:
    return list(registry(model).active)


def check_known(reg: Registry, name) -> None:
    if name not in reg.configs:
        raise ValueError(f"unknown adapter {name!r}; the model has {list(reg.configs)}")


def check_not_merged(model: nn.Module, what: str) -> None:
    merged = [n for n, m in lora_layers(model) if m.merged]
    if merged:
        raise ValueError(f"cannot {what} while adapters are merged into the base weights (e.g. {merged[0]!r}); "
                         "call lora.unmerge(model) first")


def check_disjoint(model: nn.Module, targets: list[str], saved: list[str]) -> None:
    """Across adapters a module is adapted (LoRA) or trained in full (modules_to_save), never both."""
    reg = find_registry(model)
    if reg is None:
        return
    owned, wrapped = _owned(reg), [n for n, _ in lora_layers(model)]
    clash = [(t, m) for t in targets for m in owned if t == m or t.startswith(m + ".")]
    clash += [(w, s) for s in saved for w in wrapped if w == s or w.startswith(s + ".")]
    if clash:
        raise ValueError(f"{clash[0][0]!r} is adapted (LoRA) by one adapter and inside {clash[0][1]!r}, which "
                         "another saves in full (modules_to_save); a module can be one or the other across the "
                         "adapters of a model: change the targets or modules_to_save")


def _sync(model: nn.Module, reg: Registry) -> None:
    model.lora_config = reg.configs.get(DEFAULT_ADAPTER) or next(iter(reg.configs.values()))


# --- modules_to_save: one live copy, the others in the stash -------------------------------------------

def _owner(reg: Registry, module: str, active: list[str]) -> str:
    owners = [n for n in active if module in reg.saved[n]]
    if len(owners) > 1:
        raise ValueError(f"adapters {owners} each train their own copy of {module!r} (modules_to_save), and one "
                         "module holds one copy: activate one of them at a time")
    return owners[0] if owners else BASE


def _owned(reg: Registry) -> list[str]:
    return sorted({m for names in reg.saved.values() for m in names})


def _cpu_copy(module: nn.Module) -> dict[str, Tensor]:
    return {k: t.detach().to("cpu", copy=True) for k, t in module.state_dict().items()}


def _switch_heads(model: nn.Module, reg: Registry, active: list[str]) -> None:
    """Puts into each modules_to_save module the copy its owner under `active` trained; trainable iff owned."""
    owners = {m: (_owner(reg, m, reg.active), _owner(reg, m, active)) for m in _owned(reg)}   # raises first
    modules = dict(model.named_modules())
    for name, (old, new) in owners.items():
        module = modules[name]
        if old != new:
            reg.stash.setdefault(old, {})[name] = _cpu_copy(module)
            module.load_state_dict(reg.stash[new].pop(name))         # copies in place: optimizers keep their tensors
        for p in module.parameters():
            p.requires_grad_(new != BASE)


def register(model: nn.Module, name: str, config, saved: list[str]) -> None:
    """Records adapter `name`, whose layers are already added. The first adapter becomes active and its
    modules_to_save trainable (their original values stashed); a later one gets a copy of the originals."""
    reg = find_registry(model)
    first = reg is None
    if first:
        reg = model.lora_registry = Registry()
    modules = dict(model.named_modules())
    for module in saved:
        live = _owner(reg, module, reg.active) if not first else BASE
        base = _cpu_copy(modules[module]) if live == BASE else reg.stash[BASE][module]
        if first:
            reg.stash.setdefault(BASE, {})[module] = base
            modules[module].requires_grad_(True)
        else:
            reg.stash.setdefault(name, {})[module] = {k: t.clone() for k, t in base.items()}
    reg.configs[name], reg.saved[name] = config, list(saved)
    if first:
        reg.active = [name]
    _sync(model, reg)


def saved_values(model: nn.Module, name: str) -> dict[str, Tensor]:
    """Adapter `name`'s modules_to_save tensors under their full names ("classifier.weight")."""
    reg, modules, out = registry(model), dict(model.named_modules()), {}
    for module in reg.saved[name]:
        live = _owner(reg, module, reg.active) == name
        tensors = modules[module].state_dict() if live else reg.stash[name][module]
        out.update({f"{module}.{k}": t.detach() for k, t in tensors.items()})
    return out


@torch.no_grad()
def write_saved(model: nn.Module, name: str, module: str, tensors: dict[str, Tensor]) -> None:
    """Copies `tensors` ({key: tensor}) into adapter `name`'s copy of modules_to_save module `module`."""
    reg = registry(model)
    live = _owner(reg, module, reg.active) == name
    target = model.get_submodule(module).state_dict() if live else reg.stash[name][module]
    for key, t in tensors.items():
        target[key].copy_(t.to(device=target[key].device, dtype=target[key].dtype))


# --- the public verbs -------------------------------------------------------------------------------------

def _check_names(reg: Registry, names) -> list[str]:
    names = [names] if isinstance(names, str) else names
    if not (isinstance(names, (list, tuple)) and names and all(isinstance(n, str) for n in names)):
        raise ValueError(f"set_adapter takes an adapter name or a non-empty list of names (e.g. 'sst2' or "
                         f"['default', 'sst2']); got {describe(names)}")
    for n in names:
        check_known(reg, n)
    if len(set(names)) != len(names):
        raise ValueError(f"set_adapter: {list(names)} names an adapter twice")
    return list(names)


def set_adapter(model: nn.Module, names) -> nn.Module:
    """Makes `names` (one name, or a list whose updates add) the active adapters; they train, the rest freeze."""
    reg = registry(model)
    names = _check_names(reg, names)
    check_not_merged(model, "switch adapters")
    _switch_heads(model, reg, names)
    for _, layer in lora_layers(model):
        layer.active_adapters = list(names)
        for n in layer.adapter_names:
            for p in adapter_parameters(layer.adapter(n)):
                p.requires_grad_(n in names)
    reg.active = names
    return model


def delete_adapter(model: nn.Module, name: str) -> nn.Module:
    """Removes adapter `name` (see the module docstring for the active and the only adapter)."""
    reg = registry(model)
    check_known(reg, name)
    if len(reg.configs) == 1:
        raise ValueError(f"cannot delete {name!r}: it is the model's only adapter. lora.merge_and_unload(model) "
                         "folds it into the base; to drop it, load the base model again")
    check_not_merged(model, f"delete adapter {name!r}")
    if name in reg.active:
        rest = [n for n in reg.active if n != name]
        set_adapter(model, rest or [next(n for n in reg.configs if n != name)])
    for path, layer in lora_layers(model):
        if layer.has_adapter(name):
            layer.delete_adapter(name)
            if not layer.adapter_names:                            # nothing left to add: unwrap
                parent, _, child = path.rpartition(".")
                setattr(model.get_submodule(parent), child, layer.base_layer)
    reg.stash.pop(name, None)
    del reg.configs[name], reg.saved[name]
    owned = set(_owned(reg))
    reg.stash[BASE] = {m: t for m, t in reg.stash.get(BASE, {}).items() if m in owned}   # unowned: live is base
    _sync(model, reg)
    return model
