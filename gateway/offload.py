"""Per-request CPU work (tokenization, post-processing, building large replies) off the event loop.

The loop only moves futures: work on a request that may take more than about a millisecond runs on a small
pool of threads, so that one large request never delays health checks or other requests. Small requests
stay on the loop, where a thread hop would cost more than the work.
"""

from __future__ import annotations

import asyncio
import functools
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
R = TypeVar("R")
# Characters (or tokens) of a request below which its work stays on the loop: tokenizing and
# post-processing 2,000 characters takes well under a millisecond.
INLINE_SIZE = 2000
# Two threads: the work holds the GIL, so more threads would not run faster, and the fewer threads contend
# with the loop for it, the sooner the loop gets its turn.
_WORKERS = 2
# Nice value added to compute threads (ONNX Runtime calls, tokenization, decoding). Server on one core of a
# shared VM, three alternating runs: closed-loop capacity 74-78 req/s with it, 41-66 without.
WORKER_NICENESS = 5


def behind_the_loop() -> None:
    """Lower the calling thread's scheduling priority (Linux: a thread's own nice value), so that on a busy
    machine the event loop, which accepts and refuses requests, gets the CPU before compute threads do.
    Elsewhere (or when not allowed) it does nothing."""
    try:
        thread = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, thread, os.getpriority(os.PRIO_PROCESS, thread) + WORKER_NICENESS)
    except (AttributeError, OSError):
        pass


@functools.cache
def _pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=_WORKERS, thread_name_prefix="pgw-cpu", initializer=behind_the_loop)


async def off_loop(size: int, function: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
    """`function(*args, **kwargs)`, on a worker thread when `size` (characters or tokens of the request) is
    above INLINE_SIZE, else here."""
    if size <= INLINE_SIZE:
        return function(*args, **kwargs)
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(_pool(), functools.partial(function, *args, **kwargs))
