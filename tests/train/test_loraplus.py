"""LoRA+ (Hayou et al. 2024) in train.fit: lora_B (and 1-D trainables) learn at loraplus_lr_ratio x lr."""
from __future__ import annotations

import pytest
import torch

from _ddp_worker import collate, loss_fn, tiny_model, toy_data, trainable_state
from train.loop import TrainConfig, fit, make_optimizer

pytestmark = pytest.mark.usefixtures("one_thread")


def config(tmp_path, **overrides) -> TrainConfig:
    base = dict(out_dir=str(tmp_path / "run"), batch_size=4, lr=1e-2, log_every=1, progress=False, seed=0,
                max_grad_norm=None)
    return TrainConfig(**{**base, **overrides})


def b_like(name: str, p: torch.Tensor) -> bool:
    return "lora_B" in name or p.ndim == 1


@pytest.mark.parametrize("ratio", [4.0, 16.0])
def test_groups_split_b_from_the_rest(tmp_path, ratio):
    model = tiny_model()
    optimizer = make_optimizer(model, config(tmp_path, loraplus_lr_ratio=ratio))
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    scale = {id(p): g["lr_scale"] for g in optimizer.param_groups for p in g["params"]}
    assert len(scale) == len(named)                                       # every trainable, once
    for n, p in named:
        assert scale[id(p)] == (ratio if b_like(n, p) else 1.0), n
    assert any("lora_B" in n for n, _ in named) and any("lora_A" in n for n, _ in named)


def test_groups_match_peft(tmp_path):
    """PEFT's create_loraplus_optimizer puts the same parameters at ratio x lr."""
    peft = pytest.importorskip("peft", reason="PEFT is not installed: the comparison needs it")
    from peft.optimizers import create_loraplus_optimizer

    model = tiny_model()
    ours = make_optimizer(model, config(tmp_path, loraplus_lr_ratio=8.0))
    theirs = create_loraplus_optimizer(model, torch.optim.AdamW, lr=1e-2, loraplus_lr_ratio=8.0)
    lr_ours = {id(p): 1e-2 * g["lr_scale"] for g in ours.param_groups for p in g["params"]}
    lr_theirs = {id(p): g["lr"] for g in theirs.param_groups for p in g["params"]}
    assert peft.__version__ and lr_ours.keys() == lr_theirs.keys()
    for key, lr in lr_theirs.items():
        assert lr_ours[key] == pytest.approx(lr)


def test_b_runs_at_ratio_times_the_scheduled_lr(tmp_path, monkeypatch):
    """At every step B's group holds ratio x the lr the schedule gives A's group (warmup included)."""
    import train.loop as loop

    made, seen = [], []
    make = loop.make_optimizer
    monkeypatch.setattr(loop, "make_optimizer", lambda m, c: made.append(make(m, c)) or made[-1])

    def spy(model, batch):
        seen.append([g["lr"] for g in made[0].param_groups])
        return loss_fn(model, batch)

    fit(tiny_model(), toy_data(), config(tmp_path, loraplus_lr_ratio=16.0, max_steps=4, warmup_steps=2),
        loss_fn=spy, collate_fn=collate)
    assert len(seen) == 4
    for lr_a, lr_b in seen:
        assert lr_b == pytest.approx(16.0 * lr_a)
    assert seen[0][0] < seen[2][0]                                         # warmup: the schedule applies


def test_ratio_one_is_plain_lora_bit_for_bit(tmp_path):
    a, b = tiny_model(), tiny_model()
    fit(a, toy_data(), config(tmp_path / "a", max_steps=5), loss_fn=loss_fn, collate_fn=collate)
    fit(b, toy_data(), config(tmp_path / "b", max_steps=5, loraplus_lr_ratio=1.0), loss_fn=loss_fn,
        collate_fn=collate)
    sa, sb = trainable_state(a), trainable_state(b)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_b_moves_ratio_times_further_on_the_first_update(tmp_path):
    """At init B = 0, so A gets no gradient and only B moves; Adam's first step is lr * sign(g) per element,
    so with ratio 16 every moved entry of B moves 16x what it does at ratio 1."""
    moved = {}
    for ratio in (1.0, 16.0):
        model = tiny_model()
        before = trainable_state(model)
        fit(model, toy_data(), config(tmp_path / str(ratio), max_steps=1, loraplus_lr_ratio=ratio,
                                      weight_decay=0.0), loss_fn=loss_fn, collate_fn=collate)
        after = trainable_state(model)
        moved[ratio] = {k: (after[k] - before[k]).abs() for k in after if "lora_B" in k}
    for k, d1 in moved[1.0].items():
        mask = d1 > 0
        ratio = moved[16.0][k][mask] / d1[mask]
        assert mask.any() and torch.allclose(ratio, torch.full_like(ratio, 16.0), rtol=1e-3), k


def test_bad_ratio_is_refused(tmp_path):
    with pytest.raises(ValueError, match="loraplus_lr_ratio must be > 0"):
        config(tmp_path, loraplus_lr_ratio=0.0)


def test_resume_refuses_another_ratio(tmp_path):
    model = tiny_model()
    fit(model, toy_data(), config(tmp_path, max_steps=2, loraplus_lr_ratio=4.0), loss_fn=loss_fn, collate_fn=collate)
    with pytest.raises(ValueError, match="loraplus_lr_ratio: checkpoint 4.0, now 8.0"):
        fit(tiny_model(), toy_data(), config(tmp_path, max_steps=3, loraplus_lr_ratio=8.0, resume=True),
            loss_fn=loss_fn, collate_fn=collate)
