"""What the tasks share: the backbone without its head, the prompt's token helpers, and padded batches.

A task (train/tasks/) says what a batch is and what the loss is; the loop (train/loop.py) only calls
`collate_fn` and `loss_fn`. Three task types live here: ClassificationTask (a causal LM and a verbalizer,
classification.py), SequenceClassificationTask (an encoder with a classification head, sequence.py) and
GenerationTask (SQuAD v2 as generation, generation.py). The two classifiers share `Batched`: dynamic right
padding, the cross-entropy over the class logits, and `predict_proba`.
"""
from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

TEXT_SLOT = "<<<TEXT>>>"  # placeholder the prompt is rendered with, then split at


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


# Decoders whose Hugging Face forward takes position_ids and a ready 4-D boolean mask (used as given, SDPA), checked
# against the plain forward in tests/train/test_task.py (test_shared_prefix_*).
SHARED_PREFIX_MODELS = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text")
MIN_SHARED_PREFIX = 8        # tokens: below it packing saves little
PACK_TOKENS = 768            # tokens per packed sequence (more rows than fit start another, in the batch dim)
MAX_PACKED_FRACTION = 0.9    # pack only when that runs at most this fraction of the padded batch's tokens
PACK_MULTIPLE = 16           # packed sequences are padded to a multiple of it: fewer distinct shapes (see PAD_MULTIPLE):
                             # 200 SST-2 steps peaked at 3.12 GB with 1, 2.87 with 16, 2.44 with 64 (6% slower)


def shared_prefix_length(model: nn.Module, batch: dict, prefix: Sequence[int]) -> int:
    """len(prefix) when `last_states_packed` may run `batch`, else 0: at least 2 rows, every row starts with
    `prefix` and goes on past it, the model is one of SHARED_PREFIX_MODELS on SDPA attention (which takes the
    boolean mask as it is), no row is longer than a sliding attention window (the mask replaces the window), and
    the packed sequences hold at most MAX_PACKED_FRACTION of the padded batch's tokens (rows of hundreds of
    tokens, an IMDB review, fill a sequence each: packing would only add the mask)."""
    from train.attention import NAME as FAST_SDPA

    ids, P = batch["input_ids"], len(prefix)
    config = getattr(model, "config", None)
    if P < MIN_SHARED_PREFIX or ids.shape[0] < 2 or "last_index" not in batch:
        return 0
    if getattr(config, "model_type", None) not in SHARED_PREFIX_MODELS:
        return 0
    if getattr(config, "_attn_implementation", None) not in ("sdpa", FAST_SDPA):
        return 0
    last = batch["last_index"]
    window = getattr(config, "sliding_window", None)
    if int(last.min()) < P or (window and int(last.max()) + 1 > window):
        return 0
    packs, n = _packs(last.tolist(), P)
    if len(packs) * n > MAX_PACKED_FRACTION * ids.numel():      # long rows, one a sequence: nothing saved
        return 0
    head = torch.as_tensor(prefix, device=ids.device)
    return P if bool((ids[:, :P] == head).all()) and bool(batch["attention_mask"][:, :P].all()) else 0


def _packs(last: list[int], P: int) -> tuple[list[list[int]], int]:
    """Rows (by last_index) in order into sequences of at most PACK_TOKENS tokens (a longer row gets one of its
    own), each the prefix + its rows' remaining tokens; returns (rows per sequence, the longest's length rounded up
    to a multiple of PACK_MULTIPLE)."""
    packs, current, size = [], [], P
    for b, end in enumerate(last):
        rest = end + 1 - P
        if current and size + rest > PACK_TOKENS:
            packs.append(current)
            current, size = [], P
        current.append(b)
        size += rest
    packs.append(current)
    n = max(P + sum(last[b] + 1 - P for b in pack) for pack in packs)
    return packs, -(-n // PACK_MULTIPLE) * PACK_MULTIPLE


def last_states_packed(model: nn.Module, batch: dict, n_prefix: int) -> torch.Tensor:
    """The backbone's hidden state (B, d) at each row's `last_index`, for a batch whose rows share their first P
    tokens (the prompt's system line and instruction), with every token run once: the rows are packed, without
    padding, behind ONE copy of the prefix,

        tokens     [prefix | rest of row 0 | rest of row 1 | ...]       positions [0..P-1 | P..L0-1 | P..L1-1 | ...]
        attention  causal, and a row's tokens see the prefix and their own row only (a 4-D boolean mask)

    so each row's states are those of its own full forward (the same keys, positions and math, float rounding
    aside), and gradients through the one prefix sum over the rows, as through B copies. Rows fill sequences of
    up to PACK_TOKENS tokens (the masked attention costs the square of the packed length), stacked in the batch
    dimension. On an SST-2 prompt the prefix is 26 of 44 tokens: a training step of SmolLM2-135M at batch 16
    takes 0.56-0.58 s instead of 1.00, and scoring 320 dev sentences at batch 64 5.2 s instead of 13.5 (4-bit,
    bf16, r = 16, a 2-core Xeon with AMX; 384 tokens a sequence: 6.1 s, 256: 6.7). Works under gradient
    checkpointing."""
    ids, last, P = batch["input_ids"], batch["last_index"].tolist(), n_prefix
    packs, n = _packs(last, P)
    tokens = ids.new_zeros((len(packs), n))
    positions = ids.new_zeros((len(packs), n))
    segment = ids.new_full((len(packs), n), -2)                   # -2: padding, -1: the prefix, b: row b
    where = []                                                    # (pack, index) of each row's last token
    for g, pack in enumerate(packs):
        tokens[g, :P], positions[g, :P], segment[g, :P] = ids[pack[0], :P], torch.arange(P), -1
        at = P
        for b in pack:
            rest = last[b] + 1 - P
            tokens[g, at:at + rest] = ids[b, P:last[b] + 1]
            positions[g, at:at + rest] = torch.arange(P, last[b] + 1)
            segment[g, at:at + rest] = b
            at += rest
            where.append((g, at - 1))
    i = torch.arange(n, device=ids.device)
    causal = i[None, :] <= i[:, None]                                                # (n, n) key <= query
    same = (segment[:, None, :] == segment[:, :, None]) | (segment[:, None, :] == -1)   # (G, n, n)
    mask = (causal & same) | torch.eye(n, dtype=torch.bool, device=ids.device)       # padding sees itself only
    out = backbone(model)(input_ids=tokens, attention_mask=mask[:, None], position_ids=positions, use_cache=False)
    h = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]      # (G, n, d)
    g_idx, t_idx = (torch.tensor(v, device=h.device) for v in zip(*where))
    return h[g_idx, t_idx]                                                           # (B, d), in row order


