"""Tokenizers: character level, byte-level BPE trained on the corpus, or an existing tokenizer.json.

Every kind is a Hugging Face `tokenizers.Tokenizer` saved as `tokenizer.json`, so `transformers` can load
what we write. Special tokens are reserved up front (end of text, padding, and the two chat markers) and are
never produced from raw text: text that merely looks like `<|endoftext|>` is encoded as ordinary characters.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from lmforge.errors import LMForgeError

EOT = "<|endoftext|>"
SPECIAL_TOKENS = [EOT, "<|pad|>", "<|im_start|>", "<|im_end|>", "<|mask|>"]


class Tokenizer:
    """A thin wrapper over `tokenizers.Tokenizer` that knows its kind and its end-of-text id."""

    def __init__(self, hf: HFTokenizer, kind: str):
        self.hf = hf
        self.kind = kind
        # Special-token text inside raw data must stay text; only our code inserts special ids.
        self.hf.encode_special_tokens = True
        self.eot_id = hf.token_to_id(EOT)
        if self.eot_id is None:
            raise LMForgeError(f"the tokenizer has no {EOT} token; add it as a special token and try again")
        self._chars = set(hf.get_vocab()) if kind == "char" else None

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    def check_encodable(self, text: str) -> None:
        """Raise if a character-level tokenizer would silently drop characters of text."""
        if self._chars is None:
            return
        missing = sorted(set(text) - self._chars)
        if missing:
            shown = ", ".join(repr(c) for c in missing[:10]) + (" ..." if len(missing) > 10 else "")
            raise LMForgeError(
                f"text has {len(missing)} character(s) the character vocabulary lacks ({shown}); "
                "remove them or prepare the data with --tokenizer bpe"
            )

    def encode(self, text: str) -> list[int]:
        self.check_encodable(text)
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.hf.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def save(self, path: str | Path) -> None:
        self.hf.save(str(path))

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        try:
            hf = HFTokenizer.from_file(str(path))
        except Exception as exc:  # the tokenizers library raises a bare Exception for bad files
            raise LMForgeError(f"cannot read tokenizer {path}: {exc}; give a Hugging Face tokenizer.json") from exc
        return cls(hf, detect_kind(path))


def detect_kind(path: Path) -> str:
    """char when the file is one of ours built by `char_tokenizer`, else what its model says (bpe, ...)."""
    spec = json.loads(path.read_text(encoding="utf-8"))
    model = spec.get("model") or {}
    if model.get("type") == "BPE" and not model.get("merges") and (spec.get("decoder") or {}).get("type") == "Fuse":
        return "char"
    return str(model.get("type", "unknown")).lower()


def char_tokenizer(texts: Iterable[str]) -> Tokenizer:
    """One token per Unicode character seen in texts, after the special tokens, in code point order."""
    chars: set[str] = set()
    for text in texts:
        chars.update(text)
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for ch in sorted(chars):
        vocab.setdefault(ch, len(vocab))
    # A BPE model with no merges maps each character to its own id; Fuse joins them back without spaces.
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
    hf.add_special_tokens(SPECIAL_TOKENS)
    hf.decoder = decoders.Fuse()
    return Tokenizer(hf, "char")


def bpe_tokenizer(texts: Iterator[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE (GPT-2 style) trained on texts: any input encodes, with no unknown token."""
    minimum = 256 + len(SPECIAL_TOKENS)
    if vocab_size < minimum:
        raise LMForgeError(f"--vocab-size must be at least {minimum} for byte-level BPE, not {vocab_size}")
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    hf.train_from_iterator(texts, trainer=trainer)
    return Tokenizer(hf, "bpe")
