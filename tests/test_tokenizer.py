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
