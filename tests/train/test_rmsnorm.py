"""train.rmsnorm: the same forward as transformers' RMSNorms to the bit, a closed-form backward checked in fp64."""
import copy

import pytest
import torch
from torch import nn

from train.rmsnorm import RMSNormFunction, fast_forward_for, use_fast_rmsnorm

tf = pytest.importorskip("transformers")
from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm  # noqa: E402
from transformers.models.llama.modeling_llama import LlamaRMSNorm  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(3, 64), (2, 7, 96), (1, 5, 3, 40)]


def norm_of(cls, d: int, weight_dtype: torch.dtype, seed: int = 0) -> nn.Module:
    """A norm with a non-trivial weight (Llama's starts at 1, Gemma's at 0)."""
    torch.manual_seed(seed)
    norm = cls(d, eps=1e-5)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5) if cls is LlamaRMSNorm else norm.weight.uniform_(-0.5, 0.5)
    return norm.to(weight_dtype)


def reference(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The norm in fp64 from its definition."""
    x64, w64 = x.double(), norm.weight.double()
    x_hat = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + (getattr(norm, "variance_epsilon", None)
                                                                     or norm.eps))
    return x_hat * (1 + w64) if isinstance(norm, Gemma3RMSNorm) else x_hat * w64


@pytest.mark.parametrize("cls", [LlamaRMSNorm, Gemma3RMSNorm])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_is_transformers_to_the_bit(cls, dtype, shape):
    weight_dtype = dtype if cls is LlamaRMSNorm else torch.float32
    norm = norm_of(cls, shape[-1], weight_dtype)
    x = (torch.randn(shape) * 3).to(dtype)
    with torch.no_grad():
        want = norm(x)
        use_fast_rmsnorm(norm)
        got = norm(x)
    assert got.dtype == want.dtype and torch.equal(got, want)


@pytest.mark.parametrize("cls", [LlamaRMSNorm, Gemma3RMSNorm])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("train_weight", [False, True])
def test_backward_matches_fp64_at_least_as_well_as_autograd(cls, dtype, shape, train_weight):
    """dx (and dw when the weight trains) against the fp64 formula: within the dtype's tolerance, and no further
    from it than autograd through transformers' own forward (2x + one ulp of slack)."""
    norm = norm_of(cls, shape[-1], dtype if cls is LlamaRMSNorm else torch.float32)
    norm.weight.requires_grad_(train_weight)
    x0 = (torch.randn(shape) * 3).to(dtype)
    g = torch.randn(shape).to(dtype)

    def grads(module):
        x = x0.clone().requires_grad_(True)
        module.weight.grad = None
        module(x).backward(g)
        return x.grad, module.weight.grad

    dx_hf, dw_hf = grads(norm)
    fast = copy.deepcopy(norm)
    assert use_fast_rmsnorm(fast) == 1
    dx, dw = grads(fast)
    x64 = x0.double().requires_grad_(True)
    w64 = norm.weight.detach().double().requires_grad_(train_weight)
    ref_norm = copy.deepcopy(norm).double()
    ref_norm.weight = nn.Parameter(w64, requires_grad=train_weight)
    reference(ref_norm, x64).backward(g.double())
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 3e-3}[dtype]
    scale = x64.grad.abs().max().item()
    err, err_hf = (dx.double() - x64.grad).abs().max().item(), (dx_hf.double() - x64.grad).abs().max().item()
    assert dx.dtype == dtype and err <= tol * scale
    assert err <= 2 * err_hf + torch.finfo(dtype).eps * scale
    if train_weight:
        w_scale = ref_norm.weight.grad.abs().max().item()
        w_err = (dw.double() - ref_norm.weight.grad).abs().max().item()
        w_err_hf = (dw_hf.double() - ref_norm.weight.grad).abs().max().item()
        assert dw.dtype == norm.weight.dtype and w_err <= tol * w_scale
        assert w_err <= 2 * w_err_hf + torch.finfo(norm.weight.dtype).eps * w_scale
    else:
        assert dw is None


def test_function_keeps_only_the_input_and_the_row_scale():
    x = torch.randn(4, 32, dtype=torch.bfloat16, requires_grad=True)
    w = torch.ones(32, dtype=torch.bfloat16)
    y = RMSNormFunction.apply(x, w, 1e-6, False)
    saved = y.grad_fn.saved_tensors
    assert [t.shape for t in saved] == [(4, 32), (4, 1), (32,)] and saved[0].dtype == torch.bfloat16


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2", "qwen3", "gemma3_text"])
def test_models_get_it_and_keep_their_outputs(kind):
    from tests.train.test_task import tiny_decoder

    model = tiny_decoder(kind).to(torch.bfloat16)
    norms = [m for m in model.modules() if type(m).__name__.endswith("RMSNorm")]
    ids = torch.randint(0, 128, (2, 9))
    want = model(input_ids=ids, labels=ids)
    fast = copy.deepcopy(model)
    assert use_fast_rmsnorm(fast) == len(norms) > 0
    assert use_fast_rmsnorm(fast) == len(norms)                                  # idempotent
    got = fast(input_ids=ids, labels=ids)
    assert torch.equal(got.logits, want.logits)
    want.loss.backward()
    got.loss.backward()
    for (name, p), q in zip(model.named_parameters(), fast.parameters()):
        assert torch.allclose(q.grad.float(), p.grad.float(), rtol=0.05, atol=0.02 * p.grad.abs().max().item()), name


def test_other_norms_are_left_alone():
    class Scaled(LlamaRMSNorm):                      # a subclass with its own forward: not the known math
        def forward(self, hidden_states):
            return 2 * super().forward(hidden_states)

    class Renamed(nn.Module):                        # the known math under a name that is not a norm's
        forward = LlamaRMSNorm.forward

    assert fast_forward_for(LlamaRMSNorm) is not None and fast_forward_for(Scaled) is None
    model = nn.Sequential(Scaled(8), nn.LayerNorm(8), LlamaRMSNorm(8))
    assert use_fast_rmsnorm(model) == 1
    assert "forward" not in vars(model[0]) and "forward" in vars(model[2])
    assert use_fast_rmsnorm(Renamed()) == 0


def test_known_families_are_recognised():
    """The fingerprints follow transformers' code: a change there turns the fast path off (this fails) rather
    than computing something else."""
    from transformers.models.gemma2.modeling_gemma2 import Gemma2RMSNorm
    from transformers.models.mistral.modeling_mistral import MistralRMSNorm
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

    for cls in (LlamaRMSNorm, MistralRMSNorm, Qwen2RMSNorm, Qwen3RMSNorm, Gemma2RMSNorm, Gemma3RMSNorm):
        assert fast_forward_for(cls) is not None, cls.__name__
