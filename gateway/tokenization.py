"""Tokenization for serving, on the `tokenizers` library alone (no transformers, no torch).

Offsets are code-point indices into the input string, as the API promises.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Encoding, Tokenizer

from gateway.manifest import SpecialTokens


@dataclass(frozen=True)
class Encoded:
    ids: list[int]
    offsets: list[tuple[int, int]]  # (start, end) code points; (0, 0) for special tokens
    special: list[bool]  # True for tokens the tokenizer added (<s>, [CLS], ...)
    truncated: bool

    def __len__(self) -> int:
        return len(self.ids)


def _encoded(encoding: Encoding, truncated: bool) -> Encoded:
    # `tokenizers` hands out fresh lists of Python ints and (int, int) tuples: no per-token conversion.
    return Encoded(
        ids=encoding.ids,
        offsets=encoding.offsets,
        special=list(map(bool, encoding.special_tokens_mask)),
        truncated=truncated,
    )


class TextTokenizer:
    """The exported `tokenizer.json`, with the model's input limit applied."""

    def __init__(self, path: Path, special: SpecialTokens, max_length: int) -> None:
        self._tokenizer = Tokenizer.from_file(str(path))
        self._tokenizer.no_truncation()
        self._tokenizer.no_padding()
        self.special = special
        self.max_length = max_length
        self.observer: Callable[[float], None] | None = None  # seconds per encode call, for metrics

    def encode_batch(
        self, texts: Sequence[str], add_special_tokens: bool = True, truncate: bool = True
    ) -> list[Encoded]:
        started = time.perf_counter()
        encodings = self._tokenizer.encode_batch(list(texts), add_special_tokens=add_special_tokens)
        encoded = [self._limit(e) if truncate else _encoded(e, False) for e in encodings]
        if self.observer is not None:
            self.observer(time.perf_counter() - started)
        return encoded

    def _limit(self, encoding: Encoding) -> Encoded:
        if len(encoding.ids) <= self.max_length:
            return _encoded(encoding, False)
        full = _encoded(encoding, True)
        # Keep the leading special tokens, as many content tokens as fit, and the trailing special tokens.
        tail = 0
        while tail < len(full.special) and full.special[-1 - tail]:
            tail += 1
        keep_head = self.max_length - tail
        pick = list(range(keep_head)) + list(range(len(full.ids) - tail, len(full.ids)))
        return Encoded(
            ids=[full.ids[i] for i in pick],
            offsets=[full.offsets[i] for i in pick],
            special=[full.special[i] for i in pick],
            truncated=True,
        )

    @property
    def vocab_size(self) -> int:
        return int(self._tokenizer.get_vocab_size())

    @functools.cached_property
    def _specials(self) -> tuple[list[int], list[int]]:
        """The special tokens the tokenizer puts before and after a text's tokens (read once)."""
        probe = self._tokenizer.encode("a", add_special_tokens=True)
        mask = probe.special_tokens_mask
        if 0 not in mask:
            return list(probe.ids), []
        return probe.ids[: mask.index(0)], probe.ids[len(mask) - mask[::-1].index(0) :]

    def encode_ids(self, rows: Sequence[Sequence[int]], truncate: bool = True) -> list[Encoded]:
        """Token ids a client tokenized itself, as `encode_batch` would have made them: between the special
        tokens the tokenizer adds around a text, cut to the input limit when `truncate`. The ids must be
        this tokenizer's (0 <= id < vocab_size); offsets are (0, 0) throughout, as there is no text."""
        head, tail = self._specials
        room = self.max_length - len(head) - len(tail)
        encoded = []
        for row in rows:
            content = list(row)[:room] if truncate else list(row)
            ids = [*head, *content, *tail]
            encoded.append(
                Encoded(
                    ids=ids,
                    offsets=[(0, 0)] * len(ids),
                    special=[True] * len(head) + [False] * len(content) + [True] * len(tail),
                    truncated=len(content) < len(row),
                )
            )
        return encoded

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return str(self._tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens))

    def decode_batch(self, batch: Sequence[Sequence[int]], skip_special_tokens: bool = True) -> list[str]:
        return list(
            self._tokenizer.decode_batch(
                [list(ids) for ids in batch], skip_special_tokens=skip_special_tokens
            )
        )


def pad_batch(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad token id rows into (input_ids, attention_mask), both int64 [batch, longest]."""
    width = max(len(row) for row in rows)
    input_ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    attention_mask = np.zeros((len(rows), width), dtype=np.int64)
    for index, row in enumerate(rows):
        input_ids[index, : len(row)] = row
        attention_mask[index, : len(row)] = 1
    return input_ids, attention_mask
