"""Generated blocks inside hand-written Markdown files (the README's CLI reference and model card).

A block runs from a ``BEGIN`` marker line to an ``END`` marker line, both HTML comments, so
the rendered page shows neither. Scripts rewrite the block from its source (a parser, a
results file); tests compare the block as it stands with a fresh rendering.
"""

from __future__ import annotations

__all__ = ["current_block", "replace_block"]


def _span(text: str, begin: str, end: str) -> tuple[int, int]:
    start, stop = text.find(begin), text.find(end)
    if start < 0 or stop < start:
        raise ValueError(f"no generated block: the markers {begin!r} ... {end!r} are missing")
    return start, stop + len(end)


def current_block(text: str, begin: str, end: str) -> str:
    """The block between ``begin`` and ``end`` as it stands in ``text`` (markers included).

    Raises
    ------
    ValueError
        If either marker is missing or they are out of order.
    """
    start, stop = _span(text, begin, end)
    return text[start:stop]


def replace_block(text: str, begin: str, end: str, block: str) -> str:
    """``text`` with the block between ``begin`` and ``end`` (inclusive) replaced by ``block``,
    which carries its own markers."""
    start, stop = _span(text, begin, end)
    return text[:start] + block + text[stop:]
