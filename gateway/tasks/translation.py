"""Translation: NLLB language codes, the encoder once, then our own decoding loop over the exported decoder
with its key/value cache: greedy, beam search (transformers' semantics) and sampling.

Each text is one batcher item. A batch runs the encoder once; items then decode in groups that share their
decoding settings, whatever their target languages. Rows that finish leave the batch (and the cache), so
short translations do not pay for long ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from gateway.backends.base import Arrays, Backend
from gateway.batcher import BatcherSettings, Observer
from gateway.errors import InvalidInput
from gateway.languages import resolve_language
from gateway.runtime import LoadedModel
from gateway.tasks.base import DEFAULT_LIMITS, BatchedTask, TextLimits, Timing, Usage
from gateway.tokenization import pad_batch

MAX_BEAMS = 16
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


@dataclass(frozen=True)
class TranslateInput:
    texts: list[str]
    source_lang: str
    target_lang: str
    options: DecodingOptions = field(default_factory=DecodingOptions)
    deadline: float | None = None


@dataclass(frozen=True)
class Hypothesis:
    text: str
    score: float
    token_ids: list[int]
    token_logprobs: list[float]


@dataclass(frozen=True)
class Translation:
    hypotheses: list[Hypothesis]
    truncated: bool


@dataclass(frozen=True)
class TranslateOutput:
    translations: list[Translation]
    source_lang: str
    target_lang: str
    usage: Usage
    timing: Timing


@dataclass(frozen=True)
class _Item:
    source: list[int]  # [src_lang] text </s>
    prefix: tuple[int, int]  # decoder start, target language
    limit: int  # max tokens after the prefix
    options: DecodingOptions
    seed_offset: int  # index of the text in its request: same seed, different texts -> different streams


@dataclass(frozen=True)
class _Decoded:
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
    """The exported decoder parts with a cache that can shrink and reorder by rows."""

    def __init__(self, first: Backend, step: Backend) -> None:
        self.first_part, self.step_part = first, step
        self.first_outputs = [spec.name for spec in first.outputs]
        self.step_outputs = [spec.name for spec in step.outputs]
        self.cache: Arrays = {}
        self.mask = np.zeros((0, 0), dtype=np.int64)

    async def start(self, tokens: np.ndarray, hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
        out = await self.first_part.run(
            {"input_ids": tokens, "encoder_hidden_states": hidden, "encoder_attention_mask": mask},
            self.first_outputs,
        )
        self.cache = {k.replace("present", "past_key_values"): v for k, v in out.items() if k != "logits"}
        self.mask = mask
        return out["logits"][:, -1]

    async def step(self, tokens: np.ndarray) -> np.ndarray:
        inputs = {
            "input_ids": tokens[:, None].astype(np.int64),
            "encoder_attention_mask": self.mask,
            **self.cache,
        }
        out = await self.step_part.run(inputs, self.step_outputs)
        for name, value in out.items():
            if name != "logits":
                self.cache[name.replace("present", "past_key_values")] = value
        return out["logits"][:, -1]

    def keep(self, rows: np.ndarray, self_only: bool = False) -> None:
        """Keep (and reorder to) `rows`; the cross-attention cache only changes when rows leave."""
        for name, value in self.cache.items():
            if not self_only or ".decoder." in name:
                self.cache[name] = value[rows]
        if not self_only:
            self.mask = self.mask[rows]


class TranslationModel(BatchedTask[_Item, _Decoded]):
    """Translation from a `translation` export (NLLB / M2M100 architecture)."""

    task = "translation"

    def __init__(
        self,
        model: LoadedModel,
        settings: BatcherSettings,
        observer: Observer | None = None,
        limits: TextLimits = DEFAULT_LIMITS,
        max_new_tokens: int | None = None,
    ) -> None:
        info = model.manifest.translation
        special = model.manifest.special_tokens
        if info is None or special.eos_id is None:
            raise InvalidInput(f"{model.name} is a {model.manifest.task} model, not a translation model")
        self.info = info
        self.eos = special.eos_id
        self.pad = special.pad_id
        # The smaller of the export's and the server's caps on generated tokens.
        self.max_new_tokens = min(info.max_new_tokens, max_new_tokens or info.max_new_tokens)
        super().__init__(model, settings, observer, limits)

    # ------------------------------------------------------------------------------------------ requests

    def validate(self, request: TranslateInput) -> tuple[str, str, int]:
        """Normalized source and target codes and the token limit, or InvalidInput naming the field."""
        self.limits.check(request.texts)
        source = resolve_language(request.source_lang, self.info.languages, "source_lang")
        target = resolve_language(request.target_lang, self.info.languages, "target_lang")
        o = request.options
        cap = self.max_new_tokens
        if o.max_new_tokens > cap:
            raise InvalidInput(
                f"options.max_new_tokens: {o.max_new_tokens} exceeds this model's limit of {cap}"
            )
        if not 1 <= o.beam_size <= MAX_BEAMS:
            raise InvalidInput(f"options.beam_size: {o.beam_size} is outside 1..{MAX_BEAMS}")
        if o.num_return < 1 or (o.mode != "sample" and o.num_return > o.beam_size):
            raise InvalidInput(
                f"options.num_return: {o.num_return} must be between 1 and beam_size ({o.beam_size})"
            )
        if o.sampling is not None:
            if o.beam_size > 1:
                raise InvalidInput("options.sampling cannot be combined with beam_size > 1")
            s = o.sampling
            if s.temperature <= 0:
                raise InvalidInput(f"options.sampling.temperature: {s.temperature} must be > 0")
            if not 0 < s.top_p <= 1:
                raise InvalidInput(f"options.sampling.top_p: {s.top_p} must be in (0, 1]")
            if s.top_k < 0:
                raise InvalidInput(f"options.sampling.top_k: {s.top_k} must be >= 0")
        return source, target, o.max_new_tokens or cap

    async def translate(self, request: TranslateInput) -> TranslateOutput:
        source, target, limit = self.validate(request)
        tokenizer = self.model.tokenizer
        source_id, target_id = self.info.language_token_ids[source], self.info.language_token_ids[target]
        room = tokenizer.max_length - 2
        items, truncated = [], []
        for index, encoded in enumerate(
            tokenizer.encode_batch(request.texts, add_special_tokens=False, truncate=False)
        ):
            ids = [source_id, *encoded.ids[:room], self.eos]
            truncated.append(len(encoded.ids) > room)
            prefix = (self.info.decoder_start_token_id, target_id)
            items.append(_Item(ids, prefix, limit, request.options, index))
        timed = await self.batcher.submit_all([(item, len(item.source)) for item in items], request.deadline)
        translations = []
        output_tokens = 0
        for result, was_cut in zip(timed, truncated, strict=True):
            decoded = result.value
            texts = tokenizer.decode_batch(decoded.tokens)
            output_tokens += len(decoded.tokens[0])
            hypotheses = [
                Hypothesis(text, score, tokens, logprobs if request.options.return_scores else [])
                for text, score, tokens, logprobs in zip(
                    texts, decoded.scores, decoded.tokens, decoded.logprobs, strict=True
                )
            ]
            translations.append(Translation(hypotheses, was_cut))
        return TranslateOutput(
            translations=translations,
            source_lang=source,
            target_lang=target,
            usage=Usage(sum(len(item.source) for item in items), output_tokens),
            timing=Timing.of(timed),
        )

    # ------------------------------------------------------------------------------------------- batches

    async def _run(self, items: list[_Item]) -> list[_Decoded]:
        input_ids, mask = pad_batch([item.source for item in items], self.pad)
        hidden = (await self.model.parts["encoder"].run({"input_ids": input_ids, "attention_mask": mask}))[
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
        results: list[_Decoded | None] = [None] * len(items)
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
        return _Decoder(self.model.parts["decoder"], self.model.parts["decoder_with_past"])

    async def _sample_or_greedy(
        self, items: list[_Item], hidden: np.ndarray, mask: np.ndarray
    ) -> list[_Decoded]:
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
            _Decoded(
                tokens=[tokens[r] for r in range(i * copies, (i + 1) * copies)],
                scores=[float(scores[r]) for r in range(i * copies, (i + 1) * copies)],
                logprobs=[logprobs[r] for r in range(i * copies, (i + 1) * copies)],
            )
            for i in range(len(items))
        ]

    @staticmethod
    def _draw(logits: np.ndarray, sampling: SamplingOptions, rng: np.random.Generator) -> int:
        scaled = logits.astype(np.float64) / sampling.temperature
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

    async def _beam(self, items: list[_Item], hidden: np.ndarray, mask: np.ndarray) -> list[_Decoded]:
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
            _Decoded(
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
