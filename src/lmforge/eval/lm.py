"""Language-model scores: loss (mean cross-entropy per token, nats), perplexity, bits per byte, loss by position.

Bits per byte = total nats / (ln 2 * UTF-8 bytes of the evaluated text), where the text is what the predicted
tokens spell; special tokens (end of text) stand for no bytes, but the nats spent predicting them count. Unlike loss
per token, it does not depend on the tokenizer, so models with different tokenizers compare on it.

Loss by position is the mean loss of the tokens predicted at each position of the context window: position 0 has
seen one token, the last has seen a whole window, so the curve shows what the model gains from longer context.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import decoders

_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")  # SentencePiece byte fallback


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean cross-entropy over the targets that are not -100."""
    return F.cross_entropy(
        logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100, label_smoothing=label_smoothing
    )


def evaluate(model, batches, device, autocast=None) -> dict:
    """Validation metrics for training (val_loss, val_ppl, val_tokens): `score` without the byte counts."""
    result = score(model, batches, None, device, autocast)
    if not result:
        return {}
    return {"val_loss": result["loss"], "val_ppl": result["perplexity"], "val_tokens": result["tokens"]}


def token_bytes(tokenizer, size: int) -> np.ndarray:
    """UTF-8 bytes of the text each token id < size stands for; 0 for special tokens.

    Character tokenizers: the character's bytes. Byte-level BPE: one byte per character of the token (each stands
    for one byte). SentencePiece: a `<0xNN>` piece is one byte and `▁` a space (the space a decoder strips at the
    start of a text is counted).
    """
    table = np.zeros(size, dtype=np.int64)
    special = set(tokenizer.special_ids)
    byte_level = isinstance(tokenizer.hf.decoder, decoders.ByteLevel)
    added = {token.content for token in tokenizer.hf.get_added_tokens_decoder().values()}
    for token, i in tokenizer.hf.get_vocab(with_added_tokens=True).items():
        if i >= size or i in special:
            continue
        if tokenizer.kind == "char" or token in added:
            table[i] = len(token.encode("utf-8"))
        elif byte_level:
            table[i] = len(token)
        elif _BYTE_PIECE.fullmatch(token):
            table[i] = 1
        else:
            table[i] = len(token.replace("\u2581", " ").encode("utf-8"))
    return table


def text_batches(ids: list[int], seq_len: int, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(inputs, targets) over consecutive non-overlapping windows of ids, every token after the first predicted once.

    Full windows come batch_size at a time; a shorter last window comes alone.
    """
    tokens = torch.tensor(ids, dtype=torch.long)
    n_full = (len(ids) - 1) // seq_len
    for begin in range(0, n_full, batch_size):
        rows = [tokens[s * seq_len : s * seq_len + seq_len + 1] for s in range(begin, min(begin + batch_size, n_full))]
        stacked = torch.stack(rows)
        yield stacked[:, :-1], stacked[:, 1:]
    rest = tokens[n_full * seq_len :]
    if len(rest) > 1:
        yield rest[None, :-1], rest[None, 1:]


@torch.no_grad()
def score(
    model,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    bytes_per_token: np.ndarray | None,
    device,
    autocast=None,
) -> dict:
    """Loss, perplexity, bits per byte and loss by position over (inputs, targets) batches; targets -100 are skipped.

    Token-weighted over all batches; bits per byte needs bytes_per_token (see token_bytes), else it is None.
    The model is put back in its previous mode.
    """
    was_training = model.training
    model.eval()
    seq_len = model.config.seq_len
    table = torch.from_numpy(bytes_per_token) if bytes_per_token is not None else None
    nats, tokens, n_bytes = 0.0, 0, 0
    position_nats = torch.zeros(seq_len, dtype=torch.float64)
    position_count = torch.zeros(seq_len, dtype=torch.float64)
    for x, y in batches:
        with autocast if autocast is not None else contextlib.nullcontext():
            logits, _ = model(x.to(device))
        y = y.to(device)
        nll = F.cross_entropy(logits.float().transpose(1, 2), y, ignore_index=-100, reduction="none")  # (B, T)
        real = y != -100
        nll = (nll * real).double().cpu()
        nats += float(nll.sum())
        tokens += int(real.sum())
        if table is not None:
            n_bytes += int(table[y[real].cpu()].sum())
        width = y.size(1)
        position_nats[:width] += nll.sum(dim=0)
        position_count[:width] += real.sum(dim=0).double().cpu()
    model.train(was_training)
    if tokens == 0:
        return {}
    loss = nats / tokens
    seen = position_count > 0
    return {
        "loss": loss,
        "perplexity": math.exp(min(loss, 50.0)),
        "bits_per_byte": nats / (math.log(2) * n_bytes) if n_bytes else None,
        "tokens": tokens,
        "bytes": n_bytes,
        "loss_by_position": (position_nats[seen] / position_count[seen]).tolist(),
    }
