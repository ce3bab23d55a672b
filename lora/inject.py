"""inject(): wrap a model's linear layers in LoRALinear, freeze the rest, count what trains.

Target selection follows PEFT, so an adapter_config.json means the same module set in both libraries:
- a list of names: module `name` is a target when `name == t` or `name.endswith("." + t)`;
- a string: a regex that must match the module's full name (re.fullmatch);
- "all-linear": every linear layer except the output head, i.e. `model.get_output_embeddings()` and
  anything named (or living under) `lm_head`, `classifier` or `score` (PEFT excludes the output
  embeddings always and the classifier heads for sequence classification; heads are usually trained in
  full through `modules_to_save`, not adapted).
A linear layer is nn.Linear or any module with in_features/out_features and a weight or dequantize(),
so 4-bit layers count without this package importing `quant`.

Modules under `modules_to_save` are never adapted (PEFT's rule); they stay trainable and are saved
in full. Everything else is frozen.

Injection is planned before it is applied: every check (ranges, targets that match nothing, non-linear
targets, a model that already has an adapter of that name) runs first, so a failed call leaves the model
untouched.

`use_dora=True` adds DoRA's trained magnitude per output row (lora.dora). `adapter_name` names the adapter
(PEFT's "default" unless given); a model that already has adapters gets a further one beside them, on the
modules its own targets select (wrapped ones included), inactive until lora.set_adapter (lora.adapters).
"""

import difflib
import math
import os
import re
from dataclasses import dataclass, field

import torch.nn as nn

from . import adapters
from .checks import (DEFAULT_ADAPTER, check_adapter_name, check_alpha, check_compute_dtype, check_dropout, check_rank,
                     check_use_dora, check_use_rslora, describe)
from .layer import LoRALinear, adapter_parameters, has_dense_weight, is_linear_like, is_quantized, lora_layers

ALL_LINEAR = "all-linear"
HEAD_NAMES = ("lm_head", "classifier", "score")


@dataclass
class LoraConfig:
    r: int = 8                                      # rank of the update B @ A
    lora_alpha: float = 16                          # scaling = lora_alpha / r (or / sqrt(r) with rsLoRA)
    lora_dropout: float = 0.05                      # dropout on the adapter's input only
    target_modules: list[str] | str = ALL_LINEAR    # name suffixes, a regex (full match), or "all-linear"
    modules_to_save: list[str] | None = None        # trained and saved in full, e.g. ["classifier"]
    use_rslora: bool = False                        # rank-stabilised scaling alpha / sqrt(r)
    use_dora: bool = False                          # DoRA: trained magnitude per output row (lora.dora)
    task_type: str | None = None                    # PEFT's task type ("CAUSAL_LM", "SEQ_CLS", ...)
    base_model_name_or_path: str | None = None      # written to adapter_config.json
    target_names: list[str] = field(default_factory=list)  # resolved full names of the adapted modules

    def __post_init__(self):
        # Also what lora.load builds from adapter_config.json, so the messages use the field (= JSON key) names.
        check_rank(self.r, "r")
        check_alpha(self.lora_alpha, "lora_alpha")
        check_dropout(self.lora_dropout, "lora_dropout")
        check_use_rslora(self.use_rslora)
        check_use_dora(self.use_dora)
        self.target_modules = _check_targets(self.target_modules, "target_modules")
        self.modules_to_save = _check_modules_to_save(self.modules_to_save)
        _check_metadata(self)

    @property
    def scaling(self) -> float:
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


def _check_metadata(config: LoraConfig) -> None:
    if not (config.task_type is None or isinstance(config.task_type, str)):
        raise ValueError(f"task_type must be PEFT's task type name (e.g. 'CAUSAL_LM', 'SEQ_CLS') or None; "
                         f"got {describe(config.task_type)}")
    if not (config.base_model_name_or_path is None or isinstance(config.base_model_name_or_path, (str, os.PathLike))):
        raise ValueError(f"base_model_name_or_path must be a str or path (written to adapter_config.json) or None; "
                         f"got {describe(config.base_model_name_or_path)}")
    if not (isinstance(config.target_names, list) and all(isinstance(n, str) for n in config.target_names)):
        raise ValueError(f"target_names must be a list of module names (str); got {describe(config.target_names)}")


