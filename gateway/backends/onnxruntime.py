"""ONNX Runtime in-process: one InferenceSession per ONNX part, run off the event loop.

Providers are tried in the order TensorRT (only when asked) -> CUDA -> CPU; on CUDA, inputs and outputs go
through IO binding (see `ort_cuda.py`, imported only when a CUDA session exists). Input and output names
come from the session, never from constants.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnxruntime as ort

from gateway.backends.base import Arrays
from gateway.errors import ModelNotReady
from gateway.manifest import TensorSpec

log = logging.getLogger(__name__)
CPU, CUDA, TENSORRT = "CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"
_DTYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int64)": "int64"}


@dataclass(frozen=True)
class OrtSettings:
    device: Literal["cpu", "cuda"] = "cpu"
    device_id: int = 0
    intra_op_threads: int = 0  # 0: ONNX Runtime's default (one per physical core)
    tensorrt: bool = False
    # Whether a session's threads spin between runs. Only for a part run back to back on one thread (the
    # translation engine's decoder step): spinning threads of one session steal the cores from the next
    # session to run. Measured on the full-size NLLB int8, 2 cores: a decoder step right after the encoder
    # took 57 ms instead of 24 while the encoder's threads spun.
    spinning: bool = False


def available_providers() -> list[str]:
    return list(ort.get_available_providers())


def provider_chain(settings: OrtSettings) -> list[str | tuple[str, dict[str, Any]]]:
    """The providers to offer a session, best first, restricted to what this onnxruntime build has."""
    available = set(available_providers())
    chain: list[str | tuple[str, dict[str, Any]]] = []
    if settings.device == "cuda":
        if settings.tensorrt and TENSORRT in available:
            chain.append((TENSORRT, {"device_id": settings.device_id, "trt_fp16_enable": True}))
        if CUDA not in available:
            raise ModelNotReady(
                "device cuda was asked for, but this onnxruntime has no CUDAExecutionProvider "
                "(install the gpu extra: pip install 'polyglot-gateway[gpu]')"
            )
        _preload_cuda_libraries()
        chain.append((CUDA, {"device_id": settings.device_id}))
    chain.append(CPU)
    return chain


@functools.cache
def _preload_cuda_libraries() -> None:
    """Load the CUDA and cuDNN libraries of pip's nvidia-* packages (or torch's) before the first CUDA
    session, so that onnxruntime-gpu finds them without LD_LIBRARY_PATH (onnxruntime >= 1.21)."""
    preload = getattr(ort, "preload_dlls", None)
    if preload is not None:
        preload()


def _specs(values: Sequence[Any]) -> list[TensorSpec]:
    return [TensorSpec(name=v.name, dtype=_DTYPES.get(v.type, v.type), shape=list(v.shape)) for v in values]


class OnnxRuntimeBackend:
    """One ONNX part. `run` executes on `executor`, so the event loop keeps serving while it computes."""

    name = "onnxruntime"

    def __init__(self, path: Path, settings: OrtSettings, executor: ThreadPoolExecutor) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = settings.intra_op_threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        if not settings.spinning:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.path = path
        self.session = ort.InferenceSession(str(path), options, providers=provider_chain(settings))
        self.provider = self.session.get_providers()[0]
        self.device = f"cuda:{settings.device_id}" if self.provider in (CUDA, TENSORRT) else "cpu"
        self._executor = executor
        self._inputs = _specs(self.session.get_inputs())
        self._outputs = _specs(self.session.get_outputs())
        self._input_names = {spec.name for spec in self._inputs}
        self._runner = self._cuda_runner() if self.device != "cpu" else None
        self.keep_outputs = self.device != "cpu"  # BoundBackend
        # Where kept outputs live, as OrtValue and IO binding name it.
        self._ort_device = ("cpu", 0) if self.device == "cpu" else ("cuda", settings.device_id)

    def _cuda_runner(self) -> Any:
        from gateway.backends.ort_cuda import IoBindingRunner

        return IoBindingRunner(self.session, self.device)

    @property
    def ready(self) -> bool:
        return True

    async def start(self) -> None:
        return None

    @property
    def inputs(self) -> Sequence[TensorSpec]:
        return self._inputs

    @property
    def outputs(self) -> Sequence[TensorSpec]:
        return self._outputs

    def run_sync(self, inputs: Arrays, outputs: Sequence[str] | None = None) -> Arrays:
        names = list(outputs) if outputs is not None else [spec.name for spec in self._outputs]
        feed = {name: value for name, value in inputs.items() if name in self._input_names}
        if self._runner is not None:
            result: Arrays = self._runner.run(feed, names)
            return result
        return dict(zip(names, self.session.run(names, feed), strict=True))

    async def run(self, inputs: Arrays, outputs: Sequence[str] | None = None) -> Arrays:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, partial(self.run_sync, inputs, outputs))

    # BoundBackend: outputs kept as OrtValues on the session's device, fed back through IO binding.

    def run_bound_sync(
        self, inputs: Mapping[str, Any], host: Sequence[str], kept: Sequence[str]
    ) -> tuple[Arrays, dict[str, Any]]:
        binding = self.session.io_binding()
        for name, value in inputs.items():
            if name not in self._input_names:
                continue
            if isinstance(value, ort.OrtValue):
                binding.bind_ortvalue_input(name, value)
            else:
                binding.bind_cpu_input(name, np.ascontiguousarray(value))
        for name in host:
            binding.bind_output(name, "cpu")
        device, device_id = self._ort_device
        for name in kept:
            binding.bind_output(name, device, device_id)
        self.session.run_with_iobinding(binding)
        values = binding.get_outputs()
        arrays = {name: value.numpy() for name, value in zip(host, values[: len(host)], strict=True)}
        return arrays, dict(zip(kept, values[len(host) :], strict=True))

    async def run_bound(
        self, inputs: Mapping[str, Any], host: Sequence[str], kept: Sequence[str]
    ) -> tuple[Arrays, dict[str, Any]]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, partial(self.run_bound_sync, inputs, host, kept))

    def to_host(self, value: Any) -> np.ndarray:
        return np.asarray(value.numpy())

    def to_device(self, array: np.ndarray) -> Any:
        device, device_id = self._ort_device
        return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), device, device_id)

    async def close(self) -> None:
        self._runner = None


def warmup_inputs(specs: Sequence[TensorSpec], batch: int = 1, length: int = 8) -> Arrays:
    """Small valid inputs for a part, from its specs: symbolic dims become `batch` then `length`."""
    arrays: Arrays = {}
    for spec in specs:
        shape = [batch if i == 0 else (length if isinstance(d, str) else d) for i, d in enumerate(spec.shape)]
        arrays[spec.name] = np.ones([int(d) for d in shape], dtype=np.dtype(spec.dtype))
    return arrays
