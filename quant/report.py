"""memory_report: where a (partly) 4-bit model's bytes are.

A 4-bit weight costs numel / 2 packed bytes plus its quant state: one fp32 absmax per block
(0.5 bit/param at blocksize 64) or, with double quantization, one byte per block plus one fp32 per
256 blocks (~0.127 bit/param) -> about 4.13 bits per weight instead of 16 (bf16) or 32 (fp32).
Parameters count a 4-bit weight by its real number of elements (out * in), not by its packed bytes;
shared (tied) parameters are counted once.
"""
from __future__ import annotations

from torch import nn

from quant.linear import Linear4bit


def memory_report(model: nn.Module) -> dict:
    """Bytes and parameter counts of the 4-bit weights (with quant state) and of everything else."""
    quantized = [m for m in model.modules() if isinstance(m, Linear4bit)]
    packed_ids = {id(m.weight) for m in quantized}
    q_bytes = sum(m.weight.nbytes + sum(t.nbytes for t in m.quant_state.tensors()) for m in quantized)
    q_params = sum(m.quant_state.numel for m in quantized)
    dense = [p for p in model.parameters() if id(p) not in packed_ids]  # parameters() dedupes ties
    d_bytes, d_params = sum(p.nbytes for p in dense), sum(p.numel() for p in dense)
    total, n_params = q_bytes + d_bytes, q_params + d_params
    return {
        "quantized_layers": len(quantized),
        "quantized_params": q_params,
        "quantized_bytes": q_bytes,
        "quantized_bits_per_param": 8 * q_bytes / q_params if q_params else 0.0,
        "dense_params": d_params,
        "dense_bytes": d_bytes,
        "total_params": n_params,
        "total_bytes": total,
        "bytes_per_param": total / n_params if n_params else 0.0,
    }


def format_memory_report(report: dict) -> str:
    """A small fixed-width table of `memory_report`'s numbers."""
    rows = [
        ("4-bit weights", report["quantized_params"], report["quantized_bytes"]),
        ("dense params", report["dense_params"], report["dense_bytes"]),
        ("total", report["total_params"], report["total_bytes"]),
    ]
    lines = [f"{'component':<14} {'params':>14} {'bytes':>14} {'MiB':>9} {'bits/param':>10}"]
    for name, n, b in rows:
        bits = 8 * b / n if n else 0.0
        lines.append(f"{name:<14} {n:>14,} {b:>14,} {b / 2**20:>9.2f} {bits:>10.2f}")
    lines.append(f"({report['quantized_layers']} Linear4bit layers; "
                 f"{report['bytes_per_param']:.3f} bytes per parameter overall)")
    return "\n".join(lines)
