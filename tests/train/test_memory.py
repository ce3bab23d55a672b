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


# ------------------------------------------------------------------ jemalloc for the commands

REEXEC = textwrap.dedent("""
    import sys
    from train.memory import allocator, run_under_jemalloc
    run_under_jemalloc()
    print(allocator(), *sys.argv[1:])
""")


def run_probe(tmp_path, env_extra, *args, source=REEXEC):
    script = tmp_path / "probe.py"
    script.write_text(source)
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", memory._REEXECUTED, memory.ALLOCATOR_ENV)}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = root
    return subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=120,
                          env={**env, **env_extra}, cwd=root)


needs_jemalloc = pytest.mark.skipif(not sys.platform.startswith("linux") or memory.find_jemalloc() is None,
                                    reason="no libjemalloc.so.2 here (make installs one into the venv)")


@needs_jemalloc
def test_a_command_reexecutes_itself_under_jemalloc_with_its_arguments(tmp_path):
    done = run_probe(tmp_path, {}, "--flag", "two words")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split(maxsplit=1) == ["jemalloc", "--flag two words\n"]


@needs_jemalloc
def test_jemalloc_frees_and_the_lean_setting_then_stands_down(tmp_path):
    script = tmp_path / "lean.py"
    script.write_text("from train.memory import lean_cpu_allocator, run_under_jemalloc\n"
                      "run_under_jemalloc()\nprint(lean_cpu_allocator())\n")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, cwd=root,
                          env={**os.environ, "PYTHONPATH": root})
    assert done.stdout.strip() == "False", done.stderr      # glibc's malloc is not the one serving


# Allocates, touches and frees a 64 MiB tensor five times after a first one, then releases the free memory:
# prints the allocator, the page faults per allocation, whether the release worked and the RSS it gave back (MiB).
REUSE = textwrap.dedent("""
    import resource, torch
    from train.memory import allocator, release_free_memory, run_under_jemalloc
    run_under_jemalloc()
    def rss_mib():
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) for l in f if l.startswith("VmRSS")) / 1024
    def faults():
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = torch.ones(16 << 20)
    del x
    f0 = faults()
    for _ in range(5):
        x = torch.ones(16 << 20)
        del x
    per_alloc = (faults() - f0) / 5
    before = rss_mib()
    released = release_free_memory()
    print(allocator(), per_alloc, released, before - rss_mib())
""")


@needs_jemalloc
@pytest.mark.parametrize("user_conf", [None, "dirty_decay_ms:0"])
def test_jemalloc_reuses_freed_pages_until_released(tmp_path, user_conf):
    """Under JEMALLOC_CONF a freed 64 MiB tensor's pages serve the next one without faulting in again (16,384
    faults of 4 KiB pages if they were handed back), and release_free_memory() gives them back; a MALLOC_CONF
    the user sets wins (here: purge at once, every allocation faults)."""
    done = run_probe(tmp_path, {"MALLOC_CONF": user_conf or ""}, source=REUSE)
    assert done.returncode == 0, done.stderr
    name, per_alloc, released, given_back = done.stdout.split()
    assert name == "jemalloc" and released == "True"
    if user_conf is None:
        assert float(per_alloc) < 2000, f"{per_alloc} page faults per reused 64 MiB allocation"
        assert float(given_back) >= 60.0, f"release_free_memory gave back {given_back} MiB of 64"
    else:
        assert float(per_alloc) > 16000, f"the user's MALLOC_CONF was not applied ({per_alloc} faults)"


def test_release_free_memory_under_the_system_allocator(tmp_path):
    done = run_probe(tmp_path, {memory.ALLOCATOR_ENV: "system"}, source=REUSE)
    assert done.returncode == 0, done.stderr
    name, _, released, _ = done.stdout.split()
    assert name == "system" and released == str(memory._glibc() is not None)


def test_system_allocator_when_asked_or_missing(tmp_path):
    done = run_probe(tmp_path, {memory.ALLOCATOR_ENV: "system"}, "x")
    assert done.returncode == 0 and done.stdout.split() == ["system", "x"], done.stderr
    done = run_probe(tmp_path, {memory.JEMALLOC_ENV: str(tmp_path / "none.so")}, "x")
    assert done.returncode != 0 and "QLORA_JEMALLOC=" in done.stderr and "no such file" in done.stderr


def test_an_unknown_allocator_name_is_an_error(monkeypatch):
    monkeypatch.setenv(memory.ALLOCATOR_ENV, "tcmalloc")
    monkeypatch.delenv(memory._REEXECUTED, raising=False)
    if memory.allocator() == "jemalloc" or not sys.platform.startswith("linux"):
        pytest.skip("the check runs before a re-execution, which is not needed here")
    with pytest.raises(ValueError, match="QLORA_ALLOCATOR='tcmalloc': expected 'jemalloc' or 'system'"):
        memory.run_under_jemalloc()


