"""Time to 88% SST-2 dev accuracy: our recipe vs the usual PEFT recipe, each side in its own process.

    ours   train.recipe's defaults (ClassificationRecipe): train.load_model (its SDPA attention, bf16 attention
           over short sequences run in fp32), quant.quantize (NF4, double quant) + lora.inject (the adapter
           matmuls in bf16 from fp32 weights, the recipe's adapter_compute="base"), the
           label-word loss at the answer position (the head applied to the 2 label rows of the B last states),
           batches grouped by length (train.batches.epoch_batches) and padded to their own longest prompt; the
           recipe's dropout (off) and examples/sst2.py's gradient checkpointing (off: short prompts); under
           jemalloc, freed pages handed back at train.fit's log rows and after each evaluation, as the library's
           commands run.
    peer   what a PEFT QLoRA fine-tune usually looks like: transformers' BitsAndBytesConfig (NF4, double quant)
           + peft.get_peft_model (lora_dropout 0.05), gradient checkpointing on (prepare_model_for_kbit_training
           turns it on), random batches padded to the batch maximum, and the causal-LM loss over the answer
           tokens, i.e. the label word + end of turn after the prompt, labels -100 on the prompt: the model's own
           forward with `labels=`, so the full-vocabulary head runs at every position of every row.
    both   SmolLM2-135M in the recipe's compute dtype (bf16 on a CPU with avx512_bf16), the same chat prompt
           (examples/sst2.py's instruction, the recipe's system line), r, alpha, all linear layers, AdamW
           (lr, warmup, cosine over one epoch of --train-limit examples), batch size, clip 1.0, seed; the same loop
           (train.fit's order: lr schedule, loss, backward, clip, step, zero_grad) and the same evaluation:
           argmax over the label words at the answer position on the dev set (872 rows), every --eval-every steps.
`prepare_model_for_kbit_training` itself is not called: it would also cast norms, embeddings and head to fp32,
which only slows the peer down; --peer-dropout and --no-peer-grad-ckpt move the peer towards our recipe one
knob at a time.

A side stops at the first evaluation with accuracy >= --target, at the end of the epoch, or once its wall time
passes --cap-minutes. Reported per side: training time to the target (step times only, batching included,
evaluations excluded: they are the same code on both sides), wall time including evaluations and setup, steps,
the accuracy curve, peak RSS; and, since a side may never reach --target, the ratio of the training times to the
highest accuracy both sides reached (time_to_common_ratio). It takes long (up to 2 x the cap); a smoke run:

    python benchmarks/bench_task.py --cap-minutes 1 --eval-limit 64 --eval-every 5
    python benchmarks/bench_task.py                      # the real thing: ~1 h per side cap on a 2-core CPU
"""

import argparse
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from common import (environment, max_rss_bytes, pick_device, print_table, run_child, save_json, wait_until_idle,
                    write_child_result)

SIDES = ("peer", "ours")
INSTRUCTION = "Is the sentiment of this movie review negative or positive?"  # examples/sst2.py's
IGNORE = -100
COLUMNS = [("side", "side", "{}"), ("reached", "reached", "{}"), ("steps", "steps", "{}"),
           ("train_s", "train s to target", "{:.1f}"), ("wall_s", "wall s (evals, setup)", "{:.1f}"),
           ("step_s", "step s (median)", "{:.3f}"), ("pad_frac", "padding", "{:.1%}"),
           ("best_acc", "best acc", "{:.4f}"), ("last_acc", "last acc", "{:.4f}"),
           ("peak_rss_gb", "peak RSS GB", "{:.2f}"), ("stopped", "stopped", "{}"),
           ("time_vs_peer", "train time / peer", "{:.3f}")]


# ----------------------------------------------------------------------------------------------------------
# the two recipes (each builds a model and says how to batch and what the loss is)

def build_ours(recipe, dtype, task, args):
    import lora
    import quant
    import train

    model, _ = train.load_model(recipe.model, dtype=dtype)
    quant.quantize(model, blocksize=recipe.blocksize, double_quant=recipe.double_quant, compute_dtype=dtype,
                   backend=recipe.backend)
    lora.inject(model, r=recipe.r, alpha=recipe.alpha, dropout=recipe.dropout, targets=recipe.targets,
                use_rslora=recipe.use_rslora, compute_dtype=recipe.adapter_compute)
    if recipe.grad_checkpointing:
        train.enable_gradient_checkpointing(model)
    encode = lambda row: {"input_ids": task.encode(row["text"]), "label": int(row["label"])}  # noqa: E731
    info = {"dropout": recipe.dropout, "grad_checkpointing": recipe.grad_checkpointing, "group_by_length": True,
            "loss": "label-word CE at the answer position"}
    return model, encode, task.collate, task.loss, True, info