def _check_targets(targets, name: str = "targets"):
    """'all-linear', a regex (compiled here, so a typo fails now) or a list of names; returns it normalised."""
    if isinstance(targets, str) and targets:
        if targets.lower() == ALL_LINEAR:
            return ALL_LINEAR
        try:
            re.compile(targets)
        except re.error as e:
            raise ValueError(f"{name} {targets!r} is not a valid regex ({e}); pass a list of module names "
                             f"such as ['q_proj', 'v_proj'], a regex, or 'all-linear'") from None
        return targets
    if not (isinstance(targets, (list, tuple, set)) and targets):
        raise ValueError(f"{name} must be a non-empty list of module names (e.g. ['q_proj', 'v_proj']), "
                         f"a regex string, or 'all-linear'; got {describe(targets)}")
    return _check_names(targets, name)


def _check_modules_to_save(names) -> list[str] | None:
    """None, or a list of module names (a single name is accepted and wrapped, as PEFT does)."""
    if names is None:
        return None
    names = [names] if isinstance(names, str) else names
    if not isinstance(names, (list, tuple, set)):
        raise ValueError(f"modules_to_save must be None or a list of module names (e.g. ['classifier']); "
                         f"got {describe(names)}")
    return _check_names(names, "modules_to_save")


def _check_names(names, name: str) -> list[str]:
    bad = [n for n in names if not (isinstance(n, str) and n)]
    if bad:   # named on its own: in a long list the repr would be cut before it
        raise ValueError(f"{name} entries must be module names (non-empty str, e.g. 'q_proj'); got {describe(bad[0])}")
    return list(names)


def _suffix_match(name: str, key: str) -> bool:
    return name == key or name.endswith("." + key)


