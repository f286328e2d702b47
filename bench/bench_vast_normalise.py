"""vast.ai offer normalisation: raw offer objects, as `POST /api/v0/bundles/` returns them, to
gpuherd's `Offer` list.

    .venv-test/bin/python bench/bench_vast_normalise.py [--offers N] [--repeat R]

Prints the median (and best/worst) milliseconds of R runs with cold and with warm caches; the
target is a cold median under 100 ms for 10,000 offers. JSON decoding is not included (httpx
does it before the provider sees them). The machine reference line tells a slow or busy
machine from a slow normaliser."""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:        # the fakes live in tests/, which is never installed
    sys.path.insert(0, str(ROOT))

from gpuherd.core.providers import vast  # noqa: E402
from tests.fakes.vast_fake import make_offers  # noqa: E402

TARGET_MS = 100.0


def _reference_ms(repeat: int = 5) -> float:
    def loop() -> int:
        total = 0
        for i in range(1_000_000):
            total += i
        return total
    samples = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        loop()
        samples.append((time.perf_counter() - t0) * 1000)
    return statistics.median(samples)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--offers", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=15)
    args = parser.parse_args(argv)

    raw = make_offers(args.offers, seed=11)
    now = datetime.now(UTC)
    offers = vast.normalise_offers(raw, fetched_at=now)          # warm up, and check the output
    assert len(offers) == len(raw), f"{len(raw) - len(offers)} offers were dropped"
    builder = vast._build_offer.__name__
    cold: list[float] = []
    warm: list[float] = []
    for _ in range(args.repeat):
        # cold: the module's GPU-name, place and storage-price caches empty, as on the first
        # search after a start; warm: as on every later one
        vast._name_cache.clear()
        vast._place_cache.clear()
        vast._storage_cache.clear()
        for samples in (cold, warm):
            gc.collect()               # each run from the same heap, not mid-way to a collection
            t0 = time.perf_counter()
            vast.normalise_offers(raw, fetched_at=now)
            samples.append((time.perf_counter() - t0) * 1000)
    med = statistics.median(cold)
    print(f"{len(raw):,} vast offers -> Offer ({builder}), {args.repeat} runs each")
    for label, samples in (("cold caches", cold), ("warm caches", warm)):
        print(f"  {label}: median {statistics.median(samples):.1f} ms, best {min(samples):.1f} ms, "
              f"worst {max(samples):.1f} ms")
    print(f"machine reference: a 1,000,000-step Python loop takes {_reference_ms():.1f} ms here now "
          "(compare figures from different machines or loads by this)")
    verdict = "OK" if med < TARGET_MS else "TOO SLOW"
    print(f"target: cold median under {TARGET_MS:.0f} ms: {med:.1f} ms -> {verdict}")
    return 0 if med < TARGET_MS else 1


if __name__ == "__main__":
    raise SystemExit(main())
