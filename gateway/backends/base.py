"""The Backend protocol: what a task model needs from a runtime, and nothing more."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

from gateway.manifest import TensorSpec

Arrays = dict[str, np.ndarray]


class Backend(Protocol):
    """One runnable model part (an encoder, a decoder, ...) on one runtime and device."""

    name: str  # "onnxruntime" | "triton"
    device: str  # "cpu", "cuda:0", or a Triton endpoint
    provider: str  # e.g. "CPUExecutionProvider"

    @property
    def ready(self) -> bool:
        """Whether `run` can be expected to succeed now (a remote backend's health)."""
        ...

    async def start(self) -> None:
        """Connect (remote backends); called once the event loop runs."""
        ...

    @property
    def inputs(self) -> Sequence[TensorSpec]: ...

    @property
    def outputs(self) -> Sequence[TensorSpec]: ...

    async def run(self, inputs: Arrays, outputs: Sequence[str] | None = None) -> Arrays:
        """Run on named inputs; returns the named outputs (all when `outputs` is None)."""
        ...

    async def close(self) -> None: ...


@runtime_checkable
class BoundBackend(Protocol):
    """A backend that can keep outputs where it computed them (a GPU's memory) and take them back as inputs,
    so a decoder's key/value cache never crosses to the host between steps. Values kept are opaque to the
    caller, which only passes them back, or moves them with `to_host` / `to_device` to reorder rows."""

    # Whether callers should keep outputs here: true on a GPU. On a CPU the binding costs more Python
    # per run than the copies it saves (~0.1 ms per decoder step on the tiny demo NLLB); tests set it there.
    keep_outputs: bool

    async def run_bound(
        self, inputs: Mapping[str, Any], host: Sequence[str], kept: Sequence[str]
    ) -> tuple[Arrays, dict[str, Any]]:
        """Run on named inputs (arrays, or values kept earlier); returns the `host` outputs as arrays and
        the `kept` outputs as kept values."""
        ...

    def to_host(self, value: Any) -> np.ndarray: ...

    def to_device(self, array: np.ndarray) -> Any: ...
