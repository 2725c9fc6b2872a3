"""The decoder's cache kept where the model runs (a GPU's memory), as ONNX Runtime values.

`ResidentBatch` is `Batch` with every key and value tensor an `OrtValue` on the decoder step's device: the
encoder's output, the cross-attention projections and every layer's self-attention cache go from one graph
to the next there, and only the step's log-probabilities come back to the host. What `Batch` does with
numpy indexing, small ONNX graphs of its own (`CacheOps`) do on the device:

- a step's new keys and values join the cache (Concat), slots no row uses any more are dropped from the
  front (Slice), and rows take their new places (Gather: beams taking their parents' state, rows that
  left replaced by the last ones), all in one run of one graph before the next step, however many beams
  reordered and rows left in between;
- joining rows get zeroed self-attention slots (ConstantOfShape) and their cross-attention, repeated per
  beam and padded to the batch's source width (Gather, Pad).

Every tensor is as large as what is in use (no capacity; leading slots no row uses are dropped once there
are 8 of them, or a quarter of the slots), and nothing of the cache is ever copied through the host. The
masks and the row bookkeeping stay on the host (a few integers a row, bound at every step). A greedy step
costs one Concat per tensor besides the decoder; Slice and Gather run only in the steps that need them.

On the CPU the numpy `Batch` is faster (it writes each step's slot in place instead of joining it to a new
cache: `bench/results/`), so `auto` takes this one only for sessions on a GPU; forced on the CPU
(`kv_cache: ortvalue`) it runs the same code, which is how the suite checks it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import onnxruntime as ort

from gateway.backends.onnxruntime import CPU, CUDA, OnnxRuntimeBackend, run_bound
from gateway.decoding.batch import StepParts
from gateway.errors import ModelNotReady

OPSET = 17
_END = np.iinfo(np.int64).max


def resident_parts(parts: StepParts) -> tuple[OnnxRuntimeBackend, OnnxRuntimeBackend, OnnxRuntimeBackend]:
    """The three parts as ONNX Runtime sessions on one device, or a clear error."""
    encoder, cross_kv, step = parts.encoder, parts.cross_kv, parts.decoder_step
    if not (
        isinstance(encoder, OnnxRuntimeBackend)
        and isinstance(cross_kv, OnnxRuntimeBackend)
        and isinstance(step, OnnxRuntimeBackend)
    ):
        raise ModelNotReady("kv_cache ortvalue needs the translation parts in ONNX Runtime in-process")
    if len({encoder.ort_device, cross_kv.ort_device, step.ort_device}) != 1:
        raise ModelNotReady("kv_cache ortvalue needs the translation parts on one device")
    return encoder, cross_kv, step


class CacheOps:
    """The graphs that move a cache of `count` tensors of `dtype` on one session's device, built on first use
    (one ONNX Runtime session each, on the same provider as the decoder step)."""

    def __init__(self, count: int, dtype: np.dtype[Any], like: OnnxRuntimeBackend) -> None:
        self.count = count
        self.dtype = dtype
        self.device = like.ort_device
        options = like.session.get_provider_options()
        # these graphs only copy memory: CUDA where the decoder runs, else the CPU (never TensorRT)
        self._providers: list[str | tuple[str, dict[str, Any]]] = [
            (name, options.get(name, {})) for name in like.session.get_providers() if name in (CUDA, CPU)
        ]
        self._sessions: dict[str, ort.InferenceSession] = {}

    def update(
        self,
        cache: Sequence[ort.OrtValue],
        new: Sequence[ort.OrtValue] | None,
        order: np.ndarray | None,
        start: int,
    ) -> list[ort.OrtValue]:
        """Self-attention after a step: each tensor with its new slot (`new`, if any) joined on axis 2, its
        first `start` slots dropped, rows taken in `order` (None: as they are). Only the operations asked
        for run (one graph for each combination): a greedy step is one Concat a tensor."""
        inputs: dict[str, np.ndarray | ort.OrtValue] = {f"x{i}": x for i, x in enumerate(cache)}
        if new is not None:
            inputs |= {f"n{i}": n for i, n in enumerate(new)}
        if order is not None:
            inputs["order"] = order.astype(np.int64)
        if start:
            inputs["start"] = np.array([start], dtype=np.int64)
        flags = "".join(
            f for f, on in (("n", new is not None), ("s", start > 0), ("g", order is not None)) if on
        )
        return self._run(f"update-{flags}", inputs)

    def select(self, cache: Sequence[ort.OrtValue], order: np.ndarray, width: int) -> list[ort.OrtValue]:
        """Cross-attention after rows left: rows taken in `order`, sources cut to `width` tokens."""
        inputs: dict[str, np.ndarray | ort.OrtValue] = {f"x{i}": x for i, x in enumerate(cache)}
        inputs |= {"order": order.astype(np.int64), "width": np.array([width], dtype=np.int64)}
        return self._run("gather", inputs)

    def zeros(self, shape: Sequence[int]) -> ort.OrtValue:
        """One zeroed tensor (self-attention slots of rows joining an empty batch: all tensors share it, no
        graph ever writes into its inputs)."""
        return self._run("zeros", {"shape": np.asarray(shape, dtype=np.int64)})[0]

    def grow(
        self,
        self_kv: Sequence[ort.OrtValue],
        cross_kv: Sequence[ort.OrtValue],
        new_cross: Sequence[ort.OrtValue],
        repeat: np.ndarray,
        rows: int,
        slots: int,
        width: int,
    ) -> tuple[list[ort.OrtValue], list[ort.OrtValue]]:
        """Rows joining a batch: `rows` zeroed rows of `slots` slots after every self-attention tensor; the
        new texts' cross-attention, row i a copy of text repeat[i], after the batch's, both padded on the
        right to `width` source tokens."""
        shape = self_kv[0].shape()
        heads, head = int(shape[1]), int(shape[3])
        inputs: dict[str, np.ndarray | ort.OrtValue] = {f"x{i}": x for i, x in enumerate(self_kv)}
        inputs |= {f"c{i}": c for i, c in enumerate(cross_kv)}
        inputs |= {f"n{i}": n for i, n in enumerate(new_cross)}
        old_width, new_width = cross_kv[0].shape()[2], new_cross[0].shape()[2]
        inputs |= {
            "shape": np.array([rows, heads, slots, head], dtype=np.int64),
            "repeat": repeat.astype(np.int64),
            "pad_old": np.array([0, 0, 0, 0, 0, 0, width - old_width, 0], dtype=np.int64),
            "pad_new": np.array([0, 0, 0, 0, 0, 0, width - new_width, 0], dtype=np.int64),
        }
        out = self._run("grow", inputs)
        return out[: self.count], out[self.count :]

    def repeat(self, new_cross: Sequence[ort.OrtValue], repeat: np.ndarray) -> list[ort.OrtValue]:
        """The new texts' cross-attention, row i a copy of text repeat[i] (rows joining an empty batch)."""
        inputs: dict[str, np.ndarray | ort.OrtValue] = {f"x{i}": x for i, x in enumerate(new_cross)}
        inputs |= {"order": repeat.astype(np.int64), "width": np.array([_END], dtype=np.int64)}
        return self._run("gather", inputs)

    def prepare(self) -> None:
        """Build every graph now (at warm-up) rather than at the first step that needs it."""
        for graph in GRAPHS:
            if graph not in self._sessions:
                self._sessions[graph] = self._session(graph)

    def _run(self, graph: str, inputs: dict[str, np.ndarray | ort.OrtValue]) -> list[ort.OrtValue]:
        session = self._sessions.get(graph)
        if session is None:
            session = self._sessions[graph] = self._session(graph)
        names = [value.name for value in session.get_outputs()]
        return run_bound(session, self.device, inputs, names)[0]

    def _session(self, graph: str) -> ort.InferenceSession:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.intra_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        model = _build(graph, self.count, self.dtype)
        return ort.InferenceSession(model, options, providers=self._providers)


