"""The training loop: `fit(model, train_data, config, loss_fn=..., collate_fn=...)`, read top to bottom.

    for each optimizer step:
        lr = schedule(step)                                  linear warmup, then cosine down to min_lr_ratio * lr
        for each of grad_accum micro-batches:
            loss, stats = loss_fn(model, collate_fn(examples))
            (loss / grad_accum).backward()                   gradients add up to the mean over the whole step
        average gradients over ranks (DDP), clip their global norm, optimizer.step(), zero_grad(set_to_none=True)
        log, eval every eval_every steps, checkpoint every save_every steps

The contract with the task (train/tasks/ or your own):
    collate_fn(examples: list) -> batch        a dict of tensors (moved to the model's device by the loop)
    loss_fn(model, batch) -> (loss, stats)     loss: a 0-dim tensor, the MEAN over the micro-batch's items (so
                                               `loss / grad_accum` summed over the step is the step's mean);
                                               stats: a dict of numbers; "n_tokens" (tokens in the micro-batch)
                                               feeds tokens/s; other numeric entries are averaged and logged
    length_fn(example) -> int                  optional; batches of similar length (less padding)
    eval_fn(model) -> dict                     optional; metrics, run under model.eval() and torch.no_grad()

Batches (train/batches.py). Seeded epochs of global micro-batches of batch_size x world_size examples, the
last incomplete one dropped, so every step sees exactly batch_size x grad_accum x world_size examples and
`loss / grad_accum` plus the gradient average over ranks is the exact mean; with a length_fn, batches of similar
length. Micro-batches form one stream across epochs, so resuming needs only the step.

Checkpoints (train/resume.py) hold what resuming needs and nothing frozen: the trainable parameters, the AdamW
state, the RNG states, the step, the run's settings and the log rows, in safetensors and JSON (no pickle). The lr
is a function of the step, so there is no scheduler object to save. A checkpoint folder appears complete or not
at all, so a kill at any moment leaves the previous one valid. `resume=True` continues from the newest complete
checkpoint (or starts fresh in an empty out_dir), refuses a run with other settings, and on CPU reproduces the
uninterrupted loss curve exactly. Every config value is checked by type and range up front, and the trainable
weights are checked finite after each update, before anything is saved.
eval_fn runs with the RNG state saved and restored, so evaluating does not change the training run.

Data parallel (torchrun --nproc_per_node N): fit joins the process group (gloo on CPU, nccl on GPU) and leaves
it open for the caller (train.distributed.shutdown() at the end of the script). batch_size is per process, so
N processes x batch_size b train like one process with batch_size N x b. Gradients of the trainable parameters
are averaged before clipping; rank 0 alone evaluates and writes logs, plots and checkpoints; all ranks read a
checkpoint on resume (a shared out_dir) and take rank 0's RNG state. The model must already be on
train.distributed.local_device().

Precision: "auto" autocasts to bf16 on a CUDA GPU that has it and leaves CPU runs alone (CPU autocast is slower
on most CPUs); "bf16" asks for it anywhere; "fp32" never. The model's own dtypes are not changed.
"""
from __future__ import annotations

import math
import os
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

from . import distributed
from .batches import MicroBatches, epoch_batches, example_lengths
from .checkpointing import disable_gradient_checkpointing, enable_gradient_checkpointing, is_gradient_checkpointing
from .distributed import say
from .logging import RunLog
from .memory import FreePageWatch
from .resume import (latest_checkpoint, load_checkpoint, resume_point, rng_state, save_checkpoint, seed_everything,
                     set_rng_state)
from .trainconfig import RUN_SETTINGS, FitResult, TrainConfig


