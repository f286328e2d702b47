"""AWS EC2 under the conformance suite: the real AwsProvider (boto3, botocore's own retries)
talking over HTTP to a fault-injecting proxy in front of moto's server.

One moto server serves the whole session and is reset for every harness. The proxy answers the
Pricing API (moto has none) with list prices for a few types, so offers carry both sources: the
Pricing API and, for the rest, gpuherd's price table. Every fault of FAULTS is injected on the
wire as AWS sends it (see tests/fakes/aws_moto.py). A capacity fault is queued once per botocore
attempt: EC2 answers InsufficientInstanceCapacity with HTTP 500, which botocore retries, and a
capacity shortage outlasts a retry."""

from __future__ import annotations

from pathlib import Path

from gpuherd.core.clock import Clock
from gpuherd.core.providers.aws import AwsProvider
from tests.fakes.aws_moto import (
    MOTO_AMI,
    REGION,
    SECRET_KEY,
    MotoProxy,
    clean_moto,
    fast_retries,
    forget_instance,
    moto_url,
    session,
)

from .harness import FAULTS, Harness

ATTEMPTS = 2            # botocore max_attempts: one retry, enough for a waited-out throttle
READ_TIMEOUT_S = 0.8    # moto answers in well under this once warm
HANG_S = 2.0            # a "timeout" fault outlasts the read timeout
PRICES = {(REGION, "g4dn.xlarge"): "0.5260000000", (REGION, "g5.xlarge"): "1.0060000000",
          (REGION, "g6.xlarge"): "0.8048000000"}


class AwsHarness(Harness):
    name = "aws"
    display = "AWS EC2"
    secret = SECRET_KEY
    faults = frozenset(FAULTS)

    def __init__(self, provider: AwsProvider, proxy: MotoProxy, undo_retries) -> None:
        self.provider = provider
        self.proxy = proxy
        self._undo_retries = undo_retries

    def inject(self, op: str, kind: str, *, times: int = 1, retry_after: float | None = None) -> None:
        count = times * ATTEMPTS if kind == "capacity" else times
        self.proxy.fault(op, kind, times=count, retry_after=retry_after, hang_s=HANG_S)

    def clear(self) -> None:
        self.proxy.clear_faults()

    def forget(self, provider_id: str) -> None:
        forget_instance(provider_id.partition("@")[0])

    async def close(self) -> None:
        try:
            await self.provider.aclose()
        finally:
            self.proxy.stop()
            self._undo_retries()


async def make(tmp_path: Path) -> Harness:
    upstream = moto_url()
    clean_moto(upstream)
    proxy = MotoProxy(upstream).start()
    proxy.prices.update(PRICES)
    undo = fast_retries()
    provider = AwsProvider(regions=[REGION], ami=MOTO_AMI, session=session(), endpoint_url=proxy.url,
                           timeout_s=READ_TIMEOUT_S, connect_timeout_s=READ_TIMEOUT_S, max_attempts=ATTEMPTS,
                           clock=Clock())
    return AwsHarness(provider, proxy, undo)
