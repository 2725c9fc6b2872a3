"""The decoder's state for the rows decoding together: every layer's self-attention keys and values, the
cross-attention keys and values of every row's source, and the masks that let rows of different lengths
share one batch.

Self-attention slots are shared: at every step each row appends its new token at the same slot, so a row
that joins later has its earlier slots masked (left padding); its position comes from its own length.
Cross-attention keys and values live in buffers with room for more rows (`join` writes only the new
rows), padded on the right to the longest source. A row that leaves is replaced by the last row (`remove`
moves one row per leaver, not the batch), and beams reorder within their own rows (`reorder`): no step
copies the whole cache but the decoder step itself. Slots no row uses any more are dropped.

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
    """The cache of the rows in flight: rows 0..rows-1 of every tensor."""

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
        self.rows = 0
        self.self_kv = [np.zeros((0, self.heads, 1, self.head_dim), dtype=self.dtype)] * len(self.past)
        self.self_mask = np.zeros((0, 1), dtype=np.int64)  # one slot, masked: the graph wants >= 1
        # Cross-attention buffers with room for `capacity` rows; rows 0..rows-1 are in use.
        self._cross_kv = [np.zeros((0, self.heads, 0, self.head_dim), dtype=self.dtype)] * len(self.cross)
        self._source_mask = np.zeros((0, 0), dtype=np.int64)

    @property
    def slots(self) -> int:
        return int(self.self_mask.shape[1])

    @property
    def source_width(self) -> int:
        return int(self._source_mask.shape[1])

    @property
    def cached_tokens(self) -> int:
        """Cache slots in use: what admission budgets (self slots and source tokens of every row)."""
        return self.rows * (self.slots + self.source_width)

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

    def join(
        self, cross_kv: list[np.ndarray], source_mask: np.ndarray, copies: Sequence[int]
    ) -> list[list[int]]:
        """Add new texts, text `i` as `copies[i]` rows (its beams or samples), their slots masked; returns
        each new text's rows."""
        count = sum(copies)
        start = self.rows
        self._make_room(start + count, source_mask.shape[1])
        repeat = np.repeat(np.arange(len(copies)), copies)
        width = source_mask.shape[1]
        for buffer, new in zip(self._cross_kv, cross_kv, strict=True):
            buffer[start : start + count] = 0
            buffer[start : start + count, :, :width] = new[repeat]
        self._source_mask[start : start + count] = 0
        self._source_mask[start : start + count, :width] = source_mask[repeat]
        self.self_kv = [
            np.concatenate([kv, np.zeros((count, *kv.shape[1:]), dtype=kv.dtype)]) for kv in self.self_kv
        ]
        self.self_mask = np.concatenate([self.self_mask, np.zeros((count, self.slots), dtype=np.int64)])
        self.rows += count
        rows = iter(range(start, start + count))
        return [[next(rows) for _ in range(c)] for c in copies]

    def _make_room(self, rows: int, width: int) -> None:
        """Grow the cross-attention buffers to `rows` rows and `width` source columns (doubling rows)."""
        capacity, current = self._source_mask.shape
        if rows <= capacity and width <= current:
            return
        capacity = max(rows, 2 * capacity) if rows > capacity else capacity
        width = max(width, current)
        used = self.rows
        grown = []
        for buffer in self._cross_kv:
            fresh = np.zeros((capacity, self.heads, width, self.head_dim), dtype=self.dtype)
            fresh[:used, :, :current] = buffer[:used]
            grown.append(fresh)
        self._cross_kv = grown
        mask = np.zeros((capacity, width), dtype=np.int64)
        mask[:used, :current] = self._source_mask[:used]
        self._source_mask = mask

    def step(self, tokens: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """Feed one token per row; returns the log-probabilities [rows, vocab] and keeps the grown cache."""
        rows = self.rows
        mask = np.concatenate([self.self_mask, np.ones((rows, 1), dtype=np.int64)], axis=1)
        feed: Arrays = {
            "input_ids": tokens.reshape(-1, 1).astype(np.int64),
            "positions": positions.reshape(-1, 1).astype(np.int64),
            "self_attention_mask": mask,
            "encoder_attention_mask": self._source_mask[:rows],
        }
        feed |= dict(zip(self.past, self.self_kv, strict=True))
        feed |= {name: kv[:rows] for name, kv in zip(self.cross, self._cross_kv, strict=True)}
        out = self.parts.decoder_step.run_sync(feed, ["logprobs", *self.present])
        self.self_kv = [out[name] for name in self.present]
        self.self_mask = mask
        return out["logprobs"]

    def reorder(self, rows: Sequence[int], parents: Sequence[int]) -> None:
        """Within one text's `rows` (its beams): row rows[i] takes the self-attention state of
        rows[parents[i]]. Beams share their source, so cross-attention stays."""
        if list(parents) == list(range(len(parents))):
            return
        target = np.asarray(rows)
        source = target[np.asarray(parents)]
        for kv in self.self_kv:
            kv[target] = kv[source]
        self.self_mask[target] = self.self_mask[source]

    def remove(self, rows: Sequence[int]) -> dict[int, int]:
        """Drop rows: each hole takes the last row in use. Returns {old row: new row} of the rows moved."""
        moved: dict[int, int] = {}
        holes = sorted(set(rows))
        if not holes:
            return moved
        leaving = set(holes)
        last = self.rows - 1
        for hole in holes:
            while last in leaving and last > hole:
                last -= 1
            if hole >= last:
                break
            self._copy_row(last, hole)
            moved[last] = hole
            leaving.add(last)
            last -= 1
        self.rows -= len(holes)
        rows_left = self.rows
        self.self_kv = [kv[:rows_left] for kv in self.self_kv]
        self.self_mask = self.self_mask[:rows_left]
        self._trim()
        return moved

    def _copy_row(self, source: int, target: int) -> None:
        for kv in self.self_kv:
            kv[target] = kv[source]
        self.self_mask[target] = self.self_mask[source]
        for buffer in self._cross_kv:
            buffer[target] = buffer[source]
        self._source_mask[target] = self._source_mask[source]

    def _trim(self) -> None:
        """Drop leading self-attention slots no row uses (at most all but one)."""
        if self.rows == 0:
            self.clear()
            return
        used = np.flatnonzero(self.self_mask.any(axis=0))
        first = min(int(used[0]) if len(used) else self.slots - 1, self.slots - 1)
        if first > 0:
            self.self_kv = [np.ascontiguousarray(kv[:, :, first:]) for kv in self.self_kv]
            self.self_mask = np.ascontiguousarray(self.self_mask[:, first:])
