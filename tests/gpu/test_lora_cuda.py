"""LoRA over real CUDA Linear4bit layers: the formula, and an adapter trained on the GPU that reloads on the CPU.

fp32 throughout (TF32 off, torch's default), so CUDA and CPU differ only by summation order: ~1e-6 relative per
layer; the limits (1e-5 per layer, 1e-4 for a whole 2-layer model's logits) leave ten times that.
"""
import pytest
import torch


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)


def quantized_tiny_llama(device):
    import lora
    import quant
    from tiny import tiny_llama

    model = quant.quantize(tiny_llama(), device=device)       # the same seed: the same weights and bytes
    lora.inject(model, r=4, alpha=8, dropout=0.0, targets="all-linear")
    return model


def test_lora_on_a_cuda_linear4bit_is_base_plus_scaled_update():
    from quant import Linear4bit
    from tiny import assert_close

    model = quantized_tiny_llama("cuda")
    layer = model.model.layers[0].mlp.up_proj                    # LoRALinear(Linear4bit 128x64)
    assert isinstance(layer.base_layer, Linear4bit) and layer.base_layer.weight.device.type == "cuda"
    x = torch.randn(3, 5, 64, device="cuda")
    with torch.no_grad():
        assert torch.equal(layer(x), layer.base_layer(x))         # B = 0 at init: exactly the base
        torch.nn.init.normal_(layer.lora_B.weight, std=0.1)
        got = layer(x)
        a, b = layer.lora_A.weight, layer.lora_B.weight           # (r, in), (out, r)
        want = layer.base_layer(x) + layer.scaling * ((x @ a.t()) @ b.t())   # (3, 5, 128)
    assert layer.scaling == 2.0 and a.device.type == b.device.type == "cuda"
    assert_close(got, want, 1e-5, "LoRA over a CUDA Linear4bit")


def test_adapter_trained_on_cuda_reloads_on_cpu_with_equal_logits(tmp_path):
    import lora
    from tiny import assert_close

    model = quantized_tiny_llama("cuda").train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))   # (B, T)
    losses = []
    for _ in range(4):
        loss = model(input_ids=ids.cuda(), labels=ids.cuda()).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < losses[0], f"four AdamW steps did not lower the loss: {losses}"
    lora.save(model, tmp_path / "adapter")
    with torch.no_grad():
        on_gpu = model.eval()(input_ids=ids.cuda()).logits.cpu()

    from quant import quantize
    from tiny import tiny_llama

    fresh = quantize(tiny_llama())                                  # on the CPU, from the same seed
    lora.load(fresh, tmp_path / "adapter")
    assert all(p.device.type == "cpu" for p in fresh.parameters())
    with torch.no_grad():
        on_cpu = fresh.eval()(input_ids=ids).logits
        without = quantize(tiny_llama())(input_ids=ids).logits
    assert (on_cpu - without).abs().max() > 1e-3, "the trained adapter did not change the logits"
    assert_close(on_cpu, on_gpu, 1e-4, "logits: CPU with the reloaded adapter vs the GPU that trained it")
