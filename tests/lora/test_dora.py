"""DoRA against the dense fp64 formula y = m ⊙ (W + s·B·A) x / ||W + s·B·A||_row + b (norm detached), on dense
and NF4 bases; init, dropout, merging, saving, and PEFT interop both ways."""

import json
import math

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

import lora
import lora.dora
from lora import LoRALinear
from tiny import assert_close, tiny_bert, tiny_llama

try:
    import peft                     # test-only, imported at collection (seconds): the library never imports it
except ImportError:
    peft = None

pytestmark = pytest.mark.usefixtures("one_thread")

# Tolerances, relative to max|reference| (measured, then given ~3x room):
# - fp32: dot products of K <= 400 terms, ~sqrt(K) * 2^-24 (measured 1-3e-7); a wrong formula errs by ~1e-1.
# - bf16 base: the base output W x + b is rounded to bf16 once, then scaled by g (~1 +- 0.3) and rounded again
#   with the sum: ~2 * 2^-9 * max g (measured 1-5e-3). dm sums those W x: the same bound (measured ~1-3e-3).
#   dA and dB come from the fp32 adapter path on bf16-exact inputs: fp32 accuracy whatever the base dtype.
REL = {torch.float32: 1e-5, torch.bfloat16: 2 ** -7}
SHAPES = [pytest.param((16, 24, (2, 3)), id="16to24"), pytest.param((37, 53, (5,)), id="odd-37to53"),
          pytest.param((300, 400, (4,)), id="300to400")]
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")]
RANKS = [pytest.param(1, id="r1"), pytest.param(8, id="r8")]


def randomize(slot, seed=0):
    """B random and m moved off ||W|| (at init both sides of every test would be the base alone)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        slot.lora_B.weight.copy_(torch.randn(slot.lora_B.weight.shape, generator=g) / math.sqrt(slot.r))
        slot.lora_magnitude_vector.mul_(1 + 0.2 * torch.randn(slot.lora_magnitude_vector.shape, generator=g))


def make_layer(n_in, n_out, dtype, r, dropout=0.0, random=True):
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(n_in, n_out, dtype=dtype), r=r, alpha=2 * r, dropout=dropout, use_dora=True)
    if random:
        randomize(layer)
    return layer


def reference(layer, weight, x, detach_norm=True):
    """fp64 formula on the layer's own values; returns y and the leaves (A, B, m, x) to read gradients from."""
    a, b, m, x64 = (t.detach().double().requires_grad_(True)
                    for t in (layer.lora_A.weight, layer.lora_B.weight, layer.lora_magnitude_vector, x))
    v = weight.double() + layer.scaling * b @ a                         # (out, in)
    norm = v.norm(dim=1)                                                # (out,)
    y = (m / (norm.detach() if detach_norm else norm)) * (x64 @ v.T)    # (..., out)
    bias = layer.bias
    return (y if bias is None else y + bias.double()), (a, b, m, x64)


def _check_grads(layer, leaves, x, dtype):
    a, b, m, x64 = leaves
    assert_close(layer.lora_A.weight.grad, a.grad, REL[torch.float32], "dA")
    assert_close(layer.lora_B.weight.grad, b.grad, REL[torch.float32], "dB")
    assert_close(layer.lora_magnitude_vector.grad, m.grad, REL[dtype], "dm")
    assert_close(x.grad, x64.grad, REL[dtype], "dx")


