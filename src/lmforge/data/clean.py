"""Cleaning: the text rules `lmforge prepare` applies to every document, each switchable and each counted.

Training stacks usually leave this to the user; we do it in the pipeline so the data dir can say exactly what
happened to the corpus. The rules, in the order they run:

1. html         (off by default) drop <script>/<style> blocks, comments and tags; unescape entities
2. newlines     CRLF and lone CR become LF
3. control      remove control and format characters that carry no text (keep tab and newline; keep the
                zero-width joiners and emoji tag characters, which change how neighbouring text renders)
4. normalize    Unicode NFC (or NFKC on request)
5. spaces       drop trailing spaces and tabs, and collapse runs of spaces after a line's indentation to one;
                the indentation itself is kept because code and verse depend on it
6. blank_lines  collapse runs of blank lines to a single blank line

Then the document filters: empty (nothing but whitespace), shorter than min_chars, longer than max_chars.
Every rule works within a line or a character, so pieces of a huge document cut after a newline (or before a
single space between two words) clean to the same text as the whole document would.

Each rule runs only after a cheap test says it could change something: most documents pass through with a
handful of C-speed scans, which keeps cleaning a small fraction of the time the tokenizer takes.
"""

from __future__ import annotations

import html
import re
import sys
import unicodedata
from dataclasses import asdict, dataclass
from functools import cache

import numpy as np

from lmforge.errors import LMForgeError

STEPS = ("html", "newlines", "control", "normalize", "spaces", "blank_lines")
NORMAL_FORMS = ("NFC", "NFKC", "none")

# Format characters that do carry meaning: zero-width non-joiner and joiner (Indic and Persian scripts, emoji
# sequences) and the tag characters of emoji subdivision flags.
_KEEP_FORMAT = {0x200C, 0x200D, *range(0xE0020, 0xE0080)}

_NEWLINES = re.compile(r"\r\n?")
_BLANK_LINES = re.compile(r"\n(?:[ \t]*\n){2,}")
_HTML_BLOCKS = re.compile(r"<(script|style)\b.*?</\1\s*>|<!--.*?-->", re.IGNORECASE | re.DOTALL)
_HTML_BREAKS = re.compile(
    r"<br\s*/?>|</(?:p|div|li|ul|ol|h[1-6]|tr|table|section|article|blockquote|pre|header|footer)\s*>",
    re.IGNORECASE,
)
_HTML_TAG = re.compile(r"</?[A-Za-z][^<>]*>")


@dataclass(frozen=True)
class CleanConfig:
    """Which cleaning rules and document filters run. The defaults are what `lmforge prepare` does."""

    html: bool = False
    newlines: bool = True
    control: bool = True
    normalize: str = "NFC"  # NFC, NFKC, or none
    spaces: bool = True
    blank_lines: bool = True
    min_chars: int = 0  # documents shorter than this (after cleaning) are dropped
    max_chars: int = 0  # documents longer than this are dropped; 0 means no limit
    dedup: bool = True  # drop exact duplicates of an earlier document (after cleaning)

    def __post_init__(self):
        if self.normalize not in NORMAL_FORMS:
            raise LMForgeError(f"--normalize must be one of {', '.join(NORMAL_FORMS)}, not {self.normalize!r}")
        if self.min_chars < 0 or self.max_chars < 0:
            raise LMForgeError("--min-chars and --max-chars must be >= 0 (0 means no limit for --max-chars)")
        if self.max_chars and self.max_chars < self.min_chars:
            raise LMForgeError(f"--max-chars {self.max_chars} is below --min-chars {self.min_chars}; raise it")

    @classmethod
    def off(cls) -> CleanConfig:
        """No rule, no filter, no deduplication: text reaches the tokenizer as read (empty documents still skip)."""
        return cls(newlines=False, control=False, normalize="none", spaces=False, blank_lines=False, dedup=False)

    def to_dict(self) -> dict:
        return asdict(self)


