"""The decoder's state for the rows decoding together: every layer's self-attention keys and values, the
cross-attention keys and values of every row's source, and the masks that let rows of different lengths
share one batch.

Self-attention slots are shared: at every step each row's new token lands at the same slot, so a row that
joins later has its earlier slots masked (left padding); its position comes from its own length. Every
buffer has room for more rows and slots: `join` writes only the new rows, a row that leaves is replaced by
the last row (`remove` moves one row per leaver), beams reorder within their own rows (`reorder`), and the
decoder step returns only the new token's keys and values. Cross-attention is padded on the right to the
longest source.

The parts run synchronously (`SyncPart.run_sync`): the engine owns its thread.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

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


class Cache(Protocol):
    """What the engine needs of the rows' state: `Batch` (numpy, host memory) or
    `resident.ResidentBatch` (ONNX Runtime values on the model's device)."""

    parts: StepParts
    rows: int
    slots: int

    @property
    def source_width(self) -> int: ...

    @property
    def cached_tokens(self) -> int: ...

    @property
    def slot_capacity(self) -> int: ...

    def clear(self) -> None: ...

    def prepare(self) -> None:
        """Whatever the cache builds on first use, built now (warm-up)."""

    def encode(self, sources: Sequence[Sequence[int]]) -> tuple[list[Any], np.ndarray]: ...

    def join(
        self, cross_kv: list[Any], source_mask: np.ndarray, copies: Sequence[int]
    ) -> list[list[int]]: ...

    def step(self, tokens: np.ndarray, positions: np.ndarray) -> np.ndarray: ...

    def reorder(self, rows: Sequence[int], parents: Sequence[int]) -> None: ...

    def remove(self, rows: Sequence[int]) -> dict[int, int]: ...


class Batch:
    """The cache of the rows in flight: rows 0..rows-1 of every buffer.

    Self-attention keys and values live in buffers [row capacity, heads, slot capacity, head]; the decoder
    step reads a prefix of rows with every slot (those not used are masked) and returns only the new
    token's key and value, which land at slot `slots`. Rows grow by doubling; when the slots run out, the
    slots still used move to the front of buffers sized for them. No step copies the cache."""

    INITIAL_SLOTS = 16

    def __init__(self, parts: StepParts, pad_id: int) -> None:
        self.parts = parts
        self.pad_id = pad_id
        step = parts.decoder_step
        names = [spec.name for spec in step.inputs]
        self.past = [n for n in names if n.startswith("past.")]
        self.cross = [n for n in names if n.startswith("cross.")]
        self.new = [spec.name for spec in step.outputs if spec.name.startswith("new.")]
        shape = next(spec.shape for spec in step.inputs if spec.name == self.past[0])
        self.heads, self.head_dim = int(shape[1]), int(shape[3])
        dtype = next(spec.dtype for spec in step.inputs if spec.name == self.past[0])
        self.dtype = np.dtype(dtype)
        self.clear()

    def clear(self) -> None:
        self.rows = 0
        self.slots = 0  # slots in use: the next token of every row goes to slot `slots`
        self._self_kv = [self._zeros(0, self.INITIAL_SLOTS) for _ in self.past]
        self._self_mask = np.zeros((0, self.INITIAL_SLOTS), dtype=np.int64)
        self._cross_kv = [self._zeros(0, 0) for _ in self.cross]
        self._source_mask = np.zeros((0, 0), dtype=np.int64)

    def prepare(self) -> None:
        return None

    def _zeros(self, rows: int, width: int) -> np.ndarray:
        return np.zeros((rows, self.heads, width, self.head_dim), dtype=self.dtype)

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
        start, end = self.rows, self.rows + count
        width = source_mask.shape[1]
        self._make_rows(end, width)
        repeat = np.repeat(np.arange(len(copies)), copies)
        for buffer, new in zip(self._cross_kv, cross_kv, strict=True):
            buffer[start:end] = 0
            buffer[start:end, :, :width] = new[repeat]
        self._source_mask[start:end] = 0
        self._source_mask[start:end, :width] = source_mask[repeat]
        for buffer in self._self_kv:
            buffer[start:end] = 0
        self._self_mask[start:end] = 0
        self.rows = end
        rows = iter(range(start, end))
        return [[next(rows) for _ in range(c)] for c in copies]

    def _make_rows(self, rows: int, width: int) -> None:
        """Room for `rows` rows (doubling) and sources of `width` tokens."""
        capacity, current = self._source_mask.shape
        if rows > capacity:
            capacity = max(rows, 2 * capacity)
            self._self_kv = [_regrow(b, capacity, b.shape[2], self.rows) for b in self._self_kv]
            self._self_mask = _regrow(self._self_mask, capacity, self._self_mask.shape[1], self.rows)
        if rows > self._source_mask.shape[0] or width > current:
            width = max(width, current)
            self._cross_kv = [_regrow(b, capacity, width, self.rows) for b in self._cross_kv]
            self._source_mask = _regrow(self._source_mask, capacity, width, self.rows)

    def step(self, tokens: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """Feed one token per row; returns the log-probabilities [rows, vocab] and keeps the new slot."""
        rows = self.rows
        if self.slots == self._self_mask.shape[1]:
            self._make_slot()
        mask = np.concatenate([self._self_mask[:rows], np.ones((rows, 1), dtype=np.int64)], axis=1)
        feed: Arrays = {
            "input_ids": tokens.reshape(-1, 1).astype(np.int64),
            "positions": positions.reshape(-1, 1).astype(np.int64),
            "self_attention_mask": mask,
            "encoder_attention_mask": self._source_mask[:rows],
        }
        feed |= {name: kv[:rows] for name, kv in zip(self.past, self._self_kv, strict=True)}
        feed |= {name: kv[:rows] for name, kv in zip(self.cross, self._cross_kv, strict=True)}
        out = self.parts.decoder_step.run_sync(feed, ["logprobs", *self.new])
        slot = self.slots
        for buffer, name in zip(self._self_kv, self.new, strict=True):
            buffer[:rows, :, slot] = out[name][:, :, 0]
        self._self_mask[:rows, slot] = 1
        self.slots += 1
        return out["logprobs"]

    def _make_slot(self) -> None:
        """Slots are full: the slots some row still uses move to the front of buffers sized for them and
        half as many again (at least INITIAL_SLOTS more). Every step reads every slot, so the buffers follow
        what is used instead of only growing: under continuous traffic the batch never empties, and a
        capacity doubled once would be read at every step from then on. A move costs one copy of the slots
        in use, once in every `headroom` steps."""
        used = np.flatnonzero(self._self_mask[: self.rows, : self.slots].any(axis=0))
        first = int(used[0]) if len(used) else self.slots
        keep = self.slots - first
        width = keep + max(self.INITIAL_SLOTS, keep // 2)
        self._self_kv = [_window(b, self.rows, first, self.slots, width) for b in self._self_kv]
        self._self_mask = _window(self._self_mask, self.rows, first, self.slots, width)
        self.slots = keep

    @property
    def slot_capacity(self) -> int:
        return int(self._self_mask.shape[1])

    def reorder(self, rows: Sequence[int], parents: Sequence[int]) -> None:
        """Within one text's `rows` (its beams): row rows[i] takes the self-attention state of
        rows[parents[i]]. Beams share their source, so cross-attention stays."""
        if list(parents) == list(range(len(parents))):
            return
        target = np.asarray(rows)
        source = target[np.asarray(parents)]
        used = self.slots
        for buffer in self._self_kv:
            buffer[target, :, :used] = buffer[source, :, :used]
        self._self_mask[target, :used] = self._self_mask[source, :used]

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
        if self.rows == 0:
            self.clear()
        return moved

    def _copy_row(self, source: int, target: int) -> None:
        used = self.slots
        for buffer in self._self_kv:
            buffer[target, :, :used] = buffer[source, :, :used]
        self._self_mask[target] = self._self_mask[source]
        for buffer in self._cross_kv:
            buffer[target] = buffer[source]
        self._source_mask[target] = self._source_mask[source]


def _regrow(array: np.ndarray, rows: int, width: int, used: int) -> np.ndarray:
    """A zeroed array of `rows` rows and `width` on axis 2 (axis 1 for masks), with the first `used` rows
    of `array` copied in."""
    if array.ndim == 2:
        out = np.zeros((rows, width), dtype=array.dtype)
        out[:used, : array.shape[1]] = array[:used]
        return out
    out = np.zeros((rows, array.shape[1], width, array.shape[3]), dtype=array.dtype)
    out[:used, :, : array.shape[2]] = array[:used]
    return out


def _window(array: np.ndarray, used: int, start: int, stop: int, width: int) -> np.ndarray:
    """A zeroed array as `array` with `width` slots (axis 2; axis 1 for masks), holding slots
    start..stop-1 of its first `used` rows at the front."""
    if array.ndim == 2:
        out = np.zeros((array.shape[0], width), dtype=array.dtype)
        out[:used, : stop - start] = array[:used, start:stop]
        return out
    out = np.zeros((array.shape[0], array.shape[1], width, array.shape[3]), dtype=array.dtype)
    out[:used, :, : stop - start] = array[:used, :, start:stop]
    return out
