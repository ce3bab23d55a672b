"""quant.Linear4bit and quant.quantize: math vs a dense fp32 reference, backends, state dicts, whole models.

Tolerances are relative to max |reference|, per compute dtype. The layer and the reference multiply by
the *same* dequantized weight, so they differ only by the rounding of x and of the output to the compute
dtype plus summation order: fp32 measured 0 (same kernel), bf16 3.4e-3 (a bf16 ulp is 2^-8 = 3.9e-3
relative), fp16 4.7e-4 (2^-11 = 4.9e-4), worst of 5 seeds x 5 shapes. Limits are about twice that.
"""

import copy
import logging
import sys
import types
import warnings
import weakref
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import quant
import quant.backends as qbackends
import quant.cpu_matmul as cpu_matmul
import quant.linear as qlinear
from quant import Linear4bit, format_memory_report, memory_report
from tiny import assert_close, tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TOL = {torch.float32: 1e-6, torch.bfloat16: 2**-7, torch.float16: 2**-10}
# (out, in): square / 300x400 (rows are not whole blocks) / tiny odd / odd numel with a partial block
SHAPES = {"64x64": (64, 64), "300x400": (300, 400), "1x7": (1, 7), "33x65": (33, 65)}


def make_linear(out_features, in_features, dtype=torch.float32, bias=True, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(in_features, out_features, bias=bias).to(dtype)


def no_dynamo():
    # bitsandbytes torch.compile()s its odd-size CPU fallback, once per shape: seconds each. Eager is the same math.
    return torch._dynamo.config.patch(disable=True)


# ---------------------------------------------------------------------------------------------- math


BACKENDS = ["torch", "bnb"]  # "triton" runs on CPU only in its interpreter: tests/quant/test_triton.py


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES.keys())
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_forward_matches_dense_reference(shape, dtype, backend):
    dtype = DTYPES[dtype]
    linear = make_linear(*shape, dtype)
    layer = Linear4bit.from_linear(linear, backend=backend)
    x = torch.randn(2, 3, shape[1]).to(dtype)  # [..., in] with two leading dims
    y = layer(x)
    assert y.shape == (2, 3, shape[0]) and y.dtype == dtype
    ref = F.linear(x.float(), layer.dequantize(torch.float32), linear.bias.float())
    assert_close(y, ref, TOL[dtype], "forward")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES.keys())
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_input_gradient_matches_dense_reference(shape, dtype, backend):
    dtype = DTYPES[dtype]
    layer = Linear4bit.from_linear(make_linear(*shape, dtype), backend=backend)
    x = torch.randn(4, shape[1]).to(dtype).requires_grad_()
    dy = torch.randn(4, shape[0]).to(dtype)
    layer(x).backward(dy)
    assert_close(x.grad, dy.float() @ layer.dequantize(torch.float32), TOL[dtype], "dL/dx")


def test_weight_gets_no_gradient_and_bias_stays_frozen():
    layer = Linear4bit.from_linear(make_linear(8, 16))
    layer(torch.randn(3, 16, requires_grad=True)).sum().backward()
    assert layer.weight.grad is None and not layer.weight.requires_grad
    assert layer.bias.grad is None and not layer.bias.requires_grad


def test_unfrozen_bias_gets_its_gradient():
    layer = Linear4bit.from_linear(make_linear(8, 16))
    layer.bias.requires_grad_(True)
    dy = torch.randn(2, 5, 8)
    layer(torch.randn(2, 5, 16)).backward(dy)
    assert_close(layer.bias.grad, dy.sum(dim=(0, 1)), 1e-6, "dL/db")


def test_backward_saves_only_the_packed_weight():
    layer = Linear4bit.from_linear(make_linear(64, 128))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = layer(torch.randn(4, 128, requires_grad=True))
    ours = [t for t in saved if t.dtype == torch.uint8 or t.numel() >= 64 * 128]
    assert len(ours) == 1 and ours[0].data_ptr() == layer.weight.data_ptr(), [(t.dtype, t.shape) for t in ours]
    y.sum().backward()


