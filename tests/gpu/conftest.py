"""tests/gpu: everything here is marked `gpu` and skipped, with the reason printed (CI runs pytest -rs), where
torch sees no CUDA device. Collection stays fast on a CPU box: the modules import only torch and pytest at the
top; models, kernels and subprocesses come inside the tests.

    python -m pytest -rs tests/gpu            # on a GPU machine (H100/H200: ~1-2 min)
    python -m pytest -rs -m "not gpu"         # everything else
"""
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent


def _why_no_gpu() -> str:
    if torch.cuda.is_available():
        return ""
    build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
    return f"no CUDA GPU visible to torch {torch.__version__} ({build})"


@pytest.hookimpl(tryfirst=True)   # before `-m gpu` / `-m "not gpu"` select by the marker added here
def pytest_collection_modifyitems(config, items):
    why = _why_no_gpu()
    for item in items:
        if HERE in Path(item.path).resolve().parents:
            item.add_marker(pytest.mark.gpu)
            if why:
                item.add_marker(pytest.mark.skip(reason=why))


@pytest.fixture(autouse=True)
def _fresh_backend_choices():
    """Each test starts with no cached backend choice and leaves none behind."""
    import quant.backends

    quant.backends.reset()
    yield
    quant.backends.reset()