def lr_multiplier(step: int, *, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0) -> float:
    """lr(step) / lr for the 0-based optimizer step `step`: linear warmup, then cosine to min_lr_ratio."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)          # never 0: the first step already learns
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)   # 0 -> 1
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))          # 1 -> 0
    return min_lr_ratio + (1.0 - min_lr_ratio) * cosine


def fit(model: torch.nn.Module, train_data: Sequence, config: TrainConfig, *, loss_fn: Callable,
        collate_fn: Callable, eval_fn: Callable | None = None, length_fn: Callable | None = None) -> FitResult:
    """Trains the parameters of `model` that require grad; see the module docstring for the contract."""
    distributed.init()                      # no-op unless torchrun started several processes
    plan = _plan(model, train_data, config, collate_fn, length_fn)
    optimizer = make_optimizer(model, config)
    state = _start(model, optimizer, plan)
    added_ckpt = config.grad_checkpointing and not is_gradient_checkpointing(model)
    if added_ckpt:
        enable_gradient_checkpointing(model)
    was_training = model.training
    model.train()
    bar = tqdm(total=plan.total_steps, initial=state.step, disable=not (plan.main and config.progress),
               dynamic_ncols=True)
    state.rng, state.t_start = rng_state(), time.perf_counter()
    try:
        _train(model, optimizer, plan, state, loss_fn, eval_fn, bar)
    except KeyboardInterrupt:
        state.stopped = "interrupted"
        optimizer.zero_grad(set_to_none=True)   # the half-accumulated step is dropped; resume redoes it
        say(f"interrupted during step {state.step + 1}: saving step {state.step} and the plot")
    finally:
        bar.close()
        if added_ckpt:
            disable_gradient_checkpointing(model)
        model.train(was_training)

    if plan.main and state.stopped != "nan" and state.saved_step != state.step:
        _save(model, optimizer, plan, state)
    state.log.finish()
    return _result(plan, state)


def make_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; with config.loraplus_lr_ratio, LoRA+'s two groups (Hayou et al.
    2024): every lora_B matrix and every 1-D trainable (DoRA magnitudes, biases) at ratio x lr, the rest at lr,
    as PEFT's create_loraplus_optimizer groups them. The groups' order is fixed, so checkpoints resume."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if config.loraplus_lr_ratio is None:
        groups = [{"params": [p for _, p in named]}]
    else:
        is_b = [("lora_B" in n or p.ndim == 1) for n, p in named]
        groups = [{"params": [p for (_, p), b in zip(named, is_b) if not b], "lr_scale": 1.0},
                  {"params": [p for (_, p), b in zip(named, is_b) if b], "lr_scale": config.loraplus_lr_ratio}]
        groups = [g for g in groups if g["params"]]
    return torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)


@dataclass
class _Plan:
    """What a fit call settles before its first step, and keeps."""
    config: TrainConfig
    out: Path
    params: list[torch.nn.Parameter]        # the trainable ones
    batches: MicroBatches
    total_steps: int                        # from epochs, or max_steps when that is fewer
    capped: bool                            # max_steps cut the run short of its epochs
    warmup: int
    autocast: object                        # torch.autocast(...) or nullcontext()
    run: dict                               # the settings a checkpoint records and a resume must share
    main: bool
    world: int

    def epochs_at(self, step: int) -> float:
        return step * self.config.grad_accum / self.batches.per_epoch


@dataclass
class _State:
    """What changes as the run goes: the step, what a checkpoint saves, the stop reason and the counters."""
    log: RunLog
    step: int = 0
    elapsed0: float = 0.0                   # wall time of the run before this call (a resume)
    saved_step: int | None = None           # the step the newest checkpoint holds, when this call knows it
    final_loss: float | None = None
    stopped: str | None = None
    rng: dict | None = None                 # the RNG state a checkpoint of `step` must restore
    t_start: float = 0.0
    train_time: float = 0.0                 # this call's seconds in steps, and the tokens they processed
    session_tokens: float = 0.0
    window_time: float = 0.0                # the same since the last log row, and its losses
    window_tokens: float = 0.0
    window_losses: list[float] = field(default_factory=list)
    pages: FreePageWatch = field(default_factory=FreePageWatch)   # hands freed pages back (train/memory.py)

    def elapsed(self) -> float:
        return self.elapsed0 + time.perf_counter() - self.t_start


def _plan(model, train_data: Sequence, config: TrainConfig, collate_fn, length_fn) -> _Plan:
    """Checks the inputs and settles the batches, the number of steps and the warmup, before any training."""
    rank, world, main = distributed.rank(), distributed.world_size(), distributed.is_main()
    out = _writable_dir(config.out_dir) if main else Path(config.out_dir)
    params = [p for p in model.parameters() if p.requires_grad]
    _check(len(params) > 0, "the model has no parameter with requires_grad=True: inject adapters "
                            "(lora.inject) or unfreeze something before fit")
    _check(len(train_data) > 0, "train_data is empty: pass at least batch_size x world_size examples")
    batches = MicroBatches(train_data, collate_fn, config.batch_size, rank=rank, world=world, seed=config.seed,
                           lengths=example_lengths(train_data, config, length_fn))
    _check(batches.per_epoch > 0, f"train_data has {len(train_data)} examples, fewer than one global batch "
                                  f"(batch_size {config.batch_size} x {world} processes): lower batch_size")
    total_steps = max(1, math.ceil(config.epochs * batches.per_epoch / config.grad_accum))
    capped = config.max_steps is not None and config.max_steps < total_steps
    total_steps = config.max_steps if capped else total_steps
    warmup = config.warmup_steps if config.warmup_steps is not None else int(config.warmup_ratio * total_steps)
    _check(warmup < total_steps, f"warmup_steps {warmup} >= total steps {total_steps}: lower warmup_steps "
                                 "or train for more steps")
    run = {"n_examples": len(train_data), "world_size": world, "group_by_length": batches.lengths is not None,
           "total_steps": total_steps, "warmup_steps": warmup, **{k: getattr(config, k) for k in RUN_SETTINGS}}
    return _Plan(config, out, params, batches, total_steps, capped, warmup,
                 _autocast(config.precision, params[0].device), run, main, world)


def _start(model, optimizer, plan: _Plan) -> _State:
    """A fresh, seeded start, or where the latest checkpoint left off; every rank then holds rank 0's adapters."""
    ckpt = resume_point(plan.out) if plan.config.resume else None
    step, rows, elapsed0 = 0, [], 0.0
    if ckpt is not None:
        saved = load_checkpoint(ckpt, model, optimizer, plan.run)
        step, rows, elapsed0 = saved["step"], saved["rows"], saved["elapsed_s"]
    else:
        seed_everything(plan.config.seed)
        if plan.main and latest_checkpoint(plan.out) is not None:
            say(f"{plan.out} holds a checkpoint of an earlier run; the first save replaces it "
                "(resume=True would continue it instead)")
    distributed.broadcast_params(plan.params)    # every rank starts from rank 0's adapters
    log = RunLog(plan.out, enabled=plan.main, rows=rows, tensorboard=plan.config.tensorboard)
    last = next((r for r in reversed(log.train_rows())), {})
    return _State(log=log, step=step, elapsed0=elapsed0, saved_step=step if ckpt is not None else None,
                  final_loss=last.get("loss"))


