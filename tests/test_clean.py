"""Each cleaning rule and filter on small crafted inputs, with its counts; pieces clean like the whole."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmforge.data.clean import STEPS, CleanConfig, Cleaner, step_names
from lmforge.data.sources import LAST, WHOLE, find_cut, split_pieces
from lmforge.errors import LMForgeError


def clean(text, **options):
    edits = {}
    cleaned, mask = Cleaner(CleanConfig(**options)).clean(text, edits)
    return cleaned, step_names(mask), edits


def test_clean_text_is_untouched():
    text = "A plain paragraph.\n\nAnother one, with a tab\there and indentation:\n    code()\n"
    assert clean(text) == (text, [], {})


def test_newlines():
    assert clean("a\r\nb\rc\n") == ("a\nb\nc\n", ["newlines"], {"newlines": 2})
    assert clean("a\r\nb", newlines=False)[0] == "a\r\nb"  # and control removal keeps \r then


def test_control_and_format_characters():
    text = "a\x00b\x07c\x1b[0md\u200be\ufeff\u00adf\tg\n"
    assert clean(text) == ("abc[0mdef\tg\n", ["control"], {"control": 6})
    # joiners and emoji tags carry meaning and stay
    family = "👩\u200d👩\u200d👧 नमस्\u200cते 🏴\U000e0067\U000e0062\U000e0073\U000e0063\U000e0074\U000e007f"
    assert clean(family)[0] == family
    assert clean("a\x00b", control=False)[0] == "a\x00b"


def test_unicode_normalization():
    decomposed = "cafe\u0301 \ufb01ne"  # e + combining acute; the fi ligature
    assert clean(decomposed) == ("café \ufb01ne", ["normalize"], {"normalize": 1})
    assert clean(decomposed, normalize="NFKC")[0] == "café fine"
    assert clean(decomposed, normalize="none")[0] == decomposed


def test_spaces_keep_indentation():
    text = "word  word   word \n    indented  line\t\n\tx"
    cleaned, steps, edits = clean(text)
    assert cleaned == "word word word\n    indented line\n\tx"
    assert steps == ["spaces"] and edits == {"spaces": 2}
    assert clean(text, spaces=False)[0] == text


def test_blank_lines():
    text = "a\n\n\n\nb\n\n \n\t\nc\n\nd"
    assert clean(text) == ("a\n\nb\n\nc\n\nd", ["spaces", "blank_lines"], {"spaces": 2, "blank_lines": 2})
    assert clean(text, spaces=False, blank_lines=False)[0] == text


def test_html_is_off_by_default_and_strips_markup():
    page = "<html><head><style>p {x: 1}</style><script>var a = '<p>';</script></head>"
    page += "<body><p>Fish &amp; chips</p><!-- note --><br/>caf&eacute;</body></html>"
    assert clean(page)[0] == page
    cleaned, steps, _ = clean(page, html=True)
    assert cleaned == "Fish & chips\n\ncafé"
    assert "html" in steps


def test_document_filters():
    cleaner = Cleaner(CleanConfig(min_chars=5, max_chars=10))
    assert cleaner.status("  \n\t") == "empty"
    assert cleaner.status("") == "empty"
    assert cleaner.status("abcd") == "too_short"
    assert cleaner.status("abcdefghijk") == "too_long"
    assert cleaner.status("abcdef") is None


def test_config_is_validated():
    with pytest.raises(LMForgeError, match="--normalize"):
        CleanConfig(normalize="NFD")
    with pytest.raises(LMForgeError, match="--max-chars"):
        CleanConfig(min_chars=10, max_chars=5)
    off = CleanConfig.off()
    assert clean("a\r\n\x00  b \n\n\n\nc", **off.to_dict())[0] == "a\r\n\x00  b \n\n\n\nc"


def test_every_step_has_a_bit():
    assert step_names((1 << len(STEPS)) - 1) == list(STEPS)


ALPHABET = st.sampled_from(
    ["a", "b", "é", "e\u0301", " ", "  ", "\n", "\r\n", "\r", "\t", "\x00", "\u200b", "東", "\xa0", "\x0c", "\u2028"]
)


@settings(max_examples=200, deadline=None)
@given(st.lists(ALPHABET, min_size=1, max_size=400), st.integers(8, 64))
def test_pieces_clean_like_the_whole(parts, limit):
    text = "".join(parts)
    cleaner = Cleaner(CleanConfig())
    whole, _ = cleaner.clean(text, {})
    pieces = list(split_pieces(text, limit))
    assert "".join(p for p, _ in pieces) == text
    assert pieces[-1][1] in (WHOLE, LAST)
    assert all(len(p) <= limit for p, _ in pieces)
    # Cuts made after a newline or before a single space between words clean exactly like the whole text.
    if all(_clean_cut(text, sum(len(p) for p, _ in pieces[: i + 1])) for i in range(len(pieces) - 1)):
        assert "".join(cleaner.clean(p, {})[0] for p, _ in pieces) == whole


def _clean_cut(text, at):
    def solid(ch):
        return ch.isprintable() and not ch.isspace()

    return (text[at - 1] == "\n" and solid(text[at])) or (
        text[at] == " " and at + 1 < len(text) and solid(text[at - 1]) and solid(text[at + 1])
    )


def test_find_cut_prefers_newlines_then_spaces():
    assert find_cut("aaaaaaa\nbb cccc", 12) == 8
    assert find_cut("aaaa bbbbbb cccc", 12) == 11
    assert find_cut("aaaa  bbbbbbcccc", 12) == 12  # no good cut: a hard one between two letters
    assert find_cut("aaaaaaaaaaa\u0301bbbb", 11) == 10  # never before a combining mark
