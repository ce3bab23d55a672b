"""Triton NF4 kernels vs the references: bitsandbytes' bytes, the torch oracle, and the dense weight.

Without CUDA the kernels run in the Triton interpreter (numpy), hence the small shapes. `@triton.jit` reads
TRITON_INTERPRET when it decorates, i.e. when quant.triton_kernels is imported: the flag is set before that
import and, if an earlier test module already imported the module without it, the module is reloaded.
triton itself is imported first, without the flag: its own `@jit` library functions must stay in one mode
(a later lazy import of triton.experimental.gluon asserts so), and our kernels call none of them.
The environment is then restored, so no other test sees the flag.
"""

import importlib
import math
import os
import types

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton", reason="triton is not installed: pip install -e '.[test]'")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _import_kernels():
    if DEVICE == "cuda":
        return importlib.import_module("quant.triton_kernels")
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        tk = importlib.import_module("quant.triton_kernels")
        return tk if tk.INTERPRET else importlib.reload(tk)
    finally:
        if previous is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = previous


tk = _import_kernels()
bnbf = pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes is the byte-level reference")
from quant.nf4 import dequantize_nf4, quantize_nf4  # noqa: E402 - after the interpreter setup

# Tolerances of the fused matmul vs dequantize + F.linear, relative to max|reference|: both sides see the
# same weight and accumulate in fp32, so they differ by summation order plus the final rounding of the
# output (a unit in the last place: bf16 2^-8, fp16 2^-11); fp32 differs by summation order only.
TIGHT = {torch.float32: 1e-5, torch.bfloat16: 2**-7, torch.float16: 2**-10}
# The 3-way ratio err(kernel vs dense) / err(dequant + F.linear vs dense): the quantization error (~0.1
# relative) dominates, so the ratio is 1 up to the tight difference above. Measured on the CPU interpreter,
# worst over the grid below: |ratio - 1| = 4e-7 fp32, 0 bf16, 1e-6 fp16; tight diff 3e-7, 0, 1.8e-4.
RATIO = {torch.float32: 1e-4, torch.bfloat16: 0.02, torch.float16: 0.005}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# (out, in): square; ragged N tile; 260 blocks (> one nested group of 256); blocks spanning rows
# (72 % 64 != 0); odd numel.
SHAPES = {"64x64": (64, 64), "96x128": (96, 128), "130x128": (130, 128), "40x72": (40, 72), "33x31": (33, 31)}
GRAD_SHAPES = ["96x128", "40x72", "33x31"]  # the backward's N is in_features: ragged in all three


def _reference_dequantize(packed, state):
    """The layout in five torch lines (docs/design.md), fp32: code[nibble] * absmax[block]."""
    numel = math.prod(state.shape)
    byte = packed.flatten().long()
    nibble = torch.stack([byte >> 4, byte & 15], dim=1).flatten()[:numel]  # first element: high nibble
    absmax = state.absmax.float()
    if state.nested_absmax is not None:
        nested = state.nested_absmax.repeat_interleave(state.nested_blocksize)[: absmax.numel()]
        absmax = state.nested_code[state.absmax.long()] * nested + state.offset
    return (state.code[nibble] * absmax.repeat_interleave(state.blocksize)[:numel]).view(state.shape)


def _bnb_quantize(w, blocksize, double_quant):
    """bitsandbytes' bytes, as the NF4State fields (docs/design.md), and its QuantState."""
    packed, qs = bnbf.quantize_4bit(w, quant_type="nf4", blocksize=blocksize, compress_statistics=double_quant)
    state = types.SimpleNamespace(
        shape=qs.shape, dtype=qs.dtype, blocksize=qs.blocksize, absmax=qs.absmax, code=qs.code,
        offset=qs.offset if double_quant else None,
        nested_absmax=qs.state2.absmax if double_quant else None,
        nested_code=qs.state2.code if double_quant else None, nested_blocksize=256)
    return packed, state, qs


def _quantize(w, blocksize=64, double_quant=True):
    """(packed, state, dequantized fp32 weight) from the torch oracle."""
    packed, state = quantize_nf4(w, blocksize=blocksize, double_quant=double_quant)
    return packed, state, dequantize_nf4(packed, state, dtype=torch.float32)


def _weight(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 0.05).to(DEVICE)  # (out, in)


