"""Hand freed CPU tensors back to the OS at once, so a training step's peak RSS is its live tensors.

On the CPU, torch allocates tensors with the C library's malloc. glibc serves requests above a threshold with
their own mmap (returned to the OS by free) and smaller ones from its heaps (kept after free, for reuse), and
by default it RAISES that threshold to the size of every mmapped block that is freed, up to 32 MiB. A training
step allocates and frees thousands of 0.1-10 MB activations, so after the first few the threshold sits above all
of them: they are carved out of the heaps, the heaps fragment, and freed memory stays in the process.

`lean_cpu_allocator()` pins the threshold (glibc `mallopt(M_MMAP_THRESHOLD)`, which also stops the dynamic
raise): every tensor above it gets its own mmap and goes back to the OS when freed. The price is time: each
such allocation is a fresh mapping whose pages fault in (zero-filled) on first touch. One QLoRA step of
SmolLM2-135M (benchmarks/bench_train_step.py --sides ours, B=8, T=128, bf16, gradient checkpointing, 2-core
CPU; MALLOC_MMAP_THRESHOLD_=N in the environment, glibc's own spelling of the same setting):

    threshold          step s (median of 6)   RSS added by the steps GB   peak RSS GB
    glibc default            2.368                    0.569                  1.250
    16 MiB                   2.581                    0.574                  1.255
    4 MiB                    2.408                    0.520                  1.200
    1 MiB                    5.531                    0.220                  0.900

and at 256 KiB, this function's default, called after the model is built (the bench's `ours_lean` side, median
of 10, in the same run as the default's 2.390 s / 0.562 GB / 1.244 GB): 6.010 s, 0.187 GB, 0.868 GB. So it is an
opt-in for runs that are short of memory, not a default: ~2.5x the step time for a third of the memory the
steps add. It changes which memory serves an allocation, never a number computed. It is
process-wide, applies to allocations made after the call, and does nothing on other C libraries (macOS, musl)
or when the user has set MALLOC_MMAP_THRESHOLD_ (their setting wins). The examples take `--lean-memory`.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os

M_MMAP_THRESHOLD = -3               # glibc's mallopt parameter number (malloc.h)
DEFAULT_THRESHOLD = 256 * 1024      # bytes: tensors above it get their own mmap

_applied: int | None = None


def lean_cpu_allocator(threshold: int = DEFAULT_THRESHOLD) -> bool:
    """Pin glibc's mmap threshold at `threshold` bytes; True when it is in effect (see the module docstring)."""
    global _applied
    if threshold < 1:
        raise ValueError(f"threshold must be >= 1 byte, got {threshold}")
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:     # the user's own glibc setting wins
        return False
    if _applied == threshold:
        return True
    libc = _glibc()
    if libc is None or libc.mallopt(M_MMAP_THRESHOLD, int(threshold)) != 1:
        return False
    _applied = threshold
    return True


def _glibc():
    """glibc's handle, or None on another C library."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        libc.gnu_get_libc_version()                 # only glibc has it
    except (OSError, AttributeError):
        return None
    return libc
