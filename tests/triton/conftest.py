"""The Triton tests compare with the in-process gateway of the e2e tests: the same session fixtures."""

from tests.e2e.conftest import channel, gateway, stub

__all__ = ["channel", "gateway", "stub"]
