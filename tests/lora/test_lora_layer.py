"""LoRALinear against the dense reference y = x @ (W + s * B @ A)^T + b, computed in fp64."""

import math

import pytest
import torch
import torch.nn as nn

from lora import LoRALinear
from lora.layer import CheapDropout
from tiny import assert_close

# Tolerances, relative to max|reference|:
# - fp32: a dot product of K <= 400 terms accumulates ~sqrt(K) * 2^-24 relative error (measured 0.8-1.8e-7);
#   1e-5 leaves room for another summation order without hiding a wrong formula (those err by ~1e-1).
# - bf16 base: the base output is rounded to bf16 once, and base + delta once more: 2 * 2^-8 at most
#   (measured 2-4e-3).
REL_TOL = {torch.float32: 1e-5, torch.bfloat16: 2 ** -7}
SHAPES = [pytest.param((16, 24, (2, 3)), id="16to24"), pytest.param((300, 400, (5,)), id="300to400")]
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")]
RANKS = [pytest.param(1, id="r1"), pytest.param(8, id="r8")]
RSLORA = [pytest.param(False, id="alpha_over_r"), pytest.param(True, id="alpha_over_sqrt_r")]


def make_layer(n_in, n_out, dtype, r, use_rslora=False, dropout=0.0, random_b=True):
    torch.manual_seed(0)
    base = nn.Linear(n_in, n_out, bias=True, dtype=dtype)
    layer = LoRALinear(base, r=r, alpha=2 * r, dropout=dropout, use_rslora=use_rslora)
    if random_b:
        nn.init.normal_(layer.lora_B.weight, std=1.0 / math.sqrt(r))
    return layer


def reference(layer, x):
    """fp64 dense formula, on exactly the values the layer holds (bf16 values are exact in fp64)."""
    w = layer.base_layer.weight.double()                                  # (out, in)
    a, b = layer.lora_A.weight.double(), layer.lora_B.weight.double()     # (r, in), (out, r)
    return x.double() @ (w + layer.scaling * b @ a).T + layer.base_layer.bias.double()


