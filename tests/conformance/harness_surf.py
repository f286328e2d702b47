"""SURF Research Cloud under the conformance suite. SURF has no offers and gpuherd does not create
or delete workspaces, so the suite's lifecycle runs on a workspace that already exists (as a
user's would) and checks that create and destroy are refused cleanly."""

from __future__ import annotations

from pathlib import Path

import httpx

from gpuherd.core.providers.base import ProviderInstance
from gpuherd.core.providers.surf import SurfProvider
from tests.fakes.surf_fake import FakeSurf

from .harness import LoopbackHarness

SECRET = "surf-token-5e6f7a8b9c0d1e2f-conformance"
TIMEOUT_S = 0.5


class SurfHarness(LoopbackHarness):
    name = "surf"
    display = "SURF Research Cloud"
    secret = SECRET
    faults = frozenset({"rate_limit", "server_error", "timeout", "malformed", "auth"})
    fault_ops = frozenset({"list", "get", "start", "stop"})

    def __init__(self) -> None:
        self.fake = FakeSurf(token=SECRET, reads_per_phase=1).start()
        self.provider = SurfProvider(SECRET, base_url=self.fake.url + "/v1", timeout_s=TIMEOUT_S, attempts=3,
                                     backoff_s=0.01, transport=httpx.AsyncHTTPTransport(verify=False))

    async def existing(self, label: str) -> ProviderInstance:
        ws_id = self.fake.add(f"gpu-{label}", status="running")
        found = await self.provider.get(ws_id)
        assert found is not None
        return found


async def make(tmp_path: Path) -> LoopbackHarness:
    return SurfHarness()