def test_every_command_starts_under_jemalloc():
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    mains = [os.path.join(root, "train", "__main__.py")] + [
        os.path.join(root, "examples", f) for f in sorted(os.listdir(os.path.join(root, "examples")))
        if f.endswith(".py") and f != "common.py"]
    for path in mains:
        guard = open(path).read().split('if __name__ == "__main__":')[1]
        assert guard.index("run_under_jemalloc()") < guard.index("main("), path


def test_a_module_run_inside_another_program_does_not_reexecute(monkeypatch):
    # runpy.run_module("train", run_name="__main__") inside pytest (tests/test_readme.py does) must not replace
    # the test runner's process with a re-executed pytest
    import types

    fake = types.ModuleType("__main__")
    fake.__spec__ = types.SimpleNamespace(name="train.__main__")
    fake.__file__ = os.path.join(os.path.dirname(memory.__file__), "__main__.py")
    monkeypatch.setitem(sys.modules, "__main__", fake)
    monkeypatch.setattr(sys, "orig_argv", [sys.executable, "-m", "pytest", "-q"])
    assert not memory.launched_as_command()
    monkeypatch.setattr(sys, "orig_argv", [sys.executable, "-m", "train", "fit"])
    assert memory.launched_as_command()
    monkeypatch.setattr(sys, "orig_argv", [sys.executable, "/somewhere/pytest", "tests"])
    assert not memory.launched_as_command()


# Loads a model folder the way every command does and reports what got imported.
TRITON_PROBE = textwrap.dedent("""
    import sys
    import train
    model, _ = train.load_model(sys.argv[1], quantize=True)
    loaded = "triton" in sys.modules
    import triton                                  # still importable afterwards (the kernels' interpreter)
    from torch.utils._triton import has_triton_package
    print(loaded, "torch._dynamo" in sys.modules, has_triton_package(), triton.__name__)
""")


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="on a GPU machine Triton is loaded on purpose")
def test_loading_a_model_on_a_cpu_leaves_triton_unloaded(tmp_path):
    from tiny import tiny_llama
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tiny_llama().save_pretrained(tmp_path)
    vocab = Tokenizer(models.WordLevel({"a": 0, "<unk>": 1}, unk_token="<unk>"))
    PreTrainedTokenizerFast(tokenizer_object=vocab, unk_token="<unk>").save_pretrained(tmp_path)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = subprocess.run([sys.executable, "-c", TRITON_PROBE, str(tmp_path)], capture_output=True, text=True,
                         timeout=300, cwd=root, env={**os.environ, "PYTHONPATH": root})
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["False", "True", "False", "triton"], out.stdout


def test_keep_triton_unloaded_stands_down_once_dynamo_is_imported(monkeypatch):
    import torch._dynamo  # noqa: F401   (pytest's process may have it already)
    monkeypatch.delitem(sys.modules, "triton", raising=False)
    memory.keep_triton_unloaded()
    assert "triton" not in sys.modules        # no sentinel left behind: nothing was imported under it


@pytest.mark.parametrize("floor_mb, grow_mb, releases", [(1000, 400, False), (1000, 600, True),
                                                          (4000, 1900, False), (4000, 2100, True)])
def test_free_page_watch_releases_only_past_its_growth_limit(monkeypatch, floor_mb, grow_mb, releases):
    rss, calls = [floor_mb << 20], []
    monkeypatch.setattr(memory, "current_rss_bytes", lambda: rss[0])
    monkeypatch.setattr(memory, "release_free_memory", lambda: calls.append(rss[0]) or True)
    watch = memory.FreePageWatch(growth=0.5, min_bytes=512 << 20)
    assert watch.check() is False and watch.floor == floor_mb << 20       # the first check sets the floor
    rss[0] = (floor_mb + grow_mb) << 20
    assert watch.check() is releases and len(calls) == int(releases)
    if releases:
        assert watch.floor == rss[0]          # the level right after the release is the new floor
        rss[0] = floor_mb << 20
        assert watch.check() is False and watch.floor == floor_mb << 20   # RSS fell: the floor follows it


def test_current_rss_bytes_sees_a_touched_allocation():
    import torch
    before = memory.current_rss_bytes()
    x = torch.ones(64 << 20, dtype=torch.uint8)       # 64 MiB, every page written
    assert memory.current_rss_bytes() - before > 48 << 20
    del x
