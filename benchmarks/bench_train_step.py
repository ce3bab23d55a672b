"""One QLoRA training step of SmolLM2-135M: this library vs PEFT + bitsandbytes, doing the same work.

Both sides, per step: forward + loss, backward, clip the adapters' gradient norm to 1, AdamW step, zero_grad.

    ours   train.load_model(quantize=...) (NF4, blocksize 64, double quant, compute dtype; each linear read from
           the checkpoint and quantized in turn; SDPA attention with short bf16 sequences run in fp32 on the
           CPU, train/attention.py) -> lora.inject(compute_dtype="base": the adapter's matmuls in the compute
           dtype from fp32 weights, as the recipes run them) -> train.enable_gradient_checkpointing (every
           decoder block, non-reentrant); run under jemalloc, as the library's commands run
           (train.memory.run_under_jemalloc re-executes the child with it preloaded; the allocator column says
           which one served)
    ours_glibc  ours on the C library's malloc: what a user gets where jemalloc is missing
    ours_fp32   ours with lora.inject(compute_dtype=None): the adapter math in fp32, as PEFT does it
    ours_lean   ours_glibc, then train.lean_cpu_allocator() before the steps (an opt-in: glibc's mmap threshold
           pinned at 256 KiB, so freed activations go back to the OS at once; train/memory.py): less memory,
           more time (every activation above 256 KiB is a fresh mmap, page faults included)
    peer   transformers BitsAndBytesConfig(load_in_4bit, nf4, double quant, compute dtype) -> bnb.nn.Linear4bit
           -> model.gradient_checkpointing_enable(use_reentrant=False) -> peft.get_peft_model(LoraConfig)
    peer_jemalloc   the peer under jemalloc: what the allocator alone does for the other library
    peer_lean   the peer with the lean setting at the same point as ours_lean
Default sides: peer, ours, ours_glibc, peer_jemalloc.

Same on both sides: the fp32 checkpoint (load_model's cache folder), the compute dtype (the backbone is loaded in
it; LoRA weights are fp32 on both sides, PEFT's autocast_adapter_dtype), r, alpha, dropout, all linear layers but
the (tied, unquantized) LM head: 4,884,480 trainable parameters (fp32); the same random token batches (B x T, no
padding), torch.optim.AdamW(lr=2e-4), and the loss, one of:
    label  train.ClassificationTask.loss: cross-entropy over the 2 label words at the last position, the head
           applied to those 2 rows only (our recipe's loss; run on the PeftModel's decoder just the same)
    lm     the causal-LM loss over every next token: the peer's model(input_ids, labels=input_ids) (full-vocab
           logits at every position); ours train.tasks.common.chunked_cross_entropy, the same mean with the
           (B*T, V) logits formed 64 MB at a time (the library's loss, not the same code: the point for Gemma-3)
Not done on the peer side: `prepare_model_for_kbit_training`, which would cast the embeddings, norms and head to
fp32 (slower and bigger, and no longer the same work). What differs is only the library: the 4-bit layer, the LoRA
wrapper, the checkpointing wrapper (HF's also makes the embedding output require grad: one extra (B, T, d) input
gradient, negligible), the attention kernel's precision (ours: fp32 for short bf16 sequences on the CPU, more
precise), and for `ours` (not `ours_fp32`) the adapter matmuls in bf16 (what torch.autocast would do).

Time: the median of `--steps` steps after `--warmup` steps (the warm-up allocates AdamW's state), wall clock
around the whole step, all CPU cores (`--threads`; a user's training run uses them all); also the process CPU
time per step (all threads). Before each side the parent waits (up to `--wait-idle` minutes) for the CPUs to be
idle and records how busy other processes kept them: on 2 shared cores one other busy process makes every
2-thread OpenMP region wait for a scheduler slice, and steps get 5-10x slower (measured), for both sides.
Memory: each side runs in its own process, one after the other, so neither sees the other's allocations:
    peak RSS      the process's high-water mark over everything: imports, model load, quantize, steps
                  (ru_maxrss); the number the issue's 6.5 GB refers to, and the one mem_ratio compares
    before steps  RSS after setup, just before the first step
    steps peak    the high-water mark during the steps only (VmHWM, reset through /proc/self/clear_refs)
    step increase steps peak - before steps: activations, gradients, AdamW state, allocator slack
On CUDA also torch.cuda.max_memory_allocated over the steps, and the table says which peak the ratio uses.

    python benchmarks/bench_train_step.py                          # bf16, label-word loss, B=8, T=128
    python benchmarks/bench_train_step.py --dtype bf16 fp32 --loss label lm
    python benchmarks/bench_train_step.py --profile                # + torch.profiler of our step (CPU time, memory)
The last line printed is `time_ratio=<ours/peer> mem_ratio=<ours/peer>` for the first --dtype and --loss.
"""

