"""The README's fenced blocks, for the tests that run them as written.

A block is found by a marker: a piece of text that occurs in exactly one block of
its language. A block that is not meant to run (an output sample, a shell line
that needs a real cluster, a fragment of a larger file) is preceded by the line
``<!-- fragment -->``; every other block must be run by some test, which
``test_readme.test_every_block_runs_or_is_a_fragment`` checks by reading the
markers the tests pass to :func:`readme_block`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"

_FENCE = re.compile(
    r"(?P<mark>^<!-- fragment(?: [^>]*)? -->\n)?^```(?P<lang>[\w-]*)\n(?P<body>.*?)^```$",
    re.S | re.M,
)


@dataclass(frozen=True)
class Block:
    lang: str
    body: str
    fragment: bool
    line: int


def readme_blocks() -> list[Block]:
    """Every fenced block of the README, in order."""
    text = README.read_text()
    return [
        Block(m["lang"], m["body"], bool(m["mark"]), text.count("\n", 0, m.start("body")))
        for m in _FENCE.finditer(text)
    ]


def readme_block(marker: str, lang: str = "python") -> str:
    """The one block of ``lang`` holding ``marker``."""
    found = [b.body for b in readme_blocks() if b.lang == lang and marker in b.body]
    assert len(found) == 1, f"{len(found)} {lang} blocks of README.md hold {marker!r}"
    return found[0]
