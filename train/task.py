"""Tasks: what a batch is and what the loss is, for classification with a causal LM, an encoder, and SQuAD.

Classification with a causal LM (ClassificationTask) is next-token prediction restricted to a verbalizer:
one label word per class, and the model's score for class c is the logit of the FIRST token of word c at the
answer position (the last prompt token). Only those C rows of the output embedding are ever multiplied:

    h      = backbone(prompt)[b, last_index[b]]          # (B, d)   the LM head is NOT run over all tokens
    W_lab  = lm_head.weight[label_ids]                   # (C, d)
    logits = softcap(h @ W_lab^T)                        # (B, C)   = full-vocab logits[:, label_ids], exactly
    loss   = cross_entropy(logits, y)                    # log_softmax over the C label words

which equals taking the full-vocabulary logits at the last position and renormalising over the label tokens
(tests/train/test_task.py checks the identity), at C/V of the head's cost: 2/49,152 for SmolLM2 on SST-2.

The prompt is the model's chat template when it has one (a short `system` message replaces a long default
one: on CPU every prompt token costs training time), else plain text. It is tokenized in three parts,
prefix + text + suffix, so that only the TEXT is truncated when the whole exceeds `max_length`; the
scaffold joins the text at a newline, where BPE never merges across the boundary. How the text is cut is
`keep`: "head" (the first `budget` tokens) or "head+tail" (the first quarter of the budget and the last three
quarters: the opening and the verdict of a long review; the best split in Sun et al. 2019, "How to Fine-Tune
BERT for Text Classification", 128 + 382 of 510 tokens).

    chat:  <template>[system] [user: instr\\n{shot}] [assistant: word] ... [user: instr\\n{text}] <gen prompt>
    plain: instr\\n\\n{shot}\\nAnswer: word\\n\\n ... {text}\\nAnswer:         (label words get a leading space)

SequenceClassificationTask: an encoder with a classification head (BERT), loss = CE of model(...).logits.
GenerationTask: SQuAD v2 as generation; loss only on the answer tokens (labels -100 on the prompt), the LM
head applied only at those positions; shared-context packing of a paragraph's questions (block mask); greedy
decoding with batched left padding through `model.generate`, scored for a calibrated abstain decision.
"""
from __future__ import annotations

import collections
import re
import warnings
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

IGNORE = -100
_QUOTED_ANSWER = re.compile(r'\bis:?\s+"([^"]+)"?')   # zero-shot habit: The answer to the question is: "1185"
_SAYS_NO_ANSWER = re.compile(r"(the (context|passage|text) does not|there is no (information|mention))", re.I)
_TEXT = "<<<TEXT>>>"  # placeholder the prompt is rendered with, then split at
_QUESTION = "<<<QUESTION>>>"


# ----------------------------------------------------------------------------------------------------------
# helpers shared by the tasks

def backbone(model: nn.Module) -> nn.Module:
    """The decoder stack without the LM head (LlamaModel inside LlamaForCausalLM, ...)."""
    if hasattr(model, "get_decoder"):
        dec = model.get_decoder()
        if dec is not None and dec is not model:
            return dec
    if isinstance(getattr(model, "model", None), nn.Module):
        return model.model
    raise TypeError(f"cannot find the backbone of {type(model).__name__} (no get_decoder() or .model)")


