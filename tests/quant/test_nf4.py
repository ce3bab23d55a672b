"""quant.nf4 vs bitsandbytes' bytes (CPU) and vs the format's own math.

Everything here is exact: the reference is meant to reproduce bnb's CPU quantizer bit for bit, so the
comparisons are torch.equal, and a failure prints how many entries differ and the max/mean |difference|.
bnb's dequantize is called on the FLAT shape: its 0.50 CPU kernel mis-indexes absmax for a 2-D weight
whose rows are not a whole number of blocks (see quant/linear.py), which is a bnb bug, not the format.
"""

import functools

import pytest
import torch

import quant.nf4 as nf4
from quant import NF4_CODE, NF4State, dequantize_nf4, quantize_nf4
from quant.nf4 import SUPPORTED_BLOCKSIZES, dequantize_absmax, dynamic_map

pytestmark = pytest.mark.usefixtures("one_thread")

bnbf = pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes is the byte-level reference")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# square / blocks spanning rows / tiny odd / odd numel + partial block / 1-D odd / long partial tail / 3-D
SHAPES = {"64x64": (64, 64), "300x400": (300, 400), "1x7": (1, 7), "33x65": (33, 65), "5": (5,),
          "3x1000": (3, 1000), "2x3x40": (2, 3, 40)}
DQ = {"dq": True, "nodq": False}


def assert_same(actual, expected, what):
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, (
        f"{what}: {tuple(actual.shape)} {actual.dtype} vs {tuple(expected.shape)} {expected.dtype}")
    if not torch.equal(actual, expected):
        diff = (actual.double() - expected.double()).abs()
        pytest.fail(f"{what}: {int((diff > 0).sum())}/{diff.numel()} differ, "
                    f"max |diff| {diff.max().item():.3g}, mean |diff| {diff.mean().item():.3g}")


