"""RunPod under the conformance suite: the real client over HTTP against the loopback GraphQL fake,
with a short timeout and fast backoff so the fault tests take milliseconds."""

from __future__ import annotations

from pathlib import Path

from gpuherd.core.providers.runpod import RunPodProvider
from tests.fakes.runpod_fake import FakeRunPod

from .harness import FAULTS, OPS, LoopbackHarness

SECRET = "rp_conformance_3c1f0a9e7b5d4c2a"


class RunPodHarness(LoopbackHarness):
    name = "runpod"
    display = "RunPod"
    secret = SECRET
    faults = frozenset(FAULTS)
    fault_ops = frozenset(OPS)

    def __init__(self) -> None:
        self.fake = FakeRunPod(api_key=SECRET).start()
        self.provider = RunPodProvider(SECRET, base_url=self.fake.url, timeout_s=0.5, attempts=3,
                                       backoff_s=0.01)


async def make(tmp_path: Path) -> LoopbackHarness:
    return RunPodHarness()
