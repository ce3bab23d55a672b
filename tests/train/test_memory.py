"""train.memory: the pinned mmap threshold hands a freed tensor's pages back to the OS at once."""
import os
import subprocess
import sys
import textwrap

import pytest

from train import memory

# Frees a 16 MiB tensor twice (glibc's dynamic threshold would now serve that size from its heap), then
# allocates, touches and frees it again and prints how much RSS the last free gave back, in MiB.
PROBE = textwrap.dedent("""
    import sys, torch
    from train.memory import lean_cpu_allocator
    def rss_mib():
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) for l in f if l.startswith("VmRSS")) / 1024
    print(lean_cpu_allocator() if sys.argv[1] == "lean" else False)
    for _ in range(2):
        x = torch.ones(4 << 20)      # 16 MiB of fp32
        del x
    x = torch.ones(4 << 20)
    before = rss_mib()
    del x
    print(before - rss_mib())
""")


def probe(mode):
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, env=env, cwd=root,
                         timeout=120, check=True).stdout.split()
    return out[0] == "True", float(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux") or memory._glibc() is None, reason="glibc only")
def test_lean_allocator_returns_freed_tensor_memory():
    applied, released = probe("lean")
    assert applied
    assert released >= 15.0, f"a freed 16 MiB tensor gave back only {released:.1f} MiB"


def test_lean_allocator_rejects_bad_threshold():
    with pytest.raises(ValueError, match="threshold"):
        memory.lean_cpu_allocator(0)


def test_lean_allocator_leaves_the_users_setting(monkeypatch):
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "131072")
    assert memory.lean_cpu_allocator() is False
