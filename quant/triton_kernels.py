"""Triton NF4 kernels: dequantize, and a fused dequantize-matmul for the forward and the input gradient.

The math. A 4-bit NF4 weight W [out, in] is stored as in bitsandbytes (see docs/design.md, NF4State):
element f = n * in + k (row-major) lives in byte f // 2 of `packed` (the first element of a pair in the
HIGH nibble), and

    W.flat[f] = code[nibble(f)] * absmax[f // blocksize]
    absmax[b] = nested_code[absmax_u8[b]] * nested_absmax[b // 256] + offset      (double quant only)

The design. Every kernel reads W through one helper, `_nf4_gather`, that takes a tensor of flat indices and
returns fp32 weights. A tile of W for `tl.dot` is just a 2-D tensor of flat indices, so one matmul kernel
computes both products of a linear layer, choosing the orientation with two strides (as `stride_bk`,
`stride_bn` in Triton tutorial 03):

    forward      y  = x  @ W^T : B[k, n] = W[n, k]  -> stride_bk = 1,  stride_bn = in
    input grad   dx = dy @ W   : B[k, n] = W[k, n]  -> stride_bk = in, stride_bn = 1

W is never written to memory: each program unpacks its tile into registers, scales it in fp32, casts it to
the activation dtype and feeds `tl.dot` with an fp32 accumulator.

Supported: any blocksize (bitsandbytes makes 32..4096), any [out, in] (odd numel, in % blocksize != 0,
blocks longer than a row), double quant on or off; activations fp16/bf16/fp32 with any strides and any M
(0 included); outputs in the activation dtype. Autotuned on CUDA; one small config under the interpreter.

Note: gather by flat index instead of loading aligned byte tiles. It makes the kernels general (any
in_features, any blocksize, odd numel, quantization blocks that span rows) at the price of reading each
packed byte twice and each absmax value up to `blocksize` times per tile; the repeats hit L1, and the unique
traffic is still 0.5 byte per weight (+ 1/blocksize for absmax).

Note: `enable_fp_fusion=False` on every launch, so `nested_code * nested_absmax + offset` rounds twice as
in the torch reference and bitsandbytes instead of becoming an FMA: dequantization is then bit-exact.

Note: the Triton interpreter (TRITON_INTERPRET=1, how this runs on a CPU) gets bfloat16 wrong twice: `tl.dot`
multiplies the raw uint16 bits (triton-lang/triton#11584, "not supported yet") and fp32 -> bf16 casts
truncate instead of rounding to nearest even. With INTERPRET_BF16 the kernels round to bf16 themselves
(`_round_bf16`, exact bit arithmetic) and feed the dot fp32 tiles holding bf16 values; bf16 x bf16
products are exact in fp32, so this is the GPU's math (bf16 MMA, fp32 accumulator, RTNE casts). The
interpreter flag is read when `@triton.jit` runs: for these kernels when this module is imported (set it
before, or `importlib.reload` this module); for Triton's own `@jit` library functions (`tl.cdiv`,
`tl.zeros`, `tl.sum`) when triton is imported, so the kernels call none of those and work in the
interpreter whenever triton itself was imported.

References: Triton tutorial 03 (tiling, grouped program ids, autotune); bitsandbytes kDequantizeBlockwise and
gemv_4bit (the layout); Dettmers et al. 2023, QLoRA (NF4, double quantization).
"""

import math
import os
from contextlib import nullcontext

import torch

try:
    import triton
    import triton.language as tl
    _IMPORT_ERROR = None
except ImportError as e:  # keep this module importable, so is_available() can say why
    triton, tl, _IMPORT_ERROR = None, None, e

# Decided once, at import, like @triton.jit itself.
INTERPRET = os.environ.get("TRITON_INTERPRET", "").lower() in ("1", "true", "on", "yes")
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def is_available():
    """(True, "") when the kernels can run here: triton imports, and CUDA or the interpreter is on."""
    if triton is None:
        return False, f"triton is not installed ({_IMPORT_ERROR}); pip install 'triton>=3.0'"
    if INTERPRET or torch.cuda.is_available():
        return True, ""
    if os.environ.get("TRITON_INTERPRET"):
        return False, ("TRITON_INTERPRET was set after quant.triton_kernels was imported; "
                       "importlib.reload(quant.triton_kernels) to pick it up")
    return False, "no CUDA device; set TRITON_INTERPRET=1 before importing quant.triton_kernels to run on the CPU"


# ----------------------------------------------------------------------------- kernels

def _dequant_configs():
    if INTERPRET:  # one config: nothing to tune, and each extra launch costs seconds in numpy
        return [triton.Config({"BLOCK": 1024})]
    return [triton.Config({"BLOCK": b}, num_warps=w) for b, w in ((1024, 4), (2048, 8), (4096, 8))]


