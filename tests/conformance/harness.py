"""What the conformance suite needs from each provider's test setup. One module per provider,
`harness_<name>.py`, exposes `async def make(tmp_path) -> Harness` (an async context manager is
not needed: `close()` is called at the end). Real providers run against their loopback fake (or
moto's server for AWS) with short timeouts and fast backoff, so the fault tests take
milliseconds."""

from __future__ import annotations

import abc
from pathlib import Path

from gpuherd.core.providers.base import Provider, ProviderInstance
from tests.fakes.loopback import LoopbackServer

OPS = ("search", "create", "get", "list", "start", "stop", "destroy")
FAULTS = ("rate_limit", "server_error", "timeout", "malformed", "capacity", "auth")


class Harness(abc.ABC):
    name: str
    display: str                       # how error messages name the provider ("vast.ai")
    provider: Provider
    secret: str | None = None          # the credential the provider was given; never in a message
    faults: frozenset[str] = frozenset(FAULTS)   # which of FAULTS this harness can inject
    fault_ops: frozenset[str] = frozenset(OPS)   # and on which operations

    @abc.abstractmethod
    def inject(self, op: str, kind: str, *, times: int = 1, retry_after: float | None = None) -> None:
        """The next `times` calls of `op` fail with `kind`. `timeout` must outlast the provider's
        client timeout; `capacity` applies to create (and start where the API can refuse it)."""

    def clear(self) -> None:
        """Drop faults still queued (a test that injected more than it used)."""

    async def settle(self) -> None:
        """Let simulated time pass so a machine moves to its next state (fakes that progress per
        request or per wall-clock second need nothing here)."""

    async def existing(self, label: str) -> ProviderInstance:
        """A running machine made outside gpuherd, for providers gpuherd cannot create on."""
        raise NotImplementedError

    def forget(self, provider_id: str) -> None:
        """Make the provider lose the machine entirely (for reconcile's 'gone' case)."""
        raise NotImplementedError

    async def close(self) -> None:
        await self.provider.aclose()


class LoopbackHarness(Harness):
    """A real client against a loopback fake (tests/fakes): faults go to the fake, with a hang
    that outlasts the client's `timeout_s` and ends soon after, so no server thread lingers."""

    fake: LoopbackServer
    timeout_s: float = 0.5

    def inject(self, op: str, kind: str, *, times: int = 1, retry_after: float | None = None) -> None:
        self.fake.fault(op, kind, times=times, retry_after=retry_after, hang_s=self.timeout_s * 3)

    def clear(self) -> None:
        self.fake.clear_faults()

    def forget(self, provider_id: str) -> None:
        self.fake.forget(provider_id)  # type: ignore[attr-defined]

    async def close(self) -> None:
        try:
            await self.provider.aclose()
        finally:
            self.fake.stop()


async def make_harness(name: str, tmp_path: Path) -> Harness:
    import importlib

    module = importlib.import_module(f"tests.conformance.harness_{name}")
    return await module.make(tmp_path)
