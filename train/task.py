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
scaffold joins the text at a newline, where BPE never merges across the boundary.

    chat:  <template>[system] [user: instr\\n{shot}] [assistant: word] ... [user: instr\\n{text}] <gen prompt>
    plain: instr\\n\\n{shot}\\nAnswer: word\\n\\n ... {text}\\nAnswer:         (label words get a leading space)

SequenceClassificationTask: an encoder with a classification head (BERT), loss = CE of model(...).logits.
GenerationTask: SQuAD v2 as generation; loss only on the answer tokens (labels -100 on the prompt), the LM
head applied only at those positions; greedy decoding with batched left padding through `model.generate`.
"""
from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

IGNORE = -100
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


def _pad_right(seqs: Sequence[Sequence[int]], value: int) -> torch.Tensor:
    out = torch.full((len(seqs), max(len(s) for s in seqs)), value, dtype=torch.long)  # (B, T)
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
                 use_chat_template: bool | None = None, max_length: int = 256, few_shot: Sequence = ()):
        if len(label_words) < 2:
            raise ValueError(f"need at least two label words, got {list(label_words)}")
        if use_chat_template and not has_chat_template(tokenizer):
            raise ValueError("use_chat_template=True but the tokenizer has no chat template")
        self.tokenizer, self.label_words = tokenizer, list(label_words)
        self.instruction, self.system, self.max_length = instruction, system, max_length
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
            text_ids = text_ids[: self.budget]
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
    """Extractive QA as generation: target = the first gold answer, or `unanswerable` for impossible ones."""

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
        self.prefix, self.middle = self._scaffold()
        self.prefix_ids = _bos(tokenizer, self.prefix) + _ids(tokenizer, self.prefix)
        self.end_id = self._end_of_answer()
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
        answers = [a for a in example.get("answers", []) if a.strip()]
        return answers[0].strip() if answers and not example.get("is_impossible") else self.unanswerable

    def encode_prompt(self, example: dict, reserve: int = 0) -> list[int]:
        """prefix + context (cut to fit max_length - reserve) + question and generation prompt."""
        tail = _ids(self.tokenizer, self.middle.replace(_QUESTION, example["question"].strip()))
        budget = self.max_length - reserve - len(self.prefix_ids) - len(tail)
        if budget < 1:
            raise ValueError(f"max_length={self.max_length} leaves no room for the context; raise it")
        ctx = _ids(self.tokenizer, example["context"].strip())
        if len(ctx) > budget:
            self.n_truncated += 1
            if self.n_truncated == 1:
                warnings.warn(f"GenerationTask: a context was cut to {budget} tokens to fit max_length="
                              f"{self.max_length}; further cuts are only counted (task.n_truncated)", stacklevel=2)
            ctx = ctx[:budget]
        return self.prefix_ids + ctx + tail

    def encode(self, example: dict) -> dict:
        """{input_ids, labels}: labels are -100 on the prompt and the answer ids (+ end token) after it."""
        lead = "" if self.use_chat_template else " "
        answer = _ids(self.tokenizer, lead + self.target(example))[: self.max_answer_tokens] + [self.end_id]
        prompt = self.encode_prompt(example, reserve=len(answer))
        return {"input_ids": prompt + answer, "labels": [IGNORE] * len(prompt) + answer}

    def length(self, example: dict) -> int:
        return len(example["input_ids"]) if "input_ids" in example else len(self.encode(example)["input_ids"])

    def collate(self, examples: Sequence[dict]) -> dict:
        enc = [ex if "labels" in ex else self.encode(ex) for ex in examples]
        return {"input_ids": _pad_right([e["input_ids"] for e in enc], self.tokenizer.pad_token_id),  # (B, T)
                "attention_mask": _pad_right([[1] * len(e["input_ids"]) for e in enc], 0),
                "labels": _pad_right([e["labels"] for e in enc], IGNORE)}

    def loss(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
        """Mean CE over the answer tokens; the LM head runs only where a label is, not over the prompt."""
        batch = to_device(batch, model)
        h = hidden_states(model, batch)                                            # (B, T, d)
        targets = batch["labels"][:, 1:]                                           # (B, T-1) token t+1 ...
        mask = targets != IGNORE
        h_sel = h[:, :-1][mask]                                                    # (N, d)   ... from state t
        logits = softcap(model.get_output_embeddings()(h_sel).float(), model)      # (N, V)
        return F.cross_entropy(logits, targets[mask]), {"n_tokens": int(mask.sum())}

    @torch.no_grad()
    def generate(self, model: nn.Module, examples: Sequence[dict], max_new_tokens: int = 24,
                 batch_size: int = 16) -> list[str]:
        """Greedy answers, "" for an abstention; batches are left-padded, formed longest first."""
        from transformers import GenerationConfig

        was_training = model.training
        model.eval()
        prompts = [self.encode_prompt(ex) for ex in examples]
        order = np.argsort([-len(p) for p in prompts], kind="stable")
        stop = sorted({self.end_id, self.tokenizer.eos_token_id} - {None})
        config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop,
                                  pad_token_id=self.tokenizer.pad_token_id)
        device = next(model.parameters()).device
        answers = [""] * len(prompts)
        try:
            for start in range(0, len(prompts), batch_size):
                idx = order[start: start + batch_size]
                width = max(len(prompts[i]) for i in idx)
                pad = self.tokenizer.pad_token_id
                ids = torch.tensor([[pad] * (width - len(prompts[i])) + prompts[i] for i in idx])   # (b, T)
                mask = torch.tensor([[0] * (width - len(prompts[i])) + [1] * len(prompts[i]) for i in idx])
                out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                     generation_config=config)                                    # (b, T + n)
                for row, i in enumerate(idx):
                    answers[i] = self.extract_answer(self.tokenizer.decode(out[row, width:], skip_special_tokens=True))
        finally:
            model.train(was_training)
        return answers

    def extract_answer(self, generated: str) -> str:
        """First line, stripped of quotes and a final period; "" when it says `unanswerable` (abstain)."""
        text = generated.strip().split("\n")[0].strip().strip("\"'`").strip()
        text = text[:-1] if text.endswith(".") else text
        return "" if text.lower().strip(" .!") == self.unanswerable.lower() else text
