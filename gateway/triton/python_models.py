"""Triton Python-backend models: encoders and translation on ONNX Runtime inside Triton's Python stub.

`model.py` in a model directory written by `pgw export --triton` re-exports one of these classes as
`TritonPythonModel`. The runners below hold all the logic and know nothing of Triton, so they are tested
without it; the model classes only move tensors in and out.

Triton's dynamic batcher hands `execute` several requests at once. The encoder runner pads them to one batch
(ragged inputs: texts of different lengths), runs the graph once and cuts every output back to its request.
The translation runner unpacks every request's items and runs them through the gateway's decoding engine
(`gateway.decoding.engine`) together.

Tensors cross the stub through DLPack: in Triton 2.51's stub, `as_numpy()` and `Tensor(name, array)` read and
write wrong bytes when NumPy 2 is installed, while DLPack is right with NumPy 1 and 2.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from gateway.backends.base import Arrays
from gateway.backends.onnxruntime import OnnxRuntimeBackend, OrtSettings
from gateway.decoding.batch import StepParts
from gateway.decoding.engine import Engine, EngineSettings
from gateway.manifest import TensorSpec
from gateway.runtime import part_settings
from gateway.triton.wire import pack_decoded, unpack_items


def _pad_concat(arrays: Sequence[np.ndarray], value: int) -> np.ndarray:
    """Concatenate along the batch axis, padding every other axis to the largest size with `value`."""
    shape = [max(a.shape[axis] for a in arrays) for axis in range(arrays[0].ndim)]
    shape[0] = sum(a.shape[0] for a in arrays)
    out = np.full(shape, value, dtype=arrays[0].dtype)
    row = 0
    for array in arrays:
        out[(slice(row, row + array.shape[0]), *(slice(0, n) for n in array.shape[1:]))] = array
        row += array.shape[0]
    return out


class EncoderRunner:
    """One encoder graph over a list of requests (dicts of input arrays)."""

    def __init__(self, backend: OnnxRuntimeBackend, pad_id: int) -> None:
        self.backend = backend
        self.pad_id = pad_id
        self.inputs: list[TensorSpec] = list(backend.inputs)
        # output -> {axis: (input, axis)} for the output axes that follow an input's symbolic dimension
        self.trim: dict[str, dict[int, tuple[str, int]]] = {}
        for output in backend.outputs:
            axes: dict[int, tuple[str, int]] = {}
            for axis, dim in enumerate(output.shape):
                if axis == 0 or not isinstance(dim, str):
                    continue
                for spec in self.inputs:
                    if dim in spec.shape[1:]:
                        axes[axis] = (spec.name, spec.shape.index(dim))
                        break
            self.trim[output.name] = axes

    def run(self, requests: list[Arrays]) -> list[Arrays]:
        merged = {
            spec.name: _pad_concat(
                [r[spec.name] for r in requests], self.pad_id if spec.name == "input_ids" else 0
            )
            for spec in self.inputs
        }
        out = self.backend.run_sync(merged)
        results: list[Arrays] = []
        row = 0
        for request in requests:
            rows = len(request[self.inputs[0].name])
            result: Arrays = {}
            for name, value in out.items():
                index: list[slice] = [slice(row, row + rows)] + [slice(None)] * (value.ndim - 1)
                for axis, (source, source_axis) in self.trim[name].items():
                    index[axis] = slice(0, request[source].shape[source_axis])
                result[name] = np.ascontiguousarray(value[tuple(index)])
            results.append(result)
            row += rows
        return results


class TranslationRunner:
    """The gateway's decoding engine over the translation parts, for requests in the wire format: each
    `execute` call's requests decode together, to completion, in Triton's thread."""

    def __init__(self, parts: dict[str, OnnxRuntimeBackend], eos_id: int, pad_id: int) -> None:
        settings = EngineSettings(max_batch_size=1 << 20, max_batch_tokens=1 << 40, max_queue_size=1 << 30)
        self.engine = Engine("triton", StepParts.of(parts), eos_id, pad_id, settings)

    def run(self, requests: list[Arrays]) -> list[Arrays]:
        futures = [self.engine.submit(unpack_items(r)) for r in requests]
        self.engine.run_all()
        return [pack_decoded(future.result().decoded) for future in futures]


def load_parts(directory: Path, parts: str, settings: OrtSettings) -> dict[str, OnnxRuntimeBackend]:
    """`parts` as the config writes it: "encoder=encoder_model.onnx,decoder=…"."""
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ort")
    loaded = {}
    for entry in parts.split(","):
        name, _, file = entry.partition("=")
        loaded[name] = OnnxRuntimeBackend(directory / file, part_settings(settings, name), executor)
    return loaded


def _quiet_dlpack_destructor(previous: Callable[[Any], object]) -> Callable[[Any], object]:
    """An unraisable-exception hook that drops one known harmless report: Triton 2.51's stub renames the
    NumPy DLPack capsules it consumes to a name NumPy 2's capsule destructor does not expect, so every output
    tensor of every response printed a 'PyCapsule_GetPointer called with incorrect name' traceback (tens of
    thousands a minute under load). The tensor itself was taken correctly; anything else still reaches
    `previous`."""

    def hook(unraisable: Any) -> object:
        value = unraisable.exc_value
        if isinstance(value, ValueError) and str(value) == "PyCapsule_GetPointer called with incorrect name":
            return None
        return previous(unraisable)

    return hook


class _PythonModel:
    """What Triton calls: initialize, execute (a list of requests -> one response each), finalize."""

    def initialize(self, args: dict[str, str]) -> None:
        import triton_python_backend_utils as pb_utils  # type: ignore[import-not-found]  # in the stub only

        sys.unraisablehook = _quiet_dlpack_destructor(sys.unraisablehook)

        self._pb: Any = pb_utils
        config = json.loads(args["model_config"])
        self.parameters = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.input_names = [spec["name"] for spec in config["input"]]
        self.output_names = [spec["name"] for spec in config["output"]]
        gpu = args.get("model_instance_kind") == "GPU"
        settings = OrtSettings(
            device="cuda" if gpu else "cpu",
            device_id=int(args.get("model_instance_device_id") or 0),
            intra_op_threads=int(self.parameters.get("intra_op_threads", "0")),
        )
        directory = Path(args["model_repository"]) / args["model_version"]
        self.runner = self._runner(load_parts(directory, self.parameters["parts"], settings))

    def _runner(self, parts: dict[str, OnnxRuntimeBackend]) -> Any:
        raise NotImplementedError

    def execute(self, requests: list[Any]) -> list[Any]:
        pb = self._pb
        responses: list[Any] = [None] * len(requests)
        good: list[int] = []
        arrays: list[Arrays] = []
        for index, request in enumerate(requests):
            try:
                arrays.append(
                    {
                        name: np.from_dlpack(pb.get_input_tensor_by_name(request, name)).copy()
                        for name in self.input_names
                    }
                )
                good.append(index)
            except Exception as exc:  # one malformed request fails alone
                responses[index] = pb.InferenceResponse(error=pb.TritonError(f"bad request: {exc}"))
        if good:
            try:
                results = self.runner.run(arrays)
            except Exception as exc:
                for index in good:
                    responses[index] = pb.InferenceResponse(error=pb.TritonError(f"model failed: {exc}"))
            else:
                for index, result in zip(good, results, strict=True):
                    tensors = [
                        pb.Tensor.from_dlpack(name, np.ascontiguousarray(result[name]))
                        for name in self.output_names
                    ]
                    responses[index] = pb.InferenceResponse(output_tensors=tensors)
        return responses

    def finalize(self) -> None:
        close = getattr(self.runner, "close", None)
        if close is not None:
            close()


class EncoderModel(_PythonModel):
    """Token classification, embedding and fill-mask graphs."""

    def _runner(self, parts: dict[str, OnnxRuntimeBackend]) -> EncoderRunner:
        return EncoderRunner(parts["model"], int(self.parameters["pad_id"]))


class TranslationModel(_PythonModel):
    """Translation: the gateway's decoding engine, requests in the wire format of `gateway.triton.wire`."""

    def _runner(self, parts: dict[str, OnnxRuntimeBackend]) -> TranslationRunner:
        return TranslationRunner(parts, int(self.parameters["eos_id"]), int(self.parameters["pad_id"]))