def _train(model, optimizer, plan: _Plan, state: _State, loss_fn, eval_fn, bar) -> None:
    """Steps until total_steps, then the final eval; stops early (stopped = "nan") at a non-finite step."""
    config = plan.config
    while state.step < plan.total_steps:
        t0 = time.perf_counter()
        lr = config.lr * lr_multiplier(state.step, warmup_steps=plan.warmup, total_steps=plan.total_steps,
                                       min_lr_ratio=config.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)       # LoRA+: B's group runs at ratio x lr
        done = _step(model, optimizer, plan, state.step, loss_fn, lr)
        if done is None:
            state.stopped = "nan"
            return
        loss_value, stats, grad_norm = done
        state.step += 1
        state.rng = rng_state()
        _count(plan, state, loss_value, stats, time.perf_counter() - t0)
        bar.update(1)
        _after_step(model, optimizer, plan, state, eval_fn, bar, lr, grad_norm, stats)
    state.stopped = "max_steps" if plan.capped else None      # all steps done: final eval, then the final checkpoint
    if eval_fn is not None:
        _evaluate(model, eval_fn, plan.autocast, state.log, state.step, plan.epochs_at(state.step), plan.main)


def _step(model, optimizer, plan: _Plan, step: int, loss_fn, lr: float) -> tuple[float, dict, float] | None:
    """One optimizer step: accumulate, average over ranks, clip, update. (loss, stats, grad norm), or None when
    the loss or the gradient is not finite (then nothing is updated) or the update made a weight so."""
    loss_value, stats = _accumulate(model, plan, step, loss_fn)
    distributed.all_reduce_grads(plan.params)
    grad_norm = torch.nn.utils.clip_grad_norm_(plan.params, plan.config.max_grad_norm or math.inf).item()
    if not (math.isfinite(loss_value) and math.isfinite(grad_norm)):
        optimizer.zero_grad(set_to_none=True)
        say(f"loss {loss_value} / grad norm {grad_norm} at step {step + 1}: stopping before the update; "
            f"the last good checkpoint is {latest_checkpoint(plan.out)} (nothing written for this step)")
        return None
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if not _all_finite(plan.params):
        say(f"the update of step {step + 1} made trainable weights NaN/Inf (lr {lr:.3g}): stopping "
            f"without saving; the last good checkpoint is {latest_checkpoint(plan.out)}")
        return None
    return loss_value, stats, grad_norm


