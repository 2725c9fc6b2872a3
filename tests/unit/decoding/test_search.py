"""Beam search's candidates and the sampling nucleus, each against a full sort of the vocabulary."""

from __future__ import annotations

import numpy as np
import pytest

from gateway.decoding.search import GROUP, StepView, best_candidates, nucleus


def _by_full_sort(logp: np.ndarray, rows: list[int], add: np.ndarray, n: int) -> list[tuple[int, int, float]]:
    total = logp[rows] + add[:, None]
    flat = [(-float(total[i, t]), i, t) for i in range(len(rows)) for t in range(logp.shape[1])]
    return [(i, t, -neg) for neg, i, t in sorted(flat)[:n]]


@pytest.mark.parametrize(
    ("vocab", "beams", "seed"),
    [(GROUP * 5, 2, 0), (GROUP * 7 + 13, 4, 1), (3, 3, 2), (1000, 1, 3), (GROUP * 3 + 1, 8, 4)],
)
def test_the_best_candidates_are_those_of_a_full_sort(vocab: int, beams: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    logp = rng.standard_normal((12, vocab)).astype(np.float32)
    logp[:, rng.integers(0, vocab, size=vocab // 4)] = -np.inf  # tokens a model rules out
    logp[2, ::7] = logp[2].max()  # ties across chunks: the lower row, then the lower token, first
    rows = rng.choice(12, size=beams, replace=False).tolist()
    if 2 not in rows:
        rows[0] = 2
    add = rng.standard_normal(beams).astype(np.float32)
    add[-1] = -1e9  # a dead beam, as at the first step
    n = 2 * beams
    got = best_candidates(StepView.of(logp), rows, add, n)
    assert got == _by_full_sort(logp, rows, add, n)


@pytest.mark.parametrize("scale", [0.1, 1.0, 10.0])
@pytest.mark.parametrize("top_p", [0.1, 0.9, 0.999999])
def test_thenucleus_is_the_prefix_of_a_full_sort(scale: float, top_p: float) -> None:
    rng = np.random.default_rng(int(scale * 10))
    for trial in range(20):
        logits = rng.standard_normal(int(rng.integers(2, 5000))) * scale
        if trial % 2:
            logits = np.round(logits, 1)  # ties: the lower token first
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        order = np.argsort(-probs, kind="stable")
        expected = order[: int(np.searchsorted(np.cumsum(probs[order]), top_p)) + 1]
        got = nucleus(probs, top_p, first=int(rng.integers(1, 64)))
        np.testing.assert_array_equal(got, expected)
