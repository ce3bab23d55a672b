"""Shared by every test: `tests/` on sys.path (for `tiny`), the `one_thread` and `smol_tok` fixtures."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors on a shared 2-core box: OpenMP thread hand-offs cost more than they save (up to 10x).
    Use with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def smol_tok():
    """The real SmolLM2 tokenizer (no weights); skips where the model package is not installed."""
    from train import models

    try:
        return models.load_tokenizer("smollm2-135m")
    except ModuleNotFoundError as e:
        pytest.skip(f"SmolLM2 package not installed: {e}")
