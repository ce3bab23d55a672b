"""Shared benchmark plumbing: timing, the measured copy bandwidth, the table, and the JSON record.

Timing is the median of repeats: `triton.testing.do_bench` on CUDA (it flushes L2 between runs, so a
dequantize is not timed out of cache), `torch.utils.benchmark.Timer.blocked_autorange` elsewhere. The
physical limit a memory-bound kernel is compared with is a copy measured in the same process
(`copy_bandwidth`), never a datasheet number (STYLE rule 20).
"""

import argparse
import json
import os
import platform
import sys
from pathlib import Path

import torch
import torch.utils.benchmark as tbench

RESULTS = Path(__file__).resolve().parent / "results"
# Run from a checkout without installing: `python benchmarks/bench_x.py` puts benchmarks/ first on the path.
sys.path.insert(0, str(RESULTS.parent.parent))


def pick_device(name=None, threads=1):
    """The device to time on. CPU timings use `threads` intra-op threads: 1 by default, because on shared
    cores a second thread gets descheduled and medians jump by the scheduler's 10-20 ms time slice."""
    device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu":
        torch.set_num_threads(threads)
    return device


def time_ms(fn, device, min_run_time=0.2):
    """Median milliseconds of fn() on `device`."""
    if device.type == "cuda":
        try:
            from triton.testing import do_bench
            return do_bench(fn, warmup=25, rep=100, return_mode="median")
        except ImportError:
            pass
    fn()  # warm-up: lazy init, autotuning, allocator
    # Timer runs single-threaded unless told otherwise; time what a user of this process gets.
    timer = tbench.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_run_time).median * 1e3


def parse_shape(text):
    """'4096x11008' -> (4096, 11008): (out, in) for argparse's type=."""
    try:
        out_f, in_f = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a shape is OUTxIN, e.g. 4096x11008; got {text!r}") from None
    return out_f, in_f


def triton_reason(device):
    """"" when quant.triton_kernels runs on `device` (CUDA, or the CPU with TRITON_INTERPRET=1), else why not."""
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return "CUDA only (or TRITON_INTERPRET=1 for a plumbing check: the interpreter's times mean nothing)"
    from quant import triton_kernels as tk
    return tk.is_available()[1]


def copy_bandwidth(device, nbytes=256 << 20):
    """GB/s of dst.copy_(src) for `nbytes` buffers: read + write, the ceiling of a streaming kernel."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device)
    return 2 * nbytes / ms / 1e6


def environment(device):
    """Device and versions for the JSON record."""
    info = {"device": str(device), "torch": torch.__version__, "python": platform.python_version(),
            "threads": torch.get_num_threads()}
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    else:
        info["device_name"] = _cpu_name()
    for pkg in ("triton", "bitsandbytes"):
        try:
            info[pkg] = __import__(pkg).__version__
        except Exception as e:  # noqa: BLE001 - a broken optional install is worth recording, not fatal
            info[pkg] = f"unavailable ({type(e).__name__})"
    return info


def _cpu_name():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def to_bnb_state(state, dtype):
    """quant.NF4State -> bitsandbytes QuantState over the same tensors (no copies).

    Keeps the 2-D shape (bnb.matmul_4bit needs it): bnb 0.50's CPU dequantize is wrong for 2-D weights whose
    in_features is not a multiple of blocksize, which the benchmark shapes all are.
    """
    from bitsandbytes.functional import QuantState
    nested = None
    if state.nested_absmax is not None:
        nested = QuantState(absmax=state.nested_absmax, code=state.nested_code,
                            blocksize=state.nested_blocksize, dtype=torch.float32)
    return QuantState(absmax=state.absmax, shape=state.shape, code=state.code, blocksize=state.blocksize,
                      quant_type="nf4", dtype=dtype, offset=state.offset, state2=nested)


def print_table(rows, columns):
    """rows: list of dicts; columns: list of (key, header, format)."""
    cells = [[header for _, header, _ in columns]]
    for row in rows:
        cells.append(["" if row.get(k) is None else fmt.format(row[k]) for k, _, fmt in columns])
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    for i, r in enumerate(cells):
        print("  ".join(c.rjust(w) for c, w in zip(r, widths)))
        if i == 0:
            print("  ".join("-" * w for w in widths))


def save_json(name, env, rows, **extra):
    """results/<name>.json (an absolute `name` is written where it says), atomically."""
    path = RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    from lora.atomic import atomic_write  # the project's one write helper (sys.path holds the repo root)
    atomic_write(path, json.dumps({"environment": env, **extra, "rows": rows}, indent=2, default=str))
    root = RESULTS.parent.parent
    print(f"\nwrote {path.relative_to(root) if path.is_relative_to(root) else path}")
    return path


# ----------------------------------------------------------------------------------------------------------
# process memory and one-process-per-side runs (bench_train_step, bench_task)

def rss_bytes(field="VmRSS"):
    """This process's resident set size (VmRSS) or its high-water mark (VmHWM), from /proc/self/status."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def max_rss_bytes():
    """Peak RSS of this process since it started, or since the last `reset_peak_rss()` (ru_maxrss)."""
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def reset_peak_rss():
    """Sets the RSS high-water mark (VmHWM, and with it ru_maxrss) back to the current RSS; False if refused.

    Writing "5" to /proc/self/clear_refs (Linux >= 4.0) is the only way to measure the peak of one phase of a
    process, e.g. the training steps without the model load that came before them.
    """
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def run_child(script, args, timeout=None):
    """Runs `python script *args --result-file F` in a fresh process; returns the dict it wrote to F as JSON.

    One process per measured side: each gets its own peak RSS and allocator, and neither inherits the other's
    imports, caches or threads. The child's stdout/stderr pass through, so progress stays visible.
    """
    import subprocess
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, str(script), *map(str, args), "--result-file", str(out)]
        proc = subprocess.run(cmd, timeout=timeout)
        if proc.returncode != 0 or not out.is_file():
            raise RuntimeError(f"child failed (exit {proc.returncode}): {' '.join(cmd)}")
        return json.loads(out.read_text())


def write_child_result(path, result):
    Path(path).write_text(json.dumps(result, default=str))


def cpu_busy_fraction(seconds=2.0):
    """Fraction of all CPU time spent busy over the next `seconds` (from /proc/stat), whoever spent it.

    Called while this process sleeps, it measures the others: on 2 shared cores a second busy process halves a
    2-thread run and stalls its OpenMP barriers for a scheduler slice, so timings taken then are not the code's.
    """
    import time

    def sample():
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return sum(fields), idle
    total0, idle0 = sample()
    time.sleep(seconds)
    total1, idle1 = sample()
    return 1.0 - (idle1 - idle0) / max(total1 - total0, 1)


def wait_until_idle(max_busy=0.15, timeout_minutes=0.0):
    """Waits (up to `timeout_minutes`) for the CPUs to be idle; returns the last busy fraction measured."""
    import time
    deadline = time.monotonic() + 60 * timeout_minutes
    busy = cpu_busy_fraction()
    while busy > max_busy and time.monotonic() < deadline:
        print(f"  CPUs {busy:.0%} busy with other work; waiting for them to be idle", flush=True)
        time.sleep(20)
        busy = cpu_busy_fraction()
    if busy > max_busy:
        print(f"  WARNING: CPUs {busy:.0%} busy with other work: the timings below are contaminated", flush=True)
    return busy
