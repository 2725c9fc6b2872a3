"""FLORES-200 language codes, as the NLLB-200 models know them, and unambiguous ISO 639-1 aliases."""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from functools import cache
from importlib import resources

from gateway.errors import InvalidInput, shown


@cache
def flores200_codes() -> tuple[str, ...]:
    """The 202 FLORES-200 codes in the order of the NLLB-200 tokenizer's language tokens."""
    text = resources.files("gateway.data").joinpath("flores200.txt").read_text(encoding="utf-8")
    return tuple(line.strip() for line in text.splitlines() if line.strip())


@cache
def iso639_1_aliases() -> dict[str, str]:
    """Two-letter codes that name one FLORES-200 language (`en` -> `eng_Latn`); ambiguous ones (`zh`) are
    left out, so a client never gets a script it did not ask for."""
    text = resources.files("gateway.data").joinpath("iso639_1.tsv").read_text(encoding="utf-8")
    return dict(line.split("\t", 1) for line in text.splitlines() if line.strip())


def resolve_language(code: str, available: Sequence[str], field: str = "language") -> str:
    """The FLORES-200 code for `code` (a FLORES code in any case, or an ISO 639-1 alias), if the model has
    it; otherwise InvalidInput naming the code and the closest valid ones."""
    known = {c.lower(): c for c in available}
    wanted = code.strip()
    resolved = known.get(wanted.lower()) or iso639_1_aliases().get(wanted.lower())
    if resolved is not None and resolved in available:
        return resolved
    if not wanted:
        raise InvalidInput(f"{field}: a language code is required, e.g. eng_Latn or en")
    # Codes are short: a long value is no typo of one, and comparing it with every code would cost time.
    close = (
        difflib.get_close_matches(wanted.lower(), list(known), n=3, cutoff=0.5) if len(wanted) < 40 else []
    )
    hint = (
        f"; did you mean {', '.join(known[c] for c in close)}?"
        if close
        else "; use FLORES-200 codes like eng_Latn"
    )
    raise InvalidInput(f"{field}: unknown language code {shown(code)}{hint}")
