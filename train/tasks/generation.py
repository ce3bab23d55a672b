"""SQuAD v2 as generation: loss only on the answer tokens (labels -100 on the prompt), the LM head applied
only at those positions; shared-context packing of a paragraph's questions (block mask); greedy decoding with
batched left padding through `model.generate`, scored for a calibrated abstain decision (GenerationTask's
docstring has the details).
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

from .common import (TEXT_SLOT, backbone, bos_ids, chunked_cross_entropy, has_chat_template, pad_right,
                     to_device, token_ids)

IGNORE = -100
_QUOTED_ANSWER = re.compile(r'\bis:?\s+"([^"]+)"?')   # zero-shot habit: The answer to the question is: "1185"
_SAYS_NO_ANSWER = re.compile(r"(the (context|passage|text) does not|there is no (information|mention))", re.I)
_QUESTION = "<<<QUESTION>>>"


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
        self.prefix_ids = bos_ids(tokenizer, self.prefix) + token_ids(tokenizer, self.prefix)
        self.end_id = self._end_of_answer()
        self.abstain_id = token_ids(tokenizer, self.lead + unanswerable)[0]
        self.n_truncated = 0

    def _scaffold(self) -> tuple[str, str]:
        """(text before the context, text after it with a {question} slot); the context is what gets cut."""
        user = f"{self.instruction}\nContext:\n{TEXT_SLOT}\nQuestion: {_QUESTION}"
        if self.use_chat_template:
            msgs = ([{"role": "system", "content": self.system}] if self.system else []) + \
                   [{"role": "user", "content": user}]
            rendered = self.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        else:
            rendered = (f"{self.system}\n\n" if self.system else "") + f"{user}\nAnswer:"
        prefix, middle = rendered.split(TEXT_SLOT)
        return prefix, middle

    def _end_of_answer(self) -> int:
        """The token that closes an answer: the template's end-of-turn (e.g. <|im_end|>), else EOS."""
        if self.use_chat_template:
            msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "ZQZ"}]
            after = self.tokenizer.apply_chat_template(msgs, tokenize=False).split("ZQZ", 1)[-1]
            ids = token_ids(self.tokenizer, after.strip(" "))
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
        return token_ids(self.tokenizer, self.middle.replace(_QUESTION, example["question"].strip()))

    def _answer_ids(self, example: dict) -> list[int]:
        return token_ids(self.tokenizer, self.lead + self.target(example))[: self.max_answer_tokens] + [self.end_id]

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
        batch = {"input_ids": pad_right([e["input_ids"] for e in enc], self.tokenizer.pad_token_id),  # (B, T)
                 "labels": pad_right([e["labels"] for e in enc], IGNORE),
                 "n_tokens": sum(len(e["input_ids"]) for e in enc)}      # input tokens, padding excluded
        if not any("segment_ids" in e for e in enc):
            batch["attention_mask"] = pad_right([[1] * len(e["input_ids"]) for e in enc], 0)
            return batch
        segments = pad_right([e.get("segment_ids", [1] * len(e["input_ids"])) for e in enc], -1)     # (B, T)
        batch["position_ids"] = pad_right([e.get("position_ids", list(range(len(e["input_ids"]))))
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
        loss = chunked_cross_entropy(h_sel, targets[mask], model)                  # (N, V) logits a chunk at a time
        return loss, {"n_tokens": batch["n_tokens"]}                               # input tokens, as elsewhere

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
                                  return_dict_in_generate=True)
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
                steps = _ScoreSteps(self.abstain_id, width)
                out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                     generation_config=config, logits_processor=LogitsProcessorList([steps]))
                new = out.sequences[:, width:]                                                         # (b, n)
                token_logp = torch.stack(steps.chosen_logp, 1)                                         # (b, n)
                abstain_logp = steps.abstain_logp                                                      # (b,)
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


class _ScoreSteps:
    """The last logits processor of a greedy generate(): -inf for `abstain_id` at the first generated step (the
    prompt is `width` long), and the scores, kept as they go, from the unmasked distribution: the abstain
    token's log-probability at that step, and at every step the log-probability of the token greedy picks (the
    argmax of what this returns). Nothing of size V is kept: generate(output_logits=True) would hold every
    step's (b, V) fp32 logits, 24 x 32 x 262,144 x 4 bytes = 0.8 GB for a Gemma-3 batch, and their log-softmax
    as much again."""

    def __init__(self, abstain_id: int, width: int):
        self.abstain_id, self.width = abstain_id, width
        self.abstain_logp: torch.Tensor | None = None           # (b,)
        self.chosen_logp: list[torch.Tensor] = []               # per step (b,)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        logp = scores.float().log_softmax(-1)                   # (b, V), this step only
        if input_ids.shape[1] == self.width:
            self.abstain_logp = logp[:, self.abstain_id].clone()
            scores = scores.clone()
            scores[:, self.abstain_id] = float("-inf")
        self.chosen_logp.append(logp.gather(1, scores.argmax(-1, keepdim=True))[:, 0])
        return scores