@pytest.mark.parametrize("half_matmul", ["native", "fp32"])
@pytest.mark.parametrize("backend", ["torch", "bnb"])
def test_compute_dtype_is_used_and_output_keeps_input_dtype(monkeypatch, half_matmul, backend):
    monkeypatch.setenv(cpu_matmul.HALF_MATMUL_ENV, half_matmul)
    monkeypatch.setattr(cpu_matmul, "_HALF_MATMUL", {})
    linear = make_linear(32, 64)
    layer = Linear4bit.from_linear(linear, compute_dtype=torch.bfloat16, backend=backend)
    x = torch.randn(5, 64, requires_grad=True)
    y = layer(x)
    assert y.dtype == torch.float32
    x16, w16, b16 = x.detach().bfloat16(), layer.dequantize(torch.bfloat16), linear.bias.detach().bfloat16()
    dy = torch.randn(5, 32)
    y.backward(dy)
    if half_matmul == "native":       # bf16 matmuls
        expected, dx = F.linear(x16, w16, b16), dy.bfloat16() @ w16
    else:                             # the weight dequantized to fp32, bf16 activations, fp32 matmuls
        w32 = layer.dequantize(torch.float32)
        expected = F.linear(x16.float(), w32, b16.float()).bfloat16()
        dx = (dy.bfloat16().float() @ w32).bfloat16()
    assert_close(y, expected.float(), 0.0, f"bf16 compute, {half_matmul} matmul")
    assert_close(x.grad, dx.float(), 0.0, f"bf16 input gradient, {half_matmul} matmul")
    assert cpu_matmul.half_matmul_choice(torch.bfloat16)["backend"] == half_matmul


def test_half_matmul_choice_is_measured_once_per_machine_and_listed(monkeypatch, tmp_path):
    monkeypatch.delenv(cpu_matmul.HALF_MATMUL_ENV, raising=False)
    monkeypatch.setenv("QLORA_CACHE", str(tmp_path))
    monkeypatch.setattr(cpu_matmul, "_HALF_MATMUL", {})
    first = cpu_matmul.half_matmul_choice(torch.bfloat16)
    assert first["how"] == "measured" and first["backend"] in ("native", "fp32")
    assert set(first["times_ms"]) == {"native", "fp32"}
    assert cpu_matmul.half_matmul_choice(torch.bfloat16) is first
    assert first in quant.backend_choice()
    monkeypatch.setattr(cpu_matmul, "_HALF_MATMUL", {})                    # a new process on the same machine
    again = cpu_matmul.half_matmul_choice(torch.bfloat16)
    assert again["how"].startswith("measured before on this CPU") and again["backend"] == first["backend"]
    assert again["times_ms"] == first["times_ms"]
    cpu_matmul.half_matmul_cache().write_text("{not json")                   # a damaged cache is measured again
    monkeypatch.setattr(cpu_matmul, "_HALF_MATMUL", {})
    assert cpu_matmul.half_matmul_choice(torch.bfloat16)["how"] == "measured"
    wanted = torch.float32 if first["backend"] == "fp32" else torch.bfloat16
    assert cpu_matmul.matmul_dtype(torch.zeros(2, 2, dtype=torch.bfloat16)) == wanted
    assert cpu_matmul.matmul_dtype(torch.zeros(2, 2)) == torch.float32


def test_half_matmul_setting_is_checked(monkeypatch):
    monkeypatch.setenv(cpu_matmul.HALF_MATMUL_ENV, "fast")
    monkeypatch.setattr(cpu_matmul, "_HALF_MATMUL", {})
    with pytest.raises(ValueError, match="QLORA_CPU_HALF_MATMUL='fast': expected 'native' or 'fp32'"):
        cpu_matmul.half_matmul_choice(torch.bfloat16)


def test_works_under_non_reentrant_checkpoint():
    layer = Linear4bit.from_linear(make_linear(48, 96))
    x = torch.randn(2, 7, 96, requires_grad=True)
    layer(x).square().sum().backward()
    plain, x.grad = x.grad, None
    torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=False).square().sum().backward()
    assert_close(x.grad, plain, 0.0, "dL/dx under checkpoint")


def test_wrong_input_width_is_a_value_error():
    layer = Linear4bit.from_linear(make_linear(8, 16))
    with pytest.raises(ValueError, match=r"expected input \[\.\.\., 16\]"):
        layer(torch.randn(2, 15))


