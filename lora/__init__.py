"""LoRA adapters for any linear layer (dense or 4-bit), in PEFT's file format.

    model = lora.inject(model, r=8, alpha=16, targets="all-linear")   # wrap, freeze the rest
    print(lora.trainable_parameters(model))                            # trainable params: ... || all params: ...
    ... train ...
    lora.save(model, "out/adapter")                                    # adapter_model.safetensors + adapter_config.json
    lora.load(fresh_model, "out/adapter")                              # also reads adapters saved by PEFT
    plain = lora.merge_and_unload(model)                               # dense layers holding W + scaling*B@A

This package never imports `quant` (or peft): a 4-bit base is anything with in_features,
out_features, forward, dequantize() and quantized_copy(weight).
"""

from .inject import LoraConfig, inject, set_compute_dtype, trainable_parameters
from .io import adapter_state_dict, load, save
from .layer import LoRALinear
from .merge import merge, merge_and_unload, unmerge

__all__ = ["LoRALinear", "LoraConfig", "inject", "set_compute_dtype", "trainable_parameters", "merge", "unmerge",
           "merge_and_unload", "save", "load", "adapter_state_dict", "update_norms"]


def __getattr__(name):
    # Lazy, so `python -m lora.inspect` does not find lora.inspect already imported (runpy warns).
    if name == "update_norms":
        from .inspect import update_norms
        return update_norms
    raise AttributeError(f"module 'lora' has no attribute {name!r}")
