"""The training loop: `fit(model, train_data, config, loss_fn=..., collate_fn=...)`, read top to bottom.

    for each optimizer step:
        lr = schedule(step)                                  linear warmup, then cosine down to min_lr_ratio * lr
        for each of grad_accum micro-batches:
            loss, stats = loss_fn(model, collate_fn(examples))
            (loss / grad_accum).backward()                   gradients add up to the mean over the whole step
        average gradients over ranks (DDP), clip their global norm, optimizer.step(), zero_grad(set_to_none=True)
        log, eval every eval_every steps, checkpoint every save_every steps

The contract with the task (train/task.py or your own):
    collate_fn(examples: list) -> batch        a dict of tensors (moved to the model's device by the loop)
    loss_fn(model, batch) -> (loss, stats)     loss: a 0-dim tensor, the MEAN over the micro-batch's items (so
                                               `loss / grad_accum` summed over the step is the step's mean);
                                               stats: a dict of numbers; "n_tokens" (tokens in the micro-batch)
                                               feeds tokens/s; other numeric entries are averaged and logged
    length_fn(example) -> int                  optional; batches of similar length (less padding)
    eval_fn(model) -> dict                     optional; metrics, run under model.eval() and torch.no_grad()

Batches. Each epoch is a seeded permutation cut into global micro-batches of batch_size x world_size examples;
the last incomplete one is dropped, so every step sees exactly batch_size x grad_accum x world_size examples and
`loss / grad_accum` plus the gradient average over ranks is the exact mean. Rank r takes the r-th slice of each
global micro-batch. With a length_fn the permutation is cut into mega-chunks of 50 batches, each sorted by
length, and the batches are then shuffled (the idea of HF's LengthGroupedSampler). Micro-batches form one
stream across epochs, so resuming needs only the step: position = step x grad_accum.

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
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

from . import distributed
from .checkpointing import disable_gradient_checkpointing, enable_gradient_checkpointing, is_gradient_checkpointing
from .logging import RunLog
from .resume import (latest_checkpoint, load_checkpoint, resume_point, rng_state, save_checkpoint, seed_everything,
                     set_rng_state)

MEGA_BATCHES = 50   # batches per length-sorted chunk when grouping by length
# The TrainConfig fields that decide the batches and the updates: a resume must share them (train/resume.py).
RUN_SETTINGS = ("epochs", "max_steps", "batch_size", "grad_accum", "lr", "weight_decay", "warmup_ratio",
                "warmup_steps", "min_lr_ratio", "max_grad_norm", "seed", "precision")


@dataclass
class TrainConfig:
    out_dir: str | os.PathLike              # checkpoints, train_log.jsonl/.csv and train_curves.png go here
    epochs: float = 1.0                     # passes over train_data (fractions allowed)
    max_steps: int | None = None            # cap on optimizer steps (None: epochs decide)
    batch_size: int = 8                     # micro-batch per process
    grad_accum: int = 1                     # micro-batches per optimizer step
    lr: float = 2e-4                        # peak learning rate (AdamW)
    weight_decay: float = 0.0               # AdamW's decoupled weight decay
    warmup_ratio: float = 0.0               # linear warmup as a fraction of all steps ...
    warmup_steps: int | None = None         # ... or as a number of steps (then warmup_ratio must stay 0)
    min_lr_ratio: float = 0.0               # the cosine ends at min_lr_ratio * lr
    max_grad_norm: float | None = 1.0       # clip the global gradient norm (None: measure, do not clip)
    seed: int = 0                           # torch, numpy, python and the batch order
    grad_checkpointing: bool = False        # recompute the decoder blocks in backward (less memory, ~30% slower)
    precision: str = "auto"                 # "auto": bf16 autocast on CUDA, none on CPU | "bf16" | "fp32"
    eval_every: int | None = None           # steps between eval_fn calls (None: only at the end)
    save_every: int | None = None           # steps between checkpoints (None: only at the end)
    log_every: int = 10                     # steps between log rows (the last step is always logged)
    resume: bool = False                    # continue from out_dir/latest when it exists
    group_by_length: bool | None = None     # None: when a length_fn is given | True (needs length_fn) | False
    progress: bool = True                   # tqdm bar on rank 0
    tensorboard: bool = False               # also write TensorBoard events (needs the tensorboard package)

    def __post_init__(self):
        for f in fields(self):
            _check_type(f.name, getattr(self, f.name), f.type)
        _check(self.epochs > 0, f"epochs must be > 0, got {self.epochs}")
        _check(self.max_steps is None or self.max_steps >= 1, f"max_steps must be >= 1 or None, got {self.max_steps}")
        _check(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        _check(self.grad_accum >= 1, f"grad_accum must be >= 1, got {self.grad_accum}")
        _check(self.lr > 0, f"lr must be > 0, got {self.lr}")
        _check(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        _check(0 <= self.warmup_ratio < 1, f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        _check(self.warmup_steps is None or self.warmup_steps >= 0, "warmup_steps must be >= 0 or None")
        _check(self.warmup_steps is None or self.warmup_ratio == 0,
               "set warmup_steps or warmup_ratio, not both: leave warmup_ratio=0 when warmup_steps is given")
        _check(0 <= self.min_lr_ratio <= 1, f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        _check(self.max_grad_norm is None or self.max_grad_norm > 0,
               f"max_grad_norm must be > 0, or None for no clipping; got {self.max_grad_norm}")
        _check(0 <= self.seed < 2**32, f"seed must be in [0, 2**32) (numpy's range), got {self.seed}")
        _check(self.precision in ("auto", "bf16", "fp32"),
               f"precision must be 'auto', 'bf16' or 'fp32', got {self.precision!r} "
               "(fp16 needs loss scaling, which this loop does not do: use 'bf16')")
        for name in ("eval_every", "save_every"):
            value = getattr(self, name)
            _check(value is None or value >= 1, f"{name} must be >= 1 or None, got {value}")
        _check(self.log_every >= 1, f"log_every must be >= 1, got {self.log_every}")

    @classmethod
    def from_recipe(cls, recipe, **overrides) -> "TrainConfig":
        """The config a recipe dataclass describes: every TrainConfig field the recipe also has, taken by
        name (out_dir, epochs, lr, seed, ...), then `overrides`. The recipes' one way to build it."""
        names = [f.name for f in fields(cls)]
        kwargs = {n: getattr(recipe, n) for n in names if hasattr(recipe, n)}
        unknown = set(overrides) - set(names)
        _check(not unknown, f"not TrainConfig fields: {sorted(unknown)}")
        return cls(**{**kwargs, **overrides})


