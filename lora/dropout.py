"""CheapDropout: nn.Dropout whose CPU keep-mask costs 16 random bits per element (LoRALinear's and, through
`train.use_cheap_dropout`, a model's own dropouts)."""
from collections import OrderedDict
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn as nn
from torch import Tensor


class CheapDropout(nn.Dropout):
    """nn.Dropout whose CPU mask costs 16 random bits per element instead of a Bernoulli draw.

    The keep-mask is `u >= t` for u uniform on the int16 range, so p is rounded to a multiple of 2^-16
    (0.05 -> 0.0500031) and the survivors are scaled by 1 / (1 - that p): E[output] = x exactly. The bits come
    from numpy's SFC64 generator seeded by one draw from torch's generator, so torch.manual_seed and
    checkpointing's RNG replay give the same mask; 2x faster than torch's CPU Mersenne Twister for the same
    bits, 10x faster than its Bernoulli sampler. The mask is a 0/1 byte tensor (numpy compares the bits: 5x
    faster than torch's int16 -> bool compare) and the output `(x * mask) * scale`, two plain multiplies in x's
    dtype, as is the backward: `torch.where` with a bool mask, or a bool -> bf16 cast, runs 4-6x slower on the
    CPU. The values are those of `torch.where(mask, x, 0) * scale`, rounded once. On other devices (fast
    Philox dropout there) and with p = 0 it is nn.Dropout."""

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0 or x.device.type != "cpu" or self.inplace:
            return super().forward(x)
        cut = round(self.p * 65536)                                   # drop where u < cut - 32768
        keep = keep_mask(x.numel(), cut - 32768).view(x.shape)       # (..., in) uint8 0/1
        return _MaskAndScale.apply(x, keep, 65536 / (65536 - cut))

    def masked(self, x: Tensor) -> tuple[Tensor, float]:
        """(x with the dropped elements zeroed, the survivors' scale): `forward(x)` is their product, and a caller
        whose next op is linear folds the scale into a smaller tensor (LoRALinear: into B·A·x's factor). One
        multiply by the mask, forward and backward, instead of two."""
        if not self.training or self.p == 0 or x.device.type != "cpu" or self.inplace:
            return super().forward(x), 1.0
        cut = round(self.p * 65536)
        keep = keep_mask(x.numel(), cut - 32768).view(x.shape).to(x.dtype)       # (..., in) 0/1 in x's dtype
        return _Mask.apply(x, keep), 65536 / (65536 - cut)


def random_int16(n: int) -> np.ndarray:
    """n uniform int16 (CPU), from numpy's SFC64 seeded by one draw from torch's default generator."""
    return _bits(_draw_seed(), n)


def keep_mask(n: int, threshold: int) -> Tensor:
    """(n,) uint8: 1 where a fresh uniform int16 is >= threshold (random_int16's bits), else 0.

    Inside `replayable_masks()`' first context (a checkpointed block's forward) the mask is also kept, packed to
    bits, for the second (the block's recompute in backward), which draws the same seed and unpacks it instead of
    drawing the bits again: the same mask, at a tenth of the cost."""
    seed = _draw_seed()
    key = (seed, n, threshold)
    if _REPLAY.phase == "replay":
        packed = _REPLAY.masks.pop(key, None)
        if packed is not None:
            _REPLAY.nbytes -= packed.nbytes
            return torch.from_numpy(np.unpackbits(packed, count=n))
    keep = (_bits(seed, n) >= threshold).view(np.uint8)
    if _REPLAY.phase == "record":
        _REPLAY.keep(key, np.packbits(keep))
    return torch.from_numpy(keep)


def _draw_seed() -> int:
    return int(torch.randint(0, 2**62, (1,)).item())


def _bits(seed: int, n: int) -> np.ndarray:
    words = np.random.SFC64(seed).random_raw((n + 3) // 4)           # uint64: 4 x 16 bits each
    return words.view(np.int16)[:n]


class _Replay:
    """The masks drawn in checkpointed forwards, bit-packed, until their recompute takes them (at most LIMIT
    bytes: the oldest go first, and the recompute, last block first, draws those again)."""
    LIMIT = 64 << 20

    def __init__(self):
        self.phase: str | None = None
        self.masks: OrderedDict[tuple, np.ndarray] = OrderedDict()
        self.nbytes = 0
        self.replayed = False              # a recompute ran since the last forward: what is left is stale

    def keep(self, key: tuple, packed: np.ndarray) -> None:
        self.masks[key] = packed
        self.nbytes += packed.nbytes
        while self.nbytes > self.LIMIT:
            self.nbytes -= self.masks.popitem(last=False)[1].nbytes

    @contextmanager
    def during(self, phase: str):
        if phase == "record" and self.replayed:
            self.masks.clear()
            self.nbytes, self.replayed = 0, False
        outer, self.phase = self.phase, phase
        try:
            yield
        finally:
            self.phase = outer
            self.replayed |= phase == "replay"


_REPLAY = _Replay()


def replayable_masks():
    """`torch.utils.checkpoint`'s `context_fn`: (the forward's context, the recompute's context)."""
    return _REPLAY.during("record"), _REPLAY.during("replay")


class _MaskAndScale(torch.autograd.Function):
    """y = (x * mask) * scale with a 0/1 uint8 mask; the gradient is the same map of dy. Saves only the mask."""

    @staticmethod
    def forward(ctx, x: Tensor, keep: Tensor, scale: float) -> Tensor:
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return _mask_and_scale(x, keep, scale)

    @staticmethod
    def backward(ctx, dy: Tensor):
        (keep,) = ctx.saved_tensors
        return _mask_and_scale(dy, keep, ctx.scale), None, None


class _Mask(torch.autograd.Function):
    """y = x * mask (0/1, x's dtype: exact); the gradient is dy * mask. Saves only the mask."""

    @staticmethod
    def forward(ctx, x: Tensor, keep: Tensor) -> Tensor:
        ctx.save_for_backward(keep)
        return x * keep

    @staticmethod
    def backward(ctx, dy: Tensor):
        (keep,) = ctx.saved_tensors
        return dy * keep, None


def _mask_and_scale(t: Tensor, keep: Tensor, scale: float) -> Tensor:
    return torch.mul(t, keep.to(t.dtype)).mul_(scale)   # x * 1 or x * 0 is exact: one rounding, in mul_