def _matmul_configs():
    if INTERPRET:  # small tiles, so the tests' small shapes still hit ragged M, N and K edges
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4})]
    return [
        # decode (M <= 16): one row-tile, wide K steps to keep many bytes in flight
        triton.Config({"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128, "GROUP_M": 8}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_M": 32, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=4),
        # training (M in the thousands): tutorial-03-like tiles
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32, "GROUP_M": 8}, num_warps=8, num_stages=3),
    ]


def _prune_matmul_configs(configs, named_args, **kwargs):
    """Only tiles that fit the rows: BLOCK_M <= 32 for decode (M <= 16), <= 64 up to 128 rows, >= 64 above.

    A 128-row tile for one row wastes 127/128 of each MMA, a 16-row tile for thousands of rows re-reads the
    weight 8x as often; skipping them halves the compilations and timings the autotuner does per shape."""
    m = named_args["M_BUCKET"]
    fits = (lambda bm: bm <= 32) if m <= 16 else (lambda bm: bm <= 64) if m <= 128 else (lambda bm: bm >= 64)
    return [c for c in configs if fits(c.kwargs["BLOCK_M"])] or configs


def _autotune_timing():
    """Shorter autotune timings than Triton's default 25 + 100 ms per config: the gaps between configs are
    large, and a model has dozens of (M bucket, N, K) keys to tune on first use."""
    import inspect

    if "do_bench" in inspect.signature(triton.autotune).parameters:   # triton >= 3.2
        return {"do_bench": lambda fn, quantiles: triton.testing.do_bench(fn, warmup=5, rep=20, quantiles=quantiles)}
    return {"warmup": 5, "rep": 20}