def softcap(logits: torch.Tensor, model: nn.Module) -> torch.Tensor:
    """Gemma-2 style final_logit_softcapping (cap * tanh(x / cap)) when the config has one."""
    config = model.config
    cap = getattr(config, "final_logit_softcapping", None)
    if cap is None and hasattr(config, "get_text_config"):
        cap = getattr(config.get_text_config(), "final_logit_softcapping", None)
    return logits if not cap else torch.tanh(logits / cap) * cap


LOGITS_CHUNK_BYTES = 64 * 2**20   # fp32 logits alive at a time in `chunked_cross_entropy`


def chunked_cross_entropy(h: torch.Tensor, targets: torch.Tensor, model: nn.Module,
                          chunk_bytes: int = LOGITS_CHUNK_BYTES) -> torch.Tensor:
    """Mean cross-entropy of the LM head's logits at `h` (N, d) against `targets` (N,), one chunk of rows at a time.

    The full (N, V) fp32 logits are never alive together: each chunk's logits are made, reduced to a summed loss
    and dropped, and made again in the backward (a checkpoint per chunk), so the head's memory is one chunk's,
    `chunk_bytes`, whatever N and the vocabulary (Gemma-3: V = 262,144, 1 MB per row). The same sum as
    F.cross_entropy over all rows, in another order (float rounding)."""
    from torch.utils.checkpoint import checkpoint

    head = model.get_output_embeddings()
    rows = max(1, chunk_bytes // (4 * head.weight.shape[0]))

    def summed(h_part: torch.Tensor, t_part: torch.Tensor) -> torch.Tensor:
        logits = softcap(head(h_part).float(), model)                    # (rows, V)
        return F.cross_entropy(logits, t_part, reduction="sum")

    if h.shape[0] <= rows:
        return summed(h, targets) / max(1, h.shape[0])
    total = sum(checkpoint(summed, h[i:i + rows], targets[i:i + rows], use_reentrant=False)
                for i in range(0, h.shape[0], rows))
    return total / h.shape[0]


def to_device(batch: dict, model: nn.Module) -> dict:
    device = next(model.parameters()).device
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def token_ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def bos_ids(tokenizer, rendered: str) -> list[int]:
    """[bos] when the tokenizer adds one by itself and the rendered prompt does not already start with it."""
    bos = tokenizer.bos_token
    if bos is None or rendered.startswith(bos):
        return []
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    return [tokenizer.bos_token_id] if probe[:1] == [tokenizer.bos_token_id] else []


# Batches are padded to a multiple of PAD_MULTIPLE tokens: fewer distinct shapes, so the allocator reuses freed
# activations and oneDNN its kernels. Measured over 120 QLoRA steps of the SST-2 recipe (SmolLM2, batch 16,
# 33-82 tokens): RSS 3.12-3.16 GB -> 2.78 GB at 4 (2.80 at 8, 2.96 at 16), 133-136 s -> 130 s; the encoder
# (all-MiniLM-L6, 400 steps of 32 phrases): 1.82 -> 1.51 GB (1.46 at 8, 4 s slower). Pads are masked, so the
# outputs at the real tokens equal the unpadded batch's to float rounding.
PAD_MULTIPLE = 4


def pad_right(seqs: Sequence[Sequence[int]], value: int) -> torch.Tensor:
    T = -(-max(len(s) for s in seqs) // PAD_MULTIPLE) * PAD_MULTIPLE
    out = torch.full((len(seqs), T), value, dtype=torch.long)  # (B, T)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.as_tensor(s, dtype=torch.long)
    return out


class Batched:
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
        batch = {"input_ids": pad_right(ids, self.tokenizer.pad_token_id),
                 "attention_mask": pad_right([[1] * len(s) for s in ids], 0),
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