# ---------------------------------------------------------------------------------------------- backends


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_bnb_backend_agrees_with_torch(shape, dtype):
    pytest.importorskip("bitsandbytes", reason="the 'bnb' backend needs bitsandbytes")
    linear = make_linear(*shape, DTYPES[dtype])
    ref, bnb = Linear4bit.from_linear(linear, backend="torch"), Linear4bit.from_linear(linear, backend="bnb")
    x = torch.randn(3, shape[1]).to(DTYPES[dtype])
    xs = [x.clone().requires_grad_(), x.clone().requires_grad_()]
    with no_dynamo():
        ys = [ref(xs[0]), bnb(xs[1])]
        dy = torch.randn_like(ys[0])
        for y in ys:
            y.backward(dy)
        # both dequantize to the same bits, and F.linear does the rest: equal up to nothing
        assert_close(bnb.dequantize(), ref.dequantize(), 0.0, "bnb vs torch dequantize")
    assert_close(ys[1], ys[0], 0.0, "bnb vs torch forward")
    assert_close(xs[1].grad, xs[0].grad, 0.0, "bnb vs torch dL/dx")


def test_default_backend_on_cpu_is_bnb_when_its_library_loads():
    # bnb's AVX-512 dequantize is 2-6x faster than quant.nf4's on this CPU (numbers in quant/nf4.py)
    try:
        from bitsandbytes.cextension import ErrorHandlerMockBNBNativeLibrary, lib
        expected = "torch" if isinstance(lib, ErrorHandlerMockBNBNativeLibrary) else "bnb"
    except ImportError:
        expected = "torch"
    assert Linear4bit(16, 8).backend is None  # None: chosen per device and shape class (tests/quant/test_backends.py)
    assert qlinear.default_backend("cpu") == expected


@pytest.mark.parametrize("shape, native", [((8, 64), True), ((3, 5), False)], ids=["even", "odd_numel"])
def test_bnb_backend_uses_quant_nf4_where_bnb_has_no_native_kernel(monkeypatch, shape, native):
    bnbf = pytest.importorskip("bitsandbytes.functional")
    from quant import bnb_native

    calls = []   # bnb's C kernel, reached through the package or directly (quant.bnb_native)
    for owner, name in ((bnbf, "dequantize_4bit"), (bnb_native, "dequantize")):
        real = getattr(owner, name)
        monkeypatch.setattr(owner, name, lambda *a, _real=real, **k: calls.append(1) or _real(*a, **k))
    layer = Linear4bit.from_linear(make_linear(*shape), backend="bnb")
    ref = Linear4bit.from_linear(make_linear(*shape), backend="torch")
    assert_close(layer.dequantize(), ref.dequantize(), 0.0, "dequantize")
    assert bool(calls) == native  # odd counts would hit bnb's torch.compile()d fallback


@pytest.mark.parametrize("broken", ["unavailable", "missing"])
def test_unavailable_triton_falls_back_to_torch_with_the_reason(monkeypatch, broken):
    if broken == "unavailable":
        fake = types.ModuleType("quant.triton_kernels")
        fake.is_available = lambda: (False, "no GPU in this test")
        reason = "no GPU in this test"
    else:
        fake, reason = None, "cannot be imported"  # a None entry in sys.modules makes the import fail
    monkeypatch.setitem(sys.modules, "quant.triton_kernels", fake)
    monkeypatch.setattr(qbackends, "_WARNED", set())
    linear = make_linear(8, 16)
    layer, ref = Linear4bit.from_linear(linear, backend="triton"), Linear4bit.from_linear(linear, backend="torch")
    x = torch.randn(2, 16)
    with pytest.warns(RuntimeWarning, match=f"'triton' is unavailable .*{reason}.*falling back to 'torch'"):
        y = layer(x)
    assert_close(y, ref(x), 0.0, "fallback output")


# ---------------------------------------------------------------------------------------------- state dict


BNB_KEYS = ["weight", "bias", "weight.absmax", "weight.quant_map", "weight.nested_absmax",
            "weight.nested_quant_map", "weight.quant_state.bitsandbytes__nf4"]


def bnb_layer(linear, double_quant=True):
    """bitsandbytes' own Linear4bit holding `linear`'s weight, quantized on the CPU."""
    bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is the interchange reference")
    layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                              quant_type="nf4", compress_statistics=double_quant).to(linear.weight.dtype)
    layer.load_state_dict(linear.state_dict())
    return layer.to("cpu")  # Params4bit quantizes on its first move to a device


