"""quant.bnb_native: bitsandbytes' CPU dequantize kernels called without importing bitsandbytes.

Bytes against bitsandbytes' own `functional.dequantize_4bit` (imported here, in the test process), and the
point of it: a training process that runs the "bnb" backend never imports the package.
"""
import subprocess
import sys
import textwrap

import pytest
import torch

import quant.backends as qb
from quant import Linear4bit, bnb_native

pytestmark = pytest.mark.skipif(bnb_native.library() is None, reason="libbitsandbytes_cpu.so not found")


def bnb_reference(layer: Linear4bit, dtype: torch.dtype) -> torch.Tensor:
    import bitsandbytes.functional as bnbf

    state = layer.quant_state
    return bnbf.dequantize_4bit(layer.weight, qb._bnb_quant_state(state, dtype)).view(state.shape)


@pytest.mark.parametrize("shape", [(48, 64), (200, 300), (7, 130), (96, 40)])
@pytest.mark.parametrize("blocksize", [64, 128, 256])
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_bytes_equal_bitsandbytes(shape, blocksize, double_quant, dtype):
    torch.manual_seed(sum(shape) + blocksize)
    layer = Linear4bit.from_linear(torch.nn.Linear(shape[1], shape[0]), blocksize=blocksize,
                                   double_quant=double_quant)
    got = bnb_native.dequantize(layer.weight, layer.quant_state, dtype)
    assert got.dtype == dtype and got.shape == shape
    assert torch.equal(got, bnb_reference(layer, dtype))


def test_absmax_equals_bitsandbytes_nested_dequantize():
    import bitsandbytes.functional as bnbf

    layer = Linear4bit.from_linear(torch.nn.Linear(640, 96), blocksize=64, double_quant=True)
    q = qb._bnb_quant_state(layer.quant_state, torch.float32)
    want = bnbf.dequantize_blockwise(q.absmax, q.state2) + q.offset
    assert torch.equal(bnb_native.absmax_fp32(layer.quant_state), want)


def test_training_step_on_the_bnb_backend_does_not_import_bitsandbytes():
    code = textwrap.dedent("""
        import sys, torch
        from quant import Linear4bit
        layer = Linear4bit.from_linear(torch.nn.Linear(64, 32), backend="bnb", compute_dtype=torch.bfloat16)
        x = torch.randn(4, 64, requires_grad=True)
        layer(x).sum().backward()
        assert x.grad is not None
        print("bitsandbytes" in sys.modules)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_without_the_library_the_package_serves(monkeypatch):
    layer = Linear4bit.from_linear(torch.nn.Linear(64, 32), double_quant=True)
    want = bnb_native.dequantize(layer.weight, layer.quant_state, torch.bfloat16)
    monkeypatch.setattr(bnb_native, "library", lambda: None)
    assert torch.equal(qb._bnb_dequantize(layer.weight, layer.quant_state, torch.bfloat16), want)
