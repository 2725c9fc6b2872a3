"""Work off the event loop: small work stays inline, large work runs on a worker thread behind the loop, and
the decoding loop thread runs and cancels coroutines."""

from __future__ import annotations

import os
import sys
import threading

import pytest

from gateway.offload import INLINE_SIZE, WORKER_NICENESS, behind_the_loop, off_loop


async def test_small_work_stays_on_the_loop_and_large_work_leaves_it() -> None:
    here = threading.get_ident()
    assert await off_loop(INLINE_SIZE, threading.get_ident) == here
    assert await off_loop(INLINE_SIZE + 1, threading.get_ident) != here


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice values are Linux's")
def test_compute_threads_run_behind_the_loop() -> None:
    seen: list[tuple[int, int]] = []

    def worker() -> None:
        tid = threading.get_native_id()
        before = os.getpriority(os.PRIO_PROCESS, tid)
        behind_the_loop()
        seen.append((before, os.getpriority(os.PRIO_PROCESS, tid)))

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    ((before, after),) = seen
    assert after == min(before + WORKER_NICENESS, 19)
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == before, "the caller's was changed"
