"""NF4 dequantize throughput: the torch reference vs bitsandbytes vs the Triton kernel (CUDA).

Bytes moved per call = packed weight read (numel / 2) + quantization state read (absmax, nested absmax,
tables) + dense weight written (numel * dtype size). GB/s is compared with a device copy measured in the
same process that reads and writes as many bytes (`copy GB/s`), the ceiling of any streaming kernel; the
speedup column is against bitsandbytes, run in the same process on the same bytes.

    python benchmarks/bench_dequant.py                          # Llama-7B shapes, on the GPU when there is one
    python benchmarks/bench_dequant.py --small                  # CPU-friendly shapes (same aspect ratios, / 4)
    python benchmarks/bench_dequant.py --device cuda --out /tmp/dequant      # -> /tmp/dequant.json
    TRITON_INTERPRET=1 python benchmarks/bench_dequant.py --device cpu --shapes 128x256 --copy-mb 8
                                                                # plumbing check: Triton in its interpreter
"""

import argparse

import torch
from common import (copy_bandwidth, environment, parse_shape, pick_device, print_table, save_json, time_ms,
                    to_bnb_state, triton_reason)

from quant.nf4 import dequantize_nf4, quantize_nf4

LLAMA_7B = [(4096, 4096), (11008, 4096), (4096, 11008)]  # (out, in): attention, gate/up, down projections
SMALL = [(1024, 1024), (2752, 1024), (1024, 2752)]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
COLUMNS = [("shape", "shape", "{}"), ("impl", "impl", "{}"), ("ms", "time ms", "{:.3f}"),
           ("gbps", "GB/s", "{:.1f}"), ("copy_gbps", "copy GB/s", "{:.1f}"), ("pct_copy", "% copy BW", "{:.1f}"),
           ("vs_bnb", "vs bnb", "{:.2f}x")]


def implementations(device):
    """name -> make(packed, state, dtype) -> fn(); and the reasons for the ones left out."""
    impls, skipped = {"torch": lambda p, s, dt: lambda: dequantize_nf4(p, s, dt)}, {}
    try:
        import bitsandbytes.functional as bnbf

        def make_bnb(p, s, dt):
            qs = to_bnb_state(s, dt)
            return lambda: bnbf.dequantize_4bit(p, qs)
        impls["bnb"] = make_bnb
    except ImportError as e:
        skipped["bnb"] = str(e)
    why = triton_reason(device)
    if why:
        skipped["triton"] = why
    else:
        from quant import triton_kernels as tk
        impls["triton"] = lambda p, s, dt: lambda: tk.dequantize(p, s, dt)
    return impls, skipped


def run(shapes, dtype, blocksize, double_quant, device, copy_mb=256):
    impls, skipped = implementations(device)
    for name, why in skipped.items():
        print(f"skipping {name}: {why}")
    copy_gbps = copy_bandwidth(device, copy_mb << 20)
    print(f"copy bandwidth on {device}: {copy_gbps:.1f} GB/s (measured, {copy_mb} MiB buffers)\n")

    rows = []
    for out_f, in_f in shapes:
        w = torch.randn(out_f, in_f, device=device, dtype=dtype) * 0.02  # (out, in)
        packed, state = quantize_nf4(w, blocksize=blocksize, double_quant=double_quant)
        del w
        moved = packed.numel() + sum(t.numel() * t.element_size() for t in state.tensors()) \
            + out_f * in_f * dtype.itemsize
        times = {name: time_ms(make(packed, state, dtype), device) for name, make in impls.items()}
        same_bytes = copy_bandwidth(device, moved // 2)  # a copy that reads + writes as many bytes
        for name, ms in times.items():
            gbps = moved / ms / 1e6
            rows.append({"shape": f"{out_f}x{in_f}", "impl": name, "ms": ms, "gbps": gbps, "copy_gbps": same_bytes,
                         "pct_copy": 100 * gbps / same_bytes, "bytes": moved,
                         "vs_bnb": times["bnb"] / ms if "bnb" in times else None})
    return rows, copy_gbps, skipped


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="CPU-friendly shapes")
    ap.add_argument("--shapes", type=parse_shape, nargs="+", help="OUTxIN weight shapes (overrides --small)")
    ap.add_argument("--dtype", choices=DTYPES, default="bf16", help="dense output dtype")
    ap.add_argument("--blocksize", type=int, default=64)
    ap.add_argument("--no-double-quant", action="store_true")
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (default 1: repeatable on shared cores)")
    ap.add_argument("--copy-mb", type=int, default=256, help="buffer size of the copy-bandwidth measurement")
    ap.add_argument("--out", default="bench_dequant", help="results/<out>.json, or a path (.json is added)")
    args = ap.parse_args()

    device = pick_device(args.device, args.threads)
    shapes = args.shapes or (SMALL if args.small else LLAMA_7B)
    rows, copy_gbps, skipped = run(shapes, DTYPES[args.dtype], args.blocksize, not args.no_double_quant, device,
                                   args.copy_mb)
    print(f"NF4 dequantize -> {args.dtype}, blocksize {args.blocksize}, double quant {not args.no_double_quant}")
    print_table(rows, COLUMNS)
    save_json(args.out, environment(device), rows, args=vars(args), copy_gbps=copy_gbps, skipped=skipped)


if __name__ == "__main__":
    main()
