"""Small helpers for the words of terminal messages (no heavy imports: the command line uses them)."""

from __future__ import annotations


def plural(count: int, word: str) -> str:
    """``plural(1, "epoch") == "1 epoch"``, ``plural(1797, "image") == "1,797 images"`` (regular nouns)."""
    return f"{count:,} {word}" if count == 1 else f"{count:,} {word}s"


__all__ = ["plural"]