import argparse
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from common import (environment, max_rss_bytes, pick_device, print_table, reset_peak_rss, rss_bytes, run_child,
                    save_json, wait_until_idle, write_child_result)
from train.memory import allocator, run_under_jemalloc  # noqa: E402 - common puts the checkout on sys.path

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
LABEL_WORDS = ("negative", "positive")
SIDES = ("peer", "ours", "ours_glibc", "peer_jemalloc", "ours_fp32", "ours_lean", "peer_lean")
DEFAULT_SIDES = SIDES[:4]
LEAN = ("ours_lean", "peer_lean")   # the sides that call train.lean_cpu_allocator() before the steps
JEMALLOC = ("ours", "ours_fp32", "peer_jemalloc")   # re-executed under jemalloc, as the library's commands are
GB = 1e9
COLUMNS = [("dtype", "dtype", "{}"), ("loss", "loss", "{}"), ("side", "side", "{}"), ("allocator", "malloc", "{}"),
           ("setup_s", "setup s", "{:.1f}"), ("step_s", "step s (median)", "{:.3f}"),
           ("step_min_s", "min s", "{:.3f}"), ("cpu_s", "CPU s", "{:.2f}"), ("tokens_per_s", "tok/s", "{:.0f}"),
           ("peak_rss_gb", "peak RSS GB", "{:.3f}"), ("rss_before_gb", "before steps GB", "{:.3f}"),
           ("steps_peak_gb", "steps peak GB", "{:.3f}"), ("step_increase_gb", "step increase GB", "{:.3f}"),
           ("cuda_peak_gb", "CUDA peak GB", "{:.3f}"), ("first_loss", "loss@1", "{:.4f}"),
           ("time_vs_peer", "time / peer", "{:.3f}"), ("mem_vs_peer", "peak / peer", "{:.3f}"),
           ("increase_vs_peer", "increase / peer", "{:.3f}")]


# ----------------------------------------------------------------------------------------------------------
# the two sides (each runs in its own process)

def build_ours(args, dtype, device, adapter_compute="base"):
    import lora
    import quant
    import train

    # the 4-bit model read from the checkpoint one linear at a time (== load_model + quant.quantize, bit for bit)
    model, tokenizer = train.load_model(args.model, dtype=dtype, quantize={"blocksize": 64, "double_quant": True})
    model.to(device)
    lora.inject(model, r=args.r, alpha=args.alpha, dropout=args.dropout, targets="all-linear",
                compute_dtype=adapter_compute, use_dora=args.use_dora)
    train.enable_gradient_checkpointing(model)
    layer = next(m for m in model.modules() if isinstance(m, quant.Linear4bit))
    return model.train(), tokenizer, {"backend": layer.backend or "auto", "blocksize": layer.quant_state.blocksize,
                                      "attention": model.config._attn_implementation,
                                      "adapter_compute": adapter_compute or "fp32"}


def build_peer(args, dtype, device):
    import peft
    import transformers
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from train.models import load_tokenizer, offline, resolve

    folder, _ = resolve(args.model)  # the same fp32 checkpoint load_model reads
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=dtype)
    with offline():
        model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=config, dtype=dtype,
                                                     device_map={"": str(device)}, local_files_only=True)
    with warnings.catch_warnings():  # transformers 5 renamed it activation_checkpointing_enable; same code
        warnings.simplefilter("ignore", FutureWarning)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lora_config = peft.LoraConfig(r=args.r, lora_alpha=args.alpha, lora_dropout=args.dropout,
                                  target_modules="all-linear", task_type="CAUSAL_LM", use_dora=args.use_dora)
    model = peft.get_peft_model(model, lora_config)
    import bitsandbytes as bnb
    layer = next(m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit))
    info = {"blocksize": layer.weight.quant_state.blocksize, "nested": layer.weight.quant_state.nested,
            "peft": peft.__version__, "transformers": transformers.__version__}
    return model.train(), load_tokenizer(args.model), info