def _accumulate(model, plan: _Plan, step: int, loss_fn) -> tuple[float, dict]:
    """Forward and backward over the step's grad_accum micro-batches; loss and stats averaged (all ranks)."""
    accum, device = plan.config.grad_accum, plan.params[0].device
    loss_sum, stat_sums = torch.zeros((), device=device), {}
    for k in range(accum):
        batch = _to_device(plan.batches[step * accum + k], device)
        with plan.autocast:
            loss, stats = loss_fn(model, batch)
        _check_loss(loss, stats)
        (loss / accum).backward()
        loss_sum += loss.detach().float()
        for key, value in stats.items():
            stat_sums[key] = stat_sums.get(key, 0.0) + float(value)
    return _mean_over_step(loss_sum, stat_sums, accum, device)


def _count(plan: _Plan, state: _State, loss_value: float, stats: dict, seconds: float) -> None:
    """The step's loss and tokens into the run's and the log window's counters (stats loses "n_tokens")."""
    state.final_loss = loss_value
    step_tokens = stats.pop("n_tokens", 0.0) * plan.config.grad_accum * plan.world   # tokens of the whole step
    state.train_time, state.session_tokens = state.train_time + seconds, state.session_tokens + step_tokens
    state.window_time, state.window_tokens = state.window_time + seconds, state.window_tokens + step_tokens
    state.window_losses.append(loss_value)


def _after_step(model, optimizer, plan: _Plan, state: _State, eval_fn, bar, lr: float, grad_norm: float,
                stats: dict) -> None:
    """A log row every log_every steps (and at the last), eval every eval_every, a checkpoint every save_every."""
    config, step = plan.config, state.step
    if step % config.log_every == 0 or step == plan.total_steps:
        _log_row(plan, state, bar, lr, grad_norm, stats)              # releases freed pages itself
    else:
        state.pages.check()     # a release if RSS climbed since the last one (shapes that did not reuse pages)
    if eval_fn is not None and config.eval_every and step % config.eval_every == 0 and step < plan.total_steps:
        _evaluate(model, eval_fn, plan.autocast, state.log, step, plan.epochs_at(step), plan.main)
    if config.save_every and step % config.save_every == 0 and step < plan.total_steps and plan.main:
        _save(model, optimizer, plan, state)
        state.saved_step = step