def test_state_dict_uses_bnb_keys():
    assert list(Linear4bit.from_linear(make_linear(8, 16)).state_dict()) == BNB_KEYS
    no_dq = Linear4bit.from_linear(make_linear(8, 16), double_quant=False).state_dict()
    assert list(no_dq) == ["weight", "bias", "weight.absmax", "weight.quant_map",
                           "weight.quant_state.bitsandbytes__nf4"]


@pytest.mark.parametrize("dq", [True, False], ids=["dq", "nodq"])
@pytest.mark.parametrize("dtype", DTYPES.keys())
def test_state_dict_bytes_equal_bnb_linear4bit(dtype, dq):
    linear = make_linear(30, 40, DTYPES[dtype])  # 1200 elements: rows span blocks
    ours, theirs = Linear4bit.from_linear(linear, double_quant=dq).state_dict(), bnb_layer(linear, dq).state_dict()
    assert list(ours) == list(theirs)
    for key in theirs:
        assert torch.equal(ours[key], theirs[key]), key


@pytest.mark.parametrize("blocksize", [64, 128])
def test_state_dict_round_trip_restores_an_identical_layer(blocksize):
    layer = Linear4bit.from_linear(make_linear(33, 65, torch.bfloat16), blocksize=blocksize)
    fresh = Linear4bit(65, 33)  # different dtype and placeholder weight: everything comes from the file
    assert str(fresh.load_state_dict(layer.state_dict())) == "<All keys matched successfully>"
    for key, value in layer.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    assert fresh.quant_state.dtype == torch.bfloat16 and fresh.quant_state.blocksize == blocksize
    x = torch.randn(4, 65, dtype=torch.bfloat16)
    assert_close(fresh(x), layer(x), 0.0, "reloaded forward")


def test_bnb_state_dict_loads_into_ours():
    linear = make_linear(30, 40, torch.bfloat16)
    theirs = bnb_layer(linear)
    ours = Linear4bit(40, 30)
    ours.load_state_dict(theirs.state_dict())
    import bitsandbytes.functional as bnbf

    with no_dynamo():
        expected = bnbf.dequantize_4bit(theirs.weight.data.view(-1, 1), _flat(theirs.weight.quant_state))
    assert_close(ours.dequantize(), expected.view(30, 40), 0.0, "dequantized bnb checkpoint")
    assert torch.equal(ours.bias, theirs.bias)


def test_our_state_dict_loads_into_bnb():
    bnb = pytest.importorskip("bitsandbytes")
    import bitsandbytes.functional as bnbf

    ours = Linear4bit.from_linear(make_linear(30, 40, torch.bfloat16))
    sd = ours.state_dict()
    stats = {k.removeprefix("weight."): v for k, v in sd.items() if k.startswith("weight.")}
    weight = bnb.nn.Params4bit.from_prequantized(data=sd["weight"], quantized_stats=stats, device="cpu")
    with no_dynamo():
        got = bnbf.dequantize_4bit(weight.data, _flat(weight.quant_state)).view(30, 40)
    assert weight.quant_state.shape == (30, 40) and weight.quant_state.dtype == torch.bfloat16
    assert_close(got, ours.dequantize(), 0.0, "bnb's dequantize of our checkpoint")


def test_bnb_checkpoint_with_bf16_quant_storage_loads_into_ours():
    bnb = pytest.importorskip("bitsandbytes")
    linear = make_linear(30, 64, torch.bfloat16)
    theirs = bnb.nn.Linear4bit(64, 30, quant_type="nf4", quant_storage=torch.bfloat16).to(torch.bfloat16)
    theirs.load_state_dict(linear.state_dict())
    sd = theirs.to("cpu").state_dict()
    assert sd["weight"].dtype == torch.bfloat16  # the packed bytes, two per bf16 (FSDP-friendly storage)
    ours = Linear4bit(64, 30)
    ours.load_state_dict(sd)
    assert_close(ours.dequantize(), Linear4bit.from_linear(linear).dequantize(), 0.0, "bf16-stored checkpoint")