def make_batches(n, vocab, args, device):
    """n random (B, T) batches, the same on both sides (seeded), with a random label per row."""
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (args.batch_size, args.seq_len), generator=g)  # (B, T)
        batches.append({"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
                        "last_index": torch.full((args.batch_size,), args.seq_len - 1, device=device),
                        "labels": torch.randint(0, len(LABEL_WORDS), (args.batch_size,), generator=g).to(device)})
    return batches


def make_loss(kind, tokenizer, side):
    if kind == "label":
        from train import ClassificationTask
        task = ClassificationTask(tokenizer, list(LABEL_WORDS), instruction="Classify the sentiment.")
        return lambda model, batch: task.loss(model, batch)[0]
    if side.startswith("peer"):
        return lambda model, batch: model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                          labels=batch["input_ids"], use_cache=False).loss
    from train.tasks.common import chunked_cross_entropy, hidden_states

    def lm_loss(model, batch):        # the same mean CE over every next token; the (N, V) logits a chunk at a time
        h = hidden_states(model, batch)                                            # (B, T, d)
        return chunked_cross_entropy(h[:, :-1].reshape(-1, h.shape[-1]), batch["input_ids"][:, 1:].reshape(-1), model)
    return lm_loss


def train_step(model, batch, loss_fn, optimizer, params):
    from torch.profiler import record_function
    with record_function("## forward + loss"):
        loss = loss_fn(model, batch)
    with record_function("## backward"):
        loss.backward()
    with record_function("## clip + AdamW"):
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return loss.item()  # also the sync point on CPU


def child(args):
    """Builds one side, times its steps, measures its memory; writes the numbers to args.result_file."""
    if args.child in JEMALLOC:
        run_under_jemalloc()                # returns when jemalloc is missing: the table's allocator column says
    device = pick_device(args.device, args.threads)
    dtype = DTYPES[args.dtype]
    torch.manual_seed(0)
    t0 = time.perf_counter()
    if args.child.startswith("peer"):
        model, tokenizer, info = build_peer(args, dtype, device)
    else:
        model, tokenizer, info = build_ours(args, dtype, device, "fp32" if args.child == "ours_fp32" else "base")
    if args.child in LEAN and device.type == "cpu":
        from train import lean_cpu_allocator
        info["lean_allocator"] = lean_cpu_allocator()
    info["allocator"] = allocator()
    setup_s = time.perf_counter() - t0
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-4)
    loss_fn = make_loss(args.loss, tokenizer, args.child)
    batches = make_batches(args.warmup + args.steps, model.config.vocab_size, args, device)

    setup_peak = max_rss_bytes()
    rss_before = rss_bytes()
    phase_peak = reset_peak_rss()           # False: the steps peak cannot be told apart from the load peak
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        cuda_before = torch.cuda.memory_allocated()
    times, cpu_times, losses = [], [], []
    for batch in batches:
        t, c = time.perf_counter(), time.process_time()
        losses.append(train_step(model, batch, loss_fn, optimizer, params))
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
        cpu_times.append(time.process_time() - c)
    steps_peak = rss_bytes("VmHWM") if phase_peak else None
    timed = times[args.warmup:]
    result = {
        "side": args.child, "info": info, "setup_s": setup_s, "step_times_s": times, "losses": losses,
        "step_s": statistics.median(timed), "step_min_s": min(timed), "cpu_times_s": cpu_times,
        "cpu_s": statistics.median(cpu_times[args.warmup:]),
        "tokens_per_s": args.batch_size * args.seq_len / statistics.median(timed),
        "trainable": sum(p.numel() for p in params),
        "peak_rss": max(setup_peak, max_rss_bytes(), steps_peak or 0), "setup_peak_rss": setup_peak,
        "rss_before": rss_before, "steps_peak_rss": steps_peak,
        "step_increase": None if steps_peak is None else steps_peak - rss_before,
    }
    if device.type == "cuda":
        result["cuda_peak"] = torch.cuda.max_memory_allocated()
        result["cuda_step_increase"] = result["cuda_peak"] - cuda_before
    if not args.child.startswith("peer"):
        result["backend_choice"] = backend_counts()
    if args.profile:
        result["profile"] = profile(model, batches[:2], loss_fn, optimizer, params, device)
    print(f"[{args.child}] {info}; trainable {result['trainable']:,}; losses {[round(x, 4) for x in losses]}",
          flush=True)
    write_child_result(args.result_file, result)


