"""NF4: the 4-bit NormalFloat format of QLoRA, as bitsandbytes stores it, in pure PyTorch.

Math (Dettmers et al. 2023, https://arxiv.org/abs/2305.14314). A weight is cut into blocks of
`blocksize` consecutive row-major elements; each block keeps its fp32 absolute maximum and every
element is replaced by the index of the nearest of 16 NormalFloat levels (`NF4_CODE`, quantiles of
N(0, 1) rescaled to [-1, 1], with an exact 0):

    absmax_b = max |w_i|  over block b              q_i = argmin_k |w_i * (1 / absmax_b) - code_k|
    w_i ~ code[q_i] * absmax_b                       (computed in fp32, rounded once to the output dtype)

Double quantization (`double_quant=True`) stores the absmax themselves in 8 bits: subtract their
fp32 mean (`offset`), then quantize blockwise (256 per block) with bitsandbytes' signed dynamic map.

Layout (identical bytes to `bitsandbytes.functional.quantize_4bit(w, quant_type="nf4")` on CPU):
    packed  uint8 [(numel + 1) // 2, 1]   element 2j in the HIGH nibble, 2j + 1 in the low nibble
    absmax  fp32 [n_blocks]  or, with double quant, uint8 [n_blocks] + offset + nested_absmax
                             fp32 [ceil(n_blocks / 256)] + nested_code fp32 [256]

What bnb 0.50's CPU path does, reproduced here (each with a `# Note:` below): a full block is scaled
by the fp32 reciprocal of its absmax, the partial last block by a true division; a zero full block
stores absmax 0, a zero partial block 1e-38; nearest level by fp32 midpoints, ties to the lower
index; an odd count is padded with the code of 0.0; the 8-bit absmax codes come from a 65536-point
grid lookup, not an exact nearest search, and a zero nested block gets code 0; nested blocksize 256.

Why not call bitsandbytes: the reference has to be readable and run wherever torch runs; it is the
oracle every faster path (bnb kernels, Triton) is tested against. The tests pin it to bnb's bytes.

Speed (CPU hot path: each 4-bit layer is dequantized in forward and again in backward). One gather
from a 256-entry byte -> (code[hi], code[lo]) table, one fp32 multiply by the block's absmax, one
rounding store, 64K elements at a time. Measured against `bitsandbytes.functional.dequantize_4bit`
(-> bf16, blocksize 64, double quant; AMD EPYC, 2 shared cores, torch 2.13, bnb 0.50.2; min of 20):
    576x576      bnb 0.039 ms    quant.nf4 0.19 ms
    1536x576     bnb 0.071 ms    quant.nf4 0.45 ms
    4096x4096    bnb 9.1 ms      quant.nf4 17.6 ms   (a fresh 32 MiB output: page faults are ~half of it)
bnb's AVX-512 kernel is 2-6x faster, so Linear4bit defaults to backend "bnb" on CPU; this module is
the oracle and the fallback. (A bf16 multiply would save a pass but double-round ~30% of the values.)
"""
from __future__ import annotations

import reprlib

import functools
from dataclasses import dataclass, replace

import torch
from torch import Tensor

# The 16 NF4 levels, bitsandbytes' `get_4bit_type("nf4")` (QLoRA appendix E), sorted ascending.
NF4_CODE = torch.tensor(
    [
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
        -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
        0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
        0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
    ],
    dtype=torch.float32,
)
SUPPORTED_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # bnb's quantize_4bit accepts these
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
NESTED_BLOCKSIZE = 256
_ZERO_INDEX = 7  # NF4_CODE[7] == 0.0: the pad nibble of an odd element count
_QUANT_CHUNK = 1 << 20  # elements converted to fp32 at a time while quantizing (4 MiB)
_DEQUANT_CHUNK = 1 << 16  # elements per dequantize step: the fp32 scratch stays in L2 (256 KiB)
_DEQUANT_CHUNK_GPU = 1 << 22  # on a GPU launches cost more than cache misses: 24 MiB of scratch per step


