"""The decoder's state for the rows decoding together: every layer's self-attention keys and values, the
cross-attention keys and values of every row's source, and the masks that let rows of different lengths
share one batch.

Self-attention slots are shared: at every step each row appends its new token at the same slot, so a row
that joins later has its earlier slots masked (left padding); its position comes from its own length.
Cross-attention is padded to the longest source on the right. Rows leave or are reordered (beams) by one
gather; slots no row uses any more are dropped.

The parts run synchronously (`SyncPart.run_sync`): the engine owns its thread.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from gateway.backends.base import Arrays
from gateway.manifest import TensorSpec


class SyncPart(Protocol):
    """A model part the engine can run on its own thread (ONNX Runtime in-process)."""

    @property
    def inputs(self) -> Sequence[TensorSpec]: ...

    @property
    def outputs(self) -> Sequence[TensorSpec]: ...

    def run_sync(self, inputs: Arrays, outputs: Sequence[str] | None = None) -> Arrays: ...


@dataclass(frozen=True)
class StepParts:
    """The exported translation graphs (`gateway.export.seq2seq`)."""

    encoder: SyncPart
    cross_kv: SyncPart
    decoder_step: SyncPart

    @classmethod
    def of(cls, parts: Mapping[str, object]) -> StepParts:
        missing = {"encoder", "cross_kv", "decoder_step"} - set(parts)
        if missing:
            from gateway.errors import InvalidInput

            raise InvalidInput(
                f"this translation export lacks {', '.join(sorted(missing))}: export it again with this "
                "version of pgw (`pgw export MODEL OUT --task translation`)"
            )
        return cls(parts["encoder"], parts["cross_kv"], parts["decoder_step"])  # type: ignore[arg-type]


class Batch:
    """The cache of the rows in flight, in row order."""

    def __init__(self, parts: StepParts, pad_id: int) -> None:
        self.parts = parts
        self.pad_id = pad_id
        step = parts.decoder_step
        names = [spec.name for spec in step.inputs]
        self.past = [n for n in names if n.startswith("past.")]
        self.cross = [n for n in names if n.startswith("cross.")]
        self.present = [spec.name for spec in step.outputs if spec.name.startswith("present.")]
        shape = next(spec.shape for spec in step.inputs if spec.name == self.past[0])
        self.heads, self.head_dim = int(shape[1]), int(shape[3])
        dtype = next(spec.dtype for spec in step.inputs if spec.name == self.past[0])
        self.dtype = np.dtype(dtype)
        self.clear()

    def clear(self) -> None:
        empty = np.zeros((0, self.heads, 1, self.head_dim), dtype=self.dtype)
        self.self_kv = [empty] * len(self.past)
        self.cross_kv = [np.zeros((0, self.heads, 0, self.head_dim), dtype=self.dtype)] * len(self.cross)
        self.self_mask = np.zeros((0, 1), dtype=np.int64)  # one slot, masked: the graph wants >= 1
        self.source_mask = np.zeros((0, 0), dtype=np.int64)

    @property
    def rows(self) -> int:
        return int(self.self_mask.shape[0])

    @property
    def slots(self) -> int:
        return int(self.self_mask.shape[1])

    @property
    def cached_tokens(self) -> int:
        """Cache slots in use: what admission budgets (self slots and source tokens of every row)."""
        return self.rows * (self.slots + int(self.source_mask.shape[1]))

    def encode(self, sources: Sequence[Sequence[int]]) -> tuple[list[np.ndarray], np.ndarray]:
        """Run the encoder and the cross projections for new texts: (cross kv, source mask)."""
        width = max(len(s) for s in sources)
        input_ids = np.full((len(sources), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(sources), width), dtype=np.int64)
        for row, source in enumerate(sources):
            input_ids[row, : len(source)] = source
            mask[row, : len(source)] = 1
        hidden = self.parts.encoder.run_sync({"input_ids": input_ids, "attention_mask": mask})
        kv = self.parts.cross_kv.run_sync({"encoder_hidden_states": hidden["last_hidden_state"]}, self.cross)
        return [kv[name] for name in self.cross], mask

    def join(self, cross_kv: list[np.ndarray], source_mask: np.ndarray, copies: Sequence[int]) -> None:
        """Add rows: new text `i` as `copies[i]` rows (its beams or samples), slots all masked."""
        repeat = np.repeat(np.arange(len(copies)), copies)
        source = max(self.source_mask.shape[1], source_mask.shape[1])
        self.cross_kv = [
            np.concatenate([_pad_axis(old, 2, source), _pad_axis(new[repeat], 2, source)])
            for old, new in zip(self.cross_kv, cross_kv, strict=True)
        ]
        self.source_mask = np.concatenate(
            [_pad_axis(self.source_mask, 1, source), _pad_axis(source_mask[repeat], 1, source)]
        )
        count = len(repeat)
        self.self_kv = [
            np.concatenate([old, np.zeros((count, *old.shape[1:]), dtype=old.dtype)]) for old in self.self_kv
        ]
        self.self_mask = np.concatenate([self.self_mask, np.zeros((count, self.slots), dtype=np.int64)])

    def step(self, tokens: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """Feed one token per row; returns the log-probabilities [rows, vocab] and keeps the grown cache."""
        mask = np.concatenate([self.self_mask, np.ones((self.rows, 1), dtype=np.int64)], axis=1)
        feed: Arrays = {
            "input_ids": tokens.reshape(-1, 1).astype(np.int64),
            "positions": positions.reshape(-1, 1).astype(np.int64),
            "self_attention_mask": mask,
            "encoder_attention_mask": self.source_mask,
        }
        feed |= dict(zip(self.past, self.self_kv, strict=True))
        feed |= dict(zip(self.cross, self.cross_kv, strict=True))
        out = self.parts.decoder_step.run_sync(feed, ["logprobs", *self.present])
        self.self_kv = [out[name] for name in self.present]
        self.self_mask = mask
        return out["logprobs"]

    def select(self, rows: np.ndarray) -> None:
        """Keep (and reorder to) `rows`; then drop the slots and source columns no row uses."""
        if len(rows) == self.rows and np.array_equal(rows, np.arange(self.rows)):
            return
        self.self_kv = [kv[rows] for kv in self.self_kv]
        self.cross_kv = [kv[rows] for kv in self.cross_kv]
        self.self_mask = self.self_mask[rows]
        self.source_mask = self.source_mask[rows]
        self._trim()

    def _trim(self) -> None:
        if self.rows == 0:
            self.clear()
            return
        used = np.flatnonzero(self.self_mask.any(axis=0))
        first = int(used[0]) if len(used) else self.slots - 1
        first = min(first, self.slots - 1)  # the graph wants at least one slot
        if first > 0:
            self.self_kv = [kv[:, :, first:] for kv in self.self_kv]
            self.self_mask = self.self_mask[:, first:]
        sources = np.flatnonzero(self.source_mask.any(axis=0))
        width = int(sources[-1]) + 1 if len(sources) else 1
        if width < self.source_mask.shape[1]:
            self.cross_kv = [kv[:, :, :width] for kv in self.cross_kv]
            self.source_mask = self.source_mask[:, :width]


def _pad_axis(array: np.ndarray, axis: int, size: int) -> np.ndarray:
    """`array` with zeros after it along `axis`, to `size`."""
    if array.shape[axis] >= size:
        return array
    shape = list(array.shape)
    shape[axis] = size
    out = np.zeros(shape, dtype=array.dtype)
    out[tuple(slice(0, n) for n in array.shape)] = array
    return out