@pytest.mark.parametrize("use_rslora", RSLORA)
@pytest.mark.parametrize("r", RANKS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_matches_dense_formula(shape, dtype, r, use_rslora):
    n_in, n_out, lead = shape
    layer = make_layer(n_in, n_out, dtype, r, use_rslora)
    x = torch.randn(*lead, n_in).to(dtype)
    y = layer(x)
    assert y.dtype == dtype and y.shape == (*lead, n_out)
    assert_close(y, reference(layer, x), REL_TOL[dtype], "forward")


@pytest.mark.parametrize("use_rslora", RSLORA)
@pytest.mark.parametrize("r", RANKS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_gradients_match_dense_formula(shape, dtype, r, use_rslora):
    n_in, n_out, lead = shape
    layer = make_layer(n_in, n_out, dtype, r, use_rslora)
    x = torch.randn(*lead, n_in).to(dtype).requires_grad_(True)
    g = torch.randn(*lead, n_out).to(dtype)                               # upstream gradient, dtype-exact
    (layer(x) * g).sum().backward()

    a = layer.lora_A.weight.detach().double().requires_grad_(True)
    b = layer.lora_B.weight.detach().double().requires_grad_(True)
    x64 = x.detach().double().requires_grad_(True)
    w = layer.base_layer.weight.double()
    y_ref = x64 @ (w + layer.scaling * b @ a).T
    (y_ref * g.double()).sum().backward()

    assert layer.base_layer.weight.grad is None, "the base weight must stay frozen"
    # dA, dB come from fp32 adapter math on dtype-exact inputs: fp32 accuracy even for a bf16 base.
    assert_close(layer.lora_A.weight.grad, a.grad, REL_TOL[torch.float32], "dA")
    assert_close(layer.lora_B.weight.grad, b.grad, REL_TOL[torch.float32], "dB")
    assert_close(x.grad, x64.grad, REL_TOL[dtype], "dx")


@pytest.mark.parametrize("dtype", DTYPES)
def test_output_unchanged_at_init_exactly(dtype):
    layer = make_layer(32, 48, dtype, r=4, dropout=0.1, random_b=False).train()
    x = torch.randn(3, 32).to(dtype)
    assert torch.equal(layer(x), layer.base_layer(x))


@pytest.mark.parametrize("dtype", DTYPES)
def test_init_is_kaiming_a_and_zero_b_in_fp32(dtype):
    layer = make_layer(64, 16, dtype, r=8, random_b=False)
    bound = 1 / math.sqrt(64)                     # kaiming_uniform_(a=sqrt(5)) on fan_in=64
    a = layer.lora_A.weight
    assert a.dtype == torch.float32 and layer.lora_B.weight.dtype == torch.float32
    assert a.shape == (8, 64) and layer.lora_B.weight.shape == (16, 8)
    assert a.abs().max() <= bound and a.std() > 0.4 * bound   # uniform on ±bound has std bound/sqrt(3)
    assert torch.count_nonzero(layer.lora_B.weight) == 0


@pytest.mark.parametrize("use_rslora, expected", [pytest.param(False, 16 / 8, id="alpha_over_r"),
                                                  pytest.param(True, 16 / math.sqrt(8), id="alpha_over_sqrt_r")])
def test_scaling(use_rslora, expected):
    layer = LoRALinear(nn.Linear(4, 4), r=8, alpha=16, use_rslora=use_rslora)
    assert layer.scaling == pytest.approx(expected, rel=1e-12)


def test_disabled_returns_base_output_exactly():
    layer = make_layer(16, 24, torch.float32, r=4)
    x = torch.randn(2, 16)
    layer.disabled = True
    assert torch.equal(layer(x), layer.base_layer(x))
    layer.disabled = False
    assert not torch.equal(layer(x), layer.base_layer(x))


def test_dropout_acts_on_adapter_input_only():
    layer = make_layer(16, 24, torch.float32, r=4, dropout=0.5)
    x = torch.randn(64, 16)
    assert isinstance(layer.lora_dropout, nn.Dropout)
    layer.eval()
    assert_close(layer(x), reference(layer, x), REL_TOL[torch.float32], "eval mode: no dropout")
    layer.train()
    torch.manual_seed(1)
    y = layer(x)
    torch.manual_seed(1)
    mask_x = layer.lora_dropout(x)
    expected = layer.base_layer(x) + layer.scaling * mask_x @ layer.lora_A.weight.T @ layer.lora_B.weight.T
    assert_close(y, expected, REL_TOL[torch.float32], "train mode: dropout(x) on the adapter path")
    assert 0.4 < (mask_x == 0).float().mean() < 0.6


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5, 0.9])
def test_cheap_dropout_is_bernoulli_p_with_exact_rescaling(p):
    drop = CheapDropout(p)
    x = torch.rand(1000, 1000) + 1.0                                  # no zeros of its own
    torch.manual_seed(0)
    y = drop(x)
    kept = y != 0
    p_eff = round(p * 65536) / 65536
    n = x.numel()
    assert abs((~kept).float().mean().item() - p_eff) < 5 * (p_eff * (1 - p_eff) / n) ** 0.5   # 5 sigma
    assert torch.equal(y[kept], x[kept] * (1 / (1 - p_eff)))          # survivors scaled exactly (fp32)
    for rows in (slice(0, 500), slice(500, None)):                    # both halves: no stuck bit pattern
        assert abs((~kept[rows]).float().mean().item() - p_eff) < 5 * (p_eff * (1 - p_eff) / (n / 2)) ** 0.5
    torch.manual_seed(0)
    assert torch.equal(drop(x), y), "seeded like any dropout"
    drop.eval()
    assert drop(x) is x


def test_cheap_dropout_gradient_is_the_mask():
    drop = CheapDropout(0.3)
    x = torch.randn(7, 33, requires_grad=True)                        # odd numel: a partial 64-bit word
    y = drop(x)
    y.backward(torch.ones_like(y))
    assert torch.equal(x.grad, (y != 0).float() * (65536 / (65536 - round(0.3 * 65536))))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(7, 33), (64, 576), (3, 5, 129)])
def test_cheap_dropout_equals_where_then_scale(dtype, shape):
    """Output and gradient equal, value for value, `torch.where(mask, x, 0) * scale` in x's dtype (one rounding),
    with the mask drawn from the same bits."""
    from lora.dropout import random_int16
    p = 0.1
    cut = round(p * 65536)
    scale = 65536 / (65536 - cut)
    x = torch.randn(shape).to(dtype).requires_grad_()
    dy = torch.randn(shape).to(dtype)
    torch.manual_seed(5)
    y = CheapDropout(p)(x)
    y.backward(dy)
    torch.manual_seed(5)
    keep = torch.from_numpy(random_int16(x.numel()).copy()).view(shape) >= cut - 32768
    assert y.dtype == dtype and x.grad.dtype == dtype
    assert torch.equal(y, torch.where(keep, x.detach(), 0.0) * scale)
    assert torch.equal(x.grad, torch.where(keep, dy * scale, 0.0))
    assert 0.05 < (~keep).float().mean() < 0.15


