"""train.tasks: prompts, truncation, batching, and the label-word loss identity on tiny random models."""
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import train.tasks.common as task_mod
import train.tasks.generation as generation_mod
from train.tasks import IGNORE, ClassificationTask, GenerationTask, SequenceClassificationTask

WORDS = ("negative neutral positive classify the sentiment of this review text a great bad film movie was is "
         "boring loved it plot acting answer question context unanswerable where paris france capital in city "
         "who what Answer Context Question ! ? . , :").split()
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
INSTRUCTION = "classify the sentiment of this review :"
# fp32 on CPU: the two paths do the same matmuls in a different grouping; measured max diff ~1e-6
ATOL = 1e-5


def tiny_tokenizer(chat: bool = True):
    """A word-level tokenizer of < 64 tokens with a ChatML template (no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<eos>", "<|im_start|>", "<|im_end|>", "system", "user", "assistant"]
    vocab = {w: i for i, w in enumerate(specials + WORDS)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.add_special_tokens(["<pad>", "<unk>", "<eos>", "<|im_start|>", "<|im_end|>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>")
    if chat:
        tok.chat_template = CHATML
    return tok


def tiny_llama(vocab_size: int = 128, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=vocab_size, pad_token_id=0)
    return LlamaForCausalLM(config).eval()


def full_vocab_label_logits(model, batch, label_ids):
    """The reference: all-vocabulary logits at the last prompt position, restricted to the label tokens."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, T, V)
    last = logits[torch.arange(len(logits)), batch["last_index"]]                             # (B, V)
    return last[:, label_ids]                                                                  # (B, C)


def _report(a, b):
    d = (a - b).abs()
    return f"max diff {d.max().item():.3g}, mean diff {d.mean().item():.3g}"


EXAMPLES = [{"text": "a great film , loved it !", "label": 2}, {"text": "boring", "label": 0},
            {"text": "the plot was bad but the acting is great", "label": 1}]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def task(tok):
    return ClassificationTask(tok, ["negative", "neutral", "positive"], instruction=INSTRUCTION, system="classify")


# ----------------------------------------------------------------------------------------------------------
# the identity: label-word logits/loss == full-vocabulary logits at the answer position, restricted

def test_label_logits_equal_full_vocabulary_logits(task):
    model = tiny_llama()
    batch = task.collate(EXAMPLES)
    with torch.no_grad():
        ours, ref = task.label_logits(model, batch), full_vocab_label_logits(model, batch, task.label_ids)
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=0, msg=lambda _: _report(ours, ref))


def test_loss_and_gradients_equal_full_vocabulary_cross_entropy(task):
    model = tiny_llama()
    batch = task.collate(EXAMPLES)
    loss, info = task.loss(model, batch)
    ref = F.cross_entropy(full_vocab_label_logits(model, batch, task.label_ids), batch["labels"])
    assert loss.item() == pytest.approx(ref.item(), abs=ATOL)
    assert info["n_tokens"] == int(batch["attention_mask"].sum())
    g_ours = torch.autograd.grad(loss, model.model.layers[0].mlp.up_proj.weight)[0]
    g_ref = torch.autograd.grad(ref, model.model.layers[0].mlp.up_proj.weight)[0]
    torch.testing.assert_close(g_ours, g_ref, atol=ATOL, rtol=1e-4, msg=lambda _: _report(g_ours, g_ref))


def test_right_padding_does_not_change_an_example(task):
    model = tiny_llama()
    with torch.no_grad():
        batched = task.label_logits(model, task.collate(EXAMPLES))                      # (3, C)
        alone = torch.cat([task.label_logits(model, task.collate([e])) for e in EXAMPLES])
    torch.testing.assert_close(batched, alone, atol=ATOL, rtol=0, msg=lambda _: _report(batched, alone))


@pytest.mark.parametrize("multiple", [4, 8])
@pytest.mark.parametrize("kind", ["causal", "encoder"])
def test_padding_to_a_multiple_leaves_the_scores_unchanged(task, kind, multiple, monkeypatch):
    from tiny import tiny_bert

    if kind == "causal":
        model, t = tiny_llama(), task
    else:
        model, t = tiny_bert(), SequenceClassificationTask(tiny_tokenizer(), 3, max_length=64)
    rows = [{"input_ids": t.encode(e["text"])} for e in EXAMPLES]
    monkeypatch.setattr(task_mod, "PAD_MULTIPLE", 1)
    exact = t.collate(rows)
    monkeypatch.setattr(task_mod, "PAD_MULTIPLE", multiple)
    padded = t.collate(rows)
    assert padded["input_ids"].shape[1] % multiple == 0 and padded["input_ids"].shape[1] >= exact["input_ids"].shape[1]
    with torch.no_grad():
        a, b = t.label_logits(model, exact), t.label_logits(model, padded)                     # (3, C)
    torch.testing.assert_close(b, a, atol=ATOL, rtol=0, msg=lambda _: _report(b, a))


