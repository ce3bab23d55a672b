"""What many tests share: tiny random backbones (seeded, in eval mode) and a relative closeness check."""
import torch
from transformers import (BertConfig, BertForSequenceClassification, Gemma3ForCausalLM, Gemma3TextConfig,
                          LlamaConfig, LlamaForCausalLM)


def tiny_llama(hidden: int = 64, seed: int = 0) -> LlamaForCausalLM:
    """2 layers, 4 heads (2 KV heads), MLP 128, vocab 128."""
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(hidden_size=hidden, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=128)).eval()


def tiny_gemma3(seed: int = 0) -> Gemma3ForCausalLM:
    torch.manual_seed(seed)
    return Gemma3ForCausalLM(Gemma3TextConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                              num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                              vocab_size=128)).eval()


def tiny_bert(seed: int = 0) -> BertForSequenceClassification:
    """2 layers, hidden 32, vocab 100, a 3-class head."""
    torch.manual_seed(seed)
    return BertForSequenceClassification(BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                    num_attention_heads=2, vocab_size=100, num_labels=3)).eval()


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rel: float, what: str) -> None:
    """max |actual - expected| <= rel * max |expected|, in float64, with a message that shows the numbers."""
    diff = (actual.double() - expected.double()).abs()
    scale = expected.double().abs().max().clamp_min(1e-12)
    assert diff.max() <= rel * scale, (f"{what}: max |diff| {diff.max():.3e}, mean |diff| {diff.mean():.3e}, "
                                       f"allowed {rel * scale:.3e} ({rel:.2g} x max |ref| {scale:.3e})")
