"""Plain-text corpora of about 1 MB made from what this machine has, for checking a recipe beyond one text.

    python bench/corpora.py --out /tmp/corpora     # writes pysrc.txt and pydocs.txt

- pysrc: the Python standard library's own source files (Lib/*.py of the running interpreter, sorted by name,
  whole files until the size is reached): code, with its indentation and identifiers.
- pydocs: the reference documentation CPython ships in pydoc_data (lmforge's built-in corpus), in topic order:
  English prose about Python, a different register from Shakespeare.

Both are deterministic for one Python version, so a figure can be reproduced on a machine with the same one.
"""

from __future__ import annotations

import argparse
import sysconfig
from pathlib import Path

from lmforge.data.corpora import pydocs_documents


def pysrc(size: int) -> str:
    parts, total = [], 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        parts.append(text)
        total += len(text)
        if total >= size:
            break
    return "\n".join(parts)[:size]


def pydocs(size: int) -> str:
    return "\n\n".join(text for _, text in pydocs_documents())[:size]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="corpora")
    parser.add_argument("--size", type=int, default=1_100_000, help="characters per corpus")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, make in (("pysrc", pysrc), ("pydocs", pydocs)):
        text = make(args.size)
        (out / f"{name}.txt").write_text(text, encoding="utf-8")
        print(f"{out / name}.txt: {len(text):,} characters, {len(set(text))} distinct")


if __name__ == "__main__":
    main()