# update-<flags>: n joins the step's new slot, s drops leading slots, g gathers rows (in that order)
GRAPHS = ("zeros", "gather", "grow", *(f"update-{f}" for f in ("n", "ns", "ng", "nsg", "s", "g", "sg")))


def _build(graph: str, count: int, dtype: np.dtype[Any]) -> bytes:
    """The serialized ONNX model of one cache operation over `count` tensors [rows, heads, slots, head]."""
    try:
        import onnx
        from onnx import TensorProto, helper
    except ImportError as exc:  # pragma: no cover - onnx comes with the gpu and export extras
        raise ModelNotReady(
            "kv_cache ortvalue needs the onnx package: pip install 'polyglot-gateway[gpu]'"
        ) from exc

    element = helper.np_dtype_to_tensor_dtype(dtype)
    nodes: list[onnx.NodeProto] = []
    inputs: list[onnx.ValueInfoProto] = []
    outputs: list[onnx.ValueInfoProto] = []

    def tensor(name: str, dims: Sequence[str | int]) -> onnx.ValueInfoProto:
        return helper.make_tensor_value_info(name, element, list(dims))

    def ints(name: str, dims: Sequence[str | int]) -> onnx.ValueInfoProto:
        return helper.make_tensor_value_info(name, TensorProto.INT64, list(dims))

    def constant(name: str, values: list[int]) -> None:
        nodes.append(
            helper.make_node(
                "Constant",
                [],
                [name],
                value=helper.make_tensor(name, TensorProto.INT64, [len(values)], values),
            )
        )

    kv = ["rows", "heads", "slots", "head"]
    if graph == "zeros":
        inputs.append(ints("shape", [4]))
        zero = helper.make_tensor("value", element, [1], [0])
        nodes.append(helper.make_node("ConstantOfShape", ["shape"], ["y0"], value=zero))
        outputs.append(tensor("y0", kv))
    elif graph.startswith("update-"):
        flags = graph.removeprefix("update-")
        inputs += [tensor(f"x{i}", kv) for i in range(count)]
        if "n" in flags:
            inputs += [tensor(f"n{i}", ["rows", "heads", 1, "head"]) for i in range(count)]
        if "g" in flags:
            inputs.append(ints("order", ["kept"]))
        if "s" in flags:
            inputs.append(ints("start", [1]))
            constant("end", [_END])
            constant("axis", [2])
        for i in range(count):
            chain: list[
                tuple[str, list[str], dict[str, Any]]
            ] = []  # each reads the one before; the last: y{i}
            if "n" in flags:
                chain.append(("Concat", [f"n{i}"], {"axis": 2}))
            if "s" in flags:
                chain.append(("Slice", ["start", "end", "axis"], {}))
            if "g" in flags:
                chain.append(("Gather", ["order"], {"axis": 0}))
            value = f"x{i}"
            for step, (op, more, attributes) in enumerate(chain):
                out = f"y{i}" if step == len(chain) - 1 else f"{value}.{op}"
                nodes.append(helper.make_node(op, [value, *more], [out], **attributes))
                value = out
            outputs.append(tensor(f"y{i}", ["kept", "heads", "width", "head"]))
    elif graph == "gather":
        inputs += [tensor(f"x{i}", kv) for i in range(count)]
        inputs += [ints("order", ["kept"]), ints("width", [1])]
        constant("zero", [0])
        constant("axis", [2])
        for i in range(count):
            nodes.append(helper.make_node("Gather", [f"x{i}", "order"], [f"taken{i}"], axis=0))
            nodes.append(helper.make_node("Slice", [f"taken{i}", "zero", "width", "axis"], [f"y{i}"]))
            outputs.append(tensor(f"y{i}", ["kept", "heads", "width", "head"]))
    elif graph == "grow":
        inputs += [tensor(f"x{i}", kv) for i in range(count)]
        inputs += [tensor(f"c{i}", ["rows", "heads", "source", "head"]) for i in range(count)]
        inputs += [tensor(f"n{i}", ["texts", "heads", "new_source", "head"]) for i in range(count)]
        inputs += [
            ints("shape", [4]),
            ints("repeat", ["joining"]),
            ints("pad_old", [8]),
            ints("pad_new", [8]),
        ]
        zero = helper.make_tensor("value", element, [1], [0])
        nodes.append(helper.make_node("ConstantOfShape", ["shape"], ["zeros"], value=zero))
        for i in range(count):
            nodes.append(helper.make_node("Concat", [f"x{i}", "zeros"], [f"y{i}"], axis=0))
            outputs.append(tensor(f"y{i}", ["all", "heads", "slots", "head"]))
        for i in range(count):
            nodes.append(helper.make_node("Pad", [f"c{i}", "pad_old"], [f"old{i}"]))
            nodes.append(helper.make_node("Gather", [f"n{i}", "repeat"], [f"copies{i}"], axis=0))
            nodes.append(helper.make_node("Pad", [f"copies{i}", "pad_new"], [f"new{i}"]))
            nodes.append(helper.make_node("Concat", [f"old{i}", f"new{i}"], [f"z{i}"], axis=0))
            outputs.append(tensor(f"z{i}", ["all", "heads", "width", "head"]))
    else:
        raise ValueError(graph)
    model = helper.make_model(
        helper.make_graph(nodes, f"cache_{graph}", inputs, outputs),
        opset_imports=[helper.make_opsetid("", OPSET)],
    )
    model.ir_version = 8
    return bytes(model.SerializeToString())


