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
targets, a model that already has LoRA) runs first, so a failed call leaves the model untouched.
"""

import difflib
import math
import re
from dataclasses import dataclass, field

import torch.nn as nn

from .layer import LoRALinear, check_compute_dtype, is_linear_like, is_quantized

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
    task_type: str | None = None                    # PEFT's task type ("CAUSAL_LM", "SEQ_CLS", ...)
    base_model_name_or_path: str | None = None      # written to adapter_config.json
    target_names: list[str] = field(default_factory=list)  # resolved full names of the adapted modules

    def __post_init__(self):
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"r must be a positive integer (the adapter rank, e.g. 8); got {self.r!r}")
        if isinstance(self.lora_alpha, bool) or not isinstance(self.lora_alpha, (int, float)) \
                or not self.lora_alpha > 0:
            raise ValueError(f"alpha must be > 0 (scaling = alpha / r; e.g. alpha = 2 * r); got {self.lora_alpha!r}")
        if not isinstance(self.lora_dropout, (int, float)) or not 0 <= self.lora_dropout < 1:
            raise ValueError(f"dropout must be in [0, 1) (a probability; 0 disables it); got {self.lora_dropout!r}")
        self.target_modules = _check_targets(self.target_modules)
        if isinstance(self.modules_to_save, str):
            self.modules_to_save = [self.modules_to_save]
        if self.modules_to_save is not None:
            self.modules_to_save = list(self.modules_to_save)

    @property
    def scaling(self) -> float:
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


def _check_targets(targets):
    if isinstance(targets, str):
        if targets.lower() == ALL_LINEAR:
            return ALL_LINEAR
        try:
            re.compile(targets)
        except re.error as e:
            raise ValueError(f"targets {targets!r} is not a valid regex ({e}); pass a list of module names "
                             f"such as ['q_proj', 'v_proj'], a regex, or 'all-linear'") from None
        return targets
    if isinstance(targets, (list, tuple, set)) and targets and all(isinstance(t, str) and t for t in targets):
        return list(targets)
    raise ValueError(f"targets must be a non-empty list of module names (e.g. ['q_proj', 'v_proj']), "
                     f"a regex string, or 'all-linear'; got {targets!r}")


def lora_layers(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


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


def plan_targets(model: nn.Module, config: LoraConfig, saved: list[str]) -> list[str]:
    """Full names of the linear layers to wrap; raises (naming the problem) before anything changes."""
    modules = dict(model.named_modules())
    if config.target_modules == ALL_LINEAR:
        skip = _output_heads(model) + saved
        hits = [n for n, m in modules.items() if n and is_linear_like(m) and not _under(n, skip)]
        if not hits:
            raise ValueError(f"targets='all-linear' found no linear layer in {type(model).__name__} "
                             "(outside the output head and modules_to_save)")
        return hits
    hits = [n for n in _match_names(model, [n for n in modules if n], config.target_modules) if not _under(n, saved)]
    if not hits:
        raise ValueError(f"every module that targets {config.target_modules!r} selects lies inside modules_to_save "
                         f"{saved}, which are trained in full and never adapted; target other modules")
    for n in hits:
        _check_linear(n, modules[n])
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
    if is_linear_like(module):
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


def check_not_injected(model: nn.Module) -> None:
    existing = lora_layers(model)
    if existing:
        raise ValueError(f"model already has LoRA ({len(existing)} LoRALinear layers, e.g. {existing[0][0]!r}); "
                         "inject once, or call lora.merge_and_unload(model) first / start from a fresh model")


def apply(model: nn.Module, config: LoraConfig, targets: list[str], saved: list[str]) -> nn.Module:
    """Wrap `targets`, freeze all but adapters and `saved`, and store `config` on the model."""
    modules = dict(model.named_modules())
    for p in model.parameters():
        p.requires_grad_(False)
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        layer = LoRALinear(modules[name], config.r, config.lora_alpha, config.lora_dropout, config.use_rslora)
        layer.train(modules[name].training)       # new dropout follows the model's train/eval mode
        setattr(modules[parent_name], child, layer)
    for name in saved:
        for p in modules[name].parameters():
            p.requires_grad_(True)
    config.target_names = list(targets)
    model.lora_config = config
    return model


def inject(model: nn.Module, r: int = 8, alpha: float = 16, dropout: float = 0.05, targets="all-linear",
           modules_to_save=None, use_rslora: bool = False, compute_dtype: str | None = None) -> nn.Module:
    """Adds LoRA adapters to `model` in place and returns it (see the module docstring for `targets`).

    compute_dtype: None (or "fp32") runs the adapter math in fp32 (its weights' dtype; PEFT's default); "base"
    runs it in the base layer's output dtype, autocast-style (fp32 weights, bf16 matmuls; faster on the CPU,
    see lora.layer). A training-time choice: not saved with the adapter; `set_compute_dtype` changes it later."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"inject expects a torch.nn.Module, got {type(model).__name__}")
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets,
                        modules_to_save=modules_to_save, use_rslora=use_rslora)
    check_not_injected(model)
    saved = resolve_modules_to_save(model, config.modules_to_save)
    names = plan_targets(model, config, saved)
    config.task_type = _infer_task_type(model, names)
    check_compute_dtype(compute_dtype)                         # before the model is changed
    return set_compute_dtype(apply(model, config, names, saved), compute_dtype)


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