def backend_counts():
    """How many (op, shape, rows) classes backend=None gave each backend: {"linear triton": 4, ...}."""
    import quant
    counts = {}
    for r in quant.backend_choice():
        key = f"{r['op']} {r['backend']} ({r['how']})"
        counts[key] = counts.get(key, 0) + 1
    return counts


def profile(model, batches, loss_fn, optimizer, params, device, rows=25):
    """torch.profiler over the given steps: where the time and the allocations go (printed, and top rows)."""
    from torch.profiler import ProfilerActivity, profile as torch_profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch_profile(activities=activities, profile_memory=True) as prof:
        for batch in batches:
            train_step(model, batch, loss_fn, optimizer, params)
    averages = prof.key_averages()
    print(averages.table(sort_by="self_cpu_time_total", row_limit=rows), flush=True)
    print(averages.table(sort_by="self_cpu_memory_usage", row_limit=12), flush=True)
    top = sorted(averages, key=lambda e: -e.self_cpu_time_total)[:rows]
    phases = [e for e in averages if e.key.startswith("## ")]
    return {"steps": len(batches),
            "phases_ms": {e.key[3:]: e.cpu_time_total / 1e3 / len(batches) for e in phases},
            "top_self_cpu_ms": {e.key: e.self_cpu_time_total / 1e3 / len(batches) for e in top}}


# ----------------------------------------------------------------------------------------------------------
# the parent: one child per (config, side), the table, the JSON, the ratio line

def child_args(args, dtype, loss, side):
    out = ["--child", side, "--dtype", dtype, "--loss", loss, "--model", args.model,
           "--batch-size", args.batch_size, "--seq-len", args.seq_len, "--r", args.r, "--alpha", args.alpha,
           "--dropout", args.dropout, "--steps", args.steps, "--warmup", args.warmup, "--threads", args.threads]
    if args.use_dora:
        out.append("--use-dora")
    if args.device:
        out += ["--device", args.device]
    if args.profile and not side.startswith("peer"):
        out.append("--profile")
    return out


def row(dtype, loss, side, r, peer):
    gb = lambda v: None if v is None else v / GB  # noqa: E731
    out = {"dtype": dtype, "loss": loss, "side": side, "allocator": r["info"].get("allocator"),
           "setup_s": r["setup_s"], "step_s": r["step_s"],
           "step_min_s": r["step_min_s"], "cpu_s": r["cpu_s"], "tokens_per_s": r["tokens_per_s"],
           "peak_rss_gb": gb(r["peak_rss"]), "others_busy_before": r.get("others_busy_before"),
           "rss_before_gb": gb(r["rss_before"]), "steps_peak_gb": gb(r["steps_peak_rss"]),
           "step_increase_gb": gb(r["step_increase"]), "cuda_peak_gb": gb(r.get("cuda_peak")),
           "first_loss": r["losses"][0], "trainable": r["trainable"]}
    if peer is not None:
        out["time_vs_peer"] = r["step_s"] / peer["step_s"]
        mem_key = "cuda_peak" if "cuda_peak" in r else "peak_rss"
        out["mem_vs_peer"] = r[mem_key] / peer[mem_key]
        if r["step_increase"] is not None and peer["step_increase"]:
            out["increase_vs_peer"] = r["step_increase"] / peer["step_increase"]
    return out