def hidden_states(model: nn.Module, batch: dict) -> torch.Tensor:
    """Last hidden states (B, T, d) of the backbone; HF output objects or tuples."""
    out = backbone(model)(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def softcap(logits: torch.Tensor, model: nn.Module) -> torch.Tensor:
    """Gemma-2 style final_logit_softcapping (cap * tanh(x / cap)) when the config has one."""
    config = model.config
    cap = getattr(config, "final_logit_softcapping", None)
    if cap is None and hasattr(config, "get_text_config"):
        cap = getattr(config.get_text_config(), "final_logit_softcapping", None)
    return logits if not cap else torch.tanh(logits / cap) * cap


def to_device(batch: dict, model: nn.Module) -> dict:
    device = next(model.parameters()).device
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _bos(tokenizer, rendered: str) -> list[int]:
    """[bos] when the tokenizer adds one by itself and the rendered prompt does not already start with it."""
    bos = tokenizer.bos_token
    if bos is None or rendered.startswith(bos):
        return []
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    return [tokenizer.bos_token_id] if probe[:1] == [tokenizer.bos_token_id] else []


KEEP = ("head", "head+tail")


def cut(ids: list[int], budget: int, keep: str = "head") -> list[int]:
    """`ids` cut to `budget` tokens: the head, or the first quarter + the last three quarters (see above)."""
    if len(ids) <= budget:
        return ids
    if keep == "head":
        return ids[:budget]
    head = budget // 4
    return ids[:head] + ids[len(ids) - (budget - head):]


# Batches are padded to a multiple of PAD_MULTIPLE tokens: fewer distinct shapes, so the allocator reuses freed
# activations and oneDNN its kernels. Measured over 120 QLoRA steps of the SST-2 recipe (SmolLM2, batch 16,
# 33-82 tokens): RSS 3.12-3.16 GB -> 2.78 GB at 4 (2.80 at 8, 2.96 at 16), 133-136 s -> 130 s; the encoder
# (all-MiniLM-L6, 400 steps of 32 phrases): 1.82 -> 1.51 GB (1.46 at 8, 4 s slower). Pads are masked, so the
# outputs at the real tokens equal the unpadded batch's to float rounding.
PAD_MULTIPLE = 4


def _pad_right(seqs: Sequence[Sequence[int]], value: int) -> torch.Tensor:
    T = -(-max(len(s) for s in seqs) // PAD_MULTIPLE) * PAD_MULTIPLE
    out = torch.full((len(seqs), T), value, dtype=torch.long)  # (B, T)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.as_tensor(s, dtype=torch.long)
    return out


class _Batched:
    """collate (dynamic right padding) and predict_proba shared by the two classification tasks."""

    n_truncated = 0

    def _warn_truncated(self, n_tokens: int, budget: int) -> None:
        self.n_truncated += 1
        if self.n_truncated == 1:
            warnings.warn(f"{type(self).__name__}: a text of {n_tokens} tokens was cut to {budget} to fit "
                          f"max_length={self.max_length}; further cuts are only counted (task.n_truncated)",
                          stacklevel=3)

    def collate(self, examples: Sequence[dict]) -> dict:
        """{input_ids (B, T), attention_mask (B, T), last_index (B,), labels (B,) if every example has one}."""
        ids = [ex["input_ids"] if "input_ids" in ex else self.encode(ex["text"]) for ex in examples]
        lengths = torch.tensor([len(s) for s in ids])  # (B,)
        batch = {"input_ids": _pad_right(ids, self.tokenizer.pad_token_id),
                 "attention_mask": _pad_right([[1] * len(s) for s in ids], 0),
                 "last_index": lengths - 1}
        if all("label" in ex for ex in examples):
            batch["labels"] = torch.tensor([int(ex["label"]) for ex in examples], dtype=torch.long)
        return batch

    def length(self, example: dict) -> int:
        return len(example["input_ids"]) if "input_ids" in example else len(self.encode(example["text"]))

    def loss(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
        """(mean cross-entropy over the batch, {"n_tokens": tokens processed})."""
        logits = self.label_logits(model, batch)  # (B, C)
        loss = F.cross_entropy(logits, batch["labels"].to(logits.device))
        return loss, {"n_tokens": int(batch["attention_mask"].sum())}

    @torch.no_grad()
    def predict_proba(self, model: nn.Module, texts: Sequence[str], batch_size: int = 32,
                      progress: bool = False) -> np.ndarray:
        """Class probabilities (N, C), in the order of `texts`; batches are formed longest first."""
        was_training, truncated_before = model.training, self.n_truncated
        model.eval()
        ids = [self.encode(t) for t in texts]
        order = np.argsort([-len(s) for s in ids], kind="stable")
        out = np.zeros((len(ids), self.num_classes), dtype=np.float32)
        starts = range(0, len(ids), batch_size)
        if progress:
            from tqdm.auto import tqdm
            starts = tqdm(starts, desc="predict", unit="batch")
        try:
            for start in starts:
                idx = order[start: start + batch_size]
                batch = self.collate([{"input_ids": ids[i]} for i in idx])
                out[idx] = self.label_logits(model, batch).softmax(-1).float().cpu().numpy()  # (b, C)
        finally:
            model.train(was_training)
        if self.n_truncated > truncated_before:
            warnings.warn(f"{self.n_truncated - truncated_before} of {len(ids)} texts were truncated to "
                          f"max_length={self.max_length}", stacklevel=2)
        return out


# ----------------------------------------------------------------------------------------------------------
# classification with a causal LM

class ClassificationTask(_Batched):
    """Verbalizer classification with a causal LM; see the module docstring."""

    def __init__(self, tokenizer, label_words: Sequence[str], *, instruction: str, system: str | None = None,
                 use_chat_template: bool | None = None, max_length: int = 256, few_shot: Sequence = (),
                 keep: str = "head"):
        if keep not in KEEP:
            raise ValueError(f"keep must be one of {KEEP} (which part of a long text to keep), got {keep!r}")
        if len(label_words) < 2:
            raise ValueError(f"need at least two label words, got {list(label_words)}")
        if use_chat_template and not has_chat_template(tokenizer):
            raise ValueError("use_chat_template=True but the tokenizer has no chat template")
        self.tokenizer, self.label_words = tokenizer, list(label_words)
        self.instruction, self.system, self.max_length, self.keep = instruction, system, max_length, keep
        self.use_chat_template = has_chat_template(tokenizer) if use_chat_template is None else use_chat_template
        self.few_shot = [(text, self._word(label)) for text, label in few_shot]
        self.prefix_ids, self.suffix_ids, suffix = self._scaffold()
        self.label_ids = self._label_ids(suffix)
        self.budget = max_length - len(self.prefix_ids) - len(self.suffix_ids)
        if self.budget < 1:
            raise ValueError(f"the prompt scaffold alone is {max_length - self.budget} tokens, over max_length="
                             f"{max_length}: raise max_length or shorten the instruction/system/few_shot")
        self.n_truncated = 0

    @property
    def num_classes(self) -> int:
        return len(self.label_words)

    def _word(self, label) -> str:
        return label if isinstance(label, str) else self.label_words[int(label)]

    def _scaffold(self) -> tuple[list[int], list[int], str]:
        """Renders the prompt around a placeholder; returns (prefix ids, suffix ids, suffix text)."""
        if self.use_chat_template:
            msgs = [{"role": "system", "content": self.system}] if self.system else []
            for text, word in self.few_shot:
                msgs += [{"role": "user", "content": f"{self.instruction}\n{text}"},
                         {"role": "assistant", "content": word}]
            msgs.append({"role": "user", "content": f"{self.instruction}\n{_TEXT}"})
            rendered = self.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        else:
            head = f"{self.system}\n\n" if self.system else ""
            shots = "".join(f"{text}\nAnswer: {word}\n\n" for text, word in self.few_shot)
            rendered = f"{head}{self.instruction}\n\n{shots}{_TEXT}\nAnswer:"
        if rendered.count(_TEXT) != 1:
            raise ValueError("the chat template lost or repeated the text placeholder; pass use_chat_template=False")
        prefix, suffix = rendered.split(_TEXT)
        return _bos(self.tokenizer, prefix) + _ids(self.tokenizer, prefix), _ids(self.tokenizer, suffix), suffix

    def _label_ids(self, suffix: str) -> list[int]:
        """First token of each label word as generated right after the prompt; must be distinct."""
        lead = "" if self.use_chat_template else " "
        n = len(self.suffix_ids)
        ids = []
        for word in self.label_words:
            joint = _ids(self.tokenizer, suffix + lead + word)
            if joint[:n] == self.suffix_ids and len(joint) > n:
                ids.append(joint[n])
            else:  # the word merged with the end of the prompt; its own first token is the best guess
                warnings.warn(f"label word {word!r} merges with the end of the prompt; using its own first token")
                ids.append(_ids(self.tokenizer, lead + word)[0])
        if len(set(ids)) != len(ids):
            tokens = {w: self.tokenizer.convert_ids_to_tokens(i) for w, i in zip(self.label_words, ids)}
            raise ValueError(f"label words must start with distinct tokens, got {tokens}; pick other words")
        return ids

    def encode(self, text: str) -> list[int]:
        """prefix + text (cut to the budget) + suffix; the label token is what should come next."""
        text_ids = _ids(self.tokenizer, text.strip())
        if len(text_ids) > self.budget:
            self._warn_truncated(len(text_ids), self.budget)
            text_ids = cut(text_ids, self.budget, self.keep)
        return self.prefix_ids + text_ids + self.suffix_ids

    def prompt(self, text: str) -> str:
        """The prompt as text (for reading; encode() is what the model sees)."""
        return self.tokenizer.decode(self.encode(text))

    def label_logits(self, model: nn.Module, batch: dict) -> torch.Tensor:
        """(B, C) logits of the label tokens at the answer position, fp32, without the full-vocab head."""
        batch = to_device(batch, model)
        h = hidden_states(model, batch)                                            # (B, T, d)
        rows = torch.arange(h.shape[0], device=h.device)
        h_last = h[rows, batch["last_index"]]                                      # (B, d)
        head = model.get_output_embeddings()
        label_ids = torch.tensor(self.label_ids, device=h.device)
        if type(head) is nn.Linear:  # a plain head (tied or not): gather C rows, never touch the other V - C
            w = head.weight[label_ids]                                             # (C, d)
            logits = h_last.float() @ w.float().T                                  # (B, C)
            if head.bias is not None:
                logits = logits + head.bias[label_ids].float()
        else:  # a wrapped head (LoRA, 4-bit): run it, at the B answer positions only
            logits = head(h_last)[:, label_ids].float()                            # (B, V) -> (B, C)
        return softcap(logits, model)


# ----------------------------------------------------------------------------------------------------------
# classification with an encoder

class SequenceClassificationTask(_Batched):
    """An encoder with a classification head (BERT): logits = model(...).logits (B, C)."""

    def __init__(self, tokenizer, num_labels: int, *, max_length: int = 256):
        self.tokenizer, self.num_classes, self.max_length = tokenizer, num_labels, max_length
        self.n_truncated = 0

    def encode(self, text: str) -> list[int]:
        ids = self.tokenizer(text.strip())["input_ids"]  # with [CLS] ... [SEP]
        if len(ids) > self.max_length:
            self._warn_truncated(len(ids), self.max_length)
            ids = self.tokenizer(text.strip(), truncation=True, max_length=self.max_length)["input_ids"]
        return ids

    def label_logits(self, model: nn.Module, batch: dict) -> torch.Tensor:
        batch = to_device(batch, model)
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()


# ----------------------------------------------------------------------------------------------------------
# SQuAD v2 as generation

class GenerationTask:
    """Extractive QA as generation: target = a gold span, or `unanswerable` for an impossible question.

    Prompt: [system] [user: instruction \\n Context:\\n {context} \\n Question: {q}] <generation prompt>. Only
    the context is ever cut to fit `max_length`: at test time it keeps its head (nothing else is known); in
    training, where the answer is known, a window of the same size around the answer, so that the label
    is always in the prompt. Loss: cross-entropy over the answer tokens and the end-of-turn token only.

    Shared-context packing (`pack`): SQuAD asks ~10 questions about each paragraph, so one training sequence
    holds the context once, then every question turn with its answer; a block mask lets turn k see the
    context and itself only, and its positions restart where the context ends:

        tokens     prefix + context | tail_1 answer_1 | tail_2 answer_2 | ...
        segment    0 ............ 0 | 1 ........... 1 | 2 ........... 2 |      (-1: padding)
        position   0 ........ C - 1 | C ...           | C ...           |
        key j visible to query i  iff  j <= i  and  seg[j] in {0, seg[i]}

    so each turn computes exactly what it would alone (tests/test_squad_example.py checks the loss), while the
    context's tokens are paid for once instead of once per question.

    Abstaining (`generate_scored`): at the first answer step the abstain string's first token is masked, so
    the greedy decode is always the best span; the log-probabilities of that span and of the abstain token
    come back and `decide` abstains greedily (the masked token was the argmax) or by a tuned threshold.
    """

    def __init__(self, tokenizer, *, instruction: str = ("Answer with a short span copied from the context. "
                                                         "If the context does not answer the question, reply "
                                                         "unanswerable."),
                 system: str | None = None, use_chat_template: bool | None = None, max_length: int = 512,
                 max_answer_tokens: int = 32, unanswerable: str = "unanswerable"):
        if use_chat_template and not has_chat_template(tokenizer):
            raise ValueError("use_chat_template=True but the tokenizer has no chat template")
        self.tokenizer, self.instruction, self.system = tokenizer, instruction, system
        self.max_length, self.max_answer_tokens, self.unanswerable = max_length, max_answer_tokens, unanswerable
        self.use_chat_template = has_chat_template(tokenizer) if use_chat_template is None else use_chat_template
        self.lead = "" if self.use_chat_template else " "   # the answer follows "Answer:" in plain prompts
        self.prefix, self.middle = self._scaffold()
        self.prefix_ids = _bos(tokenizer, self.prefix) + _ids(tokenizer, self.prefix)
        self.end_id = self._end_of_answer()
        self.abstain_id = _ids(tokenizer, self.lead + unanswerable)[0]
        self.n_truncated = 0

    def _scaffold(self) -> tuple[str, str]:
        """(text before the context, text after it with a {question} slot); the context is what gets cut."""
        user = f"{self.instruction}\nContext:\n{_TEXT}\nQuestion: {_QUESTION}"
        if self.use_chat_template:
            msgs = ([{"role": "system", "content": self.system}] if self.system else []) + \
                   [{"role": "user", "content": user}]
            rendered = self.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        else:
            rendered = (f"{self.system}\n\n" if self.system else "") + f"{user}\nAnswer:"
        prefix, middle = rendered.split(_TEXT)
        return prefix, middle

    def _end_of_answer(self) -> int:
        """The token that closes an answer: the template's end-of-turn (e.g. <|im_end|>), else EOS."""
        if self.use_chat_template:
            msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "ZQZ"}]
            after = self.tokenizer.apply_chat_template(msgs, tokenize=False).split("ZQZ", 1)[-1]
            ids = _ids(self.tokenizer, after.strip(" "))
            added = getattr(self.tokenizer, "added_tokens_decoder", {})
            if ids and (ids[0] in self.tokenizer.all_special_ids or getattr(added.get(ids[0]), "special", False)):
                return ids[0]
        return self.tokenizer.eos_token_id

    def target(self, example: dict) -> str:
        """The gold answer most annotators gave (ties: the shortest), or the abstain string."""
        answers = [a.strip() for a in example.get("answers", []) if a.strip()]
        if not answers or example.get("is_impossible"):
            return self.unanswerable
        counts = collections.Counter(answers)
        return min(counts, key=lambda a: (-counts[a], len(a)))

    def _span(self, example: dict) -> str | None:
        """The answer text that must stay in the context, None for an impossible question."""
        target = self.target(example)
        return None if target == self.unanswerable else target

    def _tail(self, example: dict) -> list[int]:
        return _ids(self.tokenizer, self.middle.replace(_QUESTION, example["question"].strip()))

    def _answer_ids(self, example: dict) -> list[int]:
        return _ids(self.tokenizer, self.lead + self.target(example))[: self.max_answer_tokens] + [self.end_id]

    def context_ids(self, example: dict, budget: int, answer: str | None = None) -> list[int]:
        """The context's ids cut to `budget`: its head, or the window centred on `answer` when the head lacks it."""
        text = example["context"].strip()
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=answer is not None)
        ids = enc["input_ids"]
        if len(ids) <= budget:
            return ids
        self._count_cut(budget)
        where = _token_span(enc["offset_mapping"], text, answer) if answer is not None else None
        if where is None or where[1] < budget:
            return ids[:budget]
        start = min(max(0, (where[0] + where[1] + 1 - budget) // 2), len(ids) - budget)
        return ids[start: start + budget]

    def _count_cut(self, budget: int) -> None:
        self.n_truncated += 1
        if self.n_truncated == 1:
            warnings.warn(f"GenerationTask: a context was cut to {budget} tokens to fit max_length="
                          f"{self.max_length}; further cuts are only counted (task.n_truncated)", stacklevel=3)

    def encode_prompt(self, example: dict, reserve: int = 0, answer: str | None = None) -> list[int]:
        """prefix + context (cut to fit max_length - reserve, keeping `answer` if given) + question turn."""
        tail = self._tail(example)
        budget = self.max_length - reserve - len(self.prefix_ids) - len(tail)
        if budget < 1:
            raise ValueError(f"max_length={self.max_length} leaves no room for the context; raise it")
        return self.prefix_ids + self.context_ids(example, budget, answer) + tail

    def encode(self, example: dict) -> dict:
        """{input_ids, labels}: labels are -100 on the prompt and the answer ids (+ end token) after it."""
        answer = self._answer_ids(example)
        prompt = self.encode_prompt(example, reserve=len(answer), answer=self._span(example))
        return {"input_ids": prompt + answer, "labels": [IGNORE] * len(prompt) + answer}

    def pack(self, examples: Sequence[dict]) -> list[dict]:
        """Questions about ONE context -> training sequences (see the class docstring): one with the head of
        the context and every question it answers, plus a windowed one per answer the head lost."""
        if len({ex["context"] for ex in examples}) != 1:
            raise ValueError("pack() takes the questions of one context: group the rows by context first")
        tails = [self._tail(ex) for ex in examples]
        budget = self.max_length - len(self.prefix_ids) - max(len(t) for t in tails)
        if budget < 1:
            raise ValueError(f"max_length={self.max_length} leaves no room for the context; raise it")
        text = examples[0]["context"].strip()
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        head, spilled = [], []
        for ex, tail in zip(examples, tails):
            span = self._span(ex)
            where = None if span is None else _token_span(enc["offset_mapping"], text, span)
            (spilled if where is not None and where[1] >= budget else head).append((ex, tail))
        if len(enc["input_ids"]) > budget:
            self._count_cut(budget)
        packed = [self._packed(enc["input_ids"][:budget], head)] if head else []
        return packed + [self._packed(self.context_ids(ex, budget, self._span(ex)), [(ex, tail)])
                         for ex, tail in spilled]

    def _packed(self, context: list[int], turns: list[tuple[dict, list[int]]]) -> dict:
        shared = self.prefix_ids + context
        ids, labels, segments = list(shared), [IGNORE] * len(shared), [0] * len(shared)
        positions = list(range(len(shared)))
        for k, (example, tail) in enumerate(turns, start=1):
            answer = self._answer_ids(example)
            ids += tail + answer
            labels += [IGNORE] * len(tail) + answer
            segments += [k] * (len(tail) + len(answer))
            positions += range(len(shared), len(shared) + len(tail) + len(answer))
        return {"input_ids": ids, "labels": labels, "segment_ids": segments, "position_ids": positions,
                "n_questions": len(turns)}

    def length(self, example: dict) -> int:
        return len(example["input_ids"]) if "input_ids" in example else len(self.encode(example)["input_ids"])

    def collate(self, examples: Sequence[dict]) -> dict:
        """Right-padded batch; packed sequences get position_ids and the (B, 1, T, T) block mask."""
        enc = [ex if "labels" in ex else self.encode(ex) for ex in examples]
        batch = {"input_ids": _pad_right([e["input_ids"] for e in enc], self.tokenizer.pad_token_id),  # (B, T)
                 "labels": _pad_right([e["labels"] for e in enc], IGNORE),
                 "n_tokens": sum(len(e["input_ids"]) for e in enc)}      # input tokens, padding excluded
        if not any("segment_ids" in e for e in enc):
            batch["attention_mask"] = _pad_right([[1] * len(e["input_ids"]) for e in enc], 0)
            return batch
        segments = _pad_right([e.get("segment_ids", [1] * len(e["input_ids"])) for e in enc], -1)     # (B, T)
        batch["position_ids"] = _pad_right([e.get("position_ids", list(range(len(e["input_ids"]))))
                                            for e in enc], 0)                                        # (B, T)
        batch["attention_mask"] = block_mask(segments)                                               # (B, 1, T, T)
        return batch

    def loss(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
        """Mean CE over the answer tokens; the LM head runs only where a label is, not over the prompt."""
        batch = to_device(batch, model)
        out = backbone(model)(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                              position_ids=batch.get("position_ids"), use_cache=False)
        h = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]   # (B, T, d)
        targets = batch["labels"][:, 1:]                                           # (B, T-1) token t+1 ...
        mask = targets != IGNORE
        h_sel = h[:, :-1][mask]                                                    # (N, d)   ... from state t
        logits = softcap(model.get_output_embeddings()(h_sel).float(), model)      # (N, V)
        return F.cross_entropy(logits, targets[mask]), {"n_tokens": batch["n_tokens"]}   # input tokens, as elsewhere

    @torch.no_grad()
    def generate(self, model: nn.Module, examples: Sequence[dict], max_new_tokens: int = 24,
                 batch_size: int = 16) -> list[str]:
        """Greedy answers, "" for an abstention."""
        return [self.decide(s) for s in self.generate_scored(model, examples, max_new_tokens, batch_size)]

    @torch.no_grad()
    def generate_scored(self, model: nn.Module, examples: Sequence[dict], max_new_tokens: int = 24,
                        batch_size: int = 16) -> list[dict]:
        """Per example {"answer": the greedy span with the abstain token masked at step 1, "logp_abstain",
        "logp_first" (the span's first token), "logp_answer" (span + end token)}; natural-log probabilities
        from the unmasked distribution. Batches are left-padded (KV cache, stop at end-of-turn/EOS) and
        formed longest first."""
        from transformers import GenerationConfig, LogitsProcessorList

        was_training = model.training
        model.eval()
        prompts = [self.encode_prompt(ex) for ex in examples]
        order = np.argsort([-len(p) for p in prompts], kind="stable")
        stop = sorted({self.end_id, self.tokenizer.eos_token_id} - {None})
        pad = self.tokenizer.pad_token_id
        config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop, pad_token_id=pad,
                                  return_dict_in_generate=True, output_logits=True)
        device = next(model.parameters()).device
        scored: list[dict] = [{}] * len(prompts)
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        hook = head.register_forward_pre_hook(_contiguous_input) if isinstance(head, nn.Module) else None
        try:
            for start in range(0, len(prompts), batch_size):
                idx = order[start: start + batch_size]
                width = max(len(prompts[i]) for i in idx)
                ids = torch.tensor([[pad] * (width - len(prompts[i])) + prompts[i] for i in idx])      # (b, T)
                mask = torch.tensor([[0] * (width - len(prompts[i])) + [1] * len(prompts[i]) for i in idx])
                first_step = LogitsProcessorList([_MaskAtStep(self.abstain_id, width)])
                out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                     generation_config=config, logits_processor=first_step)
                new = out.sequences[:, width:]                                                         # (b, n)
                logp = [step.float().log_softmax(-1) for step in out.logits]                           # n x (b, V)
                token_logp = torch.stack([lp.gather(1, new[:, t, None])[:, 0] for t, lp in enumerate(logp)], 1)
                abstain_logp = logp[0][:, self.abstain_id]                                             # (b,)
                for row, i in enumerate(idx):
                    scored[i] = self._score_row(new[row].tolist(), token_logp[row], abstain_logp[row], stop)
        finally:
            model.train(was_training)
            if hook is not None:
                hook.remove()
        return scored

    def _score_row(self, tokens: list[int], token_logp: torch.Tensor, logp_abstain: torch.Tensor, stop) -> dict:
        n = next((t for t, tok in enumerate(tokens) if tok in stop), len(tokens) - 1) + 1  # through the end token
        text = self.tokenizer.decode(tokens[:n], skip_special_tokens=True)
        return {"answer": self.extract_answer(text), "logp_abstain": float(logp_abstain),
                "logp_first": float(token_logp[0]), "logp_answer": float(token_logp[:n].sum())}

    @staticmethod
    def decide(scored: dict, threshold: float | None = None, by: str = "answer") -> str:
        """The prediction, "" to abstain. threshold None: greedy (the abstain token beat the span's first
        token); else abstain iff logp_abstain - logp_<by> > threshold, by in {"answer", "first"}."""
        if threshold is None:
            return "" if scored["logp_abstain"] > scored["logp_first"] else scored["answer"]
        return "" if scored["logp_abstain"] - scored[f"logp_{by}"] > threshold else scored["answer"]

    def extract_answer(self, generated: str) -> str:
        """First line, stripped of quotes and a final period; "" when it says `unanswerable` or that the
        context does not say (abstain). An untrained model's `The answer is: "X"` gives X."""
        text = generated.strip().split("\n")[0].strip()
        quoted = _QUOTED_ANSWER.search(text)
        text = (quoted.group(1) if quoted else text).strip().strip("\"'`").strip()
        text = text[:-1] if text.endswith(".") else text
        if text.lower().strip(" .!") == self.unanswerable.lower() or _SAYS_NO_ANSWER.match(text):
            return ""
        return text


