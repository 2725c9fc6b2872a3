"""The decoding loop of translation, over the exported encoder, decoder and decoder-with-past parts:
greedy, beam search (transformers' semantics) and sampling, with a key/value cache that shrinks as rows
finish. The gateway runs it in-process; Triton's Python-backend translation model runs the very same loop
(`gateway.triton.python_models`), and `pack_items` / `unpack_decoded` are the wire format between the two.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from gateway.backends.base import Arrays, Backend, BoundBackend
from gateway.tokenization import pad_batch

_NEG = np.float32(-1e9)


@dataclass(frozen=True)
class SamplingOptions:
    temperature: float = 1.0
    top_k: int = 0  # 0: no top-k filtering
    top_p: float = 1.0  # 1: no nucleus filtering
    seed: int | None = None


@dataclass(frozen=True)
class DecodingOptions:
    beam_size: int = 1
    max_new_tokens: int = 0  # tokens after the target-language token; 0: the model's cap
    length_penalty: float = 1.0
    early_stopping: bool = False
    num_return: int = 1
    sampling: SamplingOptions | None = None
    return_scores: bool = False

    @property
    def mode(self) -> Literal["greedy", "beam", "sample"]:
        if self.sampling is not None:
            return "sample"
        return "beam" if self.beam_size > 1 else "greedy"

    @property
    def rows(self) -> int:
        """Sequences decoded at once for one text: its beams or samples."""
        return self.num_return if self.sampling is not None else self.beam_size


@dataclass(frozen=True)
class GenerationItem:
    """One text to translate, as token ids, with its decoding settings."""

    source: list[int]  # [src_lang] text </s>
    prefix: tuple[int, int]  # decoder start, target language
    limit: int  # max tokens after the prefix
    options: DecodingOptions
    seed_offset: int  # index of the text in its request: same seed, different texts -> different streams


@dataclass(frozen=True)
class Decoded:
    """n-best token ids (prefix and </s> removed), their scores and per-token log-probabilities."""

    tokens: list[list[int]]
    scores: list[float]
    logprobs: list[list[float]]


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    logits = logits.astype(np.float32, copy=False)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return np.asarray(shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True)), dtype=np.float32)


def _top(values: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest values per row, best first."""
    part = np.argpartition(-values, k - 1, axis=-1)[:, :k]
    order = np.argsort(-np.take_along_axis(values, part, -1), axis=-1, kind="stable")
    return np.take_along_axis(part, order, -1)