def parent(args):
    device = pick_device(args.device, args.threads)
    configs = [(d, loss) for d in args.dtype for loss in args.loss]
    rows, raw = [], {}
    for dtype, loss in configs:
        results = {}
        for side in args.sides:
            print(f"--- {side}: {dtype}, {loss} loss, B={args.batch_size} T={args.seq_len}", flush=True)
            busy = wait_until_idle(timeout_minutes=args.wait_idle) if device.type == "cpu" else None
            results[side] = run_child(Path(__file__).resolve(), child_args(args, dtype, loss, side))
            results[side]["others_busy_before"] = busy
        raw[f"{dtype}/{loss}"] = results
        for side, r in results.items():
            rows.append(row(dtype, loss, side, r, results.get("peer") if side != "peer" else None))

    print(f"\nQLoRA training step, {args.model}, B={args.batch_size} T={args.seq_len} random tokens, "
          f"r={args.r} alpha={args.alpha:g} dropout={args.dropout:g}, all linear layers, NF4 + double quant, "
          f"gradient checkpointing, AdamW; median of {args.steps} steps after {args.warmup} warm-up; "
          f"{args.threads} threads on {device}")
    print("loss: label = label-word CE at the last position (head on 2 rows); lm = full causal-LM loss")
    print("peak RSS = the whole process (load included); steps peak / increase = during the steps only\n")
    print_table(rows, COLUMNS)
    save_json(args.out, environment(device), rows, args=vars(args), raw=raw,
              peer_versions=_versions(("peft", "transformers", "bitsandbytes")))
    head = next((r for r in rows if r["side"] == "ours" and "time_vs_peer" in r), None)
    if head is None:
        return
    mem = "CUDA max allocated" if head["cuda_peak_gb"] is not None else "peak RSS"
    lean = next((r for r in rows if r["side"] == "ours_lean" and "time_vs_peer" in r), None)
    if lean is not None:
        print(f"\nopt-in train.lean_cpu_allocator() (ours_lean vs peer): time_ratio={lean['time_vs_peer']:.3f} "
              f"mem_ratio={lean['mem_vs_peer']:.3f}")
    print(f"\nheadline ({head['dtype']}, {head['loss']} loss; memory = {mem}; "
          f"goal time <= 0.5, memory <= 0.5):")
    print(f"time_ratio={head['time_vs_peer']:.3f} mem_ratio={head['mem_vs_peer']:.3f}")


def _versions(packages):
    out = {}
    for pkg in packages:
        try:
            out[pkg] = __import__(pkg).__version__
        except Exception as e:  # noqa: BLE001 - recorded, not fatal
            out[pkg] = f"unavailable ({type(e).__name__})"
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", help="train.load_model name")
    ap.add_argument("--dtype", nargs="+", choices=DTYPES, default=["bf16"], help="compute dtype(s), both sides")
    ap.add_argument("--loss", nargs="+", choices=("label", "lm"), default=["label"],
                    help="label: label-word CE at the last position; lm: full causal-LM loss")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=32.0)
    ap.add_argument("--dropout", type=float, default=0.05, help="LoRA dropout, both sides")
    ap.add_argument("--use-dora", action="store_true", help="DoRA on both sides (PEFT's use_dora=True)")
    ap.add_argument("--steps", type=int, default=10, help="timed steps (the median is reported)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first (allocate AdamW state, caches)")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU threads (default: all cores)")
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--sides", nargs="+", choices=SIDES, default=list(DEFAULT_SIDES))
    ap.add_argument("--wait-idle", type=float, default=10.0,
                    help="minutes to wait before each side for the CPUs to be idle (others' work skews timings)")
    ap.add_argument("--profile", action="store_true", help="torch.profiler of our step after the timing")
    ap.add_argument("--out", default="bench_train_step", help="results/<out>.json")
    ap.add_argument("--child", choices=SIDES, help=argparse.SUPPRESS)
    ap.add_argument("--result-file", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        args.dtype, args.loss = args.dtype[0], args.loss[0]
        child(args)
    else:
        parent(args)


if __name__ == "__main__":
    sys.exit(main())
