"""Adapters move both ways between this library and PEFT, with the same outputs.

peft is a test-only dependency: the library never imports it.
"""

import json

import pytest
import torch
import torch.nn as nn

import lora
from lora import LoRALinear
from tiny import assert_close, tiny_bert, tiny_llama

peft = pytest.importorskip("peft", reason="peft is not installed: PEFT interop is untested (pip install peft)")

# Same math in the same order (fp32 adapters, base + delta added in fp32): measured bit-identical.
# 1e-6 relative leaves room for a PEFT release that reorders the scaling multiply.
REL = 1e-6


def logits(model):
    ids = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(input_ids=ids).logits


def randomize(model, saved_head=False):
    """B random (so the adapter matters) and, for modules_to_save, a changed classifier."""
    torch.manual_seed(5)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(p, std=0.05)
        elif saved_head and "classifier" in name and p.requires_grad:
            nn.init.normal_(p, std=0.5)


CASES = {
    "llama-all-linear": (tiny_llama, {"targets": "all-linear"}, {"target_modules": "all-linear"}),
    "llama-qv-rslora": (tiny_llama, {"targets": ["q_proj", "v_proj"], "use_rslora": True},
                        {"target_modules": ["q_proj", "v_proj"], "use_rslora": True}),
    "bert-classifier": (tiny_bert, {"targets": ["query", "value"], "modules_to_save": ["classifier"]},
                        {"target_modules": ["query", "value"], "modules_to_save": ["classifier"],
                         "task_type": "SEQ_CLS"}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_our_adapter_loads_in_peft(case, tmp_path):
    build, ours, _ = CASES[case]
    model = lora.inject(build(), r=4, alpha=8, dropout=0.0, **ours)
    randomize(model, saved_head="modules_to_save" in ours)
    lora.save(model, tmp_path)
    peft_model = peft.PeftModel.from_pretrained(build(), str(tmp_path)).eval()
    assert_close(logits(peft_model), logits(model), REL, "PEFT-loaded vs ours")
    theirs = peft.get_peft_model_state_dict(peft_model)
    mine = lora.adapter_state_dict(model)
    assert set(theirs) == set(mine), "PEFT's adapter state dict has exactly our key names"
    assert all(torch.equal(theirs[k], mine[k]) for k in mine)


@pytest.mark.parametrize("case", list(CASES))
def test_peft_adapter_loads_here(case, tmp_path):
    build, _, theirs = CASES[case]
    peft_model = peft.get_peft_model(build(), peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, **theirs))
    randomize(peft_model, saved_head="modules_to_save" in theirs)
    peft_model.eval()
    peft_model.save_pretrained(str(tmp_path))
    model = lora.load(build(), tmp_path)
    assert_close(logits(model), logits(peft_model), REL, "ours vs PEFT")
    peft_names = {n.removeprefix("base_model.model.") for n, m in peft_model.named_modules()
                  if isinstance(m, peft.tuners.lora.LoraLayer)}
    assert {n for n, m in model.named_modules() if isinstance(m, LoRALinear)} == peft_names


def test_peft_seq_cls_config_lists_heads_this_model_lacks(tmp_path):
    # PEFT's SEQ_CLS adds both 'classifier' and 'score' to modules_to_save; BERT has no 'score'.
    peft_model = peft.get_peft_model(tiny_bert(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query"],
                                                                  task_type="SEQ_CLS"))
    peft_model.save_pretrained(str(tmp_path))
    assert set(json.loads((tmp_path / "adapter_config.json").read_text())["modules_to_save"]) == \
        {"classifier", "score"}
    model = lora.load(tiny_bert(), tmp_path)
    assert model.classifier.weight.requires_grad
    assert sum(isinstance(m, LoRALinear) for m in model.modules()) == 2