@dataclass
class NF4State:
    """Everything besides the packed bytes needed to dequantize (bnb's `QuantState`)."""

    shape: torch.Size  # original weight shape, e.g. (out, in)
    dtype: torch.dtype  # original weight dtype; dequantize returns it by default
    blocksize: int  # elements per absmax block
    absmax: Tensor  # fp32 [n_blocks], or uint8 [n_blocks] with double quant
    code: Tensor  # fp32 [16], always NF4_CODE (bnb's `quant_map`; kept for the file format)
    offset: Tensor | None = None  # fp32 0-dim, mean subtracted from absmax before double quant
    nested_absmax: Tensor | None = None  # fp32 [ceil(n_blocks / 256)]
    nested_code: Tensor | None = None  # fp32 [256], bnb's signed dynamic map
    nested_blocksize: int = NESTED_BLOCKSIZE

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def numel(self) -> int:
        return self.shape.numel()

    @property
    def n_blocks(self) -> int:
        return -(-self.numel // self.blocksize)

    def tensors(self) -> list[Tensor]:
        """The state's tensors (for byte counts and device moves)."""
        ts = [self.absmax, self.code, self.offset, self.nested_absmax, self.nested_code]
        return [t for t in ts if t is not None]

    def to(self, device: torch.device | str) -> NF4State:
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return replace(self, absmax=move(self.absmax), code=move(self.code), offset=move(self.offset),
                       nested_absmax=move(self.nested_absmax), nested_code=move(self.nested_code))


def dynamic_map(device: torch.device | str = "cpu") -> Tensor:
    """bnb's signed 8-bit dynamic map (`create_dynamic_map(signed=True)`), fp32 [256], sorted.

    Exponent e = 0..6 covers magnitudes 10^(e-6) .. 10^(e-5) with 2^e linearly spaced fractions
    (the midpoints of a linspace(0.1, 1) grid), mirrored for the sign; plus 0 and 1.0.
    """
    return _dynamic_map_cpu().to(device)


@functools.cache
def _dynamic_map_cpu() -> Tensor:
    # Note: built in fp32 step by step (linspace, midpoint, scale) so every value is bit-identical
    # to bnb's table; the tests compare the two with torch.equal.
    values = [torch.tensor([0.0, 1.0])]
    for e in range(7):
        grid = torch.linspace(0.1, 1, 2**e + 1, dtype=torch.float32)
        mids = (grid[:-1] + grid[1:]) / 2.0
        values += [mids * 10.0 ** (e - 6), -(mids * 10.0 ** (e - 6))]
    return torch.cat(values).sort().values


# ----------------------------------------------------------------------------------------------
# quantize


def quantize_nf4(w: Tensor, blocksize: int = 64, double_quant: bool = True) -> tuple[Tensor, NF4State]:
    """Quantize `w` (fp32/bf16/fp16, any shape) to NF4. Returns (packed uint8 [(n+1)//2, 1], state)."""
    _check_quantize_args(w, blocksize, double_quant)
    # Note: quantize in chunks of whole blocks. Only one chunk is ever held in fp32, so quantizing
    # a bf16 model does not need a second, fp32 copy of each weight; the bytes do not depend on the
    # chunking because every operation is per block.
    flat = w.detach().reshape(-1)  # a view when w is contiguous
    n = flat.numel()
    packed = torch.empty(((n + 1) // 2, 1), dtype=torch.uint8, device=w.device)
    absmax = torch.empty(-(-n // blocksize), dtype=torch.float32, device=w.device)
    step = max(blocksize, _QUANT_CHUNK // blocksize * blocksize)
    for start in range(0, n, step):
        idx, amax = _nf4_indices(flat[start:start + step].float(), blocksize)
        if idx.numel() % 2:
            idx = torch.cat([idx, idx.new_full((1,), _ZERO_INDEX)])
        packed[start // 2:start // 2 + idx.numel() // 2, 0] = (idx[0::2] << 4 | idx[1::2]).to(torch.uint8)
        absmax[start // blocksize:start // blocksize + amax.numel()] = amax
    code = NF4_CODE.to(w.device)
    if not double_quant:
        return packed, NF4State(w.shape, w.dtype, blocksize, absmax, code)
    # Note: the absmax are double-quantized on the CPU whatever the device (n / blocksize values, a small copy):
    # a CUDA mean sums in another order than the CPU's, and its last bit moves `offset` and with it some
    # 8-bit codes, so the bytes would depend on the device. Everything above is exact elementwise math.
    qabsmax, offset, nested_absmax = (t.to(w.device) for t in _double_quantize(absmax.cpu()))
    state = NF4State(w.shape, w.dtype, blocksize, qabsmax, code, offset, nested_absmax, dynamic_map(w.device))
    return packed, state


def describe(value) -> str:
    """`the str '64'`: a wrong argument's type and value, for error messages (reprlib cuts a long repr)."""
    return "None" if value is None else f"the {type(value).__name__} {reprlib.repr(value)}"


def check_blocksize(blocksize) -> None:
    # Note: the type test comes first because `in` compares with ==: 64.0 would pass as 64 (and break the
    # integer block arithmetic later), and True is an int.
    if isinstance(blocksize, bool) or not isinstance(blocksize, int):
        raise ValueError(f"blocksize must be an int, one of {SUPPORTED_BLOCKSIZES}; got {describe(blocksize)}")
    if blocksize not in SUPPORTED_BLOCKSIZES:
        raise ValueError(f"blocksize={blocksize} is not supported; use one of {SUPPORTED_BLOCKSIZES}")


def check_double_quant(double_quant) -> None:
    if not isinstance(double_quant, bool):  # a truthy "no" or 0.0 must not pick a file format silently
        raise ValueError(f"double_quant must be True (store the absmax in 8 bits too, as QLoRA) or False; "
                         f"got {describe(double_quant)}")


def _check_quantize_args(w: Tensor, blocksize: int, double_quant: bool) -> None:
    if not isinstance(w, Tensor):
        raise ValueError(f"w must be a torch.Tensor (the weight to quantize); got {describe(w)}")
    check_blocksize(blocksize)
    check_double_quant(double_quant)
    if w.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"NF4 quantizes float32/bfloat16/float16 weights, got {w.dtype}; cast it first")
    if w.numel() == 0:
        raise ValueError(f"cannot quantize an empty tensor of shape {tuple(w.shape)}")


def _nf4_indices(x: Tensor, blocksize: int) -> tuple[Tensor, Tensor]:
    """fp32 [m] -> (int32 NF4 indices [m], fp32 absmax [ceil(m / blocksize)])."""
    full = x.numel() // blocksize * blocksize
    blocks = x[:full].view(-1, blocksize)  # (n_full, blocksize)
    absmax = blocks.abs().amax(dim=1)
    # Note: bnb's CPU path scales a full block by the fp32 reciprocal of its absmax (x * (1/absmax),
    # not x / absmax: the two differ in the last bit), after clamping absmax to >= 1e-38 so that an
    # all-zero block gives 0 * 1e38 = 0 -> the code of 0.0; the stored absmax stays 0.
    scaled = (blocks * torch.reciprocal(absmax.clamp(min=1e-38))[:, None]).clamp_(-1, 1)
    idx = _nearest_nf4(scaled.view(-1))
    if full == x.numel():
        return idx, absmax
    # Note: the partial last block is bnb's odd one out: its absmax is stored *clamped* (an all-zero
    # tail stores 1e-38, not 0) and it is scaled by a true division.
    tail_absmax = x[full:].abs().amax().clamp(min=1e-38)
    tail_idx = _nearest_nf4((x[full:] / tail_absmax).clamp_(-1, 1))
    return torch.cat([idx, tail_idx]), torch.cat([absmax, tail_absmax[None]])


def _nearest_nf4(scaled: Tensor) -> Tensor:
    # Note: nearest level by comparison with the fp32 midpoints between neighbours; a value exactly
    # on a midpoint goes to the LOWER index (bucketize's right=False), as bnb does.
    bounds = _nf4_midpoints(scaled.device)
    return torch.bucketize(scaled, bounds, out_int32=True)


@functools.cache
def _nf4_midpoints(device: torch.device) -> Tensor:
    code = NF4_CODE.to(device)
    return (code[:-1] + code[1:]) / 2  # fp32 [15]


def _double_quantize(absmax: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """fp32 absmax [n_blocks] -> (uint8 [n_blocks], fp32 offset, fp32 nested_absmax [n_nested])."""
    offset = absmax.mean()
    centered = absmax - offset
    n = centered.numel()
    blocks = torch.nn.functional.pad(centered, (0, -n % NESTED_BLOCKSIZE)).view(-1, NESTED_BLOCKSIZE)
    nested_absmax = blocks.abs().amax(dim=1)  # zero padding never raises the max of |x|
    # Note: bnb's CPU 8-bit quantizer is not an exact nearest search: it rounds x * (1/absmax) onto
    # a uniform 65536-bin grid of [-1, 1] (((v + 1) * 0.5) * 65535 + 0.5, truncated) and reads the
    # code index from a table built over that grid. We reproduce it step by step in fp32, and, like
    # bnb, give every element of an all-zero block index 0 (whose value times absmax 0 is 0).
    inv = torch.reciprocal(nested_absmax).nan_to_num_(posinf=0.0)  # 1/0 -> 0: no NaN in the grid
    scaled = (blocks * inv[:, None]).clamp_(-1, 1)
    grid = ((scaled + 1.0) * 0.5 * 65535.0 + 0.5).to(torch.int64)  # (n_nested, 256), truncation
    q = _dynamic_grid_lut(centered.device)[grid]
    q[nested_absmax == 0] = 0
    return q.view(-1)[:n], offset, nested_absmax


@functools.cache
def _dynamic_grid_lut(device: torch.device) -> Tensor:
    """uint8 [65536]: code index for each point -1 + 2i/65535 of bnb's quantization grid."""
    code = _dynamic_map_cpu()
    mids = (code[:-1] + code[1:]) * 0.5
    i = torch.arange(65536, dtype=torch.float32)
    points = (2.0 * i) / torch.full_like(i, 65535.0) + -1.0  # fp32 division, then fp32 add
    return torch.searchsorted(mids, points, side="left").to(torch.uint8).to(device)  # midpoints < point


# ----------------------------------------------------------------------------------------------
# dequantize


def dequantize_absmax(state: NF4State) -> Tensor:
    """fp32 [n_blocks] absmax, undoing double quantization: code[q] * nested_absmax + offset."""
    if not state.double_quant:
        return state.absmax.float()
    n = state.absmax.numel()
    vals = state.nested_code[state.absmax.long()]  # fp32 [n_blocks]
    vals = torch.nn.functional.pad(vals, (0, -n % state.nested_blocksize)).view(-1, state.nested_blocksize)
    return (vals * state.nested_absmax[:, None]).view(-1)[:n] + state.offset


def dequantize_nf4(packed: Tensor, state: NF4State, dtype: torch.dtype | None = None) -> Tensor:
    """packed uint8 [(n+1)//2, 1] -> tensor of `state.shape` in `dtype` (default `state.dtype`).

    Values equal bnb's `dequantize_4bit` bit for bit: fp32 product code * absmax, rounded once.
    """
    dtype = dtype or state.dtype
    absmax = dequantize_absmax(state)
    flat = packed.reshape(-1)
    n, bs = state.numel, state.blocksize
    out = torch.empty(n, dtype=dtype, device=packed.device)
    full = n // bs * bs
    if full:
        _dequantize_full_blocks(flat[:full // 2], absmax[:full // bs], bs, out[:full])
    if full < n:
        out[full:] = _dequantize_tail(flat[full // 2:], absmax[-1], n - full).to(dtype)
    return out.view(state.shape)


def _dequantize_full_blocks(packed: Tensor, absmax: Tensor, bs: int, out: Tensor) -> None:
    """packed uint8 [m / 2] (m = whole blocks) -> out [m] in place."""
    # Note: the hot path of CPU training (every 4-bit layer is dequantized in forward and again in
    # backward). One gather from a 256-entry byte -> (hi, lo) fp32 pair table (2 KiB, stays in L1),
    # one multiply by the block's absmax, one rounding store into `out`. Working a 64K-element slice
    # at a time keeps the fp32 scratch in L2; the product is done in fp32 so the result is exactly
    # bnb's (a bf16 multiply would double-round ~30% of the values by one bf16 ulp).
    lut = _pair_lut(packed.device)  # int64 [256], each word one (code[hi], code[lo]) fp32 pair
    chunk = min(out.numel(), _DEQUANT_CHUNK if packed.device.type == "cpu" else _DEQUANT_CHUNK_GPU)
    step = max(bs, chunk // bs * bs)
    scratch = torch.empty(step // 2, dtype=torch.int64, device=packed.device)
    index = torch.empty(step // 2, dtype=torch.int32, device=packed.device)
    out_blocks = out.view(-1, bs)  # (n_blocks, bs)
    for start in range(0, out.numel(), step):
        m = min(step, out.numel() - start)
        b0, nb = start // bs, m // bs
        idx = index[:m // 2]
        idx.copy_(packed[start // 2:start // 2 + m // 2])
        pairs = torch.index_select(lut, 0, idx, out=scratch[:m // 2])
        vals = pairs.view(torch.float32).view(nb, bs)  # (nb, bs) fp32 codes
        if out.dtype == torch.float32:
            torch.mul(vals, absmax[b0:b0 + nb, None], out=out_blocks[b0:b0 + nb])
        else:
            out_blocks[b0:b0 + nb].copy_(vals.mul_(absmax[b0:b0 + nb, None]))


def _dequantize_tail(packed: Tensor, absmax: Tensor, m: int) -> Tensor:
    """The partial last block: fp32 [m]."""
    nibbles = torch.stack([packed >> 4, packed & 15], dim=1).view(-1)[:m]  # (m,)
    return NF4_CODE.to(packed.device)[nibbles.long()] * absmax


@functools.cache
def _pair_lut(device: torch.device) -> Tensor:
    byte = torch.arange(256)
    pairs = torch.stack([NF4_CODE[byte >> 4], NF4_CODE[byte & 15]], dim=1)  # fp32 (256, 2)
    # int64 words: a gather copies them bit for bit (no float canonicalisation on the way).
    return pairs.contiguous().view(torch.int64).view(-1).to(device)  # one 8-byte word per byte

