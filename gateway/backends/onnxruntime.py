"""ONNX Runtime in-process: one InferenceSession per ONNX part, run off the event loop.

Providers are tried in the order TensorRT (only when asked) -> CUDA -> CPU; on CUDA, inputs and outputs go
through IO binding: inputs copied to the device once, outputs allocated there and copied back once. Input
and output names come from the session, never from constants.
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
    # Whether a session's threads spin between runs (ONNX Runtime's default) rather than sleep. Spinning
    # threads of one session steal the cores from the next session to run: measured on the full-size NLLB
    # int8, 2 cores, a decoder step right after the encoder took 57 ms instead of 24 while the encoder's
    # threads spun. So only a session that runs alone spins: the engine's decoder step, or the one encoder
    # model of a server (see runtime.part_settings and ModelConfig.spinning).
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


def tensor_specs(values: Sequence[Any]) -> list[TensorSpec]:
    """The names, dtypes and shapes of a session's inputs or outputs."""
    return [TensorSpec(name=v.name, dtype=_DTYPES.get(v.type, v.type), shape=list(v.shape)) for v in values]


def run_bound(
    session: ort.InferenceSession,
    device: tuple[str, int],
    inputs: Mapping[str, np.ndarray | ort.OrtValue],
    resident: Sequence[str],
    host: Sequence[str] = (),
) -> tuple[list[ort.OrtValue], list[np.ndarray]]:
    """One run through IO binding: OrtValue inputs are read where they are, numpy inputs copied to the
    device; the `resident` outputs are allocated on `device`, the `host` ones come back as numpy."""
    binding = session.io_binding()
    held = []  # numpy inputs stay alive until the run is over
    for name, value in inputs.items():
        if isinstance(value, ort.OrtValue):
            binding.bind_ortvalue_input(name, value)
        else:
            array = np.ascontiguousarray(value)
            held.append(array)
            binding.bind_cpu_input(name, array)
    device_type, device_id = device
    for name in resident:
        binding.bind_output(name, device_type, device_id)
    for name in host:
        binding.bind_output(name, "cpu")
    session.run_with_iobinding(binding)
    values = binding.get_outputs()
    del held
    count = len(resident)
    return list(values[:count]), [value.numpy() for value in values[count:]]


class OnnxRuntimeBackend:
    """One ONNX part. `run` executes on `executor`, so the event loop keeps serving while it computes."""

    name = "onnxruntime"

    def __init__(self, path: Path, settings: OrtSettings, executor: ThreadPoolExecutor) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = settings.intra_op_threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if settings.spinning else "0")
        self.path = path
        self.session = ort.InferenceSession(str(path), options, providers=provider_chain(settings))
        self.provider = self.session.get_providers()[0]
        self.device = f"cuda:{settings.device_id}" if self.provider in (CUDA, TENSORRT) else "cpu"
        self._executor = executor
        self._inputs = tensor_specs(self.session.get_inputs())
        self._outputs = tensor_specs(self.session.get_outputs())
        self._input_names = {spec.name for spec in self._inputs}
        # IO binding on a GPU. On a CPU it costs more Python per run than the copies it saves.
        self.io_binding = self.device != "cpu"
        # Where outputs are allocated, as IO binding names the device.
        self._ort_device = ("cpu", 0) if self.device == "cpu" else ("cuda", settings.device_id)

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
        if self.io_binding:
            return self._run_bound(feed, names)
        return dict(zip(names, self.session.run(names, feed), strict=True))

    def _run_bound(self, feed: Arrays, names: Sequence[str]) -> Arrays:
        binding = self.session.io_binding()
        for name, value in feed.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(value))
        device, device_id = self._ort_device
        for name in names:
            binding.bind_output(name, device, device_id)
        self.session.run_with_iobinding(binding)
        return dict(zip(names, binding.copy_outputs_to_cpu(), strict=True))

    @property
    def ort_device(self) -> tuple[str, int]:
        """Where this session's values live, as IO binding names it: ("cuda", 0) or ("cpu", 0)."""
        return self._ort_device

    def run_resident(
        self,
        inputs: Mapping[str, np.ndarray | ort.OrtValue],
        resident: Sequence[str],
        host: Sequence[str] = (),
    ) -> tuple[list[ort.OrtValue], list[np.ndarray]]:
        """Run with OrtValues in and out: the `resident` outputs stay on the session's device, the `host`
        ones are copied to numpy. Inputs are OrtValues already there or numpy arrays (copied over)."""
        return run_bound(self.session, self._ort_device, inputs, resident, host)

    async def run(self, inputs: Arrays, outputs: Sequence[str] | None = None) -> Arrays:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, partial(self.run_sync, inputs, outputs))

    async def close(self) -> None:
        return None