@dataclass
class FitResult:
    steps: int                              # optimizer steps done (including those before a resume)
    epochs: float                           # passes over the data done
    final_loss: float | None                # loss of the last completed step
    history: list[dict]                     # the train log rows (every log_every steps)
    eval_history: list[dict] = field(default_factory=list)   # {"step", "epoch", **eval_fn(model)}
    elapsed_s: float = 0.0                  # wall time of the run, summed over resumes
    tokens_per_s: float = 0.0               # this call's training throughput (stats["n_tokens"], all ranks)
    stopped: str | None = None              # None (all epochs done) | "max_steps" | "nan" | "interrupted"
    checkpoint_dir: str | None = None       # the latest valid checkpoint
    total_steps: int = 0                    # the steps the run was planned for (epochs or max_steps)


def lr_multiplier(step: int, *, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0) -> float:
    """lr(step) / lr for the 0-based optimizer step `step`: linear warmup, then cosine to min_lr_ratio."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)          # never 0: the first step already learns
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)   # 0 -> 1
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))          # 1 -> 0
    return min_lr_ratio + (1.0 - min_lr_ratio) * cosine


def epoch_batches(n: int, batch_size: int, *, seed: int, epoch: int,
                  lengths: Sequence[int] | None = None) -> list[list[int]]:
    """Index lists of `batch_size` for one epoch (the last incomplete one dropped); same on every rank."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(n, generator=g).tolist()
    if lengths is not None:
        chunk = batch_size * MEGA_BATCHES
        order = [i for s in range(0, n, chunk) for i in sorted(order[s:s + chunk], key=lambda i: -lengths[i])]
    batches = [order[s:s + batch_size] for s in range(0, n - batch_size + 1, batch_size)]
    if lengths is not None:
        batches = [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]
    return batches


class MicroBatches:
    """This rank's micro-batches as one stream across epochs: number m is batch m % per_epoch of epoch
    m // per_epoch, so the position to resume from is just step x grad_accum."""

    def __init__(self, data: Sequence, collate_fn: Callable, batch_size: int, *, rank: int, world: int,
                 seed: int, lengths: Sequence[int] | None):
        self.data, self.collate_fn, self.batch_size, self.rank = data, collate_fn, batch_size, rank
        self.global_batch, self.seed, self.lengths = batch_size * world, seed, lengths
        self.per_epoch = len(data) // self.global_batch
        self._epoch, self._order = -1, []

    def __getitem__(self, m: int):
        epoch, pos = divmod(m, self.per_epoch)
        if epoch != self._epoch:
            self._epoch = epoch
            self._order = epoch_batches(len(self.data), self.global_batch, seed=self.seed, epoch=epoch,
                                        lengths=self.lengths)
        mine = self._order[pos][self.rank * self.batch_size:(self.rank + 1) * self.batch_size]  # rank's slice
        return self.collate_fn([self.data[i] for i in mine])


