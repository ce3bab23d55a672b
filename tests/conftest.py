"""Shared by every test: `tests/` on sys.path (for `tiny`), and the `one_thread` fixture."""
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