if triton is not None:
    _TIMING = {} if INTERPRET else _autotune_timing()

    @triton.jit
    def _round_bf16(x):
        """fp32 -> the nearest bf16 value (ties to even), still fp32; used only under the interpreter."""
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)

    @triton.jit
    def _nf4_gather(flat, mask, packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr,
                    blocksize, nested_blocksize, DOUBLE_QUANT: tl.constexpr):
        """fp32 weights at the flat indices `flat` of the row-major weight; 0 where ~mask."""
        # Unpack: byte f // 2 holds elements (f even -> high nibble, f odd -> low nibble).
        byte = tl.load(packed_ptr + (flat >> 1), mask=mask, other=0).to(tl.int32)
        nibble = tl.where((flat & 1) == 0, byte >> 4, byte & 0xF)
        value = tl.load(code_ptr + nibble)  # 16-entry table, always in range
        # Scale: one absmax per `blocksize` consecutive elements, itself 8-bit quantized with double quant.
        block = flat // blocksize
        if DOUBLE_QUANT:
            absmax_q = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
            absmax = tl.load(nested_code_ptr + absmax_q) \
                * tl.load(nested_absmax_ptr + block // nested_blocksize, mask=mask, other=0.0) \
                + tl.load(offset_ptr)
        else:
            absmax = tl.load(absmax_ptr + block, mask=mask, other=0.0)
        return tl.where(mask, value * absmax, 0.0)

    @triton.autotune(configs=_dequant_configs(), key=["numel"], **_TIMING)
    @triton.jit
    def _nf4_dequantize_kernel(packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr,
                               out_ptr, numel, blocksize, nested_blocksize,
                               DOUBLE_QUANT: tl.constexpr, INTERPRET_BF16: tl.constexpr, BLOCK: tl.constexpr):
        # Each program writes BLOCK consecutive elements of the flat weight; int64 so huge weights index safely.
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < numel
        w = _nf4_gather(offs, mask, packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr,
                        offset_ptr, blocksize, nested_blocksize, DOUBLE_QUANT)
        # The fp32 product is rounded once, to the output dtype (as bitsandbytes does).
        if INTERPRET_BF16:
            w = _round_bf16(w)
        tl.store(out_ptr + offs, w.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.autotune(configs=_matmul_configs(), key=["M_BUCKET", "N", "K"],
                     prune_configs_by={"early_config_prune": _prune_matmul_configs}, **_TIMING)
    @triton.jit
    def _nf4_matmul_kernel(a_ptr, packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr,
                           bias_ptr, c_ptr, M, N, K, M_BUCKET,
                           stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
                           blocksize, nested_blocksize,
                           DOUBLE_QUANT: tl.constexpr, HAS_BIAS: tl.constexpr, INTERPRET_BF16: tl.constexpr,
                           INPUT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                           BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
        """C[M, N] = A[M, K] @ B[K, N] (+ bias[N]); B[k, n] = NF4 weight at flat index k*stride_bk + n*stride_bn."""
        # -- Grouped program ids: walk GROUP_M row-tiles down one column of C before moving right, so the
        #    B tiles (the packed weight) a group needs stay in L2 while its programs run.
        pid = tl.program_id(0)
        num_pid_m = (M + BLOCK_M - 1) // BLOCK_M  # not tl.cdiv: see the interpreter note
        num_pid_n = (N + BLOCK_N - 1) // BLOCK_N
        num_pid_in_group = GROUP_M * num_pid_n
        group_id = pid // num_pid_in_group
        first_pid_m = group_id * GROUP_M
        group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
        pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
        pid_n = (pid % num_pid_in_group) // group_size_m

        # -- Pointers for the first K step: A by its strides; B as flat weight indices (int64: out*in may be
        #    large). Rows/columns past M/N are masked rather than wrapped, the loads return 0 there.
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        a_ptrs = a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak            # (BLOCK_M, BLOCK_K)
        b_flat = offs_k[:, None].to(tl.int64) * stride_bk + offs_n[None, :].to(tl.int64) * stride_bn  # (BK, BN)
        mask_m = offs_m < M
        mask_n = offs_n < N

        # -- Main loop: dequantize a (BLOCK_K, BLOCK_N) tile of B in registers and accumulate in fp32.
        #    The K mask covers the ragged last step.
        acc = tl.full((BLOCK_M, BLOCK_N), 0.0, dtype=tl.float32)  # not tl.zeros: a @jit helper
        for k in range(0, (K + BLOCK_K - 1) // BLOCK_K):
            mask_k = offs_k < K - k * BLOCK_K
            a = tl.load(a_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            b = _nf4_gather(b_flat, mask_k[:, None] & mask_n[None, :], packed_ptr, absmax_ptr, code_ptr,
                            nested_absmax_ptr, nested_code_ptr, offset_ptr, blocksize, nested_blocksize,
                            DOUBLE_QUANT)
            if INTERPRET_BF16:  # see the module note
                acc = tl.dot(a.to(tl.float32), _round_bf16(b), acc)
            else:
                acc = tl.dot(a, b.to(a.dtype), acc, input_precision=INPUT_PRECISION)
            a_ptrs += BLOCK_K * stride_ak
            b_flat += BLOCK_K * stride_bk

        # -- Epilogue: bias in fp32, one rounding to the activation dtype, masked store.
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        if INTERPRET_BF16:
            acc = _round_bf16(acc)
        c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


# ----------------------------------------------------------------------------- checks

def _require_available(device):
    ok, why = is_available()
    if not ok:
        raise RuntimeError(f"the triton NF4 backend is unavailable: {why}")
    if device.type != "cuda" and not INTERPRET:
        raise ValueError(f"the triton kernels need CUDA tensors, got {device}; .cuda() them, or set "
                         "TRITON_INTERPRET=1 before importing quant.triton_kernels to run them on the CPU")


def _on(device):
    """Launch on the tensors' GPU, not the current one (a model on cuda:1 while cuda:0 is current)."""
    return torch.cuda.device(device) if device.type == "cuda" else nullcontext()


def _weight_shape(packed, state):
    """Validate packed + state against the NF4State contract; return (numel, state tensors for the kernel)."""
    numel = math.prod(state.shape)
    if state.blocksize <= 0:
        raise ValueError(f"blocksize must be a positive int, got {state.blocksize}")
    n_blocks = -(-numel // state.blocksize)
    if packed.dtype != torch.uint8 or packed.numel() != (numel + 1) // 2:
        raise ValueError(f"packed must be uint8 with (numel + 1) // 2 = {(numel + 1) // 2} bytes for shape "
                         f"{tuple(state.shape)}, got {packed.dtype} with {packed.numel()}")
    if state.code.numel() != 16 or state.code.dtype != torch.float32:
        raise ValueError(f"state.code must be fp32 [16], got {state.code.dtype} {tuple(state.code.shape)}")
    double_quant = state.nested_absmax is not None
    want = torch.uint8 if double_quant else torch.float32
    if state.absmax.dtype != want or state.absmax.numel() != n_blocks:
        raise ValueError(f"state.absmax must be {want} [{n_blocks}] (double_quant={double_quant}), "
                         f"got {state.absmax.dtype} {tuple(state.absmax.shape)}")
    tensors = [packed, state.absmax, state.code]
    if double_quant:
        n_nested = -(-n_blocks // state.nested_blocksize)
        if state.nested_absmax.numel() != n_nested or state.nested_code is None or state.offset is None:
            raise ValueError(f"double quant needs nested_absmax [{n_nested}], nested_code [256] and offset, got "
                             f"nested_absmax {tuple(state.nested_absmax.shape)}, nested_code "
                             f"{state.nested_code is not None}, offset {state.offset is not None}")
        offset = torch.as_tensor(state.offset, dtype=torch.float32, device=packed.device)
        tensors += [state.nested_absmax.float(), state.nested_code.float(), offset]
    else:  # unused pointers: any tensor on the device will do
        tensors += [state.absmax, state.absmax, state.absmax]
    for t in tensors:
        if t.device != packed.device:
            raise ValueError(f"packed and quantization state must be on one device, "
                             f"got {packed.device} and {t.device}")
    return numel, [t.contiguous() for t in tensors]


def _linear_shape(state):
    if len(state.shape) != 2:
        raise ValueError(f"a linear weight must be 2-D [out, in], got shape {tuple(state.shape)}")
    return state.shape[0], state.shape[1]


def _check_activation(a, features, name, what):
    if a.dim() != 2 or a.shape[1] != features:
        raise ValueError(f"{name} must be 2-D [M, {what}={features}], got {tuple(a.shape)}; "
                         f"reshape(-1, {features}) first")
    if a.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"{name} dtype {a.dtype} unsupported; use one of {SUPPORTED_DTYPES}")


# ----------------------------------------------------------------------------- wrappers: check -> allocate -> launch

def dequantize(packed, state, dtype=None):
    """Dense weight [state.shape] in `dtype` (default state.dtype), bit-exact with the torch reference."""
    _require_available(packed.device)
    dtype = dtype or state.dtype
    if dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"dtype {dtype} unsupported; use one of {SUPPORTED_DTYPES}")
    numel, (packed, absmax, code, nested_absmax, nested_code, offset) = _weight_shape(packed, state)

    out = torch.empty(tuple(state.shape), dtype=dtype, device=packed.device)
    if numel == 0:
        return out

    grid = lambda meta: (triton.cdiv(numel, meta["BLOCK"]),)  # noqa: E731
    with _on(packed.device):
        _nf4_dequantize_kernel[grid](packed, absmax, code, nested_absmax, nested_code, offset, out, numel,
                                     state.blocksize, state.nested_blocksize,
                                     DOUBLE_QUANT=state.nested_absmax is not None,
                                     INTERPRET_BF16=INTERPRET and dtype == torch.bfloat16, enable_fp_fusion=False)
    return out


def nf4_linear(x2d, packed, state, bias=None):
    """x2d [M, in] @ W^T (+ bias) -> [M, out] in x2d.dtype, without materialising W."""
    out_features, in_features = _linear_shape(state)
    _check_activation(x2d, in_features, "x2d", "in_features")
    if bias is not None and tuple(bias.shape) != (out_features,):
        raise ValueError(f"bias must be [{out_features}], got {tuple(bias.shape)}")
    if bias is not None and bias.device != x2d.device:
        raise ValueError(f"bias on {bias.device} but x2d on {x2d.device}")
    bias = bias.contiguous() if bias is not None else None
    return _matmul(x2d, packed, state, bias, n=out_features, k=in_features, stride_bk=1, stride_bn=in_features)


def nf4_linear_grad_input(dy2d, packed, state):
    """dy2d [M, out] @ W -> [M, in] in dy2d.dtype (the input gradient of nf4_linear)."""
    out_features, in_features = _linear_shape(state)
    _check_activation(dy2d, out_features, "dy2d", "out_features")
    return _matmul(dy2d, packed, state, None, n=in_features, k=out_features, stride_bk=in_features, stride_bn=1)


def _matmul(a, packed, state, bias, n, k, stride_bk, stride_bn):
    _require_available(a.device)
    _, (packed, absmax, code, nested_absmax, nested_code, offset) = _weight_shape(packed, state)
    if a.device != packed.device:
        raise ValueError(f"activations on {a.device} but the weight on {packed.device}")
    m = a.shape[0]

    c = torch.empty((m, n), dtype=a.dtype, device=a.device)  # (M, N)
    if m == 0:
        return c

    # fp32 activations follow torch's TF32 switch (off by default), so results match F.linear's precision.
    precision = None
    if a.dtype == torch.float32:
        precision = "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
    with _on(a.device):
        _nf4_matmul_kernel[grid](
            a, packed, absmax, code, nested_absmax, nested_code, offset, bias if bias is not None else c, c,
            m, n, k, min(triton.next_power_of_2(m), 4096),  # autotune per power-of-2 bucket of M, not per M
            a.stride(0), a.stride(1), stride_bk, stride_bn, c.stride(0), c.stride(1),
            state.blocksize, state.nested_blocksize,
            DOUBLE_QUANT=state.nested_absmax is not None, HAS_BIAS=bias is not None,
            INTERPRET_BF16=INTERPRET and a.dtype == torch.bfloat16, INPUT_PRECISION=precision,
            enable_fp_fusion=False,
        )
    return c