def test_cheap_dropout_masks_replay_under_checkpointing():
    """The recompute must draw the forward's mask again (the bits are seeded from torch's RNG, which
    checkpointing restores): the gradient through a checkpointed layer equals the plain one."""
    from torch.utils.checkpoint import checkpoint
    layer = LoRALinear(nn.Linear(64, 48), r=4, alpha=8, dropout=0.3).train()
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(5, 64)
    grads = []
    for wrap in (lambda f, x: f(x), lambda f, x: checkpoint(f, x, use_reentrant=False)):
        torch.manual_seed(3)
        wrap(layer, x).square().sum().backward()
        grads.append(layer.lora_A.weight.grad.clone())
        layer.zero_grad()
    assert torch.equal(grads[0], grads[1])
    drop = CheapDropout(0.5)
    assert not torch.equal(drop(torch.ones(4096)), drop(torch.ones(4096))), "each call draws a new mask"


def test_weight_and_bias_delegate_to_base():
    base = nn.Linear(8, 4)
    layer = LoRALinear(base, r=2, alpha=4)
    assert layer.weight is base.weight and layer.bias is base.bias
    assert (layer.in_features, layer.out_features) == (8, 4)
    assert "r=2" in repr(layer)


# compute_dtype="base": the adapter math in bf16 (autocast-style). The update is rounded to bf16 before the add,
# so the output keeps ~2^-7 accuracy (measured 4.5-5.1e-3); dA, dB and dx come out of bf16 matmuls, rounded once
# to bf16, on bf16-rounded inputs (h, the scaled upstream gradient): 2^-6 bounds them (measured 1.6-6.4e-3), far
# from a wrong formula's ~1e-1.
BASE_COMPUTE_TOL = {"out": 2 ** -7, "dA": 2 ** -6, "dB": 2 ** -6, "dx": 2 ** -6}


@pytest.mark.parametrize("r", RANKS)
@pytest.mark.parametrize("shape", SHAPES)
def test_base_compute_dtype_matches_dense_formula_at_bf16_accuracy(shape, r):
    n_in, n_out, lead = shape
    layer = make_layer(n_in, n_out, torch.bfloat16, r)
    layer.compute_dtype = "base"
    x = torch.randn(*lead, n_in).to(torch.bfloat16).requires_grad_(True)
    g = torch.randn(*lead, n_out).to(torch.bfloat16)
    y = layer(x)
    (y * g).sum().backward()

    a = layer.lora_A.weight.detach().double().requires_grad_(True)
    b = layer.lora_B.weight.detach().double().requires_grad_(True)
    x64 = x.detach().double().requires_grad_(True)
    y_ref = x64 @ (layer.base_layer.weight.double() + layer.scaling * b @ a).T + layer.base_layer.bias.double()
    (y_ref * g.double()).sum().backward()

    assert y.dtype == torch.bfloat16
    assert layer.lora_A.weight.grad.dtype == torch.float32, "master weights and their gradients stay fp32"
    assert_close(y, y_ref, BASE_COMPUTE_TOL["out"], "forward")
    assert_close(layer.lora_A.weight.grad, a.grad, BASE_COMPUTE_TOL["dA"], "dA")
    assert_close(layer.lora_B.weight.grad, b.grad, BASE_COMPUTE_TOL["dB"], "dB")
    assert_close(x.grad, x64.grad, BASE_COMPUTE_TOL["dx"], "dx")


def test_base_compute_dtype_on_an_fp32_base_is_the_fp32_path():
    layer = make_layer(16, 24, torch.float32, r=4)
    x = torch.randn(3, 16)
    expected = layer(x)
    layer.compute_dtype = "base"
    assert torch.equal(layer(x), expected)


def test_compute_dtype_is_checked():
    with pytest.raises(ValueError, match="compute_dtype"):
        LoRALinear(nn.Linear(4, 4), r=2, alpha=4, compute_dtype="bf16")


def test_fp32_compute_dtype_is_the_default_fp32_path():
    layer = make_layer(16, 24, torch.bfloat16, r=4)
    x = torch.randn(3, 16).to(torch.bfloat16)
    expected = layer(x)                                               # compute_dtype=None
    layer.compute_dtype = "fp32"
    assert torch.equal(layer(x), expected)
    layer.compute_dtype = "base"
    assert not torch.equal(layer(x), expected), "the bf16 path rounds differently: the check above can fail"