@pytest.mark.parametrize("r", RANKS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_matches_dense_formula(shape, dtype, r):
    n_in, n_out, lead = shape
    layer = make_layer(n_in, n_out, dtype, r)
    x = torch.randn(*lead, n_in).to(dtype)
    y = layer(x)
    assert y.dtype == dtype and y.shape == (*lead, n_out)
    assert_close(y, reference(layer, layer.base_layer.weight, x)[0], REL[dtype], "forward")


@pytest.mark.parametrize("r", RANKS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_gradients_of_a_b_m_match_formula_with_detached_norm(shape, dtype, r):
    n_in, n_out, lead = shape
    layer = make_layer(n_in, n_out, dtype, r)
    x = torch.randn(*lead, n_in).to(dtype).requires_grad_(True)
    g = torch.randn(*lead, n_out).to(dtype)                             # upstream gradient, dtype-exact
    (layer(x) * g).sum().backward()
    y_ref, leaves = reference(layer, layer.base_layer.weight, x)
    (y_ref * g.double()).sum().backward()
    assert layer.base_layer.weight.grad is None, "the base weight must stay frozen"
    _check_grads(layer, leaves, x, dtype)


def test_norm_is_a_constant_in_backward():
    layer = make_layer(16, 24, torch.float32, r=4)
    x = torch.randn(6, 16)
    layer(x).pow(2).sum().backward()
    y_live, (a, _, _, _) = reference(layer, layer.base_layer.weight, x, detach_norm=False)
    y_live.pow(2).sum().backward()
    diff = (layer.lora_A.weight.grad.double() - a.grad).abs().max() / a.grad.abs().max()
    assert diff > 1e-3, f"dA equals the non-detached formula's (rel diff {diff:.1e}): the norm is differentiated"


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_update_keeps_one_fp32_output_sized_tensor_for_backward(dtype):
    """Without checkpointing DoRA's activation memory is what its backward keeps: one fp32 (tokens, out)
    tensor (W x + s·B·A x, for dm) beside what LoRA keeps; autograd's own graph would keep W x and B·A x both."""
    layer = make_layer(24, 40, dtype, r=4)
    x = torch.randn(6, 24, dtype=dtype, requires_grad=True)
    saved = []

    def pack(t):
        saved.append((tuple(t.shape), t.dtype))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    assert saved.count(((6, 40), torch.float32)) == 1, saved
    y.sum().backward()
    assert layer.lora_magnitude_vector.grad is not None and layer.lora_A.weight.grad is not None


@pytest.mark.parametrize("dtype", DTYPES)
def test_output_unchanged_at_init_exactly(dtype):
    layer = make_layer(32, 48, dtype, r=4, dropout=0.1, random=False).train()
    x = torch.randn(3, 32).to(dtype)
    assert torch.equal(layer(x), layer.base_layer(x)), "train mode, with dropout"
    norms = layer.base_layer.weight.float().norm(dim=1)
    assert_close(layer.lora_magnitude_vector, norms, 1e-6, "m = ||W||_row at init")
    assert layer.lora_magnitude_vector.dtype == torch.float32 and layer.lora_magnitude_vector.requires_grad


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_inject_leaves_model_outputs_unchanged_exactly(arch):
    model = tiny_llama() if arch == "llama" else tiny_bert()
    ids = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(1))
    before = model(input_ids=ids).logits
    lora.inject(model, r=4, alpha=8, use_dora=True)
    assert torch.equal(model(input_ids=ids).logits, before)
    trainable = {n.rsplit(".", 2)[-2] if n.endswith(".weight") else n.rsplit(".", 1)[-1]
                 for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"lora_A", "lora_B", "lora_magnitude_vector"}


def test_dropout_feeds_the_dropped_input_to_both_terms():
    # PEFT: Δy = (g - 1) ⊙ W·drop(x) + g ⊙ s·B·A·drop(x), one mask for both.
    layer = make_layer(16, 24, torch.float32, r=4, dropout=0.5).train()
    x = torch.randn(64, 16)
    torch.manual_seed(1)
    y = layer(x)
    torch.manual_seed(1)
    xd = layer.lora_dropout(x)
    w, s = layer.base_layer.weight, layer.scaling
    v = w + s * layer.lora_B.weight @ layer.lora_A.weight
    g = layer.lora_magnitude_vector / v.norm(dim=1)
    expected = layer.base_layer(x) + (g - 1) * (xd @ w.T) + g * s * (xd @ (layer.lora_B.weight @ layer.lora_A.weight).T)
    assert_close(y, expected, REL[torch.float32], "train mode with dropout")
    assert 0.4 < (xd == 0).float().mean() < 0.6


@pytest.mark.parametrize("rows", [pytest.param(1, id="1-row"), pytest.param(7, id="7-rows-uneven"),
                                  pytest.param(None, id="default")])
def test_norm_in_row_chunks_equals_one_pass_and_leaves_w_alone(rows):
    torch.manual_seed(0)
    w, a, b = torch.randn(53, 37), torch.randn(4, 37), torch.randn(53, 4)
    w0 = w.clone()
    got = lora.dora.weight_norm(w, a, b, 0.7, chunk_rows=rows)
    expected = (w.double() + 0.7 * b.double() @ a.double()).norm(dim=1)
    assert_close(got, expected, 1e-6, f"chunks of {rows} rows")
    assert torch.equal(w, w0), "the norm must work on copies of W's rows, never W itself"


# --- NF4 base: W is the dequantized weight -------------------------------------------------------------

def nf4_net(bias=True):
    quant = pytest.importorskip("quant", reason="the quant package is not importable: NF4 DoRA untested")
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(40, 53, bias=bias), nn.GELU(), nn.Linear(53, 24))
    return quant.quantize(net, blocksize=64, backend="torch")      # the pure-torch oracle: no kernel loading