def build_peer(recipe, dtype, task, args):
    import peft
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from train.models import offline, resolve
    from train.tasks import GenerationTask

    folder, _ = resolve(recipe.model)
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                bnb_4bit_use_double_quant=recipe.double_quant, bnb_4bit_compute_dtype=dtype)
    with offline():
        model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=config, dtype=dtype,
                                                     device_map={"": "cpu"}, local_files_only=True)
    if args.peer_grad_ckpt:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = peft.get_peft_model(model, peft.LoraConfig(
        r=recipe.r, lora_alpha=recipe.alpha, lora_dropout=args.peer_dropout, target_modules=recipe.targets,
        use_rslora=recipe.use_rslora, task_type="CAUSAL_LM"))
    tokenizer = task.tokenizer
    end_id = GenerationTask(tokenizer, system=recipe.system).end_id   # the template's end of turn (<|im_end|>)
    answers = [_answer_ids(tokenizer, task, c) + [end_id] for c in range(task.num_classes)]

    def encode(row):
        prompt, answer = task.encode(row["text"]), answers[int(row["label"])]
        return {"input_ids": prompt + answer, "labels": [IGNORE] * len(prompt) + answer}

    def collate(examples):  # pad to the batch maximum, on the right
        width = max(len(e["input_ids"]) for e in examples)
        pad = lambda seq, value: seq + [value] * (width - len(seq))  # noqa: E731
        return {"input_ids": torch.tensor([pad(e["input_ids"], tokenizer.pad_token_id) for e in examples]),
                "attention_mask": torch.tensor([pad([1] * len(e["input_ids"]), 0) for e in examples]),
                "labels": torch.tensor([pad(e["labels"], IGNORE) for e in examples])}

    def loss_fn(model, batch):  # the model's own shifted CE, full-vocabulary logits at every position
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"],
                    use_cache=False)
        return out.loss, {}

    info = {"dropout": args.peer_dropout, "grad_checkpointing": args.peer_grad_ckpt, "group_by_length": False,
            "loss": "causal-LM CE over the answer tokens (full vocabulary)",
            "answer_tokens": [tokenizer.convert_ids_to_tokens(a) for a in answers]}
    return model, encode, collate, loss_fn, False, info


def _answer_ids(tokenizer, task, c):
    """The tokens of label word c as they follow the prompt (its first one is the task's label token)."""
    word = task.label_words[c] if task.use_chat_template else " " + task.label_words[c]
    ids = tokenizer(word, add_special_tokens=False)["input_ids"]
    return ids if ids[:1] == [task.label_ids[c]] else [task.label_ids[c]]


# ----------------------------------------------------------------------------------------------------------
# one side, in its own process: the shared loop