def test_final_logit_softcapping_is_applied():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    config = Gemma3TextConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=1, head_dim=16, vocab_size=128, final_logit_softcapping=0.5,
                              sliding_window=8, pad_token_id=0)
    model = Gemma3ForCausalLM(config).eval()
    task = ClassificationTask(tiny_tokenizer(), ["negative", "positive"], instruction=INSTRUCTION)
    batch = task.collate(EXAMPLES[:2])
    with torch.no_grad():
        ours, ref = task.label_logits(model, batch), full_vocab_label_logits(model, batch, task.label_ids)
    assert ours.abs().max() <= 0.5  # capped
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=0, msg=lambda _: _report(ours, ref))


def test_a_wrapped_head_is_run_at_the_answer_positions(task):
    class Wrapped(nn.Module):  # e.g. a LoRA or 4-bit head: not a plain nn.Linear
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x) * 2.0

    model = tiny_llama()
    batch = task.collate(EXAMPLES)
    with torch.no_grad():
        ref = full_vocab_label_logits(model, batch, task.label_ids) * 2.0
        model.lm_head = Wrapped(model.lm_head)
        ours = task.label_logits(model, batch)
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=0)


# ----------------------------------------------------------------------------------------------------------
# prompts, verbalizer, truncation, batching

def test_chat_prompt_has_system_instruction_text_and_generation_prompt(tok, task):
    prompt = task.prompt("a great film")
    assert prompt.startswith("<|im_start|> system classify <|im_end|>")
    assert "<|im_start|> user classify the sentiment of this review : a great film <|im_end|>" in prompt
    assert prompt.endswith("<|im_start|> assistant")
    assert task.label_ids == tok.convert_tokens_to_ids(["negative", "neutral", "positive"])


def test_plain_prompt_and_few_shot(tok):
    task = ClassificationTask(tok, ["negative", "positive"], instruction=INSTRUCTION, use_chat_template=False,
                              few_shot=[("boring", 0), ("loved it", "positive")])
    assert task.prompt("great") == ("classify the sentiment of this review : boring Answer : negative "
                                    "loved it Answer : positive great Answer :")
    chat = ClassificationTask(tok, ["negative", "positive"], instruction=INSTRUCTION, few_shot=[("boring", 0)])
    assert "boring <|im_end|> <|im_start|> assistant negative <|im_end|>" in chat.prompt("great")


def test_no_chat_template_means_plain_text():
    plain_tok = tiny_tokenizer(chat=False)
    assert not ClassificationTask(plain_tok, ["negative", "positive"], instruction="classify").use_chat_template
    with pytest.raises(ValueError, match="no chat template"):
        ClassificationTask(plain_tok, ["negative", "positive"], instruction="classify", use_chat_template=True)


def test_label_words_must_start_with_distinct_tokens(tok):
    with pytest.raises(ValueError, match="distinct"):
        ClassificationTask(tok, ["great", "great film"], instruction=INSTRUCTION)


def test_truncation_cuts_only_the_text_and_warns_once(tok):
    task = ClassificationTask(tok, ["negative", "positive"], instruction=INSTRUCTION, max_length=20)
    scaffold = len(task.prefix_ids) + len(task.suffix_ids)
    long_text = " ".join(["great film"] * 30)
    with pytest.warns(UserWarning, match="cut") as record:
        ids = task.encode(long_text)
        task.encode(long_text)
    assert len(record) == 1 and task.n_truncated == 2
    assert len(ids) == 20 and ids[: len(task.prefix_ids)] == task.prefix_ids
    assert ids[-len(task.suffix_ids):] == task.suffix_ids and 20 - scaffold == task.budget
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(task.encode("great")) == scaffold + 1  # short texts are untouched, silently


def test_scaffold_longer_than_max_length_is_an_error(tok):
    with pytest.raises(ValueError, match="max_length"):
        ClassificationTask(tok, ["negative", "positive"], instruction=INSTRUCTION, max_length=8)


