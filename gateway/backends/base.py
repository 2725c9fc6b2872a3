"""The Backend protocol: what a task model needs from a runtime, and nothing more."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

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
