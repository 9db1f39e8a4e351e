import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmforge.data.tokenizer import EOT, SPECIAL_TOKENS, Tokenizer, bpe_tokenizer, char_tokenizer
from lmforge.errors import LMForgeError

SAMPLE = "Hello, wörld! 東京 🙂\r\nnaïve café\tend\x00"


def test_char_round_trip_non_ascii():
    tok = char_tokenizer([SAMPLE])
    ids = tok.encode(SAMPLE)
    assert len(ids) == len(SAMPLE)  # one token per character, emoji included
    assert tok.decode(ids) == SAMPLE
    assert tok.vocab_size == len(set(SAMPLE)) + len(SPECIAL_TOKENS)


def test_char_rejects_unknown_characters():
    tok = char_tokenizer(["abc"])
    try:
        tok.encode("abz")
    except LMForgeError as exc:
        assert "'z'" in str(exc)
    else:
        raise AssertionError("an unknown character must not be dropped silently")


def test_special_token_text_is_not_a_special_id():
    tok = char_tokenizer([SAMPLE + EOT])
    ids = tok.encode("a" + EOT)
    assert tok.eot_id not in ids
    assert tok.decode(ids) == "a" + EOT
    bpe = bpe_tokenizer(iter([SAMPLE * 20, EOT * 3]), 300)
    ids = bpe.encode("x" + EOT)
    assert bpe.eot_id not in ids
    assert bpe.decode(ids) == "x" + EOT


def test_save_and_load_keep_kind_and_ids(tmp_path):
    for tok in (char_tokenizer([SAMPLE]), bpe_tokenizer(iter([SAMPLE * 50]), 300)):
        tok.save(tmp_path / "tokenizer.json")
        loaded = Tokenizer.load(tmp_path / "tokenizer.json")
        assert loaded.kind == tok.kind
        assert loaded.encode(SAMPLE) == tok.encode(SAMPLE)
        assert loaded.eot_id == tok.eot_id == 0


def test_bpe_learns_merges():
    text = "the cat sat on the mat with the hat " * 200
    tok = bpe_tokenizer(iter([text]), 300)
    assert len(tok.encode(text)) < len(text.encode()) / 2


_BPE = bpe_tokenizer(iter([SAMPLE * 30, "the quick brown fox " * 100]), 320)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=200))
def test_bpe_round_trips_any_unicode(text):
    assert _BPE.decode(_BPE.encode(text)) == text


@settings(max_examples=100, deadline=None)
@given(st.lists(st.sampled_from(["\x00", "\r", "\n", "\r\n", "\u0301", "e", "🙂", "東", " ", EOT]), max_size=60))
def test_bpe_round_trips_control_and_combining(pieces):
    text = "".join(pieces)
    ids = _BPE.encode(text)
    assert _BPE.decode(ids) == text
    assert _BPE.eot_id not in ids


TRICKY = [
    "\x00",
    "\r",
    "\n",
    "\r\n",
    "\t",
    "\u0301",
    "\u200d",
    "\ufeff",
    "e",
    "é",
    "東",
    "京",
    "🙂",
    "👩\u200d👩",
    " ",
    "  ",
    EOT,
]


def test_bpe_fuzz_ten_thousand_strings_and_a_megabyte_line():
    import random

    rng = random.Random(0)
    pool = TRICKY + [chr(rng.randrange(0x20, 0x2FFFF)) for _ in range(2000)]
    pool = [p for p in pool if not 0xD800 <= ord(p[0]) <= 0xDFFF]
    texts = ["".join(rng.choices(pool, k=rng.randrange(0, 40))) for _ in range(10_000)]
    ids = _BPE.encode_batch(texts)
    assert [_BPE.decode(row) for row in ids] == texts
    special = set(_BPE.special_ids)
    assert not any(special & set(row) for row in ids)
    line = "".join(rng.choices(pool + [" "] * 400, k=1_000_000))
    assert _BPE.decode(_BPE.encode(line)) == line


def test_char_lengths_count_characters_of_byte_level_tokens():
    text = "naïve 東京 🙂 café\r\n" * 20
    ids = _BPE.encode(text)
    table = _BPE.char_lengths()
    assert int(table[ids].sum()) == len(text)
    assert int(table[ids[: len(ids) // 2]].sum()) + int(table[ids[len(ids) // 2 :]].sum()) == len(text)
    char = char_tokenizer([text])
    assert int(char.char_lengths()[char.encode(text)].sum()) == len(text)


def _spm_model(tmp_path, model_type):
    import io

    spm = pytest.importorskip("sentencepiece")
    sentences = [
        f"the {w} sat on the mat number {i}, said the {w}." for i in range(300) for w in ("cat", "dog", "émile")
    ]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=model,
        vocab_size=60,
        model_type=model_type,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    path = tmp_path / f"{model_type}.model"
    path.write_bytes(model.getvalue())
    return path, spm.SentencePieceProcessor(model_file=str(path))


@pytest.mark.parametrize("model_type", ["unigram", "bpe"])
def test_sentencepiece_conversion_matches_sentencepiece(tmp_path, model_type):
    path, processor = _spm_model(tmp_path, model_type)
    tok = Tokenizer.load(path)
    assert tok.kind == model_type and tok.eot_token == "</s>" and tok.eot_id == processor.eos_id()
    for text in ["the cat sat on the mat", "said the dog, number 42.", "émile sat, unknown zebra Ω"]:
        assert tok.encode(text) == processor.encode(text)
    assert tok.decode(tok.encode("the cat sat, émile")) == "the cat sat, émile"
    assert tok.eot_id not in tok.encode("the </s> cat <s>")
    tok.save(tmp_path / "tokenizer.json")
    assert Tokenizer.load(tmp_path / "tokenizer.json").encode("the cat") == processor.encode("the cat")


def test_bad_tokenizer_files(tmp_path):
    (tmp_path / "bad.model").write_bytes(b"\x00\x01 not a model")
    with pytest.raises(LMForgeError, match="SentencePiece"):
        Tokenizer.load(tmp_path / "bad.model")
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(LMForgeError, match="cannot read tokenizer"):
        Tokenizer.load(tmp_path)
    with pytest.raises(LMForgeError, match="no tokenizer.json"):
        Tokenizer.load(tmp_path / "..")