def test_collate_pads_right_to_the_batch_max(task, tok):
    batch = task.collate(EXAMPLES[:2])
    lengths = [len(task.encode(e["text"])) for e in EXAMPLES[:2]]
    width = -(-max(lengths) // task_mod.PAD_MULTIPLE) * task_mod.PAD_MULTIPLE      # rounded up to the multiple
    assert batch["input_ids"].shape == (2, width) and width - max(lengths) < task_mod.PAD_MULTIPLE
    assert batch["attention_mask"].sum(1).tolist() == lengths
    assert batch["last_index"].tolist() == [n - 1 for n in lengths]
    assert batch["labels"].tolist() == [2, 0]
    assert batch["input_ids"][1, lengths[1]:].eq(tok.pad_token_id).all()
    pre = task.collate([{"input_ids": task.encode("boring"), "label": 0}])  # pre-encoded rows work too
    ids = task.encode("boring")
    assert pre["input_ids"][0, :len(ids)].tolist() == ids and pre["attention_mask"].sum().item() == len(ids)
    assert task.length(EXAMPLES[1]) == lengths[1]


def test_predict_proba_restores_order_and_mode(task):
    model = tiny_llama().train()
    texts = [e["text"] for e in EXAMPLES] + ["great"]
    probs = task.predict_proba(model, texts, batch_size=2)
    assert model.training  # restored
    assert probs.shape == (4, 3) and np.allclose(probs.sum(1), 1, atol=1e-5)
    model.eval()
    with torch.no_grad():
        one_by_one = np.stack([task.label_logits(model, task.collate([{"text": t}])).softmax(-1)[0].numpy()
                               for t in texts])
    np.testing.assert_allclose(probs, one_by_one, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------
# encoder classification

def test_sequence_classification_task_loss_is_ce_of_the_head(tok):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=1,
                                                     num_attention_heads=2, intermediate_size=64,
                                                     num_labels=3)).eval()
    task = SequenceClassificationTask(tok, 3, max_length=4)
    with pytest.warns(UserWarning, match="cut"):
        batch = task.collate(EXAMPLES)
    assert batch["input_ids"].shape[1] == 4 and task.n_truncated == 2
    loss, _ = task.loss(model, batch)
    ref = F.cross_entropy(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                          batch["labels"])
    assert loss.item() == pytest.approx(ref.item(), abs=1e-6)
    assert task.predict_proba(model, ["great", "bad film"]).shape == (2, 3)


# ----------------------------------------------------------------------------------------------------------
# SQuAD as generation

QA = [{"id": "1", "context": "paris is the capital of france .", "question": "what is the capital of france ?",
       "answers": ["paris"], "is_impossible": False},
      {"id": "2", "context": "the film was boring .", "question": "who loved it ?", "answers": [],
       "is_impossible": True}]


def test_generation_labels_cover_only_the_answer(tok):
    task = GenerationTask(tok)
    enc = task.encode(QA[0])
    n_answer = sum(l != IGNORE for l in enc["labels"])
    assert n_answer == 2  # "paris" + <|im_end|>
    assert enc["labels"][-2:] == enc["input_ids"][-2:] == [tok.convert_tokens_to_ids("paris"), task.end_id]
    assert task.end_id == tok.convert_tokens_to_ids("<|im_end|>")
    assert task.target(QA[1]) == "unanswerable"
    assert "Question : who loved it ?" in tok.decode(task.encode_prompt(QA[1]))


def test_generation_loss_equals_hf_shifted_cross_entropy(tok):
    model = tiny_llama()
    task = GenerationTask(tok)
    batch = task.collate(QA)
    loss, info = task.loss(model, batch)
    ref = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    assert loss.item() == pytest.approx(ref.item(), abs=ATOL)
    assert info["n_tokens"] == sum(len(task.encode(ex)["input_ids"]) for ex in QA)   # input tokens, no padding


def test_generation_context_is_truncated_not_the_question(tok):
    task = GenerationTask(tok, max_length=60)
    long = dict(QA[0], context=" ".join(["the film was boring ."] * 40))
    with pytest.warns(UserWarning, match="context was cut"):
        enc = task.encode(long)
    assert len(enc["input_ids"]) == 60
    assert "Question : what is the capital of france ?" in tok.decode(enc["input_ids"])


