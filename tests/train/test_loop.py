"""train.fit on a tiny random Llama with LoRA: learning, schedule, accumulation, checkpointing, resume, bad input."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from _ddp_worker import collate, loss_fn, tiny_model, toy_data, trainable_state
from train.batches import epoch_batches
from train.checkpointing import (disable_gradient_checkpointing, enable_gradient_checkpointing, find_blocks,
                                 is_gradient_checkpointing)
from train.loop import FitResult, TrainConfig, fit, latest_checkpoint, lr_multiplier

pytestmark = pytest.mark.usefixtures("one_thread")


def make_config(tmp_path: Path, **overrides) -> TrainConfig:
    base = dict(out_dir=str(tmp_path / "run"), batch_size=4, lr=1e-2, log_every=1, progress=False, seed=0)
    return TrainConfig(**{**base, **overrides})


def run(tmp_path, model=None, data=None, loss=loss_fn, dropout=0.0, **overrides) -> tuple[FitResult, nn.Module]:
    model = tiny_model(dropout=dropout) if model is None else model
    data = toy_data() if data is None else data
    return fit(model, data, make_config(tmp_path, **overrides), loss_fn=loss, collate_fn=collate), model


def losses(result: FitResult) -> list[float]:
    return [row["loss"] for row in result.history]


def max_abs_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


class LossAt:
    """A loss_fn that behaves like the toy one except at call number `at` (0-based), where it does `what`."""

    def __init__(self, at: int, what: str):
        self.calls, self.at, self.what = 0, at, what

    def __call__(self, model, batch):
        call, self.calls = self.calls, self.calls + 1
        loss, stats = loss_fn(model, batch)
        if call == self.at and self.what == "nan":
            return loss * float("nan"), stats
        if call == self.at and self.what == "interrupt":
            raise KeyboardInterrupt
        if call == self.at and self.what == "crash":
            raise RuntimeError("simulated crash")
        return loss, stats


# ----------------------------------------------------------------------------- learning and determinism

def test_loss_decreases_on_toy_task(tmp_path):
    result, _ = run(tmp_path, epochs=2, lr=2e-2, warmup_steps=2)   # 16 steps
    first, last = losses(result)[:3], losses(result)[-3:]
    print(f"loss {sum(first) / 3:.3f} -> {sum(last) / 3:.3f}")
    assert result.steps == 16 and result.stopped is None and result.epochs == pytest.approx(2.0)
    assert result.total_steps == 16
    assert sum(last) / 3 < sum(first) / 3 - 0.5


def test_same_seed_gives_bit_identical_loss_curve(tmp_path):
    a, _ = run(tmp_path / "a", max_steps=5, dropout=0.1)     # dropout: the seed has something to decide
    b, _ = run(tmp_path / "b", max_steps=5, dropout=0.1)
    assert losses(a) == losses(b)
    assert a.stopped == "max_steps"


def test_only_trainable_parameters_change(tmp_path):
    model = tiny_model()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    run(tmp_path, model=model, max_steps=2)
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if not p.requires_grad)


# ----------------------------------------------------------------------------- schedule

@pytest.mark.parametrize("warmup,total,floor", [(3, 10, 0.1), (0, 7, 0.0), (1, 2, 0.5)],
                         ids=["warmup3-total10-floor0.1", "no-warmup", "tiny"])
def test_lr_multiplier_matches_formula(warmup, total, floor):
    for s in range(total):
        if s < warmup:
            expected = (s + 1) / (warmup + 1)
        else:
            expected = floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * (s - warmup) / (total - warmup)))
        assert lr_multiplier(s, warmup_steps=warmup, total_steps=total, min_lr_ratio=floor) == pytest.approx(expected)


def test_lr_multiplier_landmarks():
    kw = dict(warmup_steps=3, total_steps=11, min_lr_ratio=0.1)
    assert [lr_multiplier(s, **kw) for s in (0, 1, 2)] == [0.25, 0.5, 0.75]   # warmup: (s + 1) / 4
    assert lr_multiplier(3, **kw) == 1.0                                       # peak right after warmup
    assert lr_multiplier(7, **kw) == pytest.approx(0.55)                       # half way: (1 + 0.1) / 2
    assert lr_multiplier(100, **kw) == pytest.approx(0.1)                      # the floor


def test_logged_lr_follows_schedule(tmp_path):
    result, _ = run(tmp_path, max_steps=8, warmup_ratio=0.25, min_lr_ratio=0.1, lr=1e-3)   # warmup int(0.25 * 8)
    for row in result.history:
        expected = 1e-3 * lr_multiplier(row["step"] - 1, warmup_steps=2, total_steps=8, min_lr_ratio=0.1)
        assert row["lr"] == pytest.approx(expected, rel=1e-12)


# ----------------------------------------------------------------------------- accumulation

def test_grad_accum_equals_one_big_batch(tmp_path):
    """2 micro-batches of 4 vs 1 batch of 8 (same 8 examples): only summation order differs (fp32 ~1e-7)."""
    _, small = run(tmp_path / "accum", batch_size=4, grad_accum=2, max_steps=2)
    _, big = run(tmp_path / "big", batch_size=8, grad_accum=1, max_steps=2)
    diff = max_abs_diff(trainable_state(small), trainable_state(big))
    print(f"max |param diff| after 2 steps: {diff:.2e}")
    assert diff < 1e-6


# ----------------------------------------------------------------------------- gradient checkpointing

def _grads(model, batch) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss, _ = loss_fn(model, batch)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _model_with_nonzero_lora_b(quantize=None):
    model = tiny_model(quantize=quantize)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)     # so lora_A gets a gradient too
    return model


def test_gradient_checkpointing_gives_same_gradients():
    """Recompute runs the same ops on the same inputs: gradients agree to fp32 rounding (we see exact)."""
    model = _model_with_nonzero_lora_b()
    model.train()
    batch = collate(toy_data(4))
    plain = _grads(model, batch)
    assert enable_gradient_checkpointing(model) == 2
    ckpt = _grads(model, batch)
    diff = max_abs_diff(plain, ckpt)
    print(f"max |grad diff| with checkpointing: {diff:.2e}")
    assert diff <= 1e-7
    assert all(g.abs().sum() > 0 for g in ckpt.values())   # no "does not require grad" trap: frozen embeddings


def test_gradient_checkpointing_recomputes_in_train_only():
    model = tiny_model()
    calls = []
    # a pre-hook: the recompute stops early, right after the last tensor backward needs, before mlp returns
    model.model.layers[0].mlp.register_forward_pre_hook(lambda *_: calls.append(1))
    batch = collate(toy_data(2))
    enable_gradient_checkpointing(model)
    model.train()
    loss_fn(model, batch)[0].backward()
    assert len(calls) == 2                     # forward + recompute in backward
    calls.clear()
    model.eval()
    with torch.no_grad():
        loss_fn(model, batch)
    assert len(calls) == 1


def test_gradient_checkpointing_disable_restores_forward():
    model = tiny_model()
    assert enable_gradient_checkpointing(model) == 2
    assert enable_gradient_checkpointing(model) == 2          # idempotent: no double wrapping
    assert is_gradient_checkpointing(model)
    assert disable_gradient_checkpointing(model) == 2
    assert not is_gradient_checkpointing(model)
    assert all("forward" not in block.__dict__ for block in model.model.layers)


class KwargBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, hidden_states, *, scale=1.0, mask=None):
        return hidden_states + scale * torch.tanh(self.proj(hidden_states)) * mask


def test_gradient_checkpointing_passes_keyword_arguments():
    torch.manual_seed(0)
    blocks = nn.ModuleList([KwargBlock() for _ in range(3)])
    x, mask = torch.randn(2, 8), torch.tensor([1.0, 0.0]).unsqueeze(-1)

    def grads():
        blocks.zero_grad(set_to_none=True)
        h = x
        for block in blocks:
            h = block(hidden_states=h, scale=2.0, mask=mask)   # all keywords, as HF calls its layers
        h.square().sum().backward()
        return {n: p.grad.clone() for n, p in blocks.named_parameters()}

    plain = grads()
    enable_gradient_checkpointing(blocks, blocks)
    assert max_abs_diff(plain, grads()) <= 1e-7


class FrozenCodeMatmul(torch.autograd.Function):
    """A stand-in for the 4-bit matmul: a uint8 weight, saves only it, returns a gradient for x only."""

    @staticmethod
    def forward(ctx, x, codes, scale):
        ctx.save_for_backward(codes, scale)
        return x @ (codes.float() * scale).t()

    @staticmethod
    def backward(ctx, grad_out):
        codes, scale = ctx.saved_tensors
        return grad_out @ (codes.float() * scale), None, None


class CodeBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("codes", torch.randint(0, 255, (8, 8), dtype=torch.uint8))
        self.register_buffer("scale", torch.tensor(0.01))
        self.lora_A, self.lora_B = nn.Linear(8, 2, bias=False), nn.Linear(2, 8, bias=False)

    def forward(self, x):
        return x + torch.tanh(FrozenCodeMatmul.apply(x, self.codes, self.scale) + self.lora_B(self.lora_A(x)))


def test_gradient_checkpointing_with_custom_function_backbone():
    """Frozen integer weights behind an autograd Function, trainable adapters only, input without grad."""
    torch.manual_seed(0)
    blocks = nn.ModuleList([CodeBlock() for _ in range(2)])
    x = torch.randn(3, 8)                                        # like frozen embeddings: no requires_grad

    def grads():
        blocks.zero_grad(set_to_none=True)
        h = x
        for block in blocks:
            h = block(h)
        h.square().sum().backward()
        return {n: p.grad.clone() for n, p in blocks.named_parameters()}

    plain = grads()
    enable_gradient_checkpointing(blocks, blocks)
    ckpt = grads()
    assert max_abs_diff(plain, ckpt) <= 1e-7 and all(g.abs().sum() > 0 for g in ckpt.values())


def test_gradient_checkpointing_with_nf4_backbone():
    """The QLoRA case itself: quant.quantize, then lora.inject; gradients equal with checkpointing on/off."""
    try:
        from quant import quantize
    except ImportError as e:
        pytest.skip(f"quant.quantize is not importable ({e})")
    model = _model_with_nonzero_lora_b(quantize=quantize)
    assert any(type(m).__name__ == "Linear4bit" for m in model.modules())
    model.train()
    batch = collate(toy_data(4))
    plain = _grads(model, batch)
    enable_gradient_checkpointing(model)
    ckpt = _grads(model, batch)
    diff = max_abs_diff(plain, ckpt)
    print(f"max |grad diff| with checkpointing, NF4 backbone: {diff:.2e}")
    assert diff <= 1e-7 and all(g.abs().sum() > 0 for g in ckpt.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradient_checkpointing_replays_dropout_masks(monkeypatch, dtype):
    """With LoRA dropout, the recompute takes the forward's masks from lora.dropout's replay store instead of
    drawing the bits again: gradients equal the un-checkpointed ones to the bit (same seeds), the bits are drawn
    once per mask, and nothing is left in the store after backward; a store over its limit drops the oldest
    masks and the recompute draws those again, with the same result."""
    import lora.dropout as dropout_mod

    drawn = []
    real_bits = dropout_mod._bits
    monkeypatch.setattr(dropout_mod, "_bits", lambda seed, n: drawn.append(n) or real_bits(seed, n))
    model = tiny_model(dropout=0.2).to(dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    model.train()
    batch = collate(toy_data(4))
    torch.manual_seed(7)
    plain = _grads(model, batch)
    n_masks = len(drawn)
    assert n_masks == 2 * 7                                  # 2 layers x 7 adapters
    enable_gradient_checkpointing(model)
    for limit, extra_draws in ((dropout_mod._Replay.LIMIT, 0), (1, n_masks)):
        monkeypatch.setattr(dropout_mod._Replay, "LIMIT", limit)
        drawn.clear()
        torch.manual_seed(7)
        ckpt = _grads(model, batch)
        assert max_abs_diff(plain, ckpt) == 0
        assert len(drawn) == n_masks + extra_draws
        assert dropout_mod._REPLAY.nbytes == sum(m.nbytes for m in dropout_mod._REPLAY.masks.values()) <= limit
        assert not dropout_mod._REPLAY.masks                 # every kept mask was taken by its recompute


def test_find_blocks_llama_and_bert():
    from transformers import BertConfig, BertModel
    llama = tiny_model()
    assert find_blocks(llama) is llama.model.layers
    bert = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
                                vocab_size=50))
    assert find_blocks(bert) is bert.encoder.layer
    with pytest.raises(ValueError, match="blocks="):
        find_blocks(nn.Linear(2, 2))


def test_fit_with_gradient_checkpointing_matches_without(tmp_path):
    a, _ = run(tmp_path / "plain", max_steps=3)
    b, model = run(tmp_path / "ckpt", max_steps=3, grad_checkpointing=True)
    assert losses(a) == pytest.approx(losses(b), abs=1e-6)
    assert not is_gradient_checkpointing(model)                # fit leaves the model as it found it


# ----------------------------------------------------------------------------- checkpoints and resume

@pytest.mark.parametrize("how", ["interrupt", "crash"])
def test_resume_reproduces_uninterrupted_run(tmp_path, how):
    """10 steps of 2 micro-batches with LoRA dropout (so the RNG state matters); stop inside step 7 (Ctrl-C,
    or a crash after the step-6 checkpoint); resume with a fresh model: the same curve, exactly."""
    kw = dict(epochs=3, max_steps=10, grad_accum=2, save_every=3, warmup_steps=2, dropout=0.1)
    full, full_model = run(tmp_path / "full", **kw)
    if how == "interrupt":
        cut, _ = run(tmp_path / "cut", loss=LossAt(13, "interrupt"), **kw)
        assert cut.stopped == "interrupted" and cut.steps == 6
    else:
        with pytest.raises(RuntimeError, match="simulated"):
            run(tmp_path / "cut", loss=LossAt(13, "crash"), **kw)
    assert latest_checkpoint(tmp_path / "cut" / "run").name == "checkpoint-000006"
    resumed, resumed_model = run(tmp_path / "cut", resume=True, **kw)
    assert resumed.steps == 10 and resumed.stopped == "max_steps"
    assert losses(resumed) == losses(full)                              # exact on CPU
    assert [r["lr"] for r in resumed.history] == [r["lr"] for r in full.history]
    assert max_abs_diff(trainable_state(resumed_model), trainable_state(full_model)) == 0.0
    log = [json.loads(line) for line in (tmp_path / "cut" / "run" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if r["kind"] == "train"] == list(range(1, 11))   # no step logged twice


def test_checkpoint_holds_trainable_parameters_only(tmp_path):
    result, model = run(tmp_path, max_steps=2)
    ckpt = Path(result.checkpoint_dir)
    assert sorted(p.name for p in ckpt.iterdir()) == ["optimizer.safetensors", "rng_state.json",
                                                      "trainable.safetensors", "trainer_state.json"]
    saved = load_file(ckpt / "trainable.safetensors")
    assert saved.keys() == trainable_state(model).keys()
    assert all(".lora_" in name for name in saved)
    assert not list(ckpt.parent.glob(".*"))                    # the temp folder was renamed away


def test_resume_with_other_batch_settings_raises(tmp_path):
    run(tmp_path, max_steps=2)
    with pytest.raises(ValueError, match="resume=False"):
        run(tmp_path, max_steps=4, batch_size=2, resume=True)


# ----------------------------------------------------------------------------- bad input and stops

def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, capsys):
    result, model = run(tmp_path, loss=LossAt(4, "nan"), max_steps=8, save_every=2)   # call 4 = step 5
    assert result.stopped == "nan" and result.steps == 4
    assert "at step 5" in capsys.readouterr().out
    ckpt = latest_checkpoint(tmp_path / "run")
    assert ckpt.name == "checkpoint-000004" and result.checkpoint_dir == str(ckpt)
    saved = load_file(ckpt / "trainable.safetensors")
    assert all(torch.isfinite(t).all() for t in saved.values())
    assert max_abs_diff(saved, trainable_state(model)) == 0.0   # the NaN step was not applied
    assert (tmp_path / "run" / "train_curves.png").is_file()


def test_keyboard_interrupt_saves_checkpoint_and_plot(tmp_path):
    result, _ = run(tmp_path, loss=LossAt(3, "interrupt"), max_steps=8)
    assert result.stopped == "interrupted" and result.steps == 3 and result.total_steps == 8
    assert Path(result.checkpoint_dir).name == "checkpoint-000003"
    assert (tmp_path / "run" / "train_curves.png").is_file()


def test_empty_dataset_raises(tmp_path):
    with pytest.raises(ValueError, match="empty"):
        run(tmp_path, data=[])


def test_dataset_smaller_than_batch_raises(tmp_path):
    with pytest.raises(ValueError, match="lower batch_size"):
        run(tmp_path, data=toy_data(3), batch_size=4)


def test_unwritable_out_dir_raises_before_training(tmp_path):
    (tmp_path / "a_file").write_text("")
    called = LossAt(-1, "")
    with pytest.raises(ValueError, match="not writable"):
        fit(tiny_model(), toy_data(), TrainConfig(out_dir=str(tmp_path / "a_file" / "run"), progress=False),
            loss_fn=called, collate_fn=collate)
    assert called.calls == 0


def test_no_trainable_parameters_raises(tmp_path):
    model = tiny_model().requires_grad_(False)
    with pytest.raises(ValueError, match="requires_grad"):
        run(tmp_path, model=model)


def test_loss_fn_returning_wrong_types_raises(tmp_path):
    with pytest.raises(TypeError, match=r"\(loss, stats\)"):
        run(tmp_path, loss=lambda model, batch: (loss_fn(model, batch)[0], 4))


@pytest.mark.parametrize("bad,match", [
    (dict(grad_accum=0), "grad_accum"),
    (dict(warmup_steps=2, warmup_ratio=0.1), "not both"),
    (dict(precision="fp16"), "bf16"),
    (dict(max_grad_norm=0.0), "None for no clipping"),
    (dict(epochs=0), "epochs"),
], ids=["accum0", "two-warmups", "fp16", "clip0", "epochs0"])
def test_inconsistent_config_raises(tmp_path, bad, match):
    with pytest.raises(ValueError, match=match):
        make_config(tmp_path, **bad)


def test_warmup_longer_than_training_raises(tmp_path):
    with pytest.raises(ValueError, match="lower warmup_steps"):
        run(tmp_path, max_steps=3, warmup_steps=5)


def test_group_by_length_without_length_fn_raises(tmp_path):
    with pytest.raises(ValueError, match="length_fn"):
        run(tmp_path, group_by_length=True)


# ----------------------------------------------------------------------------- batches

def test_length_grouped_batches_are_seeded_and_homogeneous():
    torch.manual_seed(1)
    lengths = torch.randint(1, 500, (1000,)).tolist()
    batches = epoch_batches(1000, 8, seed=0, epoch=0, lengths=lengths)
    flat = [i for b in batches for i in b]
    assert len(batches) == 125 and sorted(flat) == list(range(1000))        # every example once
    assert batches == epoch_batches(1000, 8, seed=0, epoch=0, lengths=lengths)
    assert batches != epoch_batches(1000, 8, seed=0, epoch=1, lengths=lengths)
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches) / len(batches)
    random_spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b)
                        for b in epoch_batches(1000, 8, seed=0, epoch=0)) / 125
    print(f"mean length range per batch: grouped {spread:.1f}, random {random_spread:.1f}")
    assert spread < random_spread / 5


def test_random_batches_drop_the_incomplete_one():
    batches = epoch_batches(10, 4, seed=0, epoch=0)
    assert [len(b) for b in batches] == [4, 4] and len(set(sum(batches, []))) == 8


# ----------------------------------------------------------------------------- logs and eval

def test_loss_mean_averages_the_steps_since_the_last_row(tmp_path):
    losses = []

    def recording_loss(model, batch):
        loss, stats = loss_fn(model, batch)
        losses.append(loss.item())
        return loss, stats

    result, _ = run(tmp_path, loss=recording_loss, max_steps=5, log_every=2)
    assert [r["step"] for r in result.history] == [2, 4, 5]
    for row, window in zip(result.history, (losses[0:2], losses[2:4], losses[4:5])):
        assert row["loss"] == pytest.approx(window[-1], rel=1e-6)                 # the logged step's own loss
        assert row["loss_mean"] == pytest.approx(sum(window) / len(window), rel=1e-6)


def test_logs_plot_and_eval_are_written(tmp_path):
    seen = []

    def eval_fn(model):
        seen.append((model.training, torch.is_grad_enabled()))
        return {"loss": 1.0, "accuracy": 0.5}

    data = toy_data()
    result = fit(tiny_model(), data, make_config(tmp_path, max_steps=5, eval_every=2, log_every=2),
                 loss_fn=loss_fn, collate_fn=collate, eval_fn=eval_fn)
    out = tmp_path / "run"
    assert seen == [(False, False)] * 3                                   # steps 2, 4 and the end (5)
    assert [r["step"] for r in result.eval_history] == [2, 4, 5]
    assert [r["step"] for r in result.history] == [2, 4, 5]               # every log_every, and the last
    rows = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["kind"] == "train"]
    columns = {"step", "epoch", "loss", "loss_mean", "lr", "grad_norm", "tokens_per_s", "elapsed_s"}
    assert columns <= train_rows[0].keys()
    assert train_rows[0]["tokens_per_s"] > 0 and result.tokens_per_s > 0
    header = (out / "train_log.csv").read_text().splitlines()[0]
    assert header.startswith("step,epoch,loss,loss_mean,lr,grad_norm,tokens_per_s,elapsed_s")
    assert (out / "eval_log.csv").read_text().splitlines()[0] == "step,epoch,loss,accuracy"
    assert (out / "train_curves.png").read_bytes()[:4] == b"\x89PNG"


def test_eval_does_not_change_the_training_run(tmp_path):
    def eval_fn(model):
        torch.rand(100)                                                   # consumes RNG on purpose
        return {"x": 0.0}

    plain, _ = run(tmp_path / "a", max_steps=4, dropout=0.1)              # dropout: the RNG state matters
    with_eval = fit(tiny_model(dropout=0.1), toy_data(), make_config(tmp_path / "b", max_steps=4, eval_every=1),
                    loss_fn=loss_fn, collate_fn=collate, eval_fn=eval_fn)
    assert losses(plain) == losses(with_eval)


def test_tensorboard_without_package_raises_before_training(tmp_path):
    try:
        import tensorboard  # noqa: F401
        pytest.skip("tensorboard is installed: the missing-package message cannot be tested")
    except ImportError:
        pass
    with pytest.raises(ValueError, match="pip install tensorboard"):
        run(tmp_path, tensorboard=True)


def test_fit_releases_freed_pages_when_rss_climbs_between_log_rows(tmp_path, monkeypatch):
    """train.fit checks RSS after every step: a climb of 1 GiB a step triggers a release before the next log row."""
    from train import memory
    rss, released = [1 << 30], []
    def climbing_rss():
        rss[0] += 1 << 30
        return rss[0]
    monkeypatch.setattr(memory, "current_rss_bytes", climbing_rss)
    monkeypatch.setattr(memory, "release_free_memory", lambda: released.append(rss[0]) or True)
    result, _ = run(tmp_path, log_every=1000, max_steps=6)
    assert result.steps == 6
    assert len(released) >= 2          # a purge from the watch between steps, plus the last step's log row
