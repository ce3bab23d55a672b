"""bitsandbytes' serialized NF4 quant state: the extra state-dict entries beside a packed 4-bit weight.

    weight.absmax, weight.quant_map, weight.nested_absmax, weight.nested_quant_map     tensors
    weight.quant_state.bitsandbytes__nf4                                               UTF-8 JSON in a uint8 tensor

Written with the same keys, order and bytes as bnb's `QuantState.as_dict(packed=True)`, so a checkpoint of
either library loads into the other and can be diffed byte for byte.
"""
from __future__ import annotations

import json

import torch
from torch import Tensor

from quant.nf4 import NESTED_BLOCKSIZE, NF4_CODE, NF4State

QS_KEY = "quant_state.bitsandbytes__nf4"


def pack_quant_state(state: NF4State) -> dict[str, Tensor]:
    """NF4State -> bnb's `QuantState.as_dict(packed=True)`: same keys, order and bytes."""
    # Note: bnb packs the non-tensor fields as UTF-8 JSON in a uint8 tensor; we write the same keys in
    # the same order so the bytes match, which lets a checkpoint be diffed against bnb's.
    out = {"absmax": state.absmax, "quant_map": state.code}
    meta = {"quant_type": "nf4", "blocksize": state.blocksize, "dtype": _dtype_name(state.dtype),
            "shape": list(state.shape)}
    if state.double_quant:
        out |= {"nested_absmax": state.nested_absmax, "nested_quant_map": state.nested_code.clone()}
        meta |= {"nested_blocksize": state.nested_blocksize, "nested_dtype": "float32",
                 "nested_offset": state.offset.item()}
    out[QS_KEY] = torch.tensor(list(json.dumps(meta).encode("utf-8")), dtype=torch.uint8)
    return out


def unpack_quant_state(entries: dict[str, Tensor], device: torch.device | str = "cpu") -> NF4State:
    """bnb's serialized quant state (keys without the `weight.` prefix) -> NF4State."""
    if QS_KEY not in entries:
        raise ValueError(f"no '{QS_KEY}' entry: not an NF4 bitsandbytes checkpoint (keys: {sorted(entries)})")
    meta = json.loads(bytes(entries[QS_KEY].cpu().tolist()).decode("utf-8"))
    if meta.get("quant_type") != "nf4":
        raise ValueError(f"quant_type {meta.get('quant_type')!r} is not supported, only 'nf4'")
    if "quant_map" in entries and not torch.equal(entries["quant_map"].cpu().float(), NF4_CODE):
        raise ValueError("quant_map is not the NF4 table: this checkpoint was not written as NF4")
    nested = "nested_absmax" in entries
    if nested and meta.get("nested_blocksize") != NESTED_BLOCKSIZE:
        raise ValueError(f"nested_blocksize {meta.get('nested_blocksize')} is not supported, only {NESTED_BLOCKSIZE}")
    move = lambda k: entries[k].to(device)  # noqa: E731
    return NF4State(
        shape=torch.Size(meta["shape"]), dtype=getattr(torch, meta["dtype"]), blocksize=meta["blocksize"],
        absmax=move("absmax"), code=NF4_CODE.to(device),
        offset=torch.tensor(float(meta["nested_offset"]), device=device) if nested else None,
        nested_absmax=move("nested_absmax") if nested else None,
        nested_code=move("nested_quant_map") if nested else None,
    )


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")  # torch.bfloat16 -> "bfloat16", as bnb writes it