def _under(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _nearest(key: str, names: list[str]) -> str:
    leaves = {n.rsplit(".", 1)[-1] for n in names}
    close = difflib.get_close_matches(key, sorted(leaves | set(names)), n=5, cutoff=0.4)
    return ", ".join(repr(c) for c in close) if close else "none close"


def _output_heads(model: nn.Module) -> list[str]:
    """Names of the output head(s) that "all-linear" leaves alone."""
    get_out = getattr(model, "get_output_embeddings", None)
    try:
        out_emb = get_out() if callable(get_out) else None
    except (NotImplementedError, AttributeError):
        out_emb = None
    return [n for n, m in model.named_modules()
            if n and (m is out_emb or n.rsplit(".", 1)[-1] in HEAD_NAMES)]


def resolve_modules_to_save(model: nn.Module, keys, strict: bool = True) -> list[str]:
    """Full names of the modules that `modules_to_save` keys select (suffix match, outermost only)."""
    names = [n for n, _ in model.named_modules() if n]
    found = []
    for key in keys or []:
        hits = [n for n in names if _suffix_match(n, key)]
        if not hits and strict:
            raise ValueError(f"modules_to_save entry {key!r} matches no module of {type(model).__name__}; "
                             f"nearest names: {_nearest(key, names)}")
        found += hits
    return sorted({n for n in found if not _under(n, [p for p in found if p != n])})


def _plannable(model: nn.Module) -> dict[str, nn.Module]:
    """The model's modules as the user named them: a LoRALinear stands for its base, its insides are hidden."""
    wrapped = [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    return {n: m for n, m in model.named_modules() if not any(n.startswith(w + ".") for w in wrapped)}


def _adaptable(module: nn.Module) -> bool:
    return is_linear_like(module) or isinstance(module, LoRALinear)


def plan_targets(model: nn.Module, config: LoraConfig, saved: list[str]) -> list[str]:
    """Full names of the linear layers to adapt (plain, or already wrapped for another adapter); raises
    (naming the problem) before anything changes."""
    modules = _plannable(model)
    if config.target_modules == ALL_LINEAR:
        skip = _output_heads(model) + saved
        hits = [n for n, m in modules.items() if n and _adaptable(m) and not _under(n, skip)]
        if not hits:
            raise ValueError(f"targets='all-linear' found no linear layer in {type(model).__name__} "
                             "(outside the output head and modules_to_save)")
        return _check_dora(config, hits, modules)
    hits = [n for n in _match_names(model, [n for n in modules if n], config.target_modules) if not _under(n, saved)]
    if not hits:
        raise ValueError(f"every module that targets {config.target_modules!r} selects lies inside modules_to_save "
                         f"{saved}, which are trained in full and never adapted; target other modules")
    for n in hits:
        _check_linear(n, modules[n])
    return _check_dora(config, hits, modules)


def _check_dora(config: LoraConfig, hits: list[str], modules: dict) -> list[str]:
    """DoRA needs each base's dense weight (for ||W + s·B·A||): a float weight or a dequantize()."""
    for n in hits if config.use_dora else []:
        base = modules[n].base_layer if isinstance(modules[n], LoRALinear) else modules[n]
        if not (has_dense_weight(base) or is_quantized(base)):
            raise ValueError(f"use_dora=True needs the weight of {n!r} ({type(base).__name__}) as a float [out, in] "
                             "tensor or through dequantize(); it has neither. Use use_dora=False for this layer")
    return hits


def _match_names(model: nn.Module, names: list[str], targets) -> list[str]:
    if isinstance(targets, str):
        hits = [n for n in names if re.fullmatch(targets, n)]
        if not hits:
            raise ValueError(f"target regex {targets!r} matches no module name (it must match the full name, "
                             f"e.g. r'.*\\.q_proj'); nearest names: {_nearest(targets, names)}")
        return hits
    hits = []
    for t in targets:
        t_hits = [n for n in names if _suffix_match(n, t)]
        if not t_hits:
            raise ValueError(f"target {t!r} matches no module of {type(model).__name__}; "
                             f"nearest names: {_nearest(t, names)}")
        hits += [n for n in t_hits if n not in hits]
    return hits


def _check_linear(name: str, module: nn.Module) -> None:
    if _adaptable(module):
        return
    kids = [c for c, m in module.named_modules() if c and is_linear_like(m)][:3]
    hint = f"; its linear children: {', '.join(kids)}" if kids else ""
    raise ValueError(f"target module {name!r} is a {type(module).__name__}, not a linear layer; LoRA wraps "
                     f"nn.Linear or 4-bit linear layers{hint}")


def _infer_task_type(model: nn.Module, targets: list[str]) -> str | None:
    cls = type(model).__name__
    if cls.endswith("ForCausalLM"):
        return "CAUSAL_LM"
    # PEFT's SEQ_CLS adds classifier/score to modules_to_save and then refuses to adapt them.
    if cls.endswith("ForSequenceClassification") and not any(_under(n, _output_heads(model)) for n in targets):
        return "SEQ_CLS"
    return None


def check_can_add(model: nn.Module, adapter_name: str) -> None:
    """Adding adapter `adapter_name`: a new name, an unmerged model, and LoRA layers that lora made."""
    existing = lora_layers(model)
    reg = adapters.find_registry(model)
    if existing and (reg is None or adapter_name in reg.configs):
        named = f" with an adapter named {adapter_name!r}" if reg is not None else ""
        raise ValueError(f"model already has LoRA ({len(existing)} LoRALinear layers, e.g. {existing[0][0]!r}){named}; "
                         "inject once, pass adapter_name='...' to add another adapter, or call "
                         "lora.merge_and_unload(model) first / start from a fresh model")
    adapters.check_not_merged(model, f"add adapter {adapter_name!r}")


def apply(model: nn.Module, config: LoraConfig, targets: list[str], saved: list[str],
          adapter_name: str = DEFAULT_ADAPTER) -> nn.Module:
    """Adds adapter `adapter_name` to `targets` (wrapping those not yet wrapped) and records `config`.

    The first adapter of a model freezes everything else, trains, and is active; a later one is added
    inactive and frozen (lora.set_adapter activates it), and changes nothing else."""
    adapters.check_disjoint(model, targets, saved)              # the last check: nothing has changed yet
    first = adapters.find_registry(model) is None
    modules = dict(model.named_modules())
    if first:
        for p in model.parameters():
            p.requires_grad_(False)
    active = [adapter_name] if first else adapters.active_adapters(model)
    compute = next((m.compute_dtype for _, m in lora_layers(model)), None)
    args = (config.r, config.lora_alpha, config.lora_dropout, config.use_rslora)
    for name in targets:
        layer = modules[name]
        if isinstance(layer, LoRALinear):
            layer.add_adapter(adapter_name, *args, use_dora=config.use_dora)
        else:
            layer = LoRALinear(layer, *args, compute_dtype=compute, use_dora=config.use_dora,
                               adapter_name=adapter_name)
            layer.train(modules[name].training)   # new dropout follows the model's train/eval mode
            layer.active_adapters = list(active)
            parent_name, _, child = name.rpartition(".")
            setattr(modules[parent_name], child, layer)
        for p in adapter_parameters(layer.adapter(adapter_name)):
            p.requires_grad_(first)
    config.target_names = list(targets)
    adapters.register(model, adapter_name, config, saved)
    return model


def inject(model: nn.Module, r: int = 8, alpha: float = 16, dropout: float = 0.05, targets="all-linear",
           modules_to_save=None, use_rslora: bool = False, compute_dtype: str | None = None,
           use_dora: bool = False, adapter_name: str = DEFAULT_ADAPTER) -> nn.Module:
    """Adds LoRA adapters to `model` in place and returns it (see the module docstring for `targets`).

    compute_dtype: None (or "fp32") runs the adapter math in fp32 (its weights' dtype; PEFT's default); "base"
    runs it in the base layer's output dtype, autocast-style (fp32 weights, bf16 matmuls; faster on the CPU,
    see lora.layer). A training-time choice: not saved with the adapter; `set_compute_dtype` changes it later.
    It applies to every LoRA layer; when adding a further adapter, None keeps the model's current setting.

    use_dora: DoRA (lora.dora): y = m ⊙ (W + s·B·A) x / ||W + s·B·A||_row + b, m initialised to ||W||_row.
    adapter_name: the first adapter of a model is active; a further name adds a fresh adapter beside the
    others, inactive and frozen until lora.set_adapter(model, name) (lora.adapters)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"inject expects a torch.nn.Module, got {type(model).__name__}")
    _check_inject_args(r, alpha, dropout, targets, use_rslora, compute_dtype, use_dora, adapter_name)
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets,
                        modules_to_save=modules_to_save, use_rslora=use_rslora, use_dora=use_dora)
    check_can_add(model, adapter_name)
    first = adapters.find_registry(model) is None
    saved = resolve_modules_to_save(model, config.modules_to_save)
    names = plan_targets(model, config, saved)
    config.task_type = _infer_task_type(model, names)
    apply(model, config, names, saved, adapter_name)
    return set_compute_dtype(model, compute_dtype) if first or compute_dtype is not None else model


def _check_inject_args(r, alpha, dropout, targets, use_rslora, compute_dtype, use_dora, adapter_name) -> None:
    # LoraConfig checks these too, under its field names (lora_alpha, ...); here they carry inject's own names.
    check_adapter_name(adapter_name)
    check_use_dora(use_dora)
    check_rank(r)
    check_alpha(alpha)
    check_dropout(dropout)
    _check_targets(targets)
    check_use_rslora(use_rslora)
    check_compute_dtype(compute_dtype)


def set_compute_dtype(model: nn.Module, compute_dtype: str | None) -> nn.Module:
    """Sets every LoRA layer's compute_dtype (None/"fp32" | "base": the base output's dtype); returns model."""
    check_compute_dtype(compute_dtype)
    for module in model.modules():
        if isinstance(module, LoRALinear):
            module.compute_dtype = compute_dtype
    return model


class ParamCount(dict):
    """{'trainable', 'total', 'percent'}; str() is PEFT's one-line summary."""

    def __str__(self) -> str:
        return (f"trainable params: {self['trainable']:,d} || all params: {self['total']:,d} || "
                f"trainable%: {self['percent']:.4f}")


def trainable_parameters(model: nn.Module) -> ParamCount:
    """Trainable and total parameter counts; a 4-bit weight counts as in_features * out_features."""
    seen, trainable, total = set(), 0, 0
    for module in model.modules():
        packed = is_quantized(module) and not isinstance(module, LoRALinear)
        if packed:
            total += module.in_features * module.out_features   # the real count, not the packed bytes
        for name, p in module.named_parameters(recurse=False):
            if id(p) in seen or (packed and name == "weight"):
                continue
            seen.add(id(p))
            total += p.numel()
            trainable += p.numel() if p.requires_grad else 0
    return ParamCount(trainable=trainable, total=total, percent=100.0 * trainable / max(total, 1))
