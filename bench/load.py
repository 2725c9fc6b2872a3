"""The load generator: closed-loop (N concurrent callers) and open-loop (Poisson arrivals) runs of one
async call, with warm-up, a fixed duration or request count, and per-request latency and outcome.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np

# One call: sends request number `i` and returns (texts, tokens) it carried, or raises an RpcError.
Call = Callable[[int], Awaitable[tuple[int, int]]]


@dataclass
class Sample:
    started: float
    latency: float
    code: str  # "OK" or the gRPC status name
    texts: int = 0
    tokens: int = 0
    details: str = ""  # the error's message


@dataclass
class LoadResult:
    mode: str  # "closed" | "open"
    level: float  # concurrency (closed) or offered requests per second (open)
    seconds: float
    samples: list[Sample] = field(default_factory=list)

    @classmethod
    def merged(cls, runs: list[LoadResult]) -> LoadResult:
        """Rounds of one load point (alternating with other settings) as one result."""
        first = runs[0]
        return cls(
            first.mode, first.level, sum(r.seconds for r in runs), [s for r in runs for s in r.samples]
        )

    def summary(self) -> dict[str, Any]:
        ok = [s for s in self.samples if s.code == "OK"]
        latencies = np.array([s.latency for s in ok]) * 1000 if ok else np.zeros(1)
        errors = Counter(s.code for s in self.samples if s.code != "OK")
        return {
            "mode": self.mode,
            "level": self.level,
            "seconds": round(self.seconds, 3),
            "requests": len(self.samples),
            "ok": len(ok),
            "errors": dict(errors),
            "requests_per_s": len(ok) / self.seconds,
            "texts_per_s": sum(s.texts for s in ok) / self.seconds,
            "tokens_per_s": sum(s.tokens for s in ok) / self.seconds,
            **{f"p{q}_ms": float(np.percentile(latencies, q)) for q in (50, 90, 95, 99)},
            "mean_ms": float(latencies.mean()),
        }


async def _one(call: Call, index: int, samples: list[Sample]) -> None:
    started = time.perf_counter()
    try:
        texts, tokens = await call(index)
        samples.append(Sample(started, time.perf_counter() - started, "OK", texts, tokens))
    except grpc.aio.AioRpcError as error:
        latency = time.perf_counter() - started
        samples.append(Sample(started, latency, error.code().name, details=error.details() or ""))


async def warm_up(call: Call, requests: int, concurrency: int = 1) -> None:
    """Requests whose results are thrown away: sessions, caches and connections get warm."""
    await closed_loop(call, concurrency, requests=requests)


async def closed_loop(
    call: Call,
    concurrency: int,
    seconds: float | None = None,
    requests: int | None = None,
) -> LoadResult:
    """`concurrency` callers, each sending its next request when the last one returns, until `seconds`
    passed or `requests` were sent."""
    if (seconds is None) == (requests is None):
        raise ValueError("give seconds or requests")
    samples: list[Sample] = []
    counter = iter(range(10**12))
    start = time.perf_counter()
    stop_at = start + seconds if seconds is not None else float("inf")

    async def caller() -> None:
        while time.perf_counter() < stop_at:
            index = next(counter)
            if requests is not None and index >= requests:
                return
            await _one(call, index, samples)

    await asyncio.gather(*(caller() for _ in range(concurrency)))
    return LoadResult("closed", concurrency, time.perf_counter() - start, samples)


async def open_loop(call: Call, rate: float, seconds: float, seed: int = 0) -> LoadResult:
    """Requests at Poisson arrivals of `rate` per second for `seconds`, whatever the replies do: latency
    includes the time a request waits behind earlier ones, as users see it."""
    rng = random.Random(seed)
    samples: list[Sample] = []
    pending: list[asyncio.Task[None]] = []
    start = time.perf_counter()
    next_at = start
    index = 0
    while True:
        next_at += rng.expovariate(rate)
        if next_at - start >= seconds:
            break
        delay = next_at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        pending.append(asyncio.create_task(_one(call, index, samples)))
        index += 1
    await asyncio.gather(*pending)
    return LoadResult("open", rate, time.perf_counter() - start, samples)