class _Decoder:
    """The exported decoder parts with a cache that can shrink and reorder by rows.

    On backends that keep outputs where they computed them (`BoundBackend` with `keep_outputs`: ONNX
    Runtime on a GPU), the cache stays there from step to step and only the logits come to the host: no
    key/value tensor crosses the bus unless rows leave or beams reorder. Elsewhere the cache is arrays."""

    def __init__(self, first: Backend, step: Backend) -> None:
        self.first_part, self.step_part = first, step
        self.first_outputs = [spec.name for spec in first.outputs]
        self.step_outputs = [spec.name for spec in step.outputs]
        # each part's cache outputs, and the inputs they feed at the next step
        parts = (self.first_outputs, self.step_outputs)
        self.kept = tuple([n for n in out if n != "logits"] for out in parts)
        self.feeds = tuple([n.replace("present", "past_key_values") for n in kept] for kept in self.kept)
        self.bound: tuple[BoundBackend, BoundBackend] | None = None
        if isinstance(first, BoundBackend) and isinstance(step, BoundBackend):
            self.bound = (first, step) if first.keep_outputs and step.keep_outputs else None
        self.cache: dict[str, Any] = {}  # arrays, or values kept on the bound backend's device
        self.mask = np.zeros((0, 0), dtype=np.int64)

    async def _run(self, part: int, inputs: dict[str, Any]) -> np.ndarray:
        """Run the first part (0) or the step part (1); update the cache; return the last logits."""
        backend = (self.first_part, self.step_part)[part]
        names, kept = (self.first_outputs, self.step_outputs)[part], self.kept[part]
        if self.bound is not None:
            host, out = await self.bound[part].run_bound(inputs, ["logits"], kept)
            logits = host["logits"]
        else:
            out = await backend.run(inputs, names)
            logits = out["logits"]
        for name, feed in zip(kept, self.feeds[part], strict=True):
            self.cache[feed] = out[name]
        return logits[:, -1]

    async def start(self, tokens: np.ndarray, hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
        self.cache = {}
        self.mask = mask
        inputs = {"input_ids": tokens, "encoder_hidden_states": hidden, "encoder_attention_mask": mask}
        return await self._run(0, inputs)

    async def step(self, tokens: np.ndarray) -> np.ndarray:
        inputs = {
            "input_ids": tokens[:, None].astype(np.int64),
            "encoder_attention_mask": self.mask,
            **self.cache,
        }
        return await self._run(1, inputs)

    def keep(self, rows: np.ndarray, self_only: bool = False) -> None:
        """Keep (and reorder to) `rows`; the cross-attention cache only changes when rows leave."""
        for name, value in self.cache.items():
            if not self_only or ".decoder." in name:
                if self.bound is not None:
                    step = self.bound[1]
                    self.cache[name] = step.to_device(step.to_host(value)[rows])
                else:
                    self.cache[name] = value[rows]
        if not self_only:
            self.mask = self.mask[rows]


class Generator:
    """Runs batches of GenerationItems on the three translation parts (any Backend)."""

    def __init__(self, parts: dict[str, Backend], eos_id: int, pad_id: int) -> None:
        self.encoder = parts["encoder"]
        self.decoder = parts["decoder"]
        self.decoder_with_past = parts["decoder_with_past"]
        self.eos = eos_id
        self.pad = pad_id

    async def generate(self, items: list[GenerationItem]) -> list[Decoded]:
        """Decode one batch: the encoder once, then one decoding loop per group of items that share
        their decoding settings (whatever their target languages)."""
        input_ids, mask = pad_batch([item.source for item in items], self.pad)
        hidden = (await self.encoder.run({"input_ids": input_ids, "attention_mask": mask}))[
            "last_hidden_state"
        ]
        groups: dict[tuple[object, ...], list[int]] = {}
        for index, item in enumerate(items):
            o = item.options
            key = (
                o.mode,
                o.beam_size,
                o.num_return,
                o.length_penalty,
                o.early_stopping,
                o.sampling and (o.sampling.temperature, o.sampling.top_k, o.sampling.top_p),
            )
            groups.setdefault(key, []).append(index)
        results: list[Decoded | None] = [None] * len(items)
        for rows in groups.values():
            chosen = [items[i] for i in rows]
            picked = np.array(rows)
            group_hidden, group_mask = hidden[picked], mask[picked]
            mode = chosen[0].options.mode
            if mode == "beam":
                decoded = await self._beam(chosen, group_hidden, group_mask)
            else:
                decoded = await self._sample_or_greedy(chosen, group_hidden, group_mask)
            for i, result in zip(rows, decoded, strict=True):
                results[i] = result
        return [r for r in results if r is not None]

    def _decoder(self) -> _Decoder:
        return _Decoder(self.decoder, self.decoder_with_past)

    async def _sample_or_greedy(
        self, items: list[GenerationItem], hidden: np.ndarray, mask: np.ndarray
    ) -> list[Decoded]:
        """Greedy (argmax) or sampling; `num_return` independent rows per item when sampling."""
        options = items[0].options
        copies = options.num_return if options.mode == "sample" else 1
        owner = np.repeat(np.arange(len(items)), copies)  # row -> item
        rngs = [
            np.random.default_rng(
                None
                if it.options.sampling is None or it.options.sampling.seed is None
                else [it.options.sampling.seed, it.seed_offset, copy]
            )
            for it in items
            for copy in range(copies)
        ]
        limits = np.array([items[o].limit for o in owner])
        decoder = self._decoder()
        prefix = np.array([items[o].prefix for o in owner], dtype=np.int64)
        logits = await decoder.start(prefix, hidden[owner], mask[owner])
        active = np.arange(len(owner))  # rows still decoding, in cache order
        tokens: list[list[int]] = [[] for _ in owner]
        logprobs: list[list[float]] = [[] for _ in owner]
        scores = np.zeros(len(owner), dtype=np.float32)
        while True:
            logp = _log_softmax(logits)
            if options.mode == "sample":
                assert options.sampling is not None
                chosen = np.array(
                    [
                        self._draw(row_logits, options.sampling, rngs[r])
                        for row_logits, r in zip(logits, active, strict=True)
                    ]
                )
            else:
                chosen = logp.argmax(-1)
            picked = logp[np.arange(len(active)), chosen]
            finished = np.zeros(len(active), dtype=bool)
            for position, (row, token, value) in enumerate(zip(active, chosen, picked, strict=True)):
                scores[row] += value
                if token == self.eos:
                    finished[position] = True
                    continue
                tokens[row].append(int(token))
                logprobs[row].append(float(value))
                finished[position] = len(tokens[row]) >= limits[row]
            keep = np.flatnonzero(~finished)
            if len(keep) == 0:
                break
            if len(keep) < len(active):
                decoder.keep(keep)
                active, chosen = active[keep], chosen[keep]
            logits = await decoder.step(chosen)
        return [
            Decoded(
                tokens=[tokens[r] for r in range(i * copies, (i + 1) * copies)],
                scores=[float(scores[r]) for r in range(i * copies, (i + 1) * copies)],
                logprobs=[logprobs[r] for r in range(i * copies, (i + 1) * copies)],
            )
            for i in range(len(items))
        ]

    @staticmethod
    def _draw(logits: np.ndarray, sampling: SamplingOptions, rng: np.random.Generator) -> int:
        # The maximum is subtracted before dividing, so that no temperature > 0 overflows: the best token
        # scales to 0, the others to <= 0 (or -inf).
        shifted = logits.astype(np.float64)
        scaled = (shifted - shifted.max()) / sampling.temperature
        if 0 < sampling.top_k < len(scaled):
            cut = np.partition(scaled, -sampling.top_k)[-sampling.top_k]
            scaled = np.where(scaled < cut, -np.inf, scaled)
        probs = np.exp(scaled - scaled.max())
        probs /= probs.sum()
        if sampling.top_p < 1:
            order = np.argsort(-probs, kind="stable")
            cumulative = np.cumsum(probs[order])
            keep = order[: int(np.searchsorted(cumulative, sampling.top_p) + 1)]
            kept = np.zeros_like(probs)
            kept[keep] = probs[keep]
            probs = kept / kept.sum()
        return int(rng.choice(len(probs), p=probs))

    async def _beam(self, items: list[GenerationItem], hidden: np.ndarray, mask: np.ndarray) -> list[Decoded]:
        """Beam search with transformers' semantics: 2k candidates per step, finished hypotheses scored by
        sum(log p) / length ** length_penalty (length counts the target-language token), the early-stopping
        heuristic, and hypotheses at the length limit finalized."""
        o = items[0].options
        k, penalty = o.beam_size, o.length_penalty
        n_items = len(items)
        decoder = self._decoder()
        rows = np.repeat(np.arange(n_items), k)
        prefix = np.array([items[i].prefix for i in rows], dtype=np.int64)
        logits = await decoder.start(prefix, hidden[rows], mask[rows])
        running = np.zeros((n_items, k), dtype=np.float32)
        running[:, 1:] = _NEG  # one live beam at first, as transformers starts
        sequences: list[list[list[int]]] = [[[] for _ in range(k)] for _ in range(n_items)]
        step_logps: list[list[list[float]]] = [[[] for _ in range(k)] for _ in range(n_items)]
        finished: list[list[tuple[float, list[int], list[float]]]] = [[] for _ in range(n_items)]
        live = list(range(n_items))  # items still searching, in cache order (k rows each)
        generated = 0
        while True:
            generated += 1
            logp = _log_softmax(logits).reshape(len(live), k, -1)
            vocab = logp.shape[-1]
            total = (logp + running[live][:, :, None]).reshape(len(live), k * vocab)
            candidates = _top(total, 2 * k)
            keep_rows: list[int] = []
            next_tokens: list[int] = []
            still_live: list[int] = []
            for slot, item_index in enumerate(live):
                item = items[item_index]
                at_limit = generated >= item.limit
                beams, toks = candidates[slot] // vocab, candidates[slot] % vocab
                cand_scores = total[slot, candidates[slot]]
                new_running: list[tuple[float, int, int]] = []
                pool = finished[item_index]
                # transformers stops adding to a full pool under early stopping (checked once per step).
                can_add = not (len(pool) == k and o.early_stopping)
                for rank, (beam, token, score) in enumerate(zip(beams, toks, cand_scores, strict=True)):
                    hits = at_limit or token == self.eos
                    if hits:
                        if rank < k and can_add:
                            body = sequences[item_index][beam] + ([] if token == self.eos else [int(token)])
                            lps = step_logps[item_index][beam] + (
                                [] if token == self.eos else [float(logp[slot, beam, token])]
                            )
                            normalized = float(score) / ((generated + 1) ** penalty)
                            pool.append((normalized, body, lps))
                            pool.sort(key=lambda entry: -entry[0])
                            del pool[k:]
                    elif len(new_running) < k:
                        new_running.append((float(score), int(beam), int(token)))
                done = (
                    at_limit
                    or not new_running
                    or self._search_done(pool, k, o.early_stopping, new_running[0][0], generated + 1, penalty)
                )
                if done:
                    continue
                while len(new_running) < k:  # fewer than k continuations: pad with dead beams
                    new_running.append((float(_NEG), new_running[0][1], new_running[0][2]))
                running[item_index] = [score for score, _, _ in new_running]
                sequences[item_index] = [sequences[item_index][b] + [t] for _, b, t in new_running]
                step_logps[item_index] = [
                    step_logps[item_index][b] + [float(logp[slot, b, t])] for _, b, t in new_running
                ]
                keep_rows.extend(slot * k + b for _, b, _ in new_running)
                next_tokens.extend(t for _, _, t in new_running)
                still_live.append(item_index)
            if not still_live:
                break
            rows_kept = np.array(keep_rows)
            decoder.keep(rows_kept, self_only=len(still_live) == len(live))
            live = still_live
            logits = await decoder.step(np.array(next_tokens, dtype=np.int64))
        return [
            Decoded(
                tokens=[body for _, body, _ in pool[: o.num_return]],
                scores=[score for score, _, _ in pool[: o.num_return]],
                logprobs=[lps for _, _, lps in pool[: o.num_return]],
            )
            for pool in finished
        ]

    @staticmethod
    def _search_done(
        pool: list[tuple[float, list[int], list[float]]],
        k: int,
        early_stopping: bool,
        best_running: float,
        length: int,
        penalty: float,
    ) -> bool:
        if len(pool) < k:
            return False
        return early_stopping or best_running / (length**penalty) <= pool[-1][0]


# ------------------------------------------------------------------------------------------- wire format


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
