"""The CPU memory allocator: jemalloc for every command by default, and glibc's lean setting as an opt-in.

On the CPU, torch allocates tensors with the C library's malloc. `run_under_jemalloc()` (called first by
`python -m train` and every example) re-executes the program once with jemalloc preloaded, which PyTorch's CPU
performance guide recommends: it serves a training step's thousands of activation-sized allocations from size
classes, where glibc fragments its heaps (below). Its page decay is off (`JEMALLOC_CONF`): with any decay time
Debian's jemalloc 5.3 returns a freed allocation above ~16 MB to the OS at once, and the next one faults all its
pages in again (a 64 MB tensor: 16,385 faults, 13.5 ms; with the decay off 819 faults, 2.0 ms), which doubled
the time of IMDB's evaluation passes and took 1.7x the time per training step. The library hands the freed pages
back itself, `release_free_memory()`, where a phase's high water becomes garbage (docs/design.md, "Memory on
the CPU"). `make` unpacks Debian's libjemalloc2 into the virtual environment; without it (or with
QLORA_ALLOCATOR=system, or QLORA_JEMALLOC=PATH naming another copy) everything runs on the C library's malloc,
just bigger. A program that imports the library keeps its own allocator: only the commands re-execute.
`allocator()` says which one is serving.
One QLoRA step of SmolLM2-135M (benchmarks/bench_train_step.py, sides ours and ours_glibc of one run, B=8,
T=128, bf16, gradient checkpointing, median of 10 steps, a 2-core Xeon without AMX):

    allocator          step s    peak RSS GB   RSS added by the steps GB
    glibc                7.57        1.186            0.548
    jemalloc             7.37        0.852            0.207

Why glibc grows, and `lean_cpu_allocator()`, its opt-in fix where jemalloc is missing: glibc serves requests
above a threshold with their own mmap (returned to the OS by free) and smaller ones from its heaps (kept after
free, for reuse), and
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
import functools
import os
import sys
from pathlib import Path

M_MMAP_THRESHOLD = -3               # glibc's mallopt parameter number (malloc.h)
DEFAULT_THRESHOLD = 256 * 1024      # bytes: tensors above it get their own mmap

_applied: int | None = None

ALLOCATOR_ENV = "QLORA_ALLOCATOR"   # "system": keep the C library's malloc
JEMALLOC_ENV = "QLORA_JEMALLOC"     # a libjemalloc.so.2 to use instead of the ones searched for
_REEXECUTED = "QLORA_ALLOCATOR_REEXECUTED"
JEMALLOC_CONF = "dirty_decay_ms:-1,muzzy_decay_ms:-1"   # no purge on free: release_free_memory() purges
MALLCTL_ARENAS_ALL = 4096                                # jemalloc's "every arena" index (jemalloc.h)
_JEMALLOC_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib",
                  "/usr/local/lib", "/opt/homebrew/lib")


def find_jemalloc() -> Path | None:
    """$QLORA_JEMALLOC, else the copy `make` put in this environment, else the system's; None if there is none."""
    if os.environ.get(JEMALLOC_ENV):
        path = Path(os.environ[JEMALLOC_ENV])
        if not path.is_file():
            raise FileNotFoundError(f"{JEMALLOC_ENV}={path}: no such file")
        return path
    for folder in (Path(sys.prefix) / "lib" / "jemalloc", *map(Path, _JEMALLOC_DIRS)):
        if (folder / "libjemalloc.so.2").is_file():
            return folder / "libjemalloc.so.2"
    return None


