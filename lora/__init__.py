"""LoRA adapters for any linear layer (dense or 4-bit), in PEFT's file format.

    model = lora.inject(model, r=8, alpha=16, targets="all-linear")   # wrap, freeze the rest
    print(lora.trainable_parameters(model))                            # trainable params: ... || all params: ...
    ... train ...
    lora.save(model, "out/adapter")                                    # adapter_model.safetensors + adapter_config.json
    lora.load(fresh_model, "out/adapter")                              # also reads adapters saved by PEFT
    plain = lora.merge_and_unload(model)                               # dense layers holding W + scaling*B@A

DoRA (Liu et al. 2024; PEFT's use_dora=True), on dense and 4-bit bases alike (lora.dora):

    model = lora.inject(model, r=8, alpha=16, use_dora=True)   # y = m ⊙ (W + s·B·A) x / ||W + s·B·A||_row + b
    lora.save(model, "out/dora")                               # + ...lora_magnitude_vector, "use_dora": true

m starts at ||W||_row (output unchanged at init) and trains; the norm is a constant in backward. merge,
unmerge and merge_and_unload fold m ⊙ (W + s·B·A) / ||W + s·B·A|| into the weight.

Several adapters on one base (lora.adapters; names as PEFT's, the first is "default"):

    lora.load(model, "runs/sst2/adapter", adapter_name="sst2")   # beside "default"; the base is held once
    lora.set_adapter(model, "sst2")                               # or ["default", "sst2"]: their updates add
    lora.save(model, "out/sst2", adapter_name="sst2")             # that adapter alone, PEFT's files
    lora.delete_adapter(model, "default")
    lora.inject(model, r=4, adapter_name="mnli")                  # a fresh adapter, inactive until set_adapter

Each adapter keeps its own r / alpha / targets / DoRA / modules_to_save. Only the active adapters run and
train; one active adapter gives exactly the outputs of that adapter loaded alone. lora.save(model, dir) with
several adapters writes them all as PEFT does ("default" in dir, the others in dir/<name>/). Deleting the
active adapter activates the remaining active ones (or the first adapter left); deleting the only one is refused.

This package never imports `quant` (or peft): a 4-bit base is anything with in_features,
out_features, forward, dequantize() and quantized_copy(weight).
"""

from .adapters import active_adapters, adapter_names, delete_adapter, set_adapter
from .inject import LoraConfig, inject, set_compute_dtype, trainable_parameters
from .io import adapter_state_dict, load, save
from .layer import LoRALinear
from .merge import merge, merge_and_unload, unmerge

__all__ = ["LoRALinear", "LoraConfig", "inject", "set_compute_dtype", "trainable_parameters", "merge", "unmerge",
           "merge_and_unload", "save", "load", "adapter_state_dict", "set_adapter", "delete_adapter",
           "active_adapters", "adapter_names", "update_norms"]


def __getattr__(name):
    # Lazy, so `python -m lora.inspect` does not find lora.inspect already imported (runpy warns).
    if name == "update_norms":
        from .inspect import update_norms
        return update_norms
    raise AttributeError(f"module 'lora' has no attribute {name!r}")
