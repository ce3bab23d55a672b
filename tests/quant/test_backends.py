"""quant.backends: backend=None's choice (static on the CPU, measured where MEASURED says), its checks and cache.

The measured path runs on CUDA in production; here MEASURED is patched to include "cpu", so the same code times
"bnb" against "torch" on the CPU. tests/gpu/ checks it on a real GPU.
"""
import pytest
import torch
from torch import nn

import quant
import quant.backends as qb
from quant import Linear4bit
from tiny import assert_close, tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def fresh_choices():
    qb.reset()
    yield
    qb.reset()


@pytest.fixture
def measured_on_cpu(monkeypatch):
    monkeypatch.setattr(qb, "MEASURED", ("cuda", "cpu"))


def layer(out_features=48, in_features=64, backend=None, seed=0):
    torch.manual_seed(seed)
    return Linear4bit.from_linear(nn.Linear(in_features, out_features), backend=backend)


def run(lay, m=4):
    x = torch.randn(m, lay.in_features, requires_grad=True)
    y = lay(x)
    y.backward(torch.ones_like(y))
    return y, x.grad


def records(op=None):
    return [r for r in quant.backend_choice() if op is None or r["op"] == op]


def fake_backend(monkeypatch, name, kernels):
    """`name` becomes a candidate (first in line) whose kernels are `kernels`."""
    real_load = qb.load
    monkeypatch.setattr(qb, "static_order", lambda device: [name, "torch"])
    monkeypatch.setattr(qb, "load", lambda b, device: (kernels, "") if b == name else real_load(b, device))


@pytest.mark.parametrize("m, bucket", [(1, "1"), (2, "2-16"), (16, "2-16"), (17, "17-128"), (1024, "129-1024"),
                                       (1025, ">1024")], ids=lambda v: str(v))
def test_rows_bucket(m, bucket):
    assert qb.rows_bucket(m) == bucket


def test_cpu_choice_is_the_offline_measurement_and_times_nothing(monkeypatch):
    def no_probe(*args, **kwargs):
        raise AssertionError("the CPU must not be probed at run time")
    monkeypatch.setattr(qb, "_measure", no_probe)
    lay = layer()
    run(lay)
    lay.dequantize()
    got = {r["op"]: r for r in records()}
    assert set(got) == {"linear", "grad_input", "dequantize"}
    for r in got.values():
        assert r["backend"] == qb.default_backend("cpu") and r["how"] == "static", r
    assert got["linear"]["shape"] == [48, 64] and got["linear"]["rows"] == "2-16" and got["linear"]["device"] == "cpu"


def test_explicit_backend_is_used_as_given_and_records_nothing():
    run(layer(backend="torch"))
    assert records() == []


def test_measured_choice_is_the_fastest_of_the_correct_ones(measured_on_cpu):
    if len(qb.static_order("cpu")) < 2:
        pytest.skip("bitsandbytes' native CPU library is not loaded: only 'torch' is a candidate here")
    y, dx = run(layer())
    ref_y, ref_dx = run(layer(backend="torch"))
    for op in ("linear", "grad_input"):
        (r,) = records(op)
        assert r["how"] == "measured" and set(r["times_ms"]) == {"bnb", "torch"} and r["rejected"] == {}, r
        assert r["backend"] == min(r["times_ms"], key=r["times_ms"].get)
    assert_close(y, ref_y, 0.0, "forward")       # bnb and torch dequantize to the same bits
    assert_close(dx, ref_dx, 0.0, "dL/dx")


def test_a_wrong_backend_is_rejected_however_fast(monkeypatch, measured_on_cpu):
    wrong = qb.Kernels(linear=lambda x, p, s, b: qb.TORCH.linear(x, p, s, b) * 1.1,
                       grad_input=qb.TORCH.grad_input, dequantize=qb.TORCH.dequantize)
    fake_backend(monkeypatch, "bnb", wrong)
    y, _ = run(layer())
    (r,) = records("linear")
    assert r["backend"] == "torch" and "max |diff|" in r["rejected"]["bnb"], r
    assert_close(y, run(layer(backend="torch"))[0], 0.0, "forward")


def test_a_failing_backend_is_recorded_and_skipped(monkeypatch, measured_on_cpu):
    def broken(*args):
        raise RuntimeError("no kernel image is available")
    fake_backend(monkeypatch, "triton", qb.Kernels(broken, broken, broken))
    run(layer())
    for op in ("linear", "grad_input"):
        (r,) = records(op)
        assert r["backend"] == "torch" and r["rejected"]["triton"].startswith("RuntimeError: no kernel image"), r


def test_dequantize_must_be_bit_exact(monkeypatch, measured_on_cpu):
    def off_by_one_ulp(packed, state, dtype):
        w = qb.TORCH.dequantize(packed, state, dtype)
        return torch.nextafter(w, torch.full_like(w, float("inf")))
    fake_backend(monkeypatch, "bnb", qb.Kernels(qb.TORCH.linear, qb.TORCH.grad_input, off_by_one_ulp))
    layer().dequantize()
    (r,) = records("dequantize")
    assert r["backend"] == "torch" and "bit-exact" in r["rejected"]["bnb"], r


def test_the_choice_is_measured_once_per_shape_class(monkeypatch, measured_on_cpu):
    calls = []
    real = qb._measure
    monkeypatch.setattr(qb, "_measure", lambda *a, **k: calls.append(1) or real(*a, **k))
    lay = layer()
    for m in (3, 9, 16):            # one bucket: "2-16"
        run(lay, m)
    assert len(calls) == 2          # linear + grad_input
    run(lay, 40)                    # "17-128"
    run(layer(32, 64), 3)           # another weight shape
    assert len(calls) == 6 and len(records()) == 6


def test_nothing_is_timed_inside_torch_compile(monkeypatch, measured_on_cpu):
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    y, _ = run(layer())
    assert records() == []          # not cached: the next eager call measures
    assert_close(y, run(layer(backend="torch"))[0], 0.0, "forward")


# ---------------------------------------------------------------------------------------------- quantize(device=)


def test_quantize_on_a_device_gives_the_same_layers():
    ref = quant.quantize(tiny_llama())
    moved = quant.quantize(tiny_llama(), device="cpu")
    a, b = ref.state_dict(), moved.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_quantize_to_a_device_leaves_meta_parameters_alone():
    from accelerate import init_empty_weights

    dense = tiny_llama()
    with init_empty_weights():
        empty = type(dense)(dense.config)
    quant.quantize(empty, weights=dense.state_dict().__getitem__, device="cpu")
    assert empty.model.embed_tokens.weight.is_meta
    assert all(not m.weight.is_meta for m in empty.modules() if isinstance(m, Linear4bit))


@pytest.mark.parametrize("device, message", [("gpu", "device must be"), (3.5, "device must be")],
                         ids=["bad-name", "bad-type"])
def test_quantize_rejects_a_bad_device(device, message):
    with pytest.raises(ValueError, match=message):
        quant.quantize(tiny_llama(), device=device)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_quantize_to_cuda_without_a_gpu_says_so():
    with pytest.raises(ValueError, match="no CUDA GPU"):
        quant.quantize(tiny_llama(), device="cuda")