def test_nf4_base_forward_and_grads_match_formula_on_dequantized_weight():
    net = lora.inject(nf4_net(), r=4, alpha=8, dropout=0.0, use_dora=True)
    layer = net[0]
    randomize(layer)
    w = layer.base_layer.dequantize()                                   # (out, in), what the base multiplies by
    x = torch.randn(5, 40).requires_grad_(True)
    g = torch.randn(5, 53)
    y = layer(x)
    (y * g).sum().backward()
    y_ref, leaves = reference(layer, w, x)
    (y_ref * g.double()).sum().backward()
    assert_close(y, y_ref, REL[torch.float32], "forward (NF4 base)")
    _check_grads(layer, leaves, x, torch.float32)


def test_nf4_base_with_dropout_keeps_no_dense_weight_for_backward():
    """W·drop(x) goes through the 4-bit layer, which keeps its packed bytes: no dense (out, in) W is saved."""
    net = lora.inject(nf4_net(), r=4, alpha=8, dropout=0.1, use_dora=True).train()
    layer = net[0]
    randomize(layer)
    x = torch.randn(5, 40).requires_grad_(True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        y = layer(x)
    assert not {(53, 40), (40, 53)} & set(saved), saved                  # W or its transpose
    torch.manual_seed(0)
    y = layer(x)
    y.sum().backward()
    torch.manual_seed(0)                                               # the same mask, through F.linear on W
    w = layer.base_layer.dequantize()
    expected = lora.dora.update(layer, w, layer.bias, x.detach(), layer.base_layer(x.detach()), True)
    assert_close(y - layer.base_layer(x), expected, REL[torch.float32], "W·drop(x) via the base == via W")


def test_nf4_base_init_unchanged_and_merge_and_unload_matches():
    net = nf4_net()
    x = torch.randn(3, 40)
    before = net(x)
    lora.inject(net, r=4, alpha=8, dropout=0.0, use_dora=True)
    assert torch.equal(net(x), before)
    for i in (0, 2):
        randomize(net[i], seed=i)
    adapted = net(x).detach()
    with pytest.raises(ValueError, match="4-bit base"):
        lora.merge(net)
    plain = lora.merge_and_unload(net)
    assert type(plain[0]) is nn.Linear and plain[0].bias is not None
    assert_close(plain(x).detach(), adapted, REL[torch.float32], "dense merge of a DoRA NF4 model")


# --- merging ---------------------------------------------------------------------------------------------

def dora_llama(**kw):
    model = lora.inject(tiny_llama(), r=4, alpha=8, dropout=0.0, use_dora=True, **kw)
    for i, m in enumerate(m for m in model.modules() if isinstance(m, LoRALinear)):
        randomize(m, seed=i)
    return model


def logits(model):
    ids = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_merged_weight_is_m_times_normalised_direction():
    layer = make_layer(37, 53, torch.float32, r=4)
    expected, _ = reference(layer, layer.base_layer.weight, torch.eye(37))          # rows x = e_i: W'^T + b
    expected = (expected - layer.bias.double()).T                                      # (out, in)
    w0 = layer.base_layer.weight.detach().clone()
    layer.merge()
    assert_close(layer.base_layer.weight, expected, REL[torch.float32], "m * (W + sBA) / ||W + sBA||")
    layer.unmerge()
    assert_close(layer.base_layer.weight, w0, 2 ** -20, "unmerged W")


def test_merge_unmerge_round_trip_and_idempotence():
    model = dora_llama(targets=["q_proj", "v_proj", "down_proj"])
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    w0, adapted = [m.base_layer.weight.detach().clone() for m in layers], logits(model)
    assert not torch.equal(adapted, logits(tiny_llama())), "random B and m must change the outputs"
    lora.merge(model)
    once = [m.base_layer.weight.detach().clone() for m in layers]
    lora.merge(model)
    assert all(torch.equal(m.base_layer.weight, w) for m, w in zip(layers, once, strict=True)), "merge 2x must equal 1x"
    assert_close(logits(model), adapted, REL[torch.float32], "merged vs adapted logits")
    lora.unmerge(model)
    lora.unmerge(model)
    for m, w in zip(layers, w0, strict=True):
        # (g W + g sBA - g sBA) / g in fp32: a few roundings of |W| (~2^-24 relative each)
        assert_close(m.base_layer.weight, w, 2 ** -20, "unmerged W")
    assert_close(logits(model), adapted, REL[torch.float32], "unmerged vs adapted logits")


def test_merge_and_unload_gives_a_plain_model_with_the_same_outputs():
    model = dora_llama()
    adapted = logits(model)
    plain = lora.merge_and_unload(model)
    assert not any("lora_" in n for n, _ in plain.named_parameters())
    assert_close(logits(plain), adapted, REL[torch.float32], "merge_and_unload vs adapted")
    assert all(r["delta_norm"] > 0 and r["lost"] == 0.0 for r in plain.lora_merge_report)


# --- save / load -----------------------------------------------------------------------------------------

def test_save_load_round_trip_is_bit_identical_in_peft_layout(tmp_path):
    model = dora_llama(targets=["q_proj", "v_proj"])
    lora.save(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["use_dora"] is True and config["peft_type"] == "LORA"
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_magnitude_vector"
    assert tensors[key].shape == (32,) and tensors[key].dtype == torch.float32   # 2 KV heads x 16
    assert sum(k.endswith(".lora_magnitude_vector") for k in tensors) == 4
    fresh = lora.load(tiny_llama(), tmp_path)
    assert fresh.lora_config.use_dora and torch.equal(logits(fresh), logits(model))


def test_load_dora_adapter_into_a_lora_adapter_of_the_same_name_refuses(tmp_path):
    lora.save(dora_llama(targets=["q_proj"]), tmp_path)
    model = lora.inject(tiny_llama(), r=4, alpha=8, targets=["q_proj"])
    with pytest.raises(ValueError, match=r"has use_dora=True but the model was injected with use_dora=False"):
        lora.load(model, tmp_path)


@pytest.mark.parametrize("kwargs, message", [
    pytest.param({"use_dora": "yes"},
                 r"^use_dora must be True \(DoRA: .*\) or False \(plain LoRA\); got the str 'yes'$", id="str"),
    pytest.param({"use_dora": 1}, r"^use_dora must be True .*; got the int 1$", id="int"),
    pytest.param({"use_dora": None}, r"^use_dora must be True .*; got None$", id="none"),
])
def test_use_dora_must_be_a_bool(kwargs, message):
    model = tiny_llama()
    with pytest.raises(ValueError, match=message):
        lora.inject(model, **kwargs)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    with pytest.raises(ValueError, match=message):
        LoRALinear(nn.Linear(4, 4), r=2, alpha=4, **kwargs)
    with pytest.raises(ValueError, match=message):
        lora.LoraConfig(**kwargs)


def test_dora_on_a_base_without_a_readable_weight_refuses_before_any_change():
    class Opaque(nn.Module):        # linear-like (in/out features, a weight) but no float weight, no dequantize
        def __init__(self):
            super().__init__()
            self.in_features, self.out_features = 8, 8
            self.weight = nn.Parameter(torch.zeros(4, dtype=torch.uint8), requires_grad=False)

    net = nn.Sequential(nn.Linear(8, 8), Opaque())
    with pytest.raises(ValueError, match=r"use_dora=True needs the weight of '1' \(Opaque\)"):
        lora.inject(net, use_dora=True)
    assert type(net[0]) is nn.Linear, "nothing wrapped"


# --- PEFT interop ----------------------------------------------------------------------------------------

def _need_peft():
    if peft is None:
        pytest.skip("peft is not installed: DoRA interop with PEFT is untested (pip install peft)")


# (model, our inject kwargs, PEFT's LoraConfig kwargs); BERT's layers have biases, which DoRA leaves out of W x.
INTEROP = {"llama-qv": (tiny_llama, {"targets": ["q_proj", "v_proj"]}, {"target_modules": ["q_proj", "v_proj"]}),
           "bert-biased-classifier": (tiny_bert, {"targets": ["query", "value"], "modules_to_save": ["classifier"]},
                                      {"target_modules": ["query", "value"], "modules_to_save": ["classifier"],
                                       "task_type": "SEQ_CLS"})}


@pytest.mark.parametrize("case", list(INTEROP))
def test_our_dora_adapter_loads_in_peft_with_equal_outputs(case, tmp_path):
    _need_peft()
    build, ours, _ = INTEROP[case]
    model = lora.inject(build(), r=4, alpha=8, dropout=0.0, use_dora=True, **ours)
    for i, m in enumerate(m for m in model.modules() if isinstance(m, LoRALinear)):
        randomize(m, seed=i)
    lora.save(model, tmp_path)
    theirs = peft.PeftModel.from_pretrained(build(), str(tmp_path)).eval()
    assert_close(logits(theirs), logits(model), REL[torch.float32], "PEFT-loaded vs ours")
    peft_sd, ours = peft.get_peft_model_state_dict(theirs), lora.adapter_state_dict(model)
    assert set(peft_sd) == set(ours), "PEFT's DoRA state dict has exactly our key names"
    assert all(torch.equal(peft_sd[k], ours[k]) for k in ours)


@pytest.mark.parametrize("case", list(INTEROP))
def test_peft_dora_adapter_loads_here_with_equal_outputs(case, tmp_path):
    _need_peft()
    build, _, kwargs = INTEROP[case]
    theirs = peft.get_peft_model(build(), peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, use_dora=True,
                                                          **kwargs))
    torch.manual_seed(3)
    for name, p in theirs.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(p, std=0.3)
        elif "lora_magnitude_vector" in name:
            p.data.mul_(1 + 0.2 * torch.randn_like(p))
    theirs.eval().save_pretrained(str(tmp_path))
    keys = load_file(tmp_path / "adapter_model.safetensors")
    target = kwargs["target_modules"][0]
    assert any(k.endswith(f".{target}.lora_magnitude_vector") for k in keys), sorted(keys)[:3]
    model = lora.load(build(), tmp_path)
    assert model.lora_config.use_dora
    assert_close(logits(model), logits(theirs), REL[torch.float32], "ours vs PEFT")


def test_dora_update_stays_fp32_whatever_compute_dtype_says():
    layer = make_layer(16, 24, torch.bfloat16, r=4)
    x = torch.randn(3, 16).to(torch.bfloat16)
    expected = layer(x)
    layer.compute_dtype = "base"
    assert torch.equal(layer(x), expected)