def test_batched_left_padded_generation_matches_one_by_one(tok):
    model = tiny_llama(seed=1)
    task = GenerationTask(tok)
    batched = task.generate(model, QA, max_new_tokens=5, batch_size=2)
    single = [task.generate(model, [q], max_new_tokens=5)[0] for q in QA]
    assert batched == single and all(isinstance(a, str) for a in batched)


def test_generation_feeds_a_frozen_head_a_contiguous_input(tok, monkeypatch):
    # generate() runs the head on hidden[:, -1:, :]; with a frozen head torch.matmul would then expand and copy
    # the (V, d) weight per row (bmm) instead of one mm: generate_scored hands it a contiguous (b, 1, d) input.
    model = tiny_llama(seed=1)
    for p in model.parameters():
        p.requires_grad_(False)                                  # as after lora.inject
    head = model.get_output_embeddings()
    seen = []
    probe = head.register_forward_hook(lambda m, args, out: seen.append((args[0].shape, args[0].is_contiguous())))
    task = GenerationTask(tok)
    scored = task.generate_scored(model, QA, max_new_tokens=3, batch_size=2)
    probe.remove()
    assert seen and all(contiguous for _, contiguous in seen) and seen[0][0][0] == 2
    assert not head._forward_pre_hooks                           # removed again
    monkeypatch.setattr(generation_mod, "_contiguous_input", lambda m, args: args)   # the same run, no copy
    seen.clear()
    probe = head.register_forward_hook(lambda m, args, out: seen.append(args[0].is_contiguous()))
    assert task.generate_scored(model, QA, max_new_tokens=3, batch_size=2) == scored
    probe.remove()
    assert not seen[0]                                           # what generate() hands the head by itself


def test_generation_scores_equal_a_teacher_forced_pass(tok):
    # the scores kept step by step (no (b, V) logits stored) against the model re-run on prompt + answer
    model = tiny_llama(seed=2)
    task = GenerationTask(tok)
    scored = task.generate_scored(model, QA, max_new_tokens=5, batch_size=2)     # left-padded batch of two
    for example, got in zip(QA, scored):
        prompt = task.encode_prompt(example)
        alone = task.generate_scored(model, [example], max_new_tokens=5, batch_size=1)[0]
        with torch.no_grad():
            masked = model(torch.tensor([prompt])).logits[0, -1].float()
        masked[task.abstain_id] = float("-inf")                    # greedy's first step never abstains
        first = int(masked.argmax())
        with torch.no_grad():
            logp = model(torch.tensor([prompt + [first]])).logits[0].float().log_softmax(-1)    # (T + 1, V)
        assert got["logp_abstain"] == pytest.approx(float(logp[len(prompt) - 1, task.abstain_id]), abs=1e-4)
        assert got["logp_first"] == pytest.approx(float(logp[len(prompt) - 1, first]), abs=1e-4)
        assert alone["logp_first"] == pytest.approx(got["logp_first"], abs=1e-4)
        assert alone["answer"] == got["answer"]


@pytest.mark.parametrize("generated, expected", [
    ("Paris.", "Paris"), ("  \"the Normans\"\nmore text", "the Normans"), ("unanswerable", ""),
    ("Unanswerable.", ""), ("", "")], ids=["period", "quotes+newline", "abstain", "abstain-case", "empty"])
def test_extract_answer(tok, generated, expected):
    assert GenerationTask(tok).extract_answer(generated) == expected


# ----------------------------------------------------------------------------------------------------------
# the real SmolLM2 tokenizer (tokenizer only: no weights are run)

SST2_LIKE = ["it 's a charming and often affecting journey . ",
             "unflinchingly bleak and desperate ",
             "the acting , costumes , music , cinematography and sound are all astounding given the production 's "
             "austere locales ."]


@pytest.mark.real
def test_smollm2_prompt_tokenizes_like_the_whole_string(smol_tok):
    # the recipe's default prompt (train/recipe.py): best zero-shot of the variants tried on SST-2 dev
    task = ClassificationTask(smol_tok, ["negative", "positive"], system="You are a sentiment classifier.",
                              instruction="Classify the sentiment of the text.")
    assert smol_tok.convert_ids_to_tokens(task.label_ids) == ["negative", "positive"]
    for text in SST2_LIKE:
        ids = task.encode(text)
        whole = smol_tok.decode(ids)
        assert whole.startswith("<|im_start|>system\nYou are a sentiment classifier.<|im_end|>\n<|im_start|>user\n")
        assert whole.endswith(f"{text.strip()}<|im_end|>\n<|im_start|>assistant\n")
        assert smol_tok(whole, add_special_tokens=False)["input_ids"] == ids  # split == joint tokenization
    assert len(task.prefix_ids) + len(task.suffix_ids) == 29  # the scaffold every example pays for


