"""What to decode and how to pick tokens, one text at a time: greedy, sampling and beam search as per-text
states that the engine steps with their rows' logits. Nothing here knows the batch or the runtime.

Beam search keeps transformers' semantics (tested token for token against `generate()`): 2k candidates per
step, finished hypotheses scored by sum(log p) / length ** length_penalty (the length counts the
target-language token), the early-stopping heuristic, and hypotheses at the length limit finalized.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

NEG = np.float32(-1e9)


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


def draw(logits: np.ndarray, sampling: SamplingOptions, rng: np.random.Generator) -> int:
    """One token from temperature-scaled, top-k and top-p filtered probabilities."""
    # The maximum is subtracted before dividing, so that no temperature > 0 overflows: the best token scales
    # to 0, the others to <= 0 (or -inf).
    shifted = logits.astype(np.float64)
    scaled = (shifted - shifted.max()) / sampling.temperature
    if 0 < sampling.top_k < len(scaled):
        cut = np.partition(scaled, -sampling.top_k)[-sampling.top_k]
        scaled = np.where(scaled < cut, -np.inf, scaled)
    probs = np.exp(scaled - scaled.max())
    probs /= probs.sum()
    if sampling.top_p < 1:
        keep = nucleus(probs, sampling.top_p)
        kept = np.zeros_like(probs)
        kept[keep] = probs[keep]
        probs = kept / kept.sum()
    return int(rng.choice(len(probs), p=probs))


def nucleus(probs: np.ndarray, top_p: float, first: int = 256) -> np.ndarray:
    """The most probable tokens, in order (ties: the lower token first), up to and including the one whose
    cumulative probability reaches top_p. The same as the prefix of a full sort of the vocabulary, found
    by sorting only the best `first` tokens, then more, until the prefix is inside them: a peaked
    distribution's nucleus is a few tokens of the 256k, which a full sort took ~35 ms a row to find."""
    count = min(first, len(probs))
    while True:
        if 8 * count > len(probs):  # most of the vocabulary: one sort of it all
            count = len(probs)
            best = np.argsort(-probs, kind="stable")
        else:
            cut = len(probs) - count
            best = np.flatnonzero(probs >= np.partition(probs, cut)[cut])  # those tied at the cut, too
            best = best[np.argsort(-probs[best], kind="stable")]  # ascending tokens: ties stay in order
        cumulative = np.cumsum(probs[best])
        end = int(np.searchsorted(cumulative, top_p)) + 1
        if end <= len(best) or count == len(probs):
            return best[:end]
        # every token left is at most as probable as the last one: at least this many more are needed
        more = (top_p - cumulative[-1]) / max(float(probs[best[-1]]), 1e-300)
        count = int(min(len(probs), max(2 * len(best), 1.25 * (len(best) + more))))


# A step's choice: for each row that goes on, its parent among the search's current rows and its next token.
Choice = tuple[list[int], list[int]]


GROUP = 64  # tokens a group, in the group maxima that narrow beam search's candidates


@dataclass(frozen=True)
class StepView:
    """One step's log-probabilities [batch rows, vocab], with each row's best token and its log-probability
    worked out once for the whole batch (what greedy texts need, without copying their rows)."""

    logp: np.ndarray
    best: np.ndarray
    best_logp: np.ndarray

    @classmethod
    def of(cls, logp: np.ndarray) -> StepView:
        best = logp.argmax(axis=1)
        return cls(logp, best, logp[np.arange(len(best)), best])

    @property
    def strides(self) -> int:
        """Tokens 0..GROUP * strides - 1 form `strides` groups, group g holding g, g + strides, ...; each
        token after them is a group of its own."""
        return int(self.logp.shape[1]) // GROUP

    @functools.cached_property
    def group_max(self) -> np.ndarray:
        """[batch rows, groups]: the largest log-probability of each group (a reduction across GROUP
        contiguous slices, which runs at memory speed)."""
        rows, g = self.logp.shape[0], self.strides
        grouped = self.logp[:, : GROUP * g].reshape(rows, GROUP, g).max(axis=1)
        return np.concatenate([grouped, self.logp[:, GROUP * g :]], axis=1)

    def group_tokens(self, groups: np.ndarray) -> np.ndarray:
        """[len(groups), GROUP] the tokens of each group; -1 pads the groups of one token."""
        g = self.strides
        strided = groups[:, None] + g * np.arange(GROUP)
        single = np.full((len(groups), GROUP), -1)
        single[:, 0] = GROUP * g + groups - g
        return np.where((groups < g)[:, None], strided, single)


def best_candidates(
    view: StepView, rows: Sequence[int], add: np.ndarray, n: int
) -> list[tuple[int, int, float]]:
    """The n best (i, token, score) by score = logp[rows[i], token] + add[i] (float32), best first; among
    equal scores, the lower i then the lower token first.

    A selection over every row's whole vocabulary (k beams x 256k tokens) took ~30 ms a step; instead the
    n best groups of tokens by their maxima are found first (with any tied at the cut): they hold the n
    best tokens, since a token outside them is beaten by the maxima of n groups. Only their tokens are
    then ranked."""
    index = np.asarray(rows)
    maxima = view.group_max[index] + add[:, None]  # [len(rows), groups]
    flat = maxima.reshape(-1)
    cut = flat.size - min(n, flat.size)
    picked = np.flatnonzero(flat >= np.partition(flat, cut)[cut])
    owner, group = np.divmod(picked, maxima.shape[1])
    tokens = view.group_tokens(group)  # [groups picked, GROUP]
    real = tokens >= 0
    owners, tokens = np.broadcast_to(owner[:, None], tokens.shape)[real], tokens[real]
    scores = view.logp[index[owners], tokens] + add[owners]
    order = np.lexsort((tokens, owners, -scores))[:n]
    return list(zip(owners[order].tolist(), tokens[order].tolist(), scores[order].tolist(), strict=True))