def _flat(qs):
    """The same QuantState with a 1-D shape (bnb 0.50's CPU kernel mis-indexes blocks spanning rows)."""
    flat = copy.copy(qs)
    flat.shape = torch.Size([qs.shape.numel()])
    return flat


def test_dense_linear_state_dict_is_quantized_on_load():
    linear = make_linear(8, 64)
    layer = Linear4bit(64, 8)
    layer.load_state_dict(linear.state_dict())
    assert_close(layer.dequantize(), Linear4bit.from_linear(linear).dequantize(), 0.0, "quantized on load")


def test_missing_weight_is_reported():
    result = Linear4bit(16, 8).load_state_dict({"bias": torch.zeros(8)}, strict=False)
    assert result.missing_keys == ["weight"]


def test_checkpoint_with_another_code_table_is_an_error():
    sd = Linear4bit(16, 8).state_dict()
    sd["weight.quant_map"] = sd["weight.quant_map"].flip(0)
    with pytest.raises(RuntimeError, match="quant_map is not the NF4 table"):
        Linear4bit(16, 8).load_state_dict(sd)


def test_checkpoint_of_another_shape_is_an_error():
    with pytest.raises(RuntimeError, match=r"checkpoint weight shape \(8, 16\) != \(16, 8\)"):
        Linear4bit(8, 16).load_state_dict(Linear4bit(16, 8).state_dict())


# ---------------------------------------------------------------------------------------------- copies


def test_quantized_copy_keeps_config_and_bias_and_quantizes_the_new_weight():
    layer = Linear4bit.from_linear(make_linear(24, 64), blocksize=128, double_quant=False,
                                   compute_dtype=torch.bfloat16)
    new_weight = torch.randn(24, 64)
    copy_ = layer.quantized_copy(new_weight)
    assert (copy_.quant_state.blocksize, copy_.quant_state.double_quant) == (128, False)
    assert (copy_.compute_dtype, copy_.backend) == (torch.bfloat16, layer.backend)
    assert torch.equal(copy_.bias, layer.bias) and copy_.bias.data_ptr() != layer.bias.data_ptr()
    expected = quant.dequantize_nf4(*quant.quantize_nf4(new_weight, 128, double_quant=False))
    assert_close(copy_.dequantize(), expected, 0.0, "re-quantized weight")


def test_quantized_copy_rejects_a_wrong_shape():
    with pytest.raises(ValueError, match=r"weight has shape \(8, 8\), expected \(24, 64\)"):
        Linear4bit.from_linear(make_linear(24, 64)).quantized_copy(torch.randn(8, 8))


def test_extra_repr_shows_shape_blocksize_dq_backend():
    text = repr(Linear4bit(64, 32, bias=False, blocksize=128, double_quant=False, backend="torch"))
    for part in ["in_features=64", "out_features=32", "bias=False", "blocksize=128", "dq=False", "backend='torch'"]:
        assert part in text, text


def test_moving_the_layer_moves_its_quant_state():
    layer = Linear4bit.from_linear(make_linear(8, 64)).to("meta")  # a device move without a GPU
    devices = {t.device.type for t in [layer.weight, layer.bias, *layer.quant_state.tensors()]}
    assert devices == {"meta"}, devices


def test_half_keeps_the_quant_state_in_fp32():
    layer = Linear4bit.from_linear(make_linear(8, 64), double_quant=False).half()
    assert layer.quant_state.absmax.dtype == torch.float32 and layer.weight.dtype == torch.uint8
    assert layer.bias.dtype == torch.float16


# ---------------------------------------------------------------------------------------------- models


def test_quantize_replaces_every_linear_but_lm_head():
    model = quant.quantize(tiny_llama())
    kinds = {name: type(m) for name, m in model.named_modules() if isinstance(m, (nn.Linear, Linear4bit))}
    assert kinds.pop("lm_head") is nn.Linear
    assert len(kinds) == 14 and set(kinds.values()) == {Linear4bit}, kinds


