"""Admission control for the whole server: a bound on RPCs in flight, and the switch that stops taking new
ones at shutdown while the accepted ones finish. (Each model bounds its own requests too: `BatchedTask`.)"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager

from gateway.errors import ModelNotReady, Overloaded


class Admission:
    def __init__(self, max_in_flight: int) -> None:
        self.max_in_flight = max_in_flight
        self.in_flight = 0
        self.accepting = True
        self._idle = asyncio.Event()
        self._idle.set()

    @contextmanager
    def admit(self) -> Iterator[None]:
        """One RPC being served; refused at once when the server is full or no longer takes RPCs."""
        if not self.accepting:
            raise ModelNotReady("the server is shutting down; retry on another instance")
        if self.in_flight >= self.max_in_flight:
            raise Overloaded(
                f"the server is serving {self.in_flight} requests (max_in_flight {self.max_in_flight}); "
                "retry with backoff"
            )
        self.in_flight += 1
        self._idle.clear()
        try:
            yield
        finally:
            self.in_flight -= 1
            if self.in_flight == 0:
                self._idle.set()

    def stop_accepting(self) -> None:
        self.accepting = False

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no RPC is in flight; False when `timeout` seconds passed first."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True
