"""vast.ai under the conformance suite: the real client against FakeVast over loopback HTTP, with
a short timeout and fast backoff so the fault tests take milliseconds. The fake moves an
instance one state further on each read of it, so `settle` has nothing to do."""

from __future__ import annotations

from pathlib import Path

import httpx

from gpuherd.core.providers.vast import VastProvider
from tests.fakes.vast_fake import FakeVast

from .harness import FAULTS, LoopbackHarness

SECRET = "vastkey-0c1d2e3f4a5b6c7d8e9f-conformance"
TIMEOUT_S = 0.5


class VastHarness(LoopbackHarness):
    name = "vast"
    display = "vast.ai"
    secret = SECRET
    faults = frozenset(FAULTS)

    def __init__(self) -> None:
        self.fake = FakeVast(api_key=SECRET).start()
        # plain HTTP to the fake: a TLS-less transport saves building a certificate store per test
        self.provider = VastProvider(SECRET, base_url=self.fake.url, timeout_s=TIMEOUT_S, attempts=3,
                                     backoff_s=0.01, transport=httpx.AsyncHTTPTransport(verify=False))


async def make(tmp_path: Path) -> LoopbackHarness:
    return VastHarness()