def test_quantized_llama_logits():
    dense = tiny_llama()
    model = quant.quantize(copy.deepcopy(dense))
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits, dense_logits = model(ids).logits, dense(ids).logits
        # Tight: the same model with its Linear weights set to the dequantized ones (same fp32 ops: 0 measured).
        for name, m in model.named_modules():
            if isinstance(m, Linear4bit):
                dense.get_submodule(name).weight.copy_(m.dequantize(torch.float32))
        assert_close(logits, dense(ids).logits, 1e-5, "4-bit model vs dense model with dequantized weights")
    # Loose: NF4 error vs the original weights moves the logits 0.11-0.14 x max|logit| (5 seeds); allow 0.25,
    # and require a visible change so a no-op quantize cannot pass.
    assert_close(logits, dense_logits, 0.25, "4-bit vs original dense logits")
    assert (logits - dense_logits).abs().max() > 1e-3


def test_memory_report_counts_real_elements_and_bytes():
    dense = tiny_llama()
    n_params = sum(p.numel() for p in dense.parameters())
    linear_numels = [m.weight.numel() for n, m in dense.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]
    model = quant.quantize(dense)
    report = memory_report(model)

    def nf4_bytes(n):  # packed + uint8 absmax + code + offset + nested absmax + nested code
        blocks = -(-n // 64)
        return (n + 1) // 2 + blocks + 16 * 4 + 4 + 4 * -(-blocks // 256) + 256 * 4

    assert report["quantized_layers"] == 14
    assert report["quantized_params"] == sum(linear_numels)
    assert report["total_params"] == n_params
    assert report["quantized_bytes"] == sum(nf4_bytes(n) for n in linear_numels)
    assert report["dense_bytes"] == 4 * (n_params - sum(linear_numels))  # fp32 embeddings, norms, lm_head
    assert report["total_bytes"] == report["quantized_bytes"] + report["dense_bytes"]
    assert report["bytes_per_param"] == pytest.approx(report["total_bytes"] / n_params)
    table = format_memory_report(report)
    assert "4-bit weights" in table and f"{report['total_bytes']:,}" in table


def test_quantize_frees_each_dense_weight_as_it_goes(monkeypatch):
    model = tiny_llama()
    refs = [weakref.ref(m.weight) for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]
    alive_at_each_layer = []
    original = Linear4bit.from_linear.__func__

    def spy(cls, linear, *args, **kwargs):
        alive_at_each_layer.append(sum(r() is not None for r in refs))
        return original(cls, linear, *args, **kwargs)

    monkeypatch.setattr(Linear4bit, "from_linear", classmethod(spy))
    quant.quantize(model)
    assert alive_at_each_layer == list(range(14, 0, -1))  # one fewer dense weight before every new layer
    assert all(r() is None for r in refs)


def test_quantize_skips_names_and_suffixes():
    model = quant.quantize(tiny_llama(), skip=("lm_head", "mlp.down_proj", "model.layers.0.self_attn.q_proj"))
    linear = sorted(n for n, m in model.named_modules() if isinstance(m, nn.Linear))
    assert linear == ["lm_head", "model.layers.0.mlp.down_proj", "model.layers.0.self_attn.q_proj",
                      "model.layers.1.mlp.down_proj"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quant.quantize(tiny_llama(), skip=("no_such_module",))  # matching nothing is fine


# Bad arguments (and models that already have adapters): tests/quant/test_quantize_errors.py


def test_quantize_of_a_bare_linear_points_to_from_linear():
    with pytest.raises(ValueError, match="from_linear"):
        quant.quantize(nn.Linear(8, 8))


# ----------------------------------------------------------------------------------------------
# bitsandbytes' import-time log


def test_only_the_kernel_hub_message_of_bitsandbytes_is_dropped(caplog):
    log = logging.getLogger("bitsandbytes.backends.cpu.ops")      # quant.linear filtered it when imported
    with caplog.at_level(logging.WARNING, logger=log.name):
        log.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure you "
                    "already `pip install kernels`", "No module named 'kernels'")
        log.warning("Failed to load the CPU dequantize kernel: %s", "libbitsandbytes_cpu.so missing")
    assert [r.getMessage() for r in caplog.records] == [
        "Failed to load the CPU dequantize kernel: libbitsandbytes_cpu.so missing"]


def test_importing_bitsandbytes_after_quant_is_quiet():
    import subprocess

    run = subprocess.run([sys.executable, "-c", "import quant, bitsandbytes"], capture_output=True, text=True,
                         cwd=str(Path(qlinear.__file__).resolve().parent.parent), timeout=120)
    assert run.returncode == 0, run.stderr
    assert "kernels-community" not in run.stderr + run.stdout
