"""FLORES-200 language codes, as the NLLB-200 models know them."""

from __future__ import annotations

from functools import cache
from importlib import resources


@cache
def flores200_codes() -> tuple[str, ...]:
    """The 202 FLORES-200 codes in the order of the NLLB-200 tokenizer's language tokens."""
    text = resources.files("gateway.data").joinpath("flores200.txt").read_text(encoding="utf-8")
    return tuple(line.strip() for line in text.splitlines() if line.strip())