def _log_row(plan: _Plan, state: _State, bar, lr: float, grad_norm: float, stats: dict) -> None:
    """The train row of the window since the last one (mean loss, tokens/s), then a fresh window."""
    loss = state.final_loss
    row = {"step": state.step, "epoch": round(plan.epochs_at(state.step), 4), "loss": loss,
           "loss_mean": sum(state.window_losses) / len(state.window_losses), "lr": lr, "grad_norm": grad_norm,
           "tokens_per_s": state.window_tokens / max(state.window_time, 1e-9), "elapsed_s": state.elapsed(), **stats}
    state.log.log("train", row)
    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{row['tokens_per_s']:.0f}")
    state.window_time, state.window_tokens, state.window_losses = 0.0, 0.0, []
    state.pages.release()       # the window's high-water activations (train/memory.py)


def _save(model, optimizer, plan: _Plan, state: _State) -> Path:
    meta = {"step": state.step, "elapsed_s": state.elapsed(), "run": plan.run, "rows": state.log.rows}
    return save_checkpoint(plan.out, model, optimizer, state.rng, meta)


def _result(plan: _Plan, state: _State) -> FitResult:
    ckpt = latest_checkpoint(plan.out) if plan.main else None
    return FitResult(steps=state.step, epochs=plan.epochs_at(state.step), final_loss=state.final_loss,
                     history=state.log.train_rows(), eval_history=state.log.eval_rows(),
                     elapsed_s=state.elapsed(), tokens_per_s=state.session_tokens / max(state.train_time, 1e-9),
                     stopped=state.stopped, checkpoint_dir=str(ckpt) if ckpt else None,
                     total_steps=plan.total_steps)


def _mean_over_step(loss_sum: torch.Tensor, stat_sums: dict, accum: int, device) -> tuple[float, dict]:
    """Loss and stats averaged over the micro-batches and the ranks, with one all-reduce."""
    keys = sorted(stat_sums)
    numbers = torch.tensor([loss_sum.item()] + [stat_sums[k] for k in keys], dtype=torch.float64, device=device)
    numbers = distributed.all_reduce_mean(numbers / accum).tolist()
    return numbers[0], dict(zip(keys, numbers[1:]))


def _evaluate(model, eval_fn, autocast, log: RunLog, step: int, epoch: float, main: bool) -> None:
    """eval_fn on rank 0 under eval() + no_grad(), RNG state untouched; other ranks wait at the barrier."""
    if main:
        rng = rng_state()
        model.eval()
        try:
            with torch.no_grad(), autocast:
                metrics = {k: v.item() if isinstance(v, torch.Tensor) else v for k, v in eval_fn(model).items()}
        finally:
            model.train()
            set_rng_state(rng)
        log.log("eval", {"step": step, "epoch": round(epoch, 4), **metrics})
        say(f"step {step} eval: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                              for k, v in metrics.items()))
    distributed.barrier()


# ----------------------------------------------------------------------------- small helpers

def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _all_finite(params: list[torch.Tensor]) -> bool:
    """One reduction over every parameter's max |value| (NaN and Inf propagate), one host sync."""
    return bool(torch.isfinite(torch.stack(torch._foreach_norm(params, math.inf))).all())


def _check_loss(loss, stats) -> None:
    if not (isinstance(loss, torch.Tensor) and loss.dim() == 0 and isinstance(stats, dict)):
        raise TypeError("loss_fn must return (loss, stats): loss a 0-dim tensor (the mean over the micro-batch), "
                        f"stats a dict such as {{'n_tokens': 123}}; got ({type(loss).__name__}, "
                        f"{type(stats).__name__})")


def _writable_dir(out_dir: str | os.PathLike) -> Path:
    """Creates out_dir and proves we can write there, before any training time is spent."""
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out):
            pass
    except OSError as e:
        raise ValueError(f"out_dir {str(out)!r} is not writable ({e.strerror or e}): "
                         "choose a folder you can write to") from e
    return out


def _autocast(precision: str, device: torch.device):
    """bf16 autocast where asked, or on CUDA with bf16 when "auto"; otherwise none."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported()):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def _to_device(batch, device: torch.device):
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    return batch


__all__ = ["TrainConfig", "FitResult", "fit", "lr_multiplier", "epoch_batches", "MicroBatches", "save_checkpoint",
           "load_checkpoint", "latest_checkpoint", "rng_state", "set_rng_state", "seed_everything"]
