"""The sandbox under the conformance suite: a virtual clock moves it through its states."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from gpuherd.core.clock import VirtualClock
from gpuherd.core.providers.sandbox import SandboxProvider

from .harness import Harness

_KINDS = {"rate_limit": "rate_limit", "server_error": "unavailable", "timeout": "timeout",
          "capacity": "capacity"}


class SandboxHarness(Harness):
    name = "sandbox"
    display = "sandbox"
    faults = frozenset(_KINDS)

    def __init__(self, tmp_path: Path) -> None:
        self.clock = VirtualClock(datetime(2026, 11, 10, 9, 0, tzinfo=UTC))
        self.provider = SandboxProvider(tmp_path / "sandbox.json", clock=self.clock)

    def inject(self, op: str, kind: str, *, times: int = 1, retry_after: float | None = None) -> None:
        self.provider.inject(_KINDS[kind], count=times, on=op)

    def clear(self) -> None:
        self.provider.clear_faults()

    async def settle(self) -> None:
        self.clock.advance(timedelta(seconds=30))

    def forget(self, provider_id: str) -> None:
        with self.provider._state(write=True) as state:
            state["instances"].pop(provider_id, None)


async def make(tmp_path: Path) -> Harness:
    return SandboxHarness(tmp_path)
