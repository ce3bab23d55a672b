"""quant on a CUDA GPU: bitsandbytes' bytes, the CPU reference's outputs, every backend through Linear4bit.

Tolerances, relative to max |reference| (as tests/quant/test_triton.py, whose numbers they reuse):
    TIGHT  vs dequantize + F.linear / bnb: the same dequantized weight and an fp32 accumulator on both sides, so
           they differ by summation order plus the output's last rounding (bf16 2^-8, fp16 2^-11); fp32 (TF32 off,
           torch's default) by summation order only.
    RATIO  |err(kernel vs dense fp32) / err(reference vs dense fp32) - 1|: the NF4 error (~0.1) dominates both.
    CPU vs CUDA on the same bytes (TIGHT as well): the dequantized weights are equal bit for bit, the matmuls
           differ by summation order and, in 16 bits, the output's rounding.
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TIGHT = {torch.float32: 1e-5, torch.bfloat16: 2**-7, torch.float16: 2**-10}
RATIO = {torch.float32: 1e-4, torch.bfloat16: 0.02, torch.float16: 0.005}
SHAPES = {"300x400": (300, 400), "33x65": (33, 65)}   # (out, in): rows are not whole blocks; odd numel
# bf16 (what training runs) on every shape and M; fp16 and fp32 on one shape at one decode and one batch M: each
# (dtype, shape, M bucket) is a Triton compilation + autotuning, and the suite gives the tests 90 s.
CASES = ([("bf16", shape, m) for shape in SHAPES for m in (1, 4, 48, 80)]
         + [(dtype, "300x400", m) for dtype in ("fp16", "fp32") for m in (1, 48)])
CASE_IDS = [f"{dtype}-{shape}-M{m}" for dtype, shape, m in CASES]


def make_linear(out_features, in_features, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(in_features, out_features)


def quantized(linear, backend=None, device="cuda", double_quant=True):
    from quant import Linear4bit

    return Linear4bit.from_linear(copy.deepcopy(linear).to(device), double_quant=double_quant, backend=backend)


def assert_close(actual, expected, rel, what):
    from tiny import assert_close as check  # tiny imports transformers: not at collection time

    check(actual, expected, rel, what)


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def assert_three_way(got, via_dequant, dense, dtype, what):
    """STYLE rule 18: tight vs the same dequantized weight, loose vs the dense one, error ratio near 1."""
    assert_close(got, via_dequant, TIGHT[dtype], what)
    err_got, err_ref = rel_err(got, dense), rel_err(via_dequant, dense)
    assert err_got < 0.2, f"{what}: relative error vs the dense fp32 weight {err_got:.3g} (NF4 gives ~0.1)"
    assert abs(err_got / err_ref - 1) < RATIO[dtype], f"{what}: err {err_got:.4g} vs reference's {err_ref:.4g}"


def triton_or_skip():
    from quant import triton_kernels as tk

    ok, why = tk.is_available()
    if not ok:
        pytest.skip(f"the triton backend cannot run here: {why}")


# ---------------------------------------------------------------------------------------------- bytes


@pytest.mark.parametrize("double_quant", [False, True], ids=["absmax_fp32", "double_quant"])
def test_quantized_on_cuda_bytes_equal_the_cpu_reference_and_bnb(double_quant):
    """The CPU reference's bytes are bnb's (tests/quant pins them); quantizing on the GPU must not change them."""
    import bitsandbytes.functional as bnbf

    linear = make_linear(300, 400)
    on_gpu = quantized(linear, double_quant=double_quant).state_dict()
    on_cpu = quantized(linear, device="cpu", double_quant=double_quant).state_dict()
    assert on_gpu.keys() == on_cpu.keys()
    for key in on_cpu:
        assert on_gpu[key].device.type == "cuda", key
        assert torch.equal(on_gpu[key].cpu(), on_cpu[key]), f"{key} differs between CUDA and CPU quantization"
    packed, _ = bnbf.quantize_4bit(linear.weight.detach(), blocksize=64, quant_type="nf4",
                                   compress_statistics=double_quant)
    assert torch.equal(on_gpu["weight"].cpu().view(-1), packed.view(-1))


def test_packed_bytes_and_absmax_equal_bnb_cuda_kernel():
    """bnb's CUDA quantize_4bit: the same absmax, and the same nibbles except where its --use_fast_math
    reciprocal puts a value on the other side of a level boundary (about 1 in 10^7 elements)."""
    import bitsandbytes.functional as bnbf

    w = make_linear(300, 400).weight.detach().cuda()   # 1875 whole blocks of 64
    ours = quantized(make_linear(300, 400), double_quant=False)
    packed, qs = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=False)
    assert torch.equal(ours.quant_state.absmax, qs.absmax)
    differ = (ours.weight.view(-1) != packed.view(-1)).sum().item()
    assert differ <= 2, f"{differ} of {packed.numel()} bytes differ from bnb's CUDA kernel"


# ---------------------------------------------------------------------------------------------- moving, backends


@pytest.mark.parametrize("dtype", DTYPES.keys())
@pytest.mark.parametrize("backend", ["torch", "bnb", "triton", None], ids=["torch", "bnb", "triton", "auto"])
def test_layer_moved_to_cuda_gives_the_cpu_reference_outputs(backend, dtype):
    if backend == "triton":
        triton_or_skip()
    dtype = DTYPES[dtype]
    cpu = quantized(make_linear(300, 400), backend="torch", device="cpu")
    gpu = copy.deepcopy(cpu).to("cuda")
    gpu.backend = backend
    assert {t.device.type for t in [gpu.weight, gpu.bias, *gpu.quant_state.tensors()]} == {"cuda"}
    assert torch.equal(gpu.dequantize(dtype).cpu(), cpu.dequantize(dtype))     # every backend is bit-exact
    x = torch.randn(2, 7, 400).to(dtype)                                         # [..., in], two leading dims
    y = gpu(x.cuda())
    assert y.shape == (2, 7, 300) and y.dtype == dtype and y.device.type == "cuda"
    assert_close(y.cpu(), cpu(x.float()), TIGHT[dtype], f"{backend} {dtype} CUDA vs CPU")


@pytest.mark.parametrize("dtype, shape, m", CASES, ids=CASE_IDS)
def test_triton_forward_through_linear4bit(dtype, shape, m):
    triton_or_skip()
    dtype, shape = DTYPES[dtype], SHAPES[shape]
    linear = make_linear(*shape)
    fused, bnb = quantized(linear, backend="triton"), quantized(linear, backend="bnb")
    x = torch.randn(m, shape[1], device="cuda").to(dtype)
    with torch.no_grad():
        got, via_bnb = fused(x), bnb(x)
        dense = F.linear(x.float(), linear.weight.cuda(), linear.bias.cuda())
    assert got.dtype == dtype
    assert_three_way(got, via_bnb, dense, dtype, f"triton forward M={m} {shape} {dtype}")


@pytest.mark.parametrize("dtype, shape, m", CASES, ids=CASE_IDS)
def test_triton_input_gradient_through_linear4bit(dtype, shape, m):
    triton_or_skip()
    dtype, shape = DTYPES[dtype], SHAPES[shape]
    linear = make_linear(*shape)
    grads = {}
    x0 = torch.randn(m, shape[1], device="cuda").to(dtype)
    dy = torch.randn(m, shape[0], device="cuda").to(dtype)
    for backend in ("triton", "bnb"):
        x = x0.clone().requires_grad_()
        quantized(linear, backend=backend)(x).backward(dy)
        grads[backend] = x.grad
    dense = dy.float() @ linear.weight.cuda()                       # (M, out) @ (out, in)
    assert grads["triton"].dtype == dtype
    assert_three_way(grads["triton"], grads["bnb"], dense, dtype, f"triton dL/dx M={m} {shape} {dtype}")


@pytest.mark.parametrize("m", [1, 48], ids=lambda m: f"M{m}")
def test_triton_matches_bnb_matmul_4bit(m):
    """bnb's own 4-bit matmul (its gemv kernel at M=1: in_features a multiple of the blocksize) on the same
    bytes, bf16. Its gemv rounds each product to bf16 before the fp32 sum: 2^-6, not TIGHT."""
    triton_or_skip()
    import bitsandbytes as bnb
    from bitsandbytes.functional import QuantState

    layer = quantized(make_linear(320, 512), backend="triton")
    s = layer.quant_state
    nested = QuantState(absmax=s.nested_absmax, code=s.nested_code, blocksize=s.nested_blocksize, dtype=torch.float32)
    qs = QuantState(absmax=s.absmax, shape=s.shape, code=s.code, blocksize=s.blocksize, quant_type="nf4",
                    dtype=torch.bfloat16, offset=s.offset, state2=nested)
    x = torch.randn(m, 512, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        want = bnb.matmul_4bit(x, layer.weight.t(), quant_state=qs, bias=layer.bias.to(torch.bfloat16))
        assert_close(layer(x), want, 2**-6, f"triton vs bnb.matmul_4bit M={m}")


def test_auto_backend_is_measured_correct_and_cached_on_cuda():
    import quant

    layer = quantized(make_linear(300, 400))
    x = torch.randn(48, 400, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    for _ in range(2):
        layer(x).sum().backward()
    found = {r["op"]: r for r in quant.backend_choice()}
    assert set(found) == {"linear", "grad_input"}, quant.backend_choice()
    for op, r in found.items():
        assert r["how"] == "measured" and r["rows"] == "17-128" and r["device"].startswith("cuda"), r
        assert r["rejected"] == {}, f"{op}: a backend disagreed with torch on the GPU: {r['rejected']}"
        assert {"torch", "bnb"} <= set(r["times_ms"]) and r["backend"] == min(r["times_ms"], key=r["times_ms"].get)
    assert len(quant.backend_choice()) == 2          # the second step reused both choices


# ---------------------------------------------------------------------------------------------- whole models


def test_quantize_on_the_gpu_never_holds_the_dense_model():
    import quant

    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(1024, 1024) for _ in range(24)])          # 96 MiB of fp32 weights
    dense_bytes = sum(p.nbytes for p in model.parameters())
    reference = quant.quantize(copy.deepcopy(model), skip=()).to("cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    quant.quantize(model, skip=(), device="cuda")
    peak = torch.cuda.max_memory_allocated() - start
    assert peak < dense_bytes / 2, f"peak {peak / 2**20:.1f} MiB while quantizing {dense_bytes / 2**20:.0f} MiB"
    assert {p.device.type for p in model.parameters()} == {"cuda"}
    a, b = model.state_dict(), reference.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in b), "quantizing on the GPU changed the bytes"
