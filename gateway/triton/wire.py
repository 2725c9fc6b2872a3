"""The wire format between the gateway and Triton's Python-backend translation model: one row of request
tensors per text (token ids and decoding settings), and the n-best results back. `gateway.triton.repository`
writes these tensors into the model's config; `TranslationModel` packs and unpacks them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gateway.backends.base import Arrays
from gateway.decoding.search import Decoded, DecodingOptions, GenerationItem, SamplingOptions
from gateway.tokenization import pad_batch


@dataclass(frozen=True)
class WireTensor:
    """One tensor of the Triton translation model: its name, numpy dtype and per-item dims (-1: any)."""

    name: str
    dtype: str
    dims: tuple[int, ...]
    ragged: bool = False  # items of one batch may differ in length (Triton: allow_ragged_batch)


REQUEST_TENSORS = (
    WireTensor("SOURCE_IDS", "int64", (-1,), ragged=True),  # [src_lang] text </s>, padded
    WireTensor("SOURCE_LENGTH", "int64", (1,)),
    WireTensor("PREFIX", "int64", (2,)),  # decoder start, target language
    WireTensor("MAX_NEW_TOKENS", "int64", (1,)),
    WireTensor("BEAM_SIZE", "int64", (1,)),
    WireTensor("NUM_RETURN", "int64", (1,)),
    WireTensor("LENGTH_PENALTY", "float64", (1,)),
    WireTensor("EARLY_STOPPING", "int64", (1,)),
    WireTensor("DO_SAMPLE", "int64", (1,)),
    WireTensor("TEMPERATURE", "float64", (1,)),
    WireTensor("TOP_K", "int64", (1,)),
    WireTensor("TOP_P", "float64", (1,)),
    WireTensor("HAS_SEED", "int64", (1,)),
    WireTensor("SEED", "uint64", (1,)),
    WireTensor("SEED_OFFSET", "int64", (1,)),
)
RESPONSE_TENSORS = (
    WireTensor("TOKENS", "int64", (-1, -1)),  # [hypotheses, tokens], -1 after the end
    WireTensor("TOKEN_COUNT", "int64", (-1,)),  # per hypothesis; -1: no such hypothesis
    WireTensor("SCORES", "float64", (-1,)),
    WireTensor("LOGPROBS", "float32", (-1, -1)),
)


def _column(values: list[float] | list[int], dtype: str) -> np.ndarray:
    return np.asarray(values, dtype=dtype).reshape(-1, 1)


def pack_items(items: list[GenerationItem], pad_id: int) -> Arrays:
    """GenerationItems -> the request tensors (one row per item)."""
    source, _ = pad_batch([item.source for item in items], pad_id)
    options = [item.options for item in items]
    sampling = [o.sampling or SamplingOptions() for o in options]
    return {
        "SOURCE_IDS": source,
        "SOURCE_LENGTH": _column([len(item.source) for item in items], "int64"),
        "PREFIX": np.asarray([item.prefix for item in items], dtype=np.int64).reshape(-1, 2),
        "MAX_NEW_TOKENS": _column([item.limit for item in items], "int64"),
        "BEAM_SIZE": _column([o.beam_size for o in options], "int64"),
        "NUM_RETURN": _column([o.num_return for o in options], "int64"),
        "LENGTH_PENALTY": _column([o.length_penalty for o in options], "float64"),
        "EARLY_STOPPING": _column([int(o.early_stopping) for o in options], "int64"),
        "DO_SAMPLE": _column([int(o.sampling is not None) for o in options], "int64"),
        "TEMPERATURE": _column([s.temperature for s in sampling], "float64"),
        "TOP_K": _column([s.top_k for s in sampling], "int64"),
        "TOP_P": _column([s.top_p for s in sampling], "float64"),
        "HAS_SEED": _column([int(s.seed is not None) for s in sampling], "int64"),
        "SEED": _column([s.seed or 0 for s in sampling], "uint64"),
        "SEED_OFFSET": _column([item.seed_offset for item in items], "int64"),
    }


def unpack_items(arrays: Arrays) -> list[GenerationItem]:
    """The request tensors -> GenerationItems; the inverse of `pack_items`."""
    items = []
    for row in range(len(arrays["SOURCE_IDS"])):

        def get(name: str, row: int = row) -> np.generic:
            value: np.generic = arrays[name][row, 0]
            return value

        sampling = None
        if get("DO_SAMPLE"):
            sampling = SamplingOptions(
                temperature=float(get("TEMPERATURE")),
                top_k=int(get("TOP_K")),
                top_p=float(get("TOP_P")),
                seed=int(get("SEED")) if get("HAS_SEED") else None,
            )
        options = DecodingOptions(
            beam_size=int(get("BEAM_SIZE")),
            length_penalty=float(get("LENGTH_PENALTY")),
            early_stopping=bool(get("EARLY_STOPPING")),
            num_return=int(get("NUM_RETURN")),
            sampling=sampling,
        )
        length = int(get("SOURCE_LENGTH"))
        prefix = arrays["PREFIX"][row]
        items.append(
            GenerationItem(
                source=[int(t) for t in arrays["SOURCE_IDS"][row, :length]],
                prefix=(int(prefix[0]), int(prefix[1])),
                limit=int(get("MAX_NEW_TOKENS")),
                options=options,
                seed_offset=int(get("SEED_OFFSET")),
            )
        )
    return items


def pack_decoded(results: list[Decoded]) -> Arrays:
    """Decoded results -> the response tensors, padded to the most hypotheses and the longest."""
    n = len(results)
    # At least one of each: empty tensors are not worth the edge cases of every transport.
    hypotheses = max((len(r.tokens) for r in results), default=1)
    longest = max(1, max((len(t) for r in results for t in r.tokens), default=1))
    tokens = np.full((n, hypotheses, longest), -1, dtype=np.int64)
    logprobs = np.zeros((n, hypotheses, longest), dtype=np.float32)
    counts = np.full((n, hypotheses), -1, dtype=np.int64)
    scores = np.zeros((n, hypotheses), dtype=np.float64)
    for i, result in enumerate(results):
        rows = zip(result.tokens, result.scores, result.logprobs, strict=True)
        for h, (ids, score, lps) in enumerate(rows):
            tokens[i, h, : len(ids)] = ids
            logprobs[i, h, : len(lps)] = lps
            counts[i, h] = len(ids)
            scores[i, h] = score
    return {"TOKENS": tokens, "TOKEN_COUNT": counts, "SCORES": scores, "LOGPROBS": logprobs}


def unpack_decoded(arrays: Arrays) -> list[Decoded]:
    """The response tensors -> Decoded results; the inverse of `pack_decoded`."""
    results = []
    for i, counts in enumerate(arrays["TOKEN_COUNT"]):
        kept = [h for h, count in enumerate(counts) if count >= 0]
        results.append(
            Decoded(
                tokens=[[int(t) for t in arrays["TOKENS"][i, h, : counts[h]]] for h in kept],
                scores=[float(arrays["SCORES"][i, h]) for h in kept],
                logprobs=[[float(v) for v in arrays["LOGPROBS"][i, h, : counts[h]]] for h in kept],
            )
        )
    return results