def _rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _assert_tight(got, want, dtype, what):
    diff = (got.float() - want.float()).abs()
    scale = want.float().abs().max().item()
    assert diff.max().item() <= TIGHT[dtype] * scale, (
        f"{what}: max diff {diff.max().item():.3g}, mean {diff.mean().item():.3g}, "
        f"allowed {TIGHT[dtype]:.3g} * max|ref| {scale:.3g}")


def _assert_three_way(got, via_dequant, dense, dtype, what):
    """STYLE rule 18: tight vs dequantize + dense op, loose vs the dense weight, error ratio near 1."""
    _assert_tight(got, via_dequant, dtype, what)
    err_kernel, err_ref = _rel_err(got, dense), _rel_err(via_dequant, dense)
    assert err_kernel < 0.2, f"{what}: relative error vs the dense weight {err_kernel:.3g} (NF4 gives ~0.1)"
    assert abs(err_kernel / err_ref - 1) < RATIO[dtype], (
        f"{what}: err vs dense {err_kernel:.4g}, dequant reference's {err_ref:.4g}, ratio {err_kernel / err_ref:.4f}")


# ----------------------------------------------------------------------------- dequantize

@pytest.mark.parametrize("double_quant", [False, True], ids=["absmax_fp32", "double_quant"])
@pytest.mark.parametrize("blocksize", [64, 128, 256], ids=lambda b: f"bs{b}")
@pytest.mark.parametrize("shape", [(64, 256), (130, 256)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_dequantize_bitwise_equals_bitsandbytes(shape, blocksize, double_quant):
    # in_features % blocksize == 0 here: bitsandbytes 0.50.2's native CPU dequantize_4bit is wrong otherwise
    # (e.g. 64x96 at bs64: blocks that span rows); the general layouts are checked in the next test.
    # (130, 256) has 520 blocks at bs64: more than one nested_absmax group of 256.
    packed, state, qs = _bnb_quantize(_weight(shape), blocksize, double_quant)
    got, want = tk.dequantize(packed, state, dtype=torch.float32), bnbf.dequantize_4bit(packed, qs)
    assert got.shape == shape and got.dtype == torch.float32
    assert torch.equal(got, want), f"max diff {(got - want).abs().max().item():.3g}"


@pytest.mark.parametrize("double_quant", [False, True], ids=["absmax_fp32", "double_quant"])
@pytest.mark.parametrize("blocksize", [64, 128, 256], ids=lambda b: f"bs{b}")
@pytest.mark.parametrize("shape", [(64, 64), (64, 96), (40, 72), (33, 31)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_dequantize_bitwise_equals_layout_reference(shape, blocksize, double_quant):
    # Blocks spanning rows (in % blocksize != 0), blocks longer than a row, odd numel (33 * 31).
    packed, state, _ = _bnb_quantize(_weight(shape), blocksize, double_quant)
    got, want = tk.dequantize(packed, state, dtype=torch.float32), _reference_dequantize(packed, state)
    assert torch.equal(got, want), f"max diff {(got - want).abs().max().item():.3g}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("double_quant", [False, True], ids=["absmax_fp32", "double_quant"])
def test_dequantize_16bit_is_the_fp32_value_rounded_once(dtype, double_quant):
    # Tolerance 0: the kernel rounds the fp32 product code * absmax once, as bitsandbytes does.
    packed, state, want = _quantize(_weight((96, 128)), 64, double_quant)
    got = tk.dequantize(packed, state, dtype=dtype)
    assert got.dtype == dtype
    assert torch.equal(got, want.to(dtype)), f"max diff {(got.float() - want).abs().max().item():.3g}"


@pytest.mark.parametrize("double_quant", [False, True], ids=["absmax_fp32", "double_quant"])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("shape", [(130, 64), (33, 31)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_dequantize_bitwise_equals_torch_oracle(shape, dtype, double_quant):
    # The weight's dtype is the state's: both sides dequantize to it by default.
    packed, state = quantize_nf4(_weight(shape).to(dtype), blocksize=64, double_quant=double_quant)
    got, want = tk.dequantize(packed, state), dequantize_nf4(packed, state)
    assert got.dtype == want.dtype and torch.equal(got, want), f"max diff {(got - want).abs().max().item():.3g}"


# ----------------------------------------------------------------------------- fused matmul

@pytest.mark.parametrize("double_quant", [False, True], ids=["absmax_fp32", "double_quant"])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("m", [1, 3, 17], ids=lambda m: f"M{m}")
def test_nf4_linear_three_way(m, shape, dtype, double_quant):
    w = _weight(shape)
    packed, state, w_deq = _quantize(w, 64, double_quant)
    x = torch.randn(m, shape[1], device=DEVICE).to(dtype)  # (M, in)
    bias = (torch.randn(shape[0], device=DEVICE) * 0.1).to(dtype) if m != 3 else None  # (out,)

    y = tk.nf4_linear(x, packed, state, bias)  # (M, out)
    assert y.shape == (m, shape[0]) and y.dtype == dtype
    via_dequant = F.linear(x, w_deq.to(dtype), bias)
    dense = F.linear(x.float(), w, None if bias is None else bias.float())
    _assert_three_way(y, via_dequant, dense, dtype, f"nf4_linear M={m} {shape} {dtype}")


@pytest.mark.parametrize("double_quant", [False, True], ids=["absmax_fp32", "double_quant"])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("shape", [SHAPES[k] for k in GRAD_SHAPES], ids=GRAD_SHAPES)
@pytest.mark.parametrize("m", [1, 17], ids=lambda m: f"M{m}")
def test_nf4_linear_grad_input_three_way(m, shape, dtype, double_quant):
    w = _weight(shape)
    packed, state, w_deq = _quantize(w, 64, double_quant)
    dy = torch.randn(m, shape[0], device=DEVICE).to(dtype)  # (M, out)

    dx = tk.nf4_linear_grad_input(dy, packed, state)  # (M, in)
    assert dx.shape == (m, shape[1]) and dx.dtype == dtype
    via_dequant = dy @ w_deq.to(dtype)
    dense = dy.float() @ w
    _assert_three_way(dx, via_dequant, dense, dtype, f"grad_input M={m} {shape} {dtype}")


def test_nf4_linear_reads_strided_activations():
    packed, state, w_deq = _quantize(_weight((64, 96)), 64, True)
    x = torch.randn(96, 7, device=DEVICE).t()  # (7, 96), stride (1, 7): not contiguous
    _assert_tight(tk.nf4_linear(x, packed, state), F.linear(x, w_deq), torch.float32, "strided x")


def test_nf4_linear_grad_input_matches_autograd_of_the_dequantized_weight():
    packed, state, w_deq = _quantize(_weight((40, 72)), 64, True)
    x = torch.randn(5, 72, device=DEVICE, requires_grad=True)
    dy = torch.randn(5, 40, device=DEVICE)
    F.linear(x, w_deq).backward(dy)
    _assert_tight(tk.nf4_linear_grad_input(dy, packed, state), x.grad, torch.float32, "dx vs autograd")


def test_empty_batch_returns_empty():
    packed, state, _ = _quantize(_weight((64, 64)), 64, True)
    assert tk.nf4_linear(torch.empty(0, 64, device=DEVICE), packed, state).shape == (0, 64)


# ----------------------------------------------------------------------------- errors

def _bad_inputs():
    packed, state, _ = _bnb_quantize(_weight((64, 64)), 64, True)
    x = torch.randn(2, 64, device=DEVICE)
    return {
        "x_wrong_in_features": (lambda: tk.nf4_linear(x[:, :32], packed, state), "in_features=64"),
        "x_integer": (lambda: tk.nf4_linear(x.long(), packed, state), "dtype"),
        "x_3d": (lambda: tk.nf4_linear(x[None], packed, state), "2-D"),
        "dy_wrong_out_features": (lambda: tk.nf4_linear_grad_input(x[:, :8], packed, state), "out_features=64"),
        "bias_wrong_shape": (lambda: tk.nf4_linear(x, packed, state, torch.zeros(3, device=DEVICE)), "bias"),
        "packed_truncated": (lambda: tk.dequantize(packed[:-1], state), "bytes"),
        "absmax_wrong_dtype": (lambda: tk.dequantize(packed, types.SimpleNamespace(
            **{**vars(state), "absmax": state.absmax.float()})), "absmax"),
        "dequant_to_int": (lambda: tk.dequantize(packed, state, dtype=torch.int32), "dtype"),
    }


@pytest.mark.parametrize("case", list(_bad_inputs()))
def test_bad_inputs_raise_value_error(case):
    call, match = _bad_inputs()[case]
    with pytest.raises(ValueError, match=match):
        call()


def test_is_available_here():
    assert tk.is_available() == (True, "")