@cache
def _control_tables(keep_cr: bool) -> tuple[np.ndarray, re.Pattern]:
    """A lookup table over all code points (True = remove) and the matching regex, built once."""
    keep = {0x09, 0x0A, *_KEEP_FORMAT} | ({0x0D} if keep_cr else set())
    table = np.zeros(sys.maxunicode + 1, dtype=bool)
    ranges: list[tuple[int, int]] = []
    for cp in range(sys.maxunicode + 1):
        if cp in keep or unicodedata.category(chr(cp)) not in ("Cc", "Cf"):
            continue
        table[cp] = True
        if ranges and ranges[-1][1] == cp - 1:
            ranges[-1] = (ranges[-1][0], cp)
        else:
            ranges.append((cp, cp))
    pattern = "".join(f"\\U{a:08x}-\\U{b:08x}" if b > a else f"\\U{a:08x}" for a, b in ranges)
    return table, re.compile(f"[{pattern}]+")


class Cleaner:
    """Applies a CleanConfig to documents and counts, per rule, the edits it made."""

    def __init__(self, config: CleanConfig):
        self.config = config
        if config.control:
            self.control_table, self.control_regex = _control_tables(keep_cr=not config.newlines)
            self.ascii_control = self.control_table[:128].copy()

    def clean(self, text: str, edits: dict) -> tuple[str, int]:
        """The cleaned text and a bit mask of the rules that changed it (bit i is STEPS[i]); edits is updated.

        edits counts, per rule: html tags and blocks removed, line breaks rewritten, control characters removed,
        documents renormalized, lines whose spaces changed, and runs of blank lines collapsed.
        """
        config, changed = self.config, 0
        if config.html and ("<" in text or "&" in text):
            text, n = _strip_html(text)
            changed |= _count(edits, 0, n)
        if config.newlines and "\r" in text:
            text, n = _NEWLINES.subn("\n", text)
            changed |= _count(edits, 1, n)
        if config.control and self._has_control(text):
            before = len(text)
            text = self.control_regex.sub("", text)
            changed |= _count(edits, 2, before - len(text))
        if config.normalize != "none" and not text.isascii() and not unicodedata.is_normalized(config.normalize, text):
            text = unicodedata.normalize(config.normalize, text)
            changed |= _count(edits, 3, 1)
        if config.spaces and ("  " in text or " \n" in text or "\t\n" in text or text.endswith((" ", "\t"))):
            text, n = _fix_spaces(text)
            changed |= _count(edits, 4, n)
        if config.blank_lines and ("\n\n\n" in text or not config.spaces and "\n" in text):
            text, n = _BLANK_LINES.subn("\n\n", text)
            changed |= _count(edits, 5, n)
        return text, changed

    def _has_control(self, text: str) -> bool:
        if text.isascii():
            return bool(self.ascii_control[np.frombuffer(text.encode("ascii"), dtype=np.uint8)].any())
        return bool(self.control_table[np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)].any())

    def status(self, text: str) -> str | None:
        """Why a whole cleaned document is dropped (empty, too_short, too_long), or None to keep it."""
        if not text or text.isspace():
            return "empty"
        return self.length_status(len(text))

    def length_status(self, chars: int) -> str | None:
        if chars < self.config.min_chars:
            return "too_short"
        if self.config.max_chars and chars > self.config.max_chars:
            return "too_long"
        return None


def _count(edits: dict, step: int, n: int) -> int:
    if n <= 0:
        return 0
    edits[STEPS[step]] = edits.get(STEPS[step], 0) + n
    return 1 << step


def _fix_spaces(text: str) -> tuple[str, int]:
    """Drop trailing blanks of every line and collapse inner runs of spaces; return the text and lines changed."""
    lines = text.split("\n")
    changed = 0
    for i, line in enumerate(lines):
        fixed = line.rstrip(" \t")
        if "  " in fixed:
            body = fixed.lstrip(" ")
            if "  " in body:
                fixed = fixed[: len(fixed) - len(body)] + " ".join(filter(None, body.split(" ")))
        if len(fixed) != len(line):
            lines[i] = fixed
            changed += 1
    return ("\n".join(lines) if changed else text), changed


def _strip_html(text: str) -> tuple[str, int]:
    text, blocks = _HTML_BLOCKS.subn("", text)
    text, breaks = _HTML_BREAKS.subn("\n", text)
    text, tags = _HTML_TAG.subn("", text)
    unescaped = html.unescape(text) if "&" in text else text
    return unescaped, blocks + breaks + tags + (unescaped != text)


def step_names(mask: int) -> list[str]:
    """The rules named by a bit mask from Cleaner.clean."""
    return [name for i, name in enumerate(STEPS) if mask & (1 << i)]