def make_weight(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 0.05
    w.view(-1)[: min(64, w.numel() // 4)] *= 20  # one block with outliers, as real weights have
    return w.to(dtype)


@functools.cache
def quantized_pair(shape, dtype_name, blocksize, double_quant):
    """(weight, ours, bnb's) for one configuration, cached: the bytes and the values tests share it."""
    w = make_weight(shape, DTYPES[dtype_name])
    ours = quantize_nf4(w, blocksize, double_quant)
    theirs = bnbf.quantize_4bit(w, blocksize=blocksize, quant_type="nf4", compress_statistics=double_quant)
    return w, ours, theirs


def bnb_dequantize(packed, qs, dtype=None):
    """bnb's dequantize on the flat view (TorchDynamo off: bnb compiles its odd-size fallback per shape)."""
    flat = bnbf.QuantState(absmax=qs.absmax, shape=torch.Size([qs.shape.numel()]), code=qs.code,
                           blocksize=qs.blocksize, quant_type="nf4", dtype=dtype or qs.dtype,
                           offset=qs.offset, state2=qs.state2)
    with torch._dynamo.config.patch(disable=True):
        return bnbf.dequantize_4bit(packed, flat).view(qs.shape)


def check_bytes(ours, theirs):
    (packed, state), (bpacked, bstate) = ours, theirs
    assert_same(packed, bpacked, "packed")
    assert_same(state.absmax, bstate.absmax, "absmax")
    assert_same(state.code, bstate.code, "code")
    assert state.shape == bstate.shape and state.dtype == bstate.dtype and state.blocksize == bstate.blocksize
    assert state.double_quant == bstate.nested
    if state.double_quant:
        assert_same(state.offset, bstate.offset, "offset")
        assert_same(state.nested_absmax, bstate.state2.absmax, "nested_absmax")
        assert_same(state.nested_code, bstate.state2.code, "nested_code")
        assert state.nested_blocksize == bstate.state2.blocksize


# ---------------------------------------------------------------------------------------------- tables


def test_code_table_is_bnb_nf4():
    assert_same(NF4_CODE, bnbf.get_4bit_type("nf4", device="cpu"), "NF4_CODE")


def test_nested_code_is_bnb_dynamic_map():
    assert_same(dynamic_map(), bnbf.create_dynamic_map(signed=True), "dynamic map")


# ---------------------------------------------------------------------------------------------- bytes


@pytest.mark.parametrize("dq", DQ.values(), ids=DQ.keys())
@pytest.mark.parametrize("dtype", DTYPES.keys())
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_bytes_match_bnb(shape, dtype, dq):
    _, ours, theirs = quantized_pair(shape, dtype, 64, dq)
    check_bytes(ours, theirs)


@pytest.mark.parametrize("dq", DQ.values(), ids=DQ.keys())
@pytest.mark.parametrize("blocksize", SUPPORTED_BLOCKSIZES, ids=lambda b: f"bs{b}")
@pytest.mark.parametrize("shape", [(33, 65), (300, 400)], ids=["33x65", "300x400"])
def test_bytes_match_bnb_every_blocksize(shape, blocksize, dq):
    _, ours, theirs = quantized_pair(shape, "bf16", blocksize, dq)
    check_bytes(ours, theirs)


@pytest.mark.parametrize("dq", DQ.values(), ids=DQ.keys())
@pytest.mark.parametrize("case", ["zero_block", "zero_tail", "all_zero"])
def test_zero_blocks_match_bnb(case, dq):
    w = make_weight((2, 65), torch.float32)  # blocks of 64: [0, 64), [64, 128), tail [128, 130)
    if case == "zero_block":
        w.view(-1)[64:128] = 0
    elif case == "zero_tail":
        w.view(-1)[128:] = 0
    else:
        w.zero_()
    packed, state = quantize_nf4(w, 64, dq)
    check_bytes((packed, state), bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=dq))
    zeros = w == 0
    assert_same(dequantize_nf4(packed, state)[zeros], w[zeros], "dequantized zeros")


def rounding_edge_weight(n_blocks=64, blocksize=64, seed=0):
    """fp32 blocks whose values sit on, or one or two ulps either side of, absmax x an NF4 midpoint.

    Element 0 of each block is its absmax. Every 4th full block has a power-of-two absmax, so
    x * (1/absmax) lands exactly on midpoints (ties); the others make x * (1/absmax) and x / absmax
    round to opposite sides of a midpoint. The last block is partial (blocksize - 1 elements).
    """
    g = torch.Generator().manual_seed(seed)
    bounds = (NF4_CODE[:-1] + NF4_CODE[1:]) / 2
    absmax = torch.rand(n_blocks + 1, generator=g) * 3 + 0.01
    absmax[:-1:4] = 2.0 ** torch.randint(-6, 3, (len(absmax[:-1:4]),), generator=g).float()
    x = bounds[torch.randint(0, 15, (n_blocks + 1, blocksize - 1), generator=g)] * absmax[:, None]
    for _ in range(2):  # up to two ulps up or down
        step = torch.randint(-1, 2, x.shape, generator=g)
        x = torch.where(step == 0, x, x.nextafter(step * torch.tensor(float("inf"))))
    return torch.cat([absmax[:, None], x], dim=1).flatten()[: (n_blocks + 1) * blocksize - 1]


def test_rounding_edge_cases_match_bnb():
    w = rounding_edge_weight()
    # First make sure the weight exercises what it claims (else this test could not fail):
    bounds = (NF4_CODE[:-1] + NF4_CODE[1:]) / 2
    full, tail = w[: 64 * 64].view(64, 64), w[64 * 64:]
    absmax = full.abs().amax(dim=1, keepdim=True)
    by_reciprocal, by_division = full * torch.reciprocal(absmax), full / absmax
    assert torch.isin(by_reciprocal, bounds).sum() > 100, "too few exact ties"
    assert (torch.bucketize(by_reciprocal, bounds) != torch.bucketize(by_division, bounds)).sum() > 20
    tail_absmax = tail.abs().max()
    tail_by_reciprocal, tail_by_division = tail * torch.reciprocal(tail_absmax), tail / tail_absmax
    assert (torch.bucketize(tail_by_reciprocal, bounds) != torch.bucketize(tail_by_division, bounds)).any()
    for dq in (True, False):
        theirs = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=dq)
        check_bytes(quantize_nf4(w, 64, dq), theirs)


def test_zero_tail_stores_clamped_absmax():
    # bnb's quirk, kept for byte equality: an all-zero *partial* block stores absmax 1e-38, a full one 0.
    w = torch.zeros(130)
    _, state = quantize_nf4(w, 64, double_quant=False)
    assert_same(state.absmax, torch.tensor([0.0, 0.0, 1e-38]), "absmax of zero blocks")


def test_nested_quantizer_matches_bnb_near_grid_boundaries():
    # bnb's 8-bit CPU quantizer snaps to a 65536-point grid; values half a grid step apart probe its rounding.
    g = torch.Generator().manual_seed(1)
    k = torch.randint(0, 65535, (256 * 300 + 17,), generator=g).float()
    absmax = 0.05 + 0.01 * (-1 + (2 * k + 1) / 65535 + 1e-7 * torch.randn(k.shape, generator=g))
    ours, _, nested_absmax = nf4._double_quantize(absmax)
    theirs, bstate = bnbf.quantize_blockwise(absmax - absmax.mean(), blocksize=256)
    assert_same(ours, theirs, "8-bit absmax codes")
    assert_same(nested_absmax, bstate.absmax, "nested absmax")


def test_high_nibble_holds_the_first_element():
    packed, _ = quantize_nf4(torch.tensor([-1.0, 1.0, 1.0]), 64, double_quant=False)
    # -1 -> code 0, +1 -> code 15; the odd count is padded with the code of 0.0 (index 7)
    assert packed.flatten().tolist() == [0x0F, 0xF7]
    assert packed.shape == (2, 1)


def test_chunking_does_not_change_bytes_or_values(monkeypatch):
    w = make_weight((33, 65), torch.bfloat16)
    packed, state = quantize_nf4(w, 32)
    values = dequantize_nf4(packed, state)
    monkeypatch.setattr(nf4, "_QUANT_CHUNK", 64)  # 34 chunks instead of 1
    monkeypatch.setattr(nf4, "_DEQUANT_CHUNK", 96)  # 3 blocks of 32 per step
    small_packed, small_state = quantize_nf4(w, 32)
    check_bytes((small_packed, small_state), (packed, _as_bnb_like(state)))
    assert_same(dequantize_nf4(small_packed, small_state), values, "chunked dequantize")


def _as_bnb_like(state: NF4State):
    nested = bnbf.QuantState(absmax=state.nested_absmax, code=state.nested_code, blocksize=256)
    return bnbf.QuantState(absmax=state.absmax, shape=state.shape, code=state.code, blocksize=state.blocksize,
                           quant_type="nf4", dtype=state.dtype, offset=state.offset, state2=nested)


# ---------------------------------------------------------------------------------------------- values


@pytest.mark.parametrize("dq", DQ.values(), ids=DQ.keys())
@pytest.mark.parametrize("dtype", DTYPES.keys())
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_dequantize_matches_bnb(shape, dtype, dq):
    _, (packed, state), (bpacked, bstate) = quantized_pair(shape, dtype, 64, dq)
    assert_same(dequantize_nf4(packed, state), bnb_dequantize(bpacked, bstate), "dequantized")


@pytest.mark.parametrize("dq", DQ.values(), ids=DQ.keys())
@pytest.mark.parametrize("blocksize", SUPPORTED_BLOCKSIZES, ids=lambda b: f"bs{b}")
@pytest.mark.parametrize("shape", [(33, 65), (300, 400)], ids=["33x65", "300x400"])
def test_dequantize_matches_bnb_every_blocksize(shape, blocksize, dq):
    _, (packed, state), (bpacked, bstate) = quantized_pair(shape, "bf16", blocksize, dq)
    assert_same(dequantize_nf4(packed, state), bnb_dequantize(bpacked, bstate), "dequantized")


@pytest.mark.parametrize("out_dtype", DTYPES.keys())
def test_dequantize_to_another_dtype_matches_bnb(out_dtype):
    _, (packed, state), (bpacked, bstate) = quantized_pair((300, 400), "bf16", 64, True)
    got = dequantize_nf4(packed, state, DTYPES[out_dtype])
    assert_same(got, bnb_dequantize(bpacked, bstate, DTYPES[out_dtype]), f"dequantized to {out_dtype}")


@pytest.mark.parametrize("shape", [(64, 64), (33, 65)], ids=["64x64", "33x65"])
def test_codes_are_the_nearest_level(shape):
    # The format's math, independent of bnb: every element gets the level nearest to x * (1/absmax).
    # Tolerance 1e-6: bnb decides with fp32 midpoints, which sit up to ~6e-8 off the exact midpoints.
    w = make_weight(shape, torch.float32)
    packed, state = quantize_nf4(w, 64, double_quant=False)
    n = w.numel()
    q = torch.stack([packed.flatten() >> 4, packed.flatten() & 15], 1).flatten()[:n].long()
    scale = state.absmax.repeat_interleave(64)[:n]
    x = (w.flatten() / scale).double()
    dist = (x[:, None] - NF4_CODE.double()[None, :]).abs()  # (n, 16)
    excess = dist.gather(1, q[:, None]).squeeze(1) - dist.min(dim=1).values
    assert excess.max() <= 1e-6, f"non-nearest codes: max excess {excess.max():.3g}, mean {excess.mean():.3g}"


def test_round_trip_error_is_within_half_the_widest_gap():
    # |w - dequant(w)| <= absmax * (largest gap between NF4 levels) / 2, plus fp32 rounding (1e-6 relative).
    w = make_weight((300, 400), torch.float32)
    packed, state = quantize_nf4(w, 64, double_quant=False)
    bound = state.absmax.repeat_interleave(64)[: w.numel()] * (NF4_CODE.diff().max() / 2 + 1e-6)
    err = (dequantize_nf4(packed, state) - w).flatten().abs()
    assert (err <= bound).all(), f"max excess {(err - bound).max():.3g}; max err {err.max():.3g} mean {err.mean():.3g}"


def test_double_quantized_absmax_error_is_bounded():
    # 8-bit dynamic codes: |absmax - decoded| <= nested_absmax * (widest code gap / 2 + one grid step 2/65535)
    w = make_weight((300, 400), torch.float32)
    _, plain = quantize_nf4(w, 64, double_quant=False)
    _, nested = quantize_nf4(w, 64, double_quant=True)
    err = (dequantize_absmax(nested) - plain.absmax).abs()
    per_block = nested.nested_absmax.repeat_interleave(256)[: err.numel()]
    bound = per_block * (dynamic_map().diff().max() / 2 + 2 / 65535) + 1e-7
    assert (err <= bound).all(), f"max excess {(err - bound).max():.3g}; max err {err.max():.3g} mean {err.mean():.3g}"


# ---------------------------------------------------------------------------------------------- errors


def test_unsupported_blocksize_lists_the_supported_ones():
    with pytest.raises(ValueError, match=r"blocksize=100 .*\(32, 64, 128, 256, 512, 1024, 2048, 4096\)"):
        quantize_nf4(torch.randn(8, 8), blocksize=100)


def test_integer_weight_is_rejected():
    with pytest.raises(ValueError, match="float32/bfloat16/float16"):
        quantize_nf4(torch.ones(8, 8, dtype=torch.int32))


def test_empty_weight_is_rejected():
    with pytest.raises(ValueError, match="empty"):
        quantize_nf4(torch.empty(0, 8))
