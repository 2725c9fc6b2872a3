"""What every task reply carries: token usage and timing."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from gateway.batcher import Timed


@dataclass(frozen=True)
class Usage:
    input_tokens: int
    output_tokens: int = 0


@dataclass(frozen=True)
class Timing:
    queue_ms: float  # the longest any of the request's items waited in the queue
    inference_ms: float  # the longest batch run any of its items took part in

    @classmethod
    def of(cls, items: Sequence[Timed[Any]]) -> Timing:
        if not items:
            return cls(0.0, 0.0)
        return cls(
            queue_ms=1000 * max(item.queue_seconds for item in items),
            inference_ms=1000 * max(item.run_seconds for item in items),
        )