class Search:
    """One text's decoding. `rows` rows start it; each `step` gets the step's log-probabilities and the
    text's rows there, and returns the rows that go on (parents among its rows, next tokens), possibly
    fewer; `done` then `result()`."""

    rows: int
    done: bool = False

    def step(self, view: StepView, rows: Sequence[int]) -> Choice:
        raise NotImplementedError

    def result(self) -> Decoded:
        raise NotImplementedError

    def new_tokens(self) -> list[tuple[int, int]]:
        """(row, token) generated at the last step, for streaming (greedy and sampling)."""
        return []


class Independent(Search):
    """Greedy (one row) or sampling (`num_return` independent rows, each with its own generator)."""

    def __init__(self, item: GenerationItem, eos: int) -> None:
        options = item.options
        self.eos, self.limit = eos, item.limit
        self.sampling = options.sampling
        copies = options.num_return if self.sampling is not None else 1
        self.rows = copies
        seed = None if self.sampling is None else self.sampling.seed
        self.rngs = [
            np.random.default_rng(None if seed is None else [seed, item.seed_offset, copy])
            for copy in range(copies)
        ]
        self.tokens: list[list[int]] = [[] for _ in range(copies)]
        self.logprobs: list[list[float]] = [[] for _ in range(copies)]
        self.scores = [0.0] * copies
        self.active = list(range(copies))  # copy index of each live row, in row order
        self._last: list[tuple[int, int]] = []

    def step(self, view: StepView, rows: Sequence[int]) -> Choice:
        parents, tokens = [], []
        self._last = []
        for row, (batch_row, copy) in enumerate(zip(rows, self.active, strict=True)):
            if self.sampling is not None:  # log-probabilities are logits up to a constant per row
                token = draw(view.logp[batch_row], self.sampling, self.rngs[copy])
                value = float(view.logp[batch_row, token])
            else:
                token, value = int(view.best[batch_row]), float(view.best_logp[batch_row])
            self.scores[copy] += value
            if token == self.eos:
                continue
            self.tokens[copy].append(token)
            self.logprobs[copy].append(value)
            self._last.append((copy, token))
            if len(self.tokens[copy]) < self.limit:
                parents.append(row)
                tokens.append(token)
        self.active = [self.active[p] for p in parents]
        self.rows = len(self.active)
        self.done = not self.active
        return parents, tokens

    def new_tokens(self) -> list[tuple[int, int]]:
        return self._last

    def result(self) -> Decoded:
        return Decoded(self.tokens, [float(s) for s in self.scores], self.logprobs)


class Beam(Search):
    """Beam search over `beam_size` rows (all copies of the prefix at first, as transformers starts)."""

    def __init__(self, item: GenerationItem, eos: int) -> None:
        options = item.options
        self.eos, self.limit = eos, item.limit
        self.k, self.penalty, self.early = options.beam_size, options.length_penalty, options.early_stopping
        self.num_return = options.num_return
        self.rows = self.k
        self.running = np.full(self.k, NEG, dtype=np.float32)
        self.running[0] = 0.0  # one live beam at first
        self.sequences: list[list[int]] = [[] for _ in range(self.k)]
        self.step_logps: list[list[float]] = [[] for _ in range(self.k)]
        self.pool: list[tuple[float, list[int], list[float]]] = []  # finished: (score, tokens, logprobs)
        self.generated = 0

    def step(self, view: StepView, rows: Sequence[int]) -> Choice:
        self.generated += 1
        k, eos = self.k, self.eos
        # candidates by score; transformers stops adding to a full pool under early stopping (checked
        # once per step)
        candidates = best_candidates(view, rows, self.running, 2 * k)
        at_limit = self.generated >= self.limit
        new_running: list[tuple[float, int, int]] = []
        can_add = not (len(self.pool) == k and self.early)
        for rank, (beam, token, score) in enumerate(candidates):
            if at_limit or token == eos:
                if rank < k and can_add:
                    ended = token == eos
                    body = self.sequences[beam] + ([] if ended else [token])
                    lps = self.step_logps[beam] + ([] if ended else [float(view.logp[rows[beam], token])])
                    self.pool.append((score / ((self.generated + 1) ** self.penalty), body, lps))
                    self.pool.sort(key=lambda entry: -entry[0])
                    del self.pool[k:]
            elif len(new_running) < k:
                new_running.append((score, beam, token))
        if at_limit or not new_running or self._search_done(new_running[0][0]):
            self.done = True
            self.rows = 0
            return [], []
        while len(new_running) < k:  # fewer than k continuations: pad with dead beams
            new_running.append((float(NEG), new_running[0][1], new_running[0][2]))
        self.running = np.array([score for score, _, _ in new_running], dtype=np.float32)
        self.sequences = [self.sequences[b] + [t] for _, b, t in new_running]
        self.step_logps = [self.step_logps[b] + [float(view.logp[rows[b], t])] for _, b, t in new_running]
        return [b for _, b, _ in new_running], [t for _, _, t in new_running]

    def _search_done(self, best_running: float) -> bool:
        if len(self.pool) < self.k:
            return False
        length = self.generated + 1
        return self.early or best_running / (length**self.penalty) <= self.pool[-1][0]

    def result(self) -> Decoded:
        best = self.pool[: self.num_return]
        return Decoded([b for _, b, _ in best], [s for s, _, _ in best], [lps for _, _, lps in best])


def search_for(item: GenerationItem, eos: int) -> Search:
    return Beam(item, eos) if item.options.mode == "beam" else Independent(item, eos)