def block_mask(segments: torch.Tensor) -> torch.Tensor:
    """(B, T) segment ids (0 shared, k >= 1 turn k, -1 padding) -> (B, 1, T, T) bool, True = may attend."""
    T = segments.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=segments.device).tril()           # (T, T) key <= query
    query, key = segments[:, :, None], segments[:, None, :]                              # (B, T, 1), (B, 1, T)
    allowed = causal & ((key == 0) | (key == query)) & (key >= 0)                        # (B, T, T)
    return (allowed | torch.eye(T, dtype=torch.bool, device=segments.device))[:, None]   # padding sees itself


def _token_span(offsets, text: str, answer: str) -> tuple[int, int] | None:
    """(first, last) token indices covering the first occurrence of `answer` in `text`, None if absent."""
    start = text.find(answer)
    if start < 0 or not answer:
        return None
    end = start + len(answer)
    covering = [i for i, (a, b) in enumerate(offsets) if b > start and a < end]
    return (covering[0], covering[-1]) if covering else None


def _contiguous_input(module: nn.Module, args: tuple) -> tuple:
    """Forward pre-hook for the LM head during generation: its input made contiguous.

    # Note: generate() runs the head on hidden[:, -1:, :] (b, 1, d), a view whose batch stride is T * d. For a
    # 3-D input and a 2-D weight that does NOT require grad (frozen by lora.inject), torch.matmul folds the
    # input to (b, d) for one mm only if that needs no copy, which its stride check denies here, so it runs a
    # bmm against the weight expanded to (b, d, V) and materialised: 32 x 640 x 262,144 bf16 = 10.7 GB copied
    # at each batch's first step for Gemma-3 (2/3 of its fine-tuned SQuAD evaluation time), 1.8 GB for
    # SmolLM2. A trainable head takes the mm path anyway. Copying the (b, 1, d) input costs b * d values."""
    return (args[0].contiguous(),) + tuple(args[1:])


class _MaskAtStep:
    """A logits processor: -inf for `token_id` at the first generated step (the prompt is `width` long)."""

    def __init__(self, token_id: int, width: int):
        self.token_id, self.width = token_id, width

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if input_ids.shape[1] == self.width:
            scores = scores.clone()
            scores[:, self.token_id] = float("-inf")
        return scores