def allocator() -> str:
    """"jemalloc" when it serves this process's mallocs, else "system" (the C library's)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "system"
    return "jemalloc" if "libjemalloc" in maps else "system"


def launched_as_command() -> bool:
    """Whether this process's own command line started the running `__main__`: `python -m train ...` or
    `python examples/x.py ...`, not a module run by runpy inside another program (a test runner), which a
    re-execution would replace."""
    main = sys.modules.get("__main__")
    args = sys.orig_argv[1:]
    if "-m" in args:
        at = args.index("-m") + 1
        name = args[at] if at < len(args) else ""
        spec = getattr(main, "__spec__", None)
        return spec is not None and spec.name in (name, f"{name}.__main__")
    path = getattr(main, "__file__", None)
    return path is not None and any(os.path.realpath(a) == os.path.realpath(path) for a in args if a[:1] != "-")


def run_under_jemalloc() -> None:
    """Re-executes this program, once, with jemalloc preloaded; returns when it cannot or need not.

    For programs' entry points only (it replaces the process): not when jemalloc already serves, when
    QLORA_ALLOCATOR=system, off Linux, when none is found, or when the command line did not start this
    program (`launched_as_command`). It runs with `JEMALLOC_CONF` (freed pages kept for reuse, handed back by
    `release_free_memory` at the library's phase boundaries); a MALLOC_CONF the user sets is passed on instead."""
    if (sys.platform != "linux" or os.environ.get(ALLOCATOR_ENV, "jemalloc") == "system"
            or os.environ.get(_REEXECUTED) or allocator() == "jemalloc" or not launched_as_command()):
        return
    if os.environ.get(ALLOCATOR_ENV, "jemalloc") != "jemalloc":
        raise ValueError(f"{ALLOCATOR_ENV}={os.environ[ALLOCATOR_ENV]!r}: expected 'jemalloc' or 'system'")
    lib = find_jemalloc()
    if lib is None:
        return
    preload = " ".join(filter(None, [str(lib), os.environ.get("LD_PRELOAD")]))
    env = {**os.environ, "MALLOC_CONF": os.environ.get("MALLOC_CONF") or JEMALLOC_CONF, "LD_PRELOAD": preload,
           _REEXECUTED: "1"}
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
    except OSError:
        return                                      # run on as we are


def release_free_memory() -> bool:
    """Hands the pages the allocator holds free back to the OS now; True when an allocator could be asked.

    Under jemalloc (`JEMALLOC_CONF`: it keeps every freed page for reuse, never purging on its own) it purges
    every arena (`mallctl("arena.<all>.purge")`); under glibc it trims the heaps (`malloc_trim(0)`). Called
    where a phase ends and its high-water memory is garbage: after a model is loaded and quantized, after each
    evaluation pass, every `log_every` training steps and at the end of training. The next allocations fault
    their pages in again, once (a few ms per 100 MB)."""
    if allocator() == "jemalloc":
        mallctl = getattr(ctypes.CDLL(None), "mallctl", None)
        if mallctl is None:
            return False
        name = f"arena.{MALLCTL_ARENAS_ALL}.purge".encode()
        return mallctl(ctypes.c_char_p(name), None, None, None, ctypes.c_size_t(0)) == 0
    libc = _glibc()
    if libc is None:
        return False
    libc.malloc_trim(ctypes.c_size_t(0))
    return True


def current_rss_bytes() -> int:
    """This process's resident set size now (/proc/self/statm); 0 where that file is missing."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class FreePageWatch:
    """Calls release_free_memory() once RSS has grown past its level after the last release by `growth` x that
    level or `min_bytes`, whichever is larger: with decay off, jemalloc keeps every freed page, and where the
    batches' shapes vary (lengths grouped, shuffled) the freed sizes may not fit the next step's requests, so
    RSS can climb by gigabytes between two log rows. Checked after every training step (one read of
    /proc/self/statm); purges only when the growth is there, so steady steps keep their pages."""

    def __init__(self, growth: float = 0.5, min_bytes: int = 512 << 20):
        self.growth, self.min_bytes, self.floor = growth, min_bytes, None

    def release(self) -> bool:
        released = release_free_memory()
        self.floor = current_rss_bytes()
        return released

    def check(self) -> bool:
        """Releases if RSS has grown past the limit; True when it did."""
        rss = current_rss_bytes()
        if self.floor is None or rss < self.floor:
            self.floor = rss
            return False
        if rss - self.floor > max(self.growth * self.floor, self.min_bytes):
            self.release()
            return True
        return False


def lean_cpu_allocator(threshold: int = DEFAULT_THRESHOLD) -> bool:
    """Pin glibc's mmap threshold at `threshold` bytes; True when it is in effect (see the module docstring)."""
    global _applied
    if threshold < 1:
        raise ValueError(f"threshold must be >= 1 byte, got {threshold}")
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or allocator() == "jemalloc":   # the user's setting wins;
        return False                                                         # glibc's malloc is not serving
    if _applied == threshold:
        return True
    libc = _glibc()
    if libc is None or libc.mallopt(M_MMAP_THRESHOLD, int(threshold)) != 1:
        return False
    _applied = threshold
    return True


def keep_triton_unloaded() -> None:
    """On a machine without a GPU, imports torch._dynamo with Triton hidden, so that Triton is never loaded.

    transformers' model code imports torch._dynamo, and that import asks `has_triton_package()`, which imports
    Triton and with it its compiler library: 66-71 MB of RSS (measured: a QLoRA step of SmolLM2-135M peaks at
    0.730 instead of 0.804 GB) for a GPU compiler with nothing to compile on a CPU. Hidden for that one import
    (`sys.modules["triton"] = None` makes `import triton` fail), torch caches "no Triton" for the process, as it
    would on a machine without the package; `import triton` works again afterwards (the Triton kernels'
    interpreter, TRITON_INTERPRET=1). Does nothing where a CUDA or XPU device is visible, or once torch._dynamo
    or Triton is imported. `train.load_model` and `train.load_tokenizer` call it before importing transformers.
    """
    import torch

    if "torch._dynamo" in sys.modules or "triton" in sys.modules:
        return
    if torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available()):
        return
    sys.modules["triton"] = None                   # type: ignore[assignment]   # import triton -> ImportError
    try:
        import torch._dynamo  # noqa: F401
    finally:
        if "triton" in sys.modules and sys.modules["triton"] is None:
            del sys.modules["triton"]


@functools.lru_cache(maxsize=None)
def _glibc():
    """glibc's handle, or None on another C library (looked up once: find_library runs ldconfig)."""
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
