"""Classification with a causal LM (ClassificationTask) is next-token prediction restricted to a verbalizer:
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
"""
from __future__ import annotations

import warnings
from typing import Sequence

import torch
from torch import nn

from .common import (TEXT_SLOT, Batched, bos_ids, has_chat_template, hidden_states, last_states_packed,
                     shared_prefix_length, softcap, to_device, token_ids)

KEEP = ("head", "head+tail")


def cut(ids: list[int], budget: int, keep: str = "head") -> list[int]:
    """`ids` cut to `budget` tokens: the head, or the first quarter + the last three quarters (see above)."""
    if len(ids) <= budget:
        return ids
    if keep == "head":
        return ids[:budget]
    head = budget // 4
    return ids[:head] + ids[len(ids) - (budget - head):]


class ClassificationTask(Batched):
    """Verbalizer classification with a causal LM; see the module docstring."""

    def __init__(self, tokenizer, label_words: Sequence[str], *, instruction: str, system: str | None = None,
                 use_chat_template: bool | None = None, max_length: int = 256, few_shot: Sequence = (),
                 keep: str = "head", share_prefix: bool = True):
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
        self.share_prefix = share_prefix   # rows packed behind one copy of the prompt's prefix (common.py)

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
            msgs.append({"role": "user", "content": f"{self.instruction}\n{TEXT_SLOT}"})
            rendered = self.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        else:
            head = f"{self.system}\n\n" if self.system else ""
            shots = "".join(f"{text}\nAnswer: {word}\n\n" for text, word in self.few_shot)
            rendered = f"{head}{self.instruction}\n\n{shots}{TEXT_SLOT}\nAnswer:"
        if rendered.count(TEXT_SLOT) != 1:
            raise ValueError("the chat template lost or repeated the text placeholder; pass use_chat_template=False")
        prefix, suffix = rendered.split(TEXT_SLOT)
        prefix_ids = bos_ids(self.tokenizer, prefix) + token_ids(self.tokenizer, prefix)
        return prefix_ids, token_ids(self.tokenizer, suffix), suffix

    def _label_ids(self, suffix: str) -> list[int]:
        """First token of each label word as generated right after the prompt; must be distinct."""
        lead = "" if self.use_chat_template else " "
        n = len(self.suffix_ids)
        ids = []
        for word in self.label_words:
            joint = token_ids(self.tokenizer, suffix + lead + word)
            if joint[:n] == self.suffix_ids and len(joint) > n:
                ids.append(joint[n])
            else:  # the word merged with the end of the prompt; its own first token is the best guess
                warnings.warn(f"label word {word!r} merges with the end of the prompt; using its own first token")
                ids.append(token_ids(self.tokenizer, lead + word)[0])
        if len(set(ids)) != len(ids):
            tokens = {w: self.tokenizer.convert_ids_to_tokens(i) for w, i in zip(self.label_words, ids)}
            raise ValueError(f"label words must start with distinct tokens, got {tokens}; pick other words")
        return ids

    def encode(self, text: str) -> list[int]:
        """prefix + text (cut to the budget) + suffix; the label token is what should come next."""
        text_ids = token_ids(self.tokenizer, text.strip())
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
        P = shared_prefix_length(model, batch, self.prefix_ids) if self.share_prefix else 0
        if P:
            h_last = last_states_packed(model, batch, P)                           # (B, d)
        else:
            h = hidden_states(model, batch)                                        # (B, T, d)
            h_last = h[torch.arange(h.shape[0], device=h.device), batch["last_index"].to(h.device)]
        head = model.get_output_embeddings()
        label_ids = torch.tensor(self.label_ids, device=h_last.device)
        if type(head) is nn.Linear:  # a plain head (tied or not): gather C rows, never touch the other V - C
            w = head.weight[label_ids]                                             # (C, d)
            logits = h_last.float() @ w.float().T                                  # (B, C)
            if head.bias is not None:
                logits = logits + head.bias[label_ids].float()
        else:  # a wrapped head (LoRA, 4-bit): run it, at the B answer positions only
            logits = head(h_last)[:, label_ids].float()                            # (B, V) -> (B, C)
        return softcap(logits, model)
