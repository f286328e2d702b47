"""RunPod under the conformance suite: the real client over HTTP against the loopback GraphQL fake,
with a short timeout and fast backoff so the fault tests take milliseconds."""

from __future__ import annotations

from pathlib import Path

from core.providers.runpod import RunPodProvider
from tests.fakes.runpod_fake import FakeRunPod

from .harness import FAULTS, OPS, Harness

SECRET = "rp_conformance_3c1f0a9e7b5d4c2a"


class RunPodHarness(Harness):
    name = "runpod"
    display = "RunPod"
    secret = SECRET
    faults = frozenset(FAULTS)
    fault_ops = frozenset(OPS)

    def __init__(self) -> None:
        self.fake = FakeRunPod(api_key=SECRET).start()
        self.provider = RunPodProvider(SECRET, base_url=self.fake.url, timeout_s=0.5, attempts=3,
                                       backoff_s=0.01)

    def inject(self, op: str, kind: str, *, times: int = 1, retry_after: float | None = None) -> None:
        # a hang outlasts the 0.5 s client timeout, and ends soon after so no thread lingers
        self.fake.fault(op, kind, times=times, retry_after=retry_after, hang_s=1.0)

    def clear(self) -> None:
        self.fake.clear_faults()

    def forget(self, provider_id: str) -> None:
        self.fake.forget(provider_id)

    async def close(self) -> None:
        try:
            await self.provider.aclose()
        finally:
            self.fake.stop()


async def make(tmp_path: Path) -> Harness:
    return RunPodHarness()
