"""Beam search's candidate selection against a full sort of every row's vocabulary."""

from __future__ import annotations

import numpy as np
import pytest

from gateway.decoding.search import GROUP, StepView, best_candidates


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