def child(args):
    from train import ClassificationTask, load_split, load_tokenizer
    from train.batches import epoch_batches
    from train.loop import TrainConfig, lr_multiplier, make_optimizer
    from train.memory import allocator, release_free_memory, run_under_jemalloc
    from train.recipe import ClassificationRecipe, pick_dtype

    if args.child == "ours":
        run_under_jemalloc()                 # as the library's commands run (train/memory.py)
    pick_device("cpu", args.threads)
    wall0 = time.perf_counter()
    recipe = ClassificationRecipe(out_dir="unused", grad_checkpointing=False)   # as examples/sst2.py runs it
    dtype = pick_dtype(recipe.dtype)
    torch.manual_seed(recipe.seed)
    task = ClassificationTask(load_tokenizer(recipe.model), list(recipe.label_words), instruction=INSTRUCTION,
                              system=recipe.system, max_length=recipe.max_length)
    build = build_ours if args.child == "ours" else build_peer
    model, encode, collate, loss_fn, grouped, info = build(recipe, dtype, task, args)
    info["allocator"] = allocator()
    train_rows = load_split("sst2", "train", limit=args.train_limit, seed=recipe.seed)
    dev_rows = load_split("sst2", "validation", limit=args.eval_limit, seed=recipe.seed)
    data = [encode(r) for r in train_rows]
    lengths = [len(d["input_ids"]) for d in data] if grouped else None
    batches = epoch_batches(len(data), recipe.batch_size, seed=recipe.seed, epoch=0, lengths=lengths)
    total = len(batches)
    warmup = int(recipe.warmup_ratio * total)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(model, TrainConfig(out_dir="unused", lr=recipe.lr, weight_decay=0.01,
                                                  loraplus_lr_ratio=args.loraplus_lr_ratio))
    info["loraplus_lr_ratio"] = args.loraplus_lr_ratio
    setup_s = time.perf_counter() - wall0
    print(f"[{args.child}] setup {setup_s:.1f} s; {total} steps of {recipe.batch_size}; {info}", flush=True)

    curve, step_times, tokens, padded = [], [], 0, 0
    train_s, stopped, reached = 0.0, "epoch", False
    model.train()
    for step, idx in enumerate(batches):
        t = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = recipe.lr * lr_multiplier(step, warmup_steps=warmup, total_steps=total) \
                * group.get("lr_scale", 1.0)                                  # LoRA+: B's group at ratio x lr
        batch = collate([data[i] for i in idx])
        loss, _ = loss_fn(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step_times.append(time.perf_counter() - t)
        train_s += step_times[-1]
        tokens += int(batch["attention_mask"].sum())
        padded += batch["attention_mask"].numel()
        if args.child == "ours" and (step + 1) % TrainConfig.log_every == 0:
            release_free_memory()            # as train.fit does at each log row (train/memory.py)
        if (step + 1) % args.eval_every == 0 or step + 1 == total:
            acc = evaluate(task, model, dev_rows)
            if args.child == "ours":
                release_free_memory()        # as train.recipe.evaluate does
            curve.append({"step": step + 1, "train_s": train_s, "wall_s": time.perf_counter() - wall0,
                          "loss": loss.item(), "accuracy": acc})
            print(f"[{args.child}] step {step + 1}: loss {loss.item():.4f}, dev accuracy {acc:.4f}, "
                  f"train {train_s:.0f} s, wall {time.perf_counter() - wall0:.0f} s", flush=True)
            if acc >= args.target:
                stopped, reached = "target", True
                break
        if time.perf_counter() - wall0 > 60 * args.cap_minutes:
            stopped = "cap"
            break
    result = {"side": args.child, "info": info, "reached": reached, "stopped": stopped, "steps": len(step_times),
              "total_steps": total, "train_s": train_s, "wall_s": time.perf_counter() - wall0, "setup_s": setup_s,
              "step_s": statistics.median(step_times), "tokens": tokens, "pad_frac": 1 - tokens / max(padded, 1),
              "curve": curve, "peak_rss": max_rss_bytes(), "n_dev": len(dev_rows), "n_train": len(data),
              "recipe": {k: getattr(recipe, k) for k in ("r", "alpha", "lr", "batch_size", "warmup_ratio",
                                                          "max_length", "seed")}}
    write_child_result(args.result_file, result)


def evaluate(task, model, rows):
    """Dev accuracy: argmax over the label words at the answer position (the same code on both sides)."""
    probs = task.predict_proba(model, [r["text"] for r in rows], batch_size=64)  # (N, C); eval() inside
    model.train()
    return float((probs.argmax(1) == [int(r["label"]) for r in rows]).mean())


# ----------------------------------------------------------------------------------------------------------
# the parent

def parent(args):
    results = {}
    for side in args.sides:
        print(f"--- {side}: until dev accuracy >= {args.target} or {args.cap_minutes:g} min", flush=True)
        argv = ["--child", side, "--cap-minutes", args.cap_minutes, "--eval-every", args.eval_every,
                "--target", args.target, "--train-limit", args.train_limit, "--threads", args.threads,
                "--peer-dropout", args.peer_dropout] + (["--no-peer-grad-ckpt"] if not args.peer_grad_ckpt else [])
        if args.eval_limit:
            argv += ["--eval-limit", args.eval_limit]
        if args.loraplus_lr_ratio is not None and side == "ours":
            argv += ["--loraplus-lr-ratio", args.loraplus_lr_ratio]
        busy = wait_until_idle(timeout_minutes=args.wait_idle)
        results[side] = run_child(Path(__file__).resolve(), argv)
        results[side]["others_busy_before"] = busy
    rows = []
    for side, r in results.items():
        accs = [c["accuracy"] for c in r["curve"]]
        row = {"side": side, "reached": r["reached"], "steps": r["steps"],
               "train_s": r["train_s"] if r["reached"] else None, "wall_s": r["wall_s"], "step_s": r["step_s"],
               "pad_frac": r["pad_frac"], "best_acc": max(accs, default=None),
               "last_acc": accs[-1] if accs else None, "peak_rss_gb": r["peak_rss"] / 1e9, "stopped": r["stopped"]}
        peer = results.get("peer")
        if side != "peer" and peer and r["reached"] and peer["reached"]:
            row["time_vs_peer"] = r["train_s"] / peer["train_s"]
        rows.append(row)
    n_dev = next(iter(results.values()))["n_dev"]
    print(f"\nSST-2, SmolLM2-135M: training time to dev accuracy >= {args.target} ({n_dev} dev rows, evaluated every "
          f"{args.eval_every} steps; cap {args.cap_minutes:g} min per side; {args.threads} threads)")
    print_table(rows, COLUMNS)
    ratios = {}
    ours, peer = results.get("ours"), results.get("peer")
    if ours and peer and ours["reached"] and peer["reached"]:
        ratios["time_to_target_ratio"] = ours["train_s"] / peer["train_s"]
    if ours and peer and (common := common_target(ours["curve"], peer["curve"])) is not None:
        (s_ours, t_ours), (s_peer, t_peer) = time_to(ours["curve"], common), time_to(peer["curve"], common)
        ratios.update(common_accuracy=common, time_to_common_ratio=t_ours / t_peer, common_steps=[s_ours, s_peer],
                      common_train_s=[t_ours, t_peer])
    save_json(args.out, environment(torch.device("cpu")), rows, args=vars(args), raw=results, ratios=ratios)
    if "time_to_target_ratio" in ratios:
        print(f"time_to_target_ratio={ratios['time_to_target_ratio']:.3f}")
    else:
        print("time_to_target_ratio=n/a (" + ", ".join(f"{s} {'reached' if r['reached'] else 'did not reach'}"
                                                       for s, r in results.items()) + f" {args.target})")
    if "time_to_common_ratio" in ratios:   # a number even where a side never reached --target
        print(f"time_to_common_ratio={ratios['time_to_common_ratio']:.3f} (dev accuracy >= {common:.4f}, the lower of "
              f"the two sides' best: ours {t_ours:.1f} s at step {s_ours}, peer {t_peer:.1f} s at step {s_peer})")


def time_to(curve, accuracy):
    """(step, training seconds) of the first evaluation at or above `accuracy`; None if there is none."""
    return next(((c["step"], c["train_s"]) for c in curve if c["accuracy"] >= accuracy), None)


def common_target(curve_a, curve_b):
    """The highest dev accuracy both sides reached (the lower of their two best); None if a curve is empty.

    Where one side never reaches --target, the time to this accuracy still gives a ratio, not a bound.
    """
    if not curve_a or not curve_b:
        return None
    return min(max(c["accuracy"] for c in curve_a), max(c["accuracy"] for c in curve_b))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cap-minutes", type=float, default=60.0, help="wall-time cap per side")
    ap.add_argument("--target", type=float, default=0.88, help="dev accuracy to reach")
    ap.add_argument("--eval-every", type=int, default=25, help="steps between dev evaluations")
    ap.add_argument("--eval-limit", type=int, default=None, help="evaluate on a seeded sample (smoke runs)")
    ap.add_argument("--train-limit", type=int, default=6000, help="training examples (one epoch; examples/sst2.py)")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU threads (default: all cores)")
    ap.add_argument("--sides", nargs="+", choices=SIDES, default=list(SIDES))
    ap.add_argument("--loraplus-lr-ratio", type=float, default=None,
                    help="LoRA+ on our side: lora_B at this ratio x lr (train.TrainConfig.loraplus_lr_ratio)")
    ap.add_argument("--peer-dropout", type=float, default=0.05, help="the peer's lora_dropout")
    ap.add_argument("--no-peer-grad-ckpt", dest="peer_grad_ckpt", action="store_false",
                    help="the peer without gradient checkpointing")
    ap.add_argument("--wait-idle", type=float, default=10.0,
                    help="minutes to wait before each side for the CPUs to be idle (others' work skews timings)")
    ap.add_argument("--out", default="bench_task", help="results/<out>.json")
    ap.add_argument("--child", choices=SIDES, help=argparse.SUPPRESS)
    ap.add_argument("--result-file", help=argparse.SUPPRESS)
    args = ap.parse_args()
    child(args) if args.child else parent(args)


if __name__ == "__main__":
    sys.exit(main())
