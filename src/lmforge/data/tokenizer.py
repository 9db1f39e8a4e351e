"""Tokenizers: character level, byte-level BPE trained on the corpus, an existing tokenizer.json, or SentencePiece.

Every kind is a Hugging Face `tokenizers.Tokenizer` saved as `tokenizer.json`, so `transformers` can load what
we write; a SentencePiece `.model` is converted to one (its pieces, scores and normalizer read from the model
proto). Special tokens are reserved up front (end of text, padding, the two chat markers and a mask) and are
never produced from raw text: text that merely looks like `<|endoftext|>` is encoded as ordinary characters.

Documents are separated by an end-of-text token: `<|endoftext|>` for the tokenizers we build; for an existing
tokenizer without it (a Llama's uses `</s>`), its own end-of-sequence token, read from a tokenizer_config.json
beside the file or recognized by its usual names.

A model whose sequences begin with a beginning-of-sequence token (an imported Llama's `<s>` or
`<|begin_of_text|>`) says so in that tokenizer_config.json: `add_bos_token: true` and its `bos_token`, the keys
transformers 4 reads. `import_hf` writes them when the original tokenizer adds one; the tokenizers we build add none.
The wrapper keeps it as `bos_id`, and `encode_prompt` is how generation, chat, serving, scoring and fine-tuning
encode a text that starts a sequence, so a model sees its prompts as it saw them in training. The tokenizer.json's
own post-processor is not read for this: a model lmforge trained with a Llama tokenizer was trained without it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from lmforge.errors import LMForgeError

EOT = "<|endoftext|>"
SPECIAL_TOKENS = [EOT, "<|pad|>", "<|im_start|>", "<|im_end|>", "<|mask|>"]
# End-of-document tokens of well-known tokenizers, tried in order when a tokenizer lacks <|endoftext|>.
SEPARATOR_NAMES = ("<|end_of_text|>", "</s>", "<eos>", "<|eos|>")


class Tokenizer:
    """A thin wrapper over `tokenizers.Tokenizer` that knows its kind and its document separator."""

    def __init__(self, hf: HFTokenizer, kind: str, eot_token: str | None = None, bos_token: str | None = None):
        self.hf = hf
        self.kind = kind
        # Special-token text inside raw data must stay text; only our code inserts special ids.
        self.hf.encode_special_tokens = True
        vocab = hf.get_vocab(with_added_tokens=True)
        candidates = [eot_token] if eot_token else [EOT, *SEPARATOR_NAMES]
        self.eot_token = next((token for token in candidates if token in vocab), None)
        if self.eot_token is None:
            wanted = eot_token or f"{EOT} or an end-of-sequence token ({', '.join(SEPARATOR_NAMES)})"
            raise LMForgeError(
                f"the tokenizer has no {wanted}; add one as a special token, or name it as eos_token in a "
                "tokenizer_config.json beside tokenizer.json"
            )
        self.eot_id = vocab[self.eot_token]
        if bos_token is not None and bos_token not in vocab:
            raise LMForgeError(f"the tokenizer has no {bos_token} to begin sequences with; name one it has")
        self.bos_token = bos_token
        self.bos_id = vocab[bos_token] if bos_token is not None else None
        self._chars = set(hf.get_vocab()) if kind == "char" else None
        unk = self.unk_id
        self.forbidden_ids = frozenset(i for i in self.special_ids if i != unk)  # never from raw text
        self._forbidden_text: re.Pattern | None = None

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    @property
    def special_ids(self) -> list[int]:
        """Ids of the special tokens: raw text must never encode to any of them."""
        ids = {i for i, token in self.hf.get_added_tokens_decoder().items() if token.special}
        return sorted(ids | {self.eot_id} | ({self.bos_id} if self.bos_id is not None else set()))

    @property
    def document_start(self) -> int:
        """The token a document follows: the beginning-of-sequence token of a model that has one, else end of text,
        which separates the documents we train on."""
        return self.eot_id if self.bos_id is None else self.bos_id

    @property
    def unk_id(self) -> int | None:
        token = getattr(self.hf.model, "unk_token", None)
        if token is None and isinstance(self.hf.model, models.Unigram):
            spec = json.loads(self.hf.to_str()).get("model", {})
            return spec.get("unk_id")
        return self.hf.token_to_id(token) if token else None

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
        ids = self.hf.encode(text, add_special_tokens=False).ids
        return ids if self.forbidden_ids.isdisjoint(ids) else self.encode_literal(text)

    def encode_prompt(self, text: str) -> list[int]:
        """text as the start of a sequence for the model to continue: after the beginning-of-sequence token when the
        model has one, as its original tokenizer encodes it; otherwise the same as encode."""
        ids = self.encode(text)
        return ids if self.bos_id is None else [self.bos_id, *ids]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        encode = getattr(self.hf, "encode_batch_fast", self.hf.encode_batch)  # no offsets: faster
        rows = [e.ids for e in encode(texts, add_special_tokens=False)]
        return [
            row if self.forbidden_ids.isdisjoint(row) else self.encode_literal(text) for row, text in zip(rows, texts)
        ]

    def encode_literal(self, text: str) -> list[int]:
        """Encode text with every special token's text in it spelled out one character at a time.

        Added special tokens are already kept out of raw text (encode_special_tokens); this is for tokenizers
        whose model vocabulary itself holds a special token's text (a word-level model, a unigram model with
        </s> among its pieces), which would otherwise turn that text into the special id.
        """
        if self._forbidden_text is None:
            names = sorted((self.hf.id_to_token(i) for i in self.forbidden_ids), key=len, reverse=True)
            self._forbidden_text = re.compile("|".join(re.escape(name) for name in names if name))
        ids: list[int] = []
        start = 0
        for match in [*self._forbidden_text.finditer(text), None]:
            end = match.start() if match else len(text)
            if end > start:
                ids += self.hf.encode(text[start:end], add_special_tokens=False).ids
            if match:
                for ch in match.group():
                    ids += self.hf.encode(ch, add_special_tokens=False).ids
                start = match.end()
        if not self.forbidden_ids.isdisjoint(ids):
            raise LMForgeError("the tokenizer spells some character only with a special token; use another tokenizer")
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def char_lengths(self) -> np.ndarray | None:
        """Characters each token id stands for, when that is a property of the token alone (char and byte-level
        tokenizers: a byte-level token counts the UTF-8 lead bytes it holds); None otherwise."""
        size = self.vocab_size
        lengths = np.zeros(size, dtype=np.int64)
        added = self.hf.get_added_tokens_decoder()
        if self.kind == "char":
            lengths[:] = 1
        elif isinstance(self.hf.decoder, decoders.ByteLevel):
            to_byte = {ch: b for b, ch in _bytes_to_unicode().items()}
            for token, i in self.hf.get_vocab(with_added_tokens=False).items():
                if i < size and all(ch in to_byte for ch in token):
                    lengths[i] = sum(1 for ch in token if to_byte[ch] & 0xC0 != 0x80)
                elif i < size:
                    lengths[i] = len(token)
        else:
            return None
        for i, token in added.items():
            if i < size:
                lengths[i] = len(token.content)
        return lengths

    def to_str(self) -> str:
        return self.hf.to_str()

    def save(self, path: str | Path) -> None:
        self.hf.save(str(path))

    @classmethod
    def from_str(cls, data: str, kind: str, eot_token: str | None = None, bos_token: str | None = None) -> Tokenizer:
        return cls(HFTokenizer.from_str(data), kind, eot_token, bos_token)

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """A tokenizer.json file, a folder holding one (a Hugging Face model folder), or a SentencePiece .model."""
        path = Path(path)
        if path.is_dir():
            if not (path / "tokenizer.json").is_file():
                models_found = sorted(path.glob("*.model"))
                if models_found:
                    return sentencepiece_tokenizer(models_found[0])
                raise LMForgeError(f"folder {path} has no tokenizer.json; give the tokenizer file itself")
            path = path / "tokenizer.json"
        if path.suffix == ".model":
            return sentencepiece_tokenizer(path)
        try:
            hf = HFTokenizer.from_file(str(path))
        except Exception as exc:  # the tokenizers library raises a bare Exception for bad files
            raise LMForgeError(f"cannot read tokenizer {path}: {exc}; give a Hugging Face tokenizer.json") from exc
        config = _tokenizer_config(path)
        return cls(hf, detect_kind(path), _configured_eos(config, hf), _configured_bos(config, hf))


def _tokenizer_config(path: Path) -> dict:
    """The tokenizer_config.json beside path, or {} when there is none (or it cannot be read)."""
    config = path.with_name("tokenizer_config.json")
    if not config.is_file():
        return {}
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _token_named(config: dict, key: str, hf: HFTokenizer) -> str | None:
    """The token config names under key (as text, or as an AddedToken's dict), when the tokenizer has it."""
    token = config.get(key)
    if isinstance(token, dict):
        token = token.get("content")
    return token if isinstance(token, str) and hf.token_to_id(token) is not None else None


def _configured_eos(config: dict, hf: HFTokenizer) -> str | None:
    """The eos_token of tokenizer_config.json, when the tokenizer lacks <|endoftext|>."""
    return None if hf.token_to_id(EOT) is not None else _token_named(config, "eos_token", hf)


def _configured_bos(config: dict, hf: HFTokenizer) -> str | None:
    """The bos_token of tokenizer_config.json when it sets add_bos_token true (a bos_token the tokenizer lacks adds
    nothing, as in transformers)."""
    return _token_named(config, "bos_token", hf) if config.get("add_bos_token") is True else None


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
    return char_tokenizer_from_chars(chars)


def char_tokenizer_from_chars(chars: Iterable[str]) -> Tokenizer:
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


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map from bytes to the printable characters byte-level BPE spells them with."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping, extra = {}, 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


# ------------------------------------------------------------------------------------------------ SentencePiece

_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6
_UNIGRAM, _BPE = 1, 2
_NEVER = -1e9  # score that keeps a control piece out of every segmentation of raw text


def sentencepiece_tokenizer(path: str | Path) -> Tokenizer:
    """Convert a SentencePiece .model (unigram or BPE) to a `tokenizers.Tokenizer` with the same pieces and ids."""
    path = Path(path)
    try:
        from sentencepiece import sentencepiece_model_pb2
    except ImportError as exc:
        raise LMForgeError("reading a SentencePiece .model needs sentencepiece and protobuf installed") from exc
    proto = sentencepiece_model_pb2.ModelProto()
    try:
        proto.ParseFromString(path.read_bytes())
    except Exception as exc:  # protobuf's DecodeError, or OSError
        raise LMForgeError(f"cannot read {path} as a SentencePiece model ({exc}); give a .model file") from exc
    trainer, normalizer = proto.trainer_spec, proto.normalizer_spec
    pieces = [(p.piece, p.score, p.type) for p in proto.pieces]
    if not pieces:
        raise LMForgeError(f"{path} has no pieces; is it a SentencePiece model?")
    unk_id = trainer.unk_id if 0 <= trainer.unk_id < len(pieces) else None
    if trainer.model_type == _UNIGRAM:
        vocab = [(piece, _NEVER if kind in (_CONTROL, _UNUSED) else score) for piece, score, kind in pieces]
        hf = HFTokenizer(models.Unigram(vocab, unk_id=unk_id, byte_fallback=trainer.byte_fallback))
        kind = "unigram"
    elif trainer.model_type == _BPE:
        ids = {piece: i for i, (piece, _, _) in enumerate(pieces)}
        mergeable = {piece for piece, _, kind in pieces if kind in (_NORMAL, _USER_DEFINED)}
        merges = []
        for piece, _, kind in pieces:
            if kind != _NORMAL:
                continue
            for cut in range(1, len(piece)):
                left, right = piece[:cut], piece[cut:]
                if left in mergeable and right in mergeable:
                    merges.append((ids[piece], ids[left], ids[right], left, right))
        merges.sort()
        unk = pieces[unk_id][0] if unk_id is not None else None
        hf = HFTokenizer(
            models.BPE(
                ids, [(m[3], m[4]) for m in merges], unk_token=unk, fuse_unk=True, byte_fallback=trainer.byte_fallback
            )
        )
        kind = "bpe"
    else:
        raise LMForgeError(f"{path} is a SentencePiece {trainer.model_type} model; only unigram and BPE convert")
    steps = []
    if normalizer.precompiled_charsmap:
        steps.append(normalizers.Precompiled(normalizer.precompiled_charsmap))
    if normalizer.remove_extra_whitespaces:
        steps += [normalizers.Strip(left=True, right=True), normalizers.Replace(Regex(" {2,}"), " ")]
    if normalizer.add_dummy_prefix:
        steps.append(normalizers.Prepend("▁"))
    steps.append(normalizers.Replace(" ", "▁"))
    hf.normalizer = normalizers.Sequence(steps)
    hf.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True)
    decoder_steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if normalizer.add_dummy_prefix:
        decoder_steps.append(decoders.Strip(content=" ", left=1, right=0))
    hf.decoder = decoders.Sequence(decoder_steps)
    specials = [AddedToken(p, special=True, normalized=False) for p, _, k in pieces if k in (_CONTROL, _UNKNOWN)]
    hf.add_special_tokens(specials)
    user = [AddedToken(p, special=False, normalized=False) for p, _, k in pieces if k == _USER_DEFINED]
    if user:
        hf.add_tokens(user)
    eos = pieces[trainer.eos_id][0] if 0 <= trainer.eos_id < len(pieces) else None
    return Tokenizer(hf, kind, eos)
