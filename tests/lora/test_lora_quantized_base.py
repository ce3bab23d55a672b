"""The 4-bit base path, with a fake 4-bit layer (lora must not import quant): forward, counts, merging."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lora
from lora import LoRALinear
from tiny import assert_close

FP32_REL = 1e-5   # fp32 matmuls of K <= 32 terms vs fp64: measured ~1e-7


class Fake4bit(nn.Module):
    """Stands in for quant.Linear4bit: 4-bit codes (-7..7) x a per-row absmax scale, two codes per byte."""

    def __init__(self, weight, bias=None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        scale = weight.abs().amax(dim=1, keepdim=True).clamp_min(1e-8) / 7           # (out, 1)
        codes = (torch.round(weight / scale).clamp(-7, 7) + 8).to(torch.uint8).flatten()
        codes = F.pad(codes, (0, codes.numel() % 2))
        packed = (codes[0::2] << 4) | codes[1::2]                                      # high nibble first
        self.weight = nn.Parameter(packed.unsqueeze(1), requires_grad=False)           # ((numel+1)//2, 1)
        self.register_buffer("scale", scale.float())
        self.bias = bias
        self.quant_state = "fake"

    def dequantize(self, dtype=None):
        codes = torch.stack([self.weight[:, 0] >> 4, self.weight[:, 0] & 15], dim=1).flatten()
        codes = codes[: self.in_features * self.out_features].view(self.out_features, self.in_features)
        return ((codes.float() - 8) * self.scale).to(dtype or torch.float32)

    def quantized_copy(self, weight):
        return Fake4bit(weight.detach().float(), self.bias)

    def forward(self, x):
        return F.linear(x, self.dequantize(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = Fake4bit(torch.randn(32, 16) * 0.2, nn.Parameter(torch.randn(32) * 0.1, requires_grad=False))
        self.fc2 = Fake4bit(torch.randn(24, 32) * 0.2)
        self.classifier = nn.Linear(24, 5)

    def forward(self, x):
        return self.classifier(F.gelu(self.fc2(F.gelu(self.fc1(x)))))


def trained(model=None, std=0.3):
    model = lora.inject(model or TinyNet(), r=4, alpha=8, dropout=0.0)
    torch.manual_seed(2)
    for m in model.modules():
        if isinstance(m, LoRALinear):
            nn.init.normal_(m.lora_B.weight, std=std)
    return model


X = torch.randn(6, 16, generator=torch.Generator().manual_seed(3))


def test_fake_base_round_trips_its_grid():
    fc = TinyNet().fc1
    w = fc.dequantize()
    assert fc.weight.numel() == 32 * 16 // 2 and fc.weight.dtype == torch.uint8
    assert torch.equal(Fake4bit(w).dequantize(), w), "re-quantizing a dequantized weight is exact"


def test_forward_and_grads_match_dequantized_formula():
    layer = LoRALinear(TinyNet().fc1, r=4, alpha=8)
    nn.init.normal_(layer.lora_B.weight, std=0.3)
    x = X.clone().requires_grad_(True)
    y = layer(x)
    w, a, b = layer.base_layer.dequantize().double(), layer.lora_A.weight, layer.lora_B.weight
    a64, b64 = a.detach().double().requires_grad_(True), b.detach().double().requires_grad_(True)
    x64 = x.detach().double().requires_grad_(True)
    ref = x64 @ (w + layer.scaling * b64 @ a64).T + layer.base_layer.bias.double()
    assert_close(y, ref, FP32_REL, "forward")
    y.pow(2).sum().backward()
    ref.pow(2).sum().backward()
    for got, want, what in [(a.grad, a64.grad, "dA"), (b.grad, b64.grad, "dB"), (x.grad, x64.grad, "dx")]:
        assert_close(got, want, FP32_REL, what)


def test_all_linear_adapts_4bit_layers_and_counts_their_real_size():
    model = lora.inject(TinyNet(), r=4, alpha=8, modules_to_save=["classifier"])
    assert isinstance(model.fc1, LoRALinear) and isinstance(model.fc2, LoRALinear)
    assert type(model.classifier) is nn.Linear
    adapters = 4 * (16 + 32) + 4 * (32 + 24)
    head = 24 * 5 + 5
    counts = lora.trainable_parameters(model)
    assert counts["trainable"] == adapters + head
    assert counts["total"] == 32 * 16 + 32 + 24 * 32 + head + adapters, "4-bit weights count as in x out"


def test_inject_leaves_outputs_unchanged_exactly():
    model = TinyNet()
    before = model(X)
    lora.inject(model, r=4, alpha=8)
    assert torch.equal(model(X), before)


def test_merge_in_place_refuses_4bit_and_changes_nothing():
    model = trained()
    packed, y = model.fc1.base_layer.weight.clone(), model(X)
    with pytest.raises(ValueError, match=r"4-bit base.*merge_and_unload"):
        lora.merge(model)
    assert not any(m.merged for m in model.modules() if isinstance(m, LoRALinear))
    assert torch.equal(model.fc1.base_layer.weight, packed) and torch.equal(model(X), y)


def test_merge_and_unload_keeps_dense_result_by_default():
    model = trained()
    adapted = model(X).detach()
    plain = lora.merge_and_unload(model)
    assert type(plain.fc1) is nn.Linear and type(plain.fc2) is nn.Linear
    assert plain.fc1.bias is not None and plain.fc2.bias is None
    assert_close(plain(X).detach(), adapted, FP32_REL, "dense merge vs adapted")
    assert [r["module"] for r in plain.lora_merge_report] == ["fc1", "fc2"]
    assert all(r["lost"] == 0.0 and not r["requantized"] for r in plain.lora_merge_report)


@pytest.mark.parametrize("std", [pytest.param(0.3, id="large-update"), pytest.param(1e-3, id="tiny-update")])
def test_merge_and_unload_requantize_reports_what_is_lost(std):
    model = trained(std=std)
    intended = {n: (m.base_layer.dequantize() + m.delta_weight()).detach()
                for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    deltas = {n: m.delta_weight().detach() for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    plain = lora.merge_and_unload(model, requantize=True)
    assert type(plain.fc1) is Fake4bit and type(plain.fc2) is Fake4bit
    for row in plain.lora_merge_report:
        stored = getattr(plain, row["module"]).dequantize()
        lost = (stored - intended[row["module"]]).norm() / deltas[row["module"]].norm()
        assert row["requantized"]
        assert row["lost"] == pytest.approx(lost.item(), rel=1e-5)
        assert row["delta_norm"] == pytest.approx(deltas[row["module"]].norm().item(), rel=1e-6)
    # A 4-bit grid step here is ~0.1: an update 300x smaller rounds away almost entirely.
    worst = max(r["lost"] for r in plain.lora_merge_report)
    assert worst > 0.5 if std < 0.01 else worst < 0.5


def test_requantize_without_quantized_copy_raises():
    class NoCopy(Fake4bit):
        quantized_copy = None

    model = TinyNet()
    model.fc1 = NoCopy(model.fc1.dequantize())
    trained(model)
    with pytest.raises(ValueError, match="quantized_copy"):
        lora.merge_and_unload(model, requantize=True)
    assert isinstance(model.fc1, LoRALinear), "nothing may change on error"