class ResidentBatch:
    """`Batch` (same methods, same row bookkeeping) with the cache as OrtValues on the decoder's device."""

    TRIM_SLOTS = 8  # unused leading slots dropped from at least this many (or a quarter of the slots)

    def __init__(self, parts: StepParts, pad_id: int) -> None:
        self.parts = parts
        self.pad_id = pad_id
        self._encoder, self._cross_part, self._step = resident_parts(parts)
        names = [spec.name for spec in self._step.inputs]
        self.past = [n for n in names if n.startswith("past.")]
        self.cross = [n for n in names if n.startswith("cross.")]
        self.new = [spec.name for spec in self._step.outputs if spec.name.startswith("new.")]
        spec = next(spec for spec in self._step.inputs if spec.name == self.past[0])
        self.heads, self.head_dim = int(spec.shape[1]), int(spec.shape[3])
        self.dtype = np.dtype(spec.dtype)
        if len(self.cross) != len(self.past):
            raise ModelNotReady(
                "kv_cache ortvalue needs as many cross-attention tensors as self-attention ones"
            )
        self.ops = CacheOps(len(self.past), self.dtype, self._step)
        self.clear()

    def clear(self) -> None:
        self.rows = 0
        # self-attention slots of every row (a row that joined later has its first ones masked)
        self.slots = 0
        self._self_kv: list[ort.OrtValue] = []
        self._cross_kv: list[ort.OrtValue] = []
        self._self_mask = np.zeros((0, 0), dtype=np.int64)
        self._source_mask = np.zeros((0, 0), dtype=np.int64)
        # what the device tensors still owe the host bookkeeping, applied before they are next read:
        self._new: list[ort.OrtValue] | None = None  # the last step's keys and values, not yet joined
        self._order: np.ndarray | None = None  # row r of the self-attention cache takes row order[r]
        self._cross_order: np.ndarray | None = None  # the same for cross-attention (rows that left)

    @property
    def source_width(self) -> int:
        return int(self._source_mask.shape[1])

    @property
    def cached_tokens(self) -> int:
        return self.rows * (self.slots + self.source_width)

    @property
    def slot_capacity(self) -> int:
        return self.slots

    def prepare(self) -> None:
        self.ops.prepare()

    def encode(self, sources: Sequence[Sequence[int]]) -> tuple[list[ort.OrtValue], np.ndarray]:
        """The encoder and the cross projections for new texts, their outputs left on the device."""
        width = max(len(s) for s in sources)
        input_ids = np.full((len(sources), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(sources), width), dtype=np.int64)
        for row, source in enumerate(sources):
            input_ids[row, : len(source)] = source
            mask[row, : len(source)] = 1
        (hidden,), _ = self._encoder.run_resident(
            {"input_ids": input_ids, "attention_mask": mask}, ["last_hidden_state"]
        )
        kv, _ = self._cross_part.run_resident({"encoder_hidden_states": hidden}, self.cross)
        return kv, mask

    def join(
        self, cross_kv: list[ort.OrtValue], source_mask: np.ndarray, copies: Sequence[int]
    ) -> list[list[int]]:
        self._settle()
        count = sum(copies)
        repeat = np.repeat(np.arange(len(copies)), copies)
        new_width = source_mask.shape[1]
        width = max(self.source_width, new_width)
        if self.rows == 0:
            # one masked slot, never an empty tensor: fused attention kernels need not take zero-width pasts
            zeros = self.ops.zeros([count, self.heads, 1, self.head_dim])
            self._self_kv = [zeros] * len(self.past)
            self._cross_kv = self.ops.repeat(cross_kv, repeat)
            self.slots = 1
            self._self_mask = np.zeros((count, 1), dtype=np.int64)
            self._source_mask = source_mask[repeat].astype(np.int64)
        else:
            self._self_kv, self._cross_kv = self.ops.grow(
                self._self_kv, self._cross_kv, cross_kv, repeat, count, self.slots, width
            )
            self._self_mask = np.concatenate([self._self_mask, np.zeros((count, self.slots), np.int64)])
            padded = np.zeros((count, width), dtype=np.int64)
            padded[:, :new_width] = source_mask[repeat]
            old = np.zeros((self.rows, width), dtype=np.int64)
            old[:, : self.source_width] = self._source_mask
            self._source_mask = np.concatenate([old, padded])
        start = self.rows
        self.rows += count
        rows = iter(range(start, self.rows))
        return [[next(rows) for _ in range(c)] for c in copies]

    def step(self, tokens: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """Feed one token per row; returns the log-probabilities [rows, vocab] (the only copy to the host)."""
        self._settle()
        rows = self.rows
        ones = np.ones((rows, 1), dtype=np.int64)
        feed: dict[str, np.ndarray | ort.OrtValue] = {
            "input_ids": tokens.reshape(-1, 1).astype(np.int64),
            "positions": positions.reshape(-1, 1).astype(np.int64),
            "self_attention_mask": np.concatenate([self._self_mask, ones], axis=1),
            "encoder_attention_mask": self._source_mask,
        }
        feed |= dict(zip(self.past, self._self_kv, strict=True))
        feed |= dict(zip(self.cross, self._cross_kv, strict=True))
        new, (logprobs,) = self._step.run_resident(feed, self.new, ["logprobs"])
        self._new = new
        self._self_mask = np.concatenate([self._self_mask, ones], axis=1)
        self.slots += 1
        return logprobs

    def reorder(self, rows: Sequence[int], parents: Sequence[int]) -> None:
        """Within one text's `rows` (its beams): row rows[i] takes the state of rows[parents[i]]; on the
        device at the next settle, together with every other reorder and removal until then."""
        if list(parents) == list(range(len(parents))):
            return
        target = np.asarray(rows)
        source = target[np.asarray(parents)]
        order = self._pending_order()
        order[target] = order[source]
        self._self_mask[target] = self._self_mask[source]

    def remove(self, rows: Sequence[int]) -> dict[int, int]:
        """Drop rows: each hole takes the last row in use (as `Batch.remove`). Returns {old row: new row}."""
        holes = sorted(set(rows))
        moved: dict[int, int] = {}
        if not holes:
            return moved
        leaving = set(holes)
        last = self.rows - 1
        for hole in holes:
            while last in leaving and last > hole:
                last -= 1
            if hole >= last:
                break
            moved[last] = hole
            leaving.add(last)
            last -= 1
        remaining = self.rows - len(holes)
        if remaining == 0:
            self.clear()
            return moved
        keep = np.arange(remaining)
        for old, new in moved.items():
            keep[new] = old
        self._order = self._pending_order()[keep]
        cross = self._cross_order if self._cross_order is not None else np.arange(self.rows)
        self._cross_order = cross[keep]
        self._self_mask = self._self_mask[keep]
        self._source_mask = self._source_mask[keep]
        self.rows = remaining
        return moved

    def _pending_order(self) -> np.ndarray:
        if self._order is None:
            self._order = np.arange(self.rows)
        return self._order

    def _settle(self) -> None:
        """Bring the device tensors up to the host's bookkeeping: the last step's slot joined, slots no row
        uses dropped, rows in their places; one graph run for self-attention, one for cross-attention if
        rows left."""
        if self._cross_order is not None:
            used = np.flatnonzero(self._source_mask.any(axis=0))
            width = int(used[-1]) + 1 if len(used) else 0
            self._cross_kv = self.ops.select(self._cross_kv, self._cross_order, width)
            self._source_mask = self._source_mask[:, :width]
            self._cross_order = None
        used = np.flatnonzero(self._self_mask.any(axis=0))
        # slots no row uses any more (rows that joined later masked them) leave once they are worth the copy
        start = int(used[0]) if len(used) else 0
        if start < max(self.TRIM_SLOTS, self.slots // 4):
            start = 0
        if self._new is None and self._order is None and start == 0:
            return
        self._self_kv = self.ops.update(self._self_kv, self._new, self._order, start)
        self._self_mask = self._self_mask[:, start:]
        self.slots -= start
        self._new = None
        self._order = None
