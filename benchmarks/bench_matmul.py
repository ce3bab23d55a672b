"""4-bit linear, forward and input gradient: dense F.linear vs bnb.matmul_4bit vs quant.Linear4bit backends.

Decode shapes (M = 1, 4, 16 rows) are memory-bound: what counts is how fast the weight is read, so the
table gives the weight's bytes / time and that as a % of a copy measured on the same device. Training
shapes (M = 512 .. 8192) are compute-bound: TFLOP/s = 2 M N K / time. Both passes are timed through
autograd as a training step runs them: forward under inference_mode, backward as
`autograd.grad(y, x, dy, retain_graph=True)` (input gradient only: the weight is frozen).
Speedups are against the dense layer (cuBLAS on a GPU, on the dense bf16 weight) and against bitsandbytes,
both run in this process. "ours-auto" is Linear4bit(backend=None): the backend it measured and chose per pass
is in the `chosen` column (quant.backend_choice()).

    python benchmarks/bench_matmul.py             # Llama-7B shapes, decode + training M (CUDA)
    python benchmarks/bench_matmul.py --small     # CPU-friendly shapes and M
    python benchmarks/bench_matmul.py --device cuda --m 1 16 512 4096 --out /tmp/matmul    # -> /tmp/matmul.json
"""

import argparse

import torch
import torch.nn.functional as F
from common import (copy_bandwidth, environment, parse_shape, pick_device, print_table, save_json, time_ms,
                    to_bnb_state, triton_reason)

import quant
from quant import Linear4bit

LLAMA_7B = [(4096, 4096), (11008, 4096), (4096, 11008)]  # (out, in)
SMALL = [(1024, 1024), (2752, 1024)]
M_FULL = [1, 4, 16, 512, 2048, 8192]
M_SMALL = [1, 4, 16, 128, 512]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
COLUMNS = [("shape", "shape", "{}"), ("m", "M", "{}"), ("pass", "pass", "{}"), ("impl", "impl", "{}"),
           ("ms", "time ms", "{:.3f}"), ("tflops", "TFLOP/s", "{:.3f}"), ("w_gbps", "W GB/s", "{:.1f}"),
           ("pct_copy", "% copy", "{:.1f}"), ("vs_dense", "vs dense", "{:.2f}x"), ("vs_bnb", "vs bnb", "{:.2f}x"),
           ("chosen", "chosen", "{}")]


def layers(w, device, backends=("torch", "triton", None)):
    """name -> (forward fn(x), bytes of weight it reads); and the reasons for the ones left out."""
    impls = {"dense": (lambda x: F.linear(x, w), w.numel() * w.element_size())}
    skipped = {}
    linear = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, device=device, dtype=w.dtype)
    linear.weight.data.copy_(w)
    linear.requires_grad_(False)
    for backend in backends:
        why = triton_reason(device) if backend == "triton" else ""
        if why:
            skipped["ours-triton"] = why
            continue
        layer = Linear4bit.from_linear(linear, blocksize=64, double_quant=True, backend=backend)
        nbytes = layer.weight.numel() + sum(t.numel() * t.element_size() for t in layer.quant_state.tensors())
        impls[f"ours-{backend or 'auto'}"] = (layer, nbytes)
    try:
        import bitsandbytes as bnb
        qs = to_bnb_state(layer.quant_state, w.dtype)
        impls["bnb"] = (lambda x, p=layer.weight, qs=qs: bnb.matmul_4bit(x, p.t(), quant_state=qs), nbytes)
    except ImportError as e:
        skipped["bnb"] = str(e)
    return impls, skipped


def time_passes(fn, m, in_f, out_f, dtype, device):
    """(forward ms, input-gradient ms) of y = fn(x) for x [m, in_f]."""
    x = torch.randn(m, in_f, device=device, dtype=dtype)  # (M, in)
    dy = torch.randn(m, out_f, device=device, dtype=dtype)  # (M, out)

    def forward():
        with torch.inference_mode():
            return fn(x)
    fwd = time_ms(forward, device)
    x.requires_grad_(True)
    y = fn(x)  # the graph is kept (retain_graph) and reused by every timed backward
    bwd = time_ms(lambda: torch.autograd.grad(y, x, dy, retain_graph=True), device)
    return fwd, bwd


def chosen(out_f, in_f, m, device):
    """What backend=None picked for this shape and M, per pass: {"fwd": ..., "bwd_x": ...}."""
    from quant.backends import rows_bucket
    ops = {"linear": "fwd", "grad_input": "bwd_x"}
    return {ops[r["op"]]: r["backend"] for r in quant.backend_choice()
            if r["op"] in ops and r["shape"] == [out_f, in_f] and r["rows"] == rows_bucket(m)
            and r["device"].split(":")[0] == device.type}


def run(shapes, ms, dtype, device, copy_mb=256):
    copy_gbps = copy_bandwidth(device, copy_mb << 20)
    print(f"copy bandwidth on {device}: {copy_gbps:.1f} GB/s (measured, {copy_mb} MiB buffers)\n")
    rows, all_skipped = [], {}
    for out_f, in_f in shapes:
        w = torch.randn(out_f, in_f, device=device, dtype=dtype) * 0.02  # (out, in)
        impls, skipped = layers(w, device)
        all_skipped.update(skipped)
        for m in ms:
            times = {name: time_passes(fn, m, in_f, out_f, dtype, device) for name, (fn, _) in impls.items()}
            picks = chosen(out_f, in_f, m, device)
            for i, pass_name in enumerate(("fwd", "bwd_x")):
                for name, t in times.items():
                    ms_ = t[i]
                    w_gbps = impls[name][1] / ms_ / 1e6
                    rows.append({"shape": f"{out_f}x{in_f}", "m": m, "pass": pass_name, "impl": name, "ms": ms_,
                                 "tflops": 2 * m * out_f * in_f / ms_ / 1e9, "w_gbps": w_gbps,
                                 "pct_copy": 100 * w_gbps / copy_gbps,
                                 "vs_dense": times["dense"][i] / ms_,
                                 "vs_bnb": times["bnb"][i] / ms_ if "bnb" in times else None,
                                 "chosen": picks.get(pass_name) if name == "ours-auto" else None})
        del w, impls
    return rows, copy_gbps, all_skipped


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="CPU-friendly shapes and M")
    ap.add_argument("--shapes", type=parse_shape, nargs="+", help="OUTxIN weight shapes (overrides --small)")
    ap.add_argument("--dtype", choices=DTYPES, default="bf16", help="activation / compute dtype")
    ap.add_argument("--m", type=int, nargs="*", help="rows of x (default: decode + training sizes)")
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (default 1: repeatable on shared cores)")
    ap.add_argument("--copy-mb", type=int, default=256, help="buffer size of the copy-bandwidth measurement")
    ap.add_argument("--out", default="bench_matmul", help="results/<out>.json, or a path (.json is added)")
    args = ap.parse_args()

    device = pick_device(args.device, args.threads)
    shapes = args.shapes or (SMALL if args.small else LLAMA_7B)
    ms = args.m or (M_SMALL if args.small else M_FULL)
    rows, copy_gbps, skipped = run(shapes, ms, DTYPES[args.dtype], device, args.copy_mb)
    for name, why in skipped.items():
        print(f"skipped {name}: {why}")
    print(f"NF4 linear ({args.dtype}, blocksize 64, double quant); W GB/s = weight bytes read / time")
    print_table(rows, COLUMNS)
    save_json(args.out, environment(device), rows, args=vars(args), copy_gbps=copy_gbps, skipped=skipped,
              backend_choice=quant.backend_choice())


if __name__ == "__main__":
    main()