@pytest.mark.real
def test_loss_identity_with_the_smollm2_tokenizer(smol_tok):
    model = tiny_llama(vocab_size=len(smol_tok))
    task = ClassificationTask(smol_tok, ["negative", "positive"], system="You are a sentiment classifier.",
                              instruction="Is the sentiment of this movie review negative or positive?")
    batch = task.collate([{"text": t, "label": i % 2} for i, t in enumerate(SST2_LIKE)])
    loss, _ = task.loss(model, batch)
    ref = F.cross_entropy(full_vocab_label_logits(model, batch, task.label_ids), batch["labels"])
    assert loss.item() == pytest.approx(ref.item(), abs=ATOL)


# ---------------------------------------------------------------------------- the chunked LM-head loss

@pytest.mark.parametrize("n", [1, 7, 50])
@pytest.mark.parametrize("chunk_rows", [1, 3, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_cross_entropy_equals_the_dense_loss_and_grads(n, chunk_rows, dtype):
    from tiny import tiny_gemma3

    model = tiny_gemma3().to(dtype)
    model.config.final_logit_softcapping = 30.0                  # the softcap is applied per chunk too
    vocab, d = model.get_output_embeddings().weight.shape
    torch.manual_seed(n)
    h = torch.randn(n, d, dtype=dtype, requires_grad=True)
    targets = torch.randint(0, vocab, (n,))
    dense = F.cross_entropy(task_mod.softcap(model.get_output_embeddings()(h).float(), model), targets)
    (g_dense,) = torch.autograd.grad(dense, h)
    chunked = task_mod.chunked_cross_entropy(h, targets, model, chunk_bytes=chunk_rows * 4 * vocab)
    (g_chunked,) = torch.autograd.grad(chunked, h)
    assert abs(chunked.item() - dense.item()) <= 1e-6 * abs(dense.item())      # fp32 sums in another order
    tol = 1e-6 if dtype == torch.float32 else 2**-8                            # bf16: one rounding of dL/dh
    assert (g_chunked.float() - g_dense.float()).abs().max() <= tol * g_dense.float().abs().max()


def test_chunked_cross_entropy_keeps_one_chunk_of_logits_alive():
    from tiny import tiny_gemma3

    model = tiny_gemma3()
    vocab, d = model.get_output_embeddings().weight.shape
    h = torch.randn(64, d, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        loss = task_mod.chunked_cross_entropy(h, torch.randint(0, vocab, (64,)), model, chunk_bytes=8 * 4 * vocab)
    assert max(saved) < 64 * vocab                 # no (64, V) tensor kept for the backward
    loss.backward()
    assert h.grad.shape == h.shape


def test_chunked_cross_entropy_over_every_position_is_the_models_own_lm_loss():
    from tiny import tiny_gemma3

    model = tiny_gemma3()
    ids = torch.randint(0, 128, (3, 11), generator=torch.Generator().manual_seed(0))
    want = model(input_ids=ids, labels=ids).loss
    h = task_mod.hidden_states(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    got = task_mod.chunked_cross_entropy(h[:, :-1].reshape(-1, h.shape[-1]), ids[:, 1:].reshape(-1), model,
                                         chunk_bytes=5 * 4 * 128)
    assert abs(got.item() - want.item()) <= 1e-5 * want.item()


# ----------------------------------------------------------------------------------------------------------
# the shared prompt prefix: the rows packed behind one copy of it

def tiny_decoder(kind: str, seed: int = 0):
    """A 2-layer decoder of each family the shared prefix is enabled for (SHARED_PREFIX_MODELS)."""
    import transformers as tf

    torch.manual_seed(seed)
    common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=128)
    config, cls = {"llama": (tf.LlamaConfig, tf.LlamaForCausalLM), "mistral": (tf.MistralConfig, tf.MistralForCausalLM),
                   "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM), "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM),
                   "gemma3_text": (tf.Gemma3TextConfig, tf.Gemma3ForCausalLM)}[kind]
    extra = {"head_dim": 16} if kind in ("gemma3_text", "qwen3") else {}
    model = cls(config(**common, **extra))
    assert model.config.model_type == kind
    return model


def tokens_seen(model, fn):
    """(result of fn(), how many token positions went through the embedding)."""
    seen = []
    handle = model.get_input_embeddings().register_forward_hook(lambda m, i, o: seen.append(i[0].numel()))
    try:
        return fn(), sum(seen)
    finally:
        handle.remove()


@pytest.mark.parametrize("kind", task_mod.SHARED_PREFIX_MODELS)
@pytest.mark.parametrize("pack_tokens, checkpointing", [(384, False), (20, True)])
def test_shared_prefix_gives_the_full_forwards_logits_and_gradients(tok, kind, pack_tokens, checkpointing,
                                                                      monkeypatch):
    """Packed behind one prefix (in one sequence, or one per row with a tiny PACK_TOKENS, under gradient
    checkpointing): the loss, every gradient and the eval logits equal the padded full forward's."""
    from train.checkpointing import enable_gradient_checkpointing

    monkeypatch.setattr(task_mod, "PACK_TOKENS", pack_tokens)
    monkeypatch.setattr(task_mod, "MAX_PACKED_FRACTION", 2.0)       # one row a sequence saves nothing: pack anyway
    task = ClassificationTask(tok, ["negative", "neutral", "positive"], instruction=INSTRUCTION, system="classify")
    model = tiny_decoder(kind).train()
    if checkpointing:
        enable_gradient_checkpointing(model)
    batch = task.collate(EXAMPLES)
    P = len(task.prefix_ids)
    lengths = (batch["last_index"] + 1).tolist()
    assert task_mod.shared_prefix_length(model, batch, task.prefix_ids) == P >= task_mod.MIN_SHARED_PREFIX
    results = {}
    for share in (True, False):
        task.share_prefix = share
        (loss, _), n = tokens_seen(model, lambda: task.loss(model, batch))
        grads = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad], allow_unused=True)
        results[share] = (loss, grads, n)
    task.share_prefix = True
    up = lambda n: -(-n // task_mod.PACK_MULTIPLE) * task_mod.PACK_MULTIPLE        # noqa: E731
    packed = up(P + sum(L - P for L in lengths)) if pack_tokens == 384 else len(lengths) * up(max(lengths))
    assert results[True][2] == packed and results[False][2] == batch["input_ids"].numel()
    assert results[True][0].item() == pytest.approx(results[False][0].item(), abs=ATOL)
    for g_shared, g_full in zip(results[True][1], results[False][1]):
        if g_full is None:
            assert g_shared is None or not g_shared.any()
            continue
        torch.testing.assert_close(g_shared, g_full, atol=ATOL, rtol=1e-4, msg=lambda _: _report(g_shared, g_full))
    with torch.no_grad():
        model.eval()
        torch.testing.assert_close(task.label_logits(model, batch),
                                   full_vocab_label_logits(model, batch, task.label_ids), atol=ATOL, rtol=0)


def test_shared_prefix_is_skipped_where_it_cannot_apply(task, monkeypatch):
    import transformers

    model = tiny_llama().train()
    batch = task.collate(EXAMPLES)
    P = len(task.prefix_ids)
    assert task_mod.shared_prefix_length(model, batch, task.prefix_ids) == P
    one_row = task.collate(EXAMPLES[:1])
    assert task_mod.shared_prefix_length(model, one_row, task.prefix_ids) == 0          # nothing to share
    other = dict(batch, input_ids=batch["input_ids"].clone())
    other["input_ids"][1, 2] += 1
    assert task_mod.shared_prefix_length(model, other, task.prefix_ids) == 0            # a row starts otherwise
    packed = P + int((batch["last_index"] + 1 - P).sum())                    # 39 (48 padded) of 3 x 28 tokens
    monkeypatch.setattr(task_mod, "MAX_PACKED_FRACTION", 0.99 * packed / batch["input_ids"].numel())
    assert task_mod.shared_prefix_length(model, batch, task.prefix_ids) == 0            # too little saved
    monkeypatch.undo()
    model.config._attn_implementation = "eager"                                         # wants an additive mask
    assert task_mod.shared_prefix_length(model, batch, task.prefix_ids) == 0
    gemma = tiny_decoder("gemma3_text")
    gemma.config.sliding_window = int(batch["last_index"].max())                        # a row outgrows the window
    assert task_mod.shared_prefix_length(gemma, batch, task.prefix_ids) == 0
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=128))
    assert task_mod.shared_prefix_length(gpt2, batch, task.prefix_ids) == 0             # not a listed family
