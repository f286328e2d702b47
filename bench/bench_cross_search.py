"""Cross-provider search: three providers asked at once, each a loopback fake answering slowly
(vast.ai 0.5 s, RunPod 1 s, AWS about 2 s), through the real clients and GpuService.search.
Prints each provider's time alone, the time of the search over all three, and the ratio of the
two. The target is a ratio of at most 1.1: the reply comes when the slowest answers, not later.

AWS makes several requests per search (instance types, offerings, prices), so its proxy's
per-request delay is set from a dry run to make one cold search take about 2 s. Every round
uses fresh providers and no offer cache, so nothing is served from memory.

    python bench/bench_cross_search.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import _path  # noqa: F401
import httpx

from gpuherd.core.clock import Clock
from gpuherd.core.config import Settings
from gpuherd.core.db import Database
from gpuherd.core.providers.aws import AwsProvider
from gpuherd.core.providers.registry import ProviderRegistry
from gpuherd.core.providers.runpod import RunPodProvider
from gpuherd.core.providers.vast import VastProvider
from gpuherd.core.service import GpuService
from gpuherd.core.templates import TemplateCatalog
from tests.fakes.aws_moto import MOTO_AMI, REGION, MotoProxy, moto_url, session
from tests.fakes.runpod_fake import FakeRunPod
from tests.fakes.vast_fake import FakeVast

LATENCY = {"vast": 0.5, "runpod": 1.0, "aws": 2.0}


def providers(vast: FakeVast, runpod: FakeRunPod, aws: MotoProxy) -> dict[str, object]:
    return {
        "vast": VastProvider("bench-vast", base_url=vast.url, timeout_s=10,
                             transport=httpx.AsyncHTTPTransport(verify=False)),
        "runpod": RunPodProvider("bench-runpod", base_url=runpod.url, timeout_s=10,
                                 transport=httpx.AsyncHTTPTransport(verify=False)),
        "aws": AwsProvider(regions=[REGION], ami=MOTO_AMI, session=session(), endpoint_url=aws.url,
                           timeout_s=10, clock=Clock()),
    }


async def timed(names: list[str], vast: FakeVast, runpod: FakeRunPod, aws: MotoProxy, home) -> float:
    made = providers(vast, runpod, aws)
    registry = ProviderRegistry({n: made[n] for n in names})  # type: ignore[misc]
    settings = Settings(home=home, database_url=f"sqlite:///{home}/bench.db", offer_cache_s=0,
                        provider_timeout_s=30, aws="off")
    db = Database(settings.resolved_database_url)
    db.upgrade()
    service = GpuService(settings, db, registry, TemplateCatalog.load(None))
    try:
        started = time.perf_counter()
        result = await service.search(service.local_actor(), "limit=5")
        elapsed = time.perf_counter() - started
        assert not result.failures, result.failures
        assert {o.offer.provider for o in result.offers} <= set(names) and result.total_matches > 0
        return elapsed
    finally:
        await service.aclose()
        for p in made.values():
            await p.aclose()  # type: ignore[attr-defined]


async def main(rounds: int, verbose: bool = False) -> None:
    import tempfile
    from pathlib import Path

    upstream = moto_url()
    with FakeVast(latency_s=LATENCY["vast"]) as vast, FakeRunPod(latency_s=LATENCY["runpod"]) as runpod, \
            MotoProxy(upstream) as aws, tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        vast.api_key, runpod.api_key = "bench-vast", "bench-runpod"
        # dry run: how many requests one cold AWS search makes, so it can be made to take ~2 s
        before = len(aws.requests)
        await timed(["aws"], vast, runpod, aws, home)
        per_search = max(1, len(aws.requests) - before)
        aws.latency_s = LATENCY["aws"] / per_search
        print(f"AWS search makes {per_search} requests; proxy delay {aws.latency_s * 1000:.0f} ms each")
        alone: dict[str, list[float]] = {n: [] for n in LATENCY}
        together: list[float] = []
        ratios: list[float] = []
        for _ in range(rounds):
            times = {n: await timed([n], vast, runpod, aws, home) for n in LATENCY}
            for n, t in times.items():
                alone[n].append(t)
            all_three = await timed(list(LATENCY), vast, runpod, aws, home)
            together.append(all_three)
            ratios.append(all_three / max(times.values()))
            if verbose:
                print("   round: " + ", ".join(f"{n} {t:.3f}" for n, t in times.items()) + f", all {all_three:.3f}")
        for n, ts in alone.items():
            print(f"  {n:<7} alone: median {statistics.median(ts):.3f} s")
        print(f"  all three at once: median {statistics.median(together):.3f} s")
        median = statistics.median(ratios)
        print(f"ratio to the slowest provider alone, same round: median {median:.3f}, best {min(ratios):.3f}, "
              f"worst {max(ratios):.3f}")
        print(f"target: median ratio <= 1.1 -> {'OK' if median <= 1.1 else 'MISSED'} (a worst round above it is "
              "noise in one provider's own time: compare that round's times with --verbose)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--verbose", action="store_true", help="print every round")
    args = parser.parse_args()
    asyncio.run(main(args.rounds, args.verbose))
