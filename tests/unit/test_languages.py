"""Language codes: FLORES-200, unambiguous ISO 639-1 aliases, and helpful errors."""

from __future__ import annotations

import pytest

from gateway.errors import InvalidInput
from gateway.languages import flores200_codes, iso639_1_aliases, resolve_language

ALL = flores200_codes()


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        ("eng_Latn", "eng_Latn"),
        ("ENG_LATN", "eng_Latn"),
        ("fr", "fra_Latn"),
        ("De", "deu_Latn"),
        (" am ", "amh_Ethi"),
    ],
)
def test_codes_and_aliases_resolve(code: str, expected: str) -> None:
    assert resolve_language(code, ALL) == expected


def test_aliases_point_at_real_codes_and_skip_ambiguous_ones() -> None:
    aliases = iso639_1_aliases()
    assert all(target in ALL for target in aliases.values())
    assert "zh" not in aliases  # zho_Hans or zho_Hant: the client must say which script
    assert all(len(alias) == 2 for alias in aliases)


def test_unknown_code_names_the_closest_ones() -> None:
    with pytest.raises(
        InvalidInput, match=r"target_lang: unknown language code 'eng_Latm'; did you mean eng_Latn"
    ):
        resolve_language("eng_Latm", ALL, "target_lang")


def test_a_code_the_model_lacks_is_refused() -> None:
    with pytest.raises(InvalidInput, match="unknown language code 'fr'"):
        resolve_language("fr", ["eng_Latn", "deu_Latn"])
    with pytest.raises(InvalidInput, match="a language code is required"):
        resolve_language("", ALL)
