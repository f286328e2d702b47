"""Search speed: parse + filter + sort over 10,000 realistic offers.

    .venv-test/bin/python bench/bench_search.py [--offers N] [--repeat R]

Prints median and p95 milliseconds per query; the target is under 50 ms each."""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from decimal import Decimal
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ (gpuherd itself is installed: ./run test)

from gpuherd.core.offers import Offer
from gpuherd.core.query import parse_query

TARGET_MS = 50.0

# (name, GB per GPU, typical $/h per GPU, weight)
GPUS = [
    ("RTX 3090", 24, 0.22, 14), ("RTX 4090", 24, 0.35, 18), ("RTX 4080", 16, 0.25, 5),
    ("RTX 4070 Ti", 12, 0.15, 4), ("RTX 5090", 32, 0.65, 4), ("RTX A4000", 16, 0.17, 4),
    ("RTX A5000", 24, 0.25, 4), ("RTX A6000", 48, 0.48, 7), ("RTX 6000 Ada", 48, 0.80, 3),
    ("L4", 24, 0.40, 3), ("L40S", 48, 0.85, 5), ("A10", 24, 0.45, 3), ("A40", 48, 0.40, 3),
    ("A100 40GB", 40, 0.90, 4), ("A100 80GB", 80, 1.20, 6), ("A100 SXM4", 80, 1.35, 4),
    ("H100 PCIE", 80, 2.10, 4), ("H100 SXM", 80, 2.50, 6), ("H100 NVL", 94, 2.60, 2),
    ("H200", 141, 3.40, 3), ("Tesla V100", 16, 0.20, 2),
]
PLACES = [("Oregon, US", "US"), ("Texas, US", "US"), ("Quebec, CA", "CA"), ("Bavaria, DE", "DE"),
          ("Noord-Holland, NL", "NL"), ("Tokyo, JP", "JP"), ("Sao Paulo, BR", "BR"),
          ("Stockholm, SE", "SE"), ("Virginia, US", "US"), ("Taipei, TW", "TW")]
PROVIDERS = [("vast", 6), ("runpod", 3), ("aws", 1), ("sandbox", 1)]

QUERIES = [
    "",
    "4090 <$0.5",
    "gpu_ram>=24 num_gpus=1 reliability>0.98 -o dph",
    "a100 x2 order=-reliability limit=10",
    "gpu_ram>=24 num_gpus=1 reliability>0.98 gpu_name=RTX_4090 dph<0.6",
    "h100 x8 provider in vast,runpod",
    "48gb <=$1 location in [US,CA] -o -reliability,+dph",
    "verified=any gpu_name in [RTX_3090,RTX_4090,RTX_A6000] cuda>=12.1 inet_down>500 "
    "-o gpu_total_ram-,dph limit=50",
]


def make_offers(n: int, seed: int = 7) -> list[Offer]:
    rng = random.Random(seed)
    gpu_weights = [g[3] for g in GPUS]
    offers = []
    for i in range(n):
        name, ram, price, _ = rng.choices(GPUS, weights=gpu_weights)[0]
        num = rng.choices([1, 2, 4, 8], weights=[60, 20, 12, 8])[0]
        provider = rng.choices([p for p, _ in PROVIDERS], weights=[w for _, w in PROVIDERS])[0]
        location, country = rng.choice(PLACES)
        per_gpu = price * rng.uniform(0.7, 1.6)
        dph = (Decimal(str(round(per_gpu * num, 3))) + Decimal("0.01")).quantize(Decimal("0.001"))
        offers.append(Offer(
            provider=provider,
            offer_id=str(1_000_000 + i),
            gpu_name=name,
            num_gpus=num,
            gpu_ram=float(ram),
            cpu_cores=float(rng.choice([4, 8, 16, 32, 64]) * max(1, num // 2)),
            cpu_ram=float(rng.choice([16, 32, 64, 128, 256]) * max(1, num // 2)),
            disk_space=float(rng.choice([50, 100, 250, 500, 1000, 2000])),
            dph=dph,
            storage_cost=Decimal(str(round(rng.uniform(0.05, 0.3), 3))),
            reliability=round(rng.betavariate(30, 1), 4),
            location=location,
            country=country,
            inet_down=round(rng.uniform(50, 5000), 1),
            inet_up=round(rng.uniform(20, 2000), 1),
            cuda=rng.choice([11.8, 12.0, 12.1, 12.2, 12.4, 12.6, 12.8]),
            verified=rng.random() < 0.8,
            interruptible=rng.random() < 0.15,
        ))
    return offers


def percentile(samples: list[float], p: float) -> float:
    ordered = sorted(samples)
    index = min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))
    return ordered[index]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--offers", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=50)
    args = parser.parse_args(argv)

    offers = make_offers(args.offers)
    print(f"{len(offers):,} offers, {args.repeat} runs per query (parse + filter + sort + limit)")
    print(f"{'median ms':>10} {'p95 ms':>8} {'results':>8}  query")
    worst = 0.0
    for text in QUERIES:
        parse_query(text).apply(offers)                     # warm caches once
        samples = []
        count = 0
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            count = len(parse_query(text).apply(offers))
            samples.append((time.perf_counter() - t0) * 1000)
        med, p95 = statistics.median(samples), percentile(samples, 95)
        worst = max(worst, p95)
        print(f"{med:10.2f} {p95:8.2f} {count:8d}  {text or '(empty query)'}")
    verdict = "OK" if worst < TARGET_MS else "TOO SLOW"
    print(f"target: under {TARGET_MS:.0f} ms per query; worst p95 {worst:.2f} ms -> {verdict}")
    return 0 if worst < TARGET_MS else 1


if __name__ == "__main__":
    raise SystemExit(main())