def fit(model: torch.nn.Module, train_data: Sequence, config: TrainConfig, *, loss_fn: Callable,
        collate_fn: Callable, eval_fn: Callable | None = None, length_fn: Callable | None = None) -> FitResult:
    """Trains the parameters of `model` that require grad; see the module docstring for the contract."""
    distributed.init()                      # no-op unless torchrun started several processes
    rank, world, main = distributed.rank(), distributed.world_size(), distributed.is_main()
    out = _writable_dir(config.out_dir) if main else Path(config.out_dir)
    params = [p for p in model.parameters() if p.requires_grad]
    _check(len(params) > 0, "the model has no parameter with requires_grad=True: inject adapters "
                            "(lora.inject) or unfreeze something before fit")
    _check(len(train_data) > 0, "train_data is empty: pass at least batch_size x world_size examples")
    batches = MicroBatches(train_data, collate_fn, config.batch_size, rank=rank, world=world, seed=config.seed,
                           lengths=_lengths(train_data, config, length_fn))
    micro_per_epoch = batches.per_epoch
    _check(micro_per_epoch > 0, f"train_data has {len(train_data)} examples, fewer than one global batch "
                                f"(batch_size {config.batch_size} x {world} processes): lower batch_size")
    total_steps = max(1, math.ceil(config.epochs * micro_per_epoch / config.grad_accum))
    capped = config.max_steps is not None and config.max_steps < total_steps
    total_steps = config.max_steps if capped else total_steps
    warmup = config.warmup_steps if config.warmup_steps is not None else int(config.warmup_ratio * total_steps)
    _check(warmup < total_steps, f"warmup_steps {warmup} >= total steps {total_steps}: lower warmup_steps "
                                 "or train for more steps")
    device = params[0].device
    autocast = _autocast(config.precision, device)
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    run = {"n_examples": len(train_data), "world_size": world, "group_by_length": batches.lengths is not None,
           "total_steps": total_steps, "warmup_steps": warmup, **{k: getattr(config, k) for k in RUN_SETTINGS}}

    # start fresh, or where the latest checkpoint left off
    step, rows, elapsed0, ckpt = 0, [], 0.0, resume_point(out) if config.resume else None
    if ckpt is not None:
        state = load_checkpoint(ckpt, model, optimizer, run)
        step, rows, elapsed0 = state["step"], state["rows"], state["elapsed_s"]
    else:
        seed_everything(config.seed)
        if main and latest_checkpoint(out) is not None:
            _say(f"{out} holds a checkpoint of an earlier run; the first save replaces it "
                 "(resume=True would continue it instead)")
    distributed.broadcast_params(params)    # every rank starts from rank 0's adapters
    log = RunLog(out, enabled=main, rows=rows, tensorboard=config.tensorboard)
    saved_step = step if ckpt is not None else None

    def save(step: int) -> Path:
        elapsed = elapsed0 + time.perf_counter() - t_start
        state = {"step": step, "elapsed_s": elapsed, "run": run, "rows": log.rows}
        return save_checkpoint(out, model, optimizer, rng, state)

    added_ckpt = config.grad_checkpointing and not is_gradient_checkpointing(model)
    if added_ckpt:
        enable_gradient_checkpointing(model)
    was_training = model.training
    model.train()

    bar = tqdm(total=total_steps, initial=step, disable=not (main and config.progress), dynamic_ncols=True)
    rng = rng_state()                       # the state a checkpoint of `step` must restore
    last = next((r for r in reversed(log.train_rows())), {})
    final_loss, stopped = last.get("loss"), None
    t_start, train_time, session_tokens = time.perf_counter(), 0.0, 0.0
    window_time, window_tokens, window_losses = 0.0, 0.0, []
    try:
        while step < total_steps:
            t0 = time.perf_counter()
            lr = config.lr * lr_multiplier(step, warmup_steps=warmup, total_steps=total_steps,
                                           min_lr_ratio=config.min_lr_ratio)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_sum, stat_sums = torch.zeros((), device=device), {}
            for k in range(config.grad_accum):
                batch = _to_device(batches[step * config.grad_accum + k], device)
                with autocast:
                    loss, stats = loss_fn(model, batch)
                _check_loss(loss, stats)
                (loss / config.grad_accum).backward()
                loss_sum += loss.detach().float()
                for key, value in stats.items():
                    stat_sums[key] = stat_sums.get(key, 0.0) + float(value)
            loss_value, stats = _mean_over_step(loss_sum, stat_sums, config.grad_accum, device)
            distributed.all_reduce_grads(params)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm or math.inf).item()
            if not (math.isfinite(loss_value) and math.isfinite(grad_norm)):
                stopped = "nan"
                optimizer.zero_grad(set_to_none=True)
                _say(f"loss {loss_value} / grad norm {grad_norm} at step {step + 1}: stopping before the update; "
                     f"the last good checkpoint is {latest_checkpoint(out)} (nothing written for this step)")
                break
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if not _all_finite(params):
                stopped = "nan"
                _say(f"the update of step {step + 1} made trainable weights NaN/Inf (lr {lr:.3g}): stopping "
                     f"without saving; the last good checkpoint is {latest_checkpoint(out)}")
                break
            step += 1
            rng = rng_state()
            final_loss = loss_value
            step_tokens = stats.pop("n_tokens", 0.0) * config.grad_accum * world   # tokens of the whole step
            dt = time.perf_counter() - t0
            train_time, session_tokens = train_time + dt, session_tokens + step_tokens
            window_time, window_tokens = window_time + dt, window_tokens + step_tokens
            window_losses.append(loss_value)
            bar.update(1)

            epoch_f = step * config.grad_accum / micro_per_epoch
            if step % config.log_every == 0 or step == total_steps:
                row = {"step": step, "epoch": round(epoch_f, 4), "loss": loss_value,
                       "loss_mean": sum(window_losses) / len(window_losses), "lr": lr, "grad_norm": grad_norm,
                       "tokens_per_s": window_tokens / max(window_time, 1e-9),
                       "elapsed_s": elapsed0 + time.perf_counter() - t_start, **stats}
                log.log("train", row)
                bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", tok_s=f"{row['tokens_per_s']:.0f}")
                window_time, window_tokens, window_losses = 0.0, 0.0, []
            if eval_fn is not None and config.eval_every and step % config.eval_every == 0 and step < total_steps:
                _evaluate(model, eval_fn, autocast, log, step, epoch_f, main)
            if config.save_every and step % config.save_every == 0 and step < total_steps and main:
                save(step)
                saved_step = step
        else:                               # all steps done: final eval, then the final checkpoint
            stopped = "max_steps" if capped else None
            if eval_fn is not None:
                _evaluate(model, eval_fn, autocast, log, step, step * config.grad_accum / micro_per_epoch, main)
    except KeyboardInterrupt:
        stopped = "interrupted"
        optimizer.zero_grad(set_to_none=True)   # the half-accumulated step is dropped; resume redoes it
        _say(f"interrupted during step {step + 1}: saving step {step} and the plot")
    finally:
        bar.close()
        if added_ckpt:
            disable_gradient_checkpointing(model)
        model.train(was_training)

    if main and stopped != "nan" and saved_step != step:
        save(step)
    log.finish()
    ckpt = latest_checkpoint(out) if main else None
    return FitResult(steps=step, epochs=step * config.grad_accum / micro_per_epoch, final_loss=final_loss,
                     history=log.train_rows(), eval_history=log.eval_rows(),
                     elapsed_s=elapsed0 + time.perf_counter() - t_start,
                     tokens_per_s=session_tokens / max(train_time, 1e-9), stopped=stopped,
                     checkpoint_dir=str(ckpt) if ckpt else None, total_steps=total_steps)


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
        _say(f"step {step} eval: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                               for k, v in metrics.items()))
    distributed.barrier()


# ----------------------------------------------------------------------------- small helpers

def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _check_type(name: str, value, annotation: str) -> None:
    """`value` against a field's annotation ("int", "float | None", ...): bool is not an int, 2.5 is not an
    int, and a float must be finite, so a typo fails here instead of steps later with an unrelated message."""
    kinds = [k.strip() for k in annotation.split("|")]
    if value is None:
        _check("None" in kinds, f"{name} must not be None")
        return
    if "bool" in kinds and isinstance(value, bool):
        return
    if "int" in kinds and isinstance(value, int) and not isinstance(value, bool):
        return
    if "float" in kinds and isinstance(value, (int, float)) and not isinstance(value, bool):
        _check(math.isfinite(value), f"{name} must be a finite number, got {value}")
        return
    if "str" in kinds and isinstance(value, str) or "os.PathLike" in kinds and isinstance(value, os.PathLike):
        return
    wanted = " or ".join(k for k in kinds if k != "None")
    raise ValueError(f"{name} must be {wanted}{' or None' if 'None' in kinds else ''}, got "
                     f"{type(value).__name__} {value!r}")


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


def _lengths(train_data: Sequence, config: TrainConfig, length_fn) -> list[int] | None:
    if config.group_by_length and length_fn is None:
        raise ValueError("group_by_length=True needs length_fn=... (e.g. lambda ex: len(ex['input_ids'])), "
                         "or set group_by_length=None/False")
    if length_fn is None or config.group_by_length is False:
        return None
    return [int(length_fn(example)) for example in train_data]


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


def _say(message: str) -> None:
    if distributed.is_main():
        tqdm.write(message)


__all__ = ["TrainConfig", "FitResult", "fit", "lr_multiplier", "epoch_batches", "MicroBatches", "save_checkpoint",
           "load_checkpoint", "latest_checkpoint", "rng_state", "set_rng_state", "seed_everything"]
