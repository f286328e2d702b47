"""The team server's HTTP API under load, over loopback, from a second process.

    python bench/bench_api.py [--instances 1000] [--clients 100] [--requests 20] [--boots 100]
                              [--latency 2.0] [--db sqlite|postgres] [--pg-url URL]

1. A fleet of `--instances` tracked sandbox instances is built in a fresh database (see
   bench/_loop_fleet.py), an admin API key is made, and `gpuherd serve` is started on a free
   loopback port as its own process, on that database and those machine files.
2. `GET /api/v1/instances`: `--clients` concurrent clients (one httpx.AsyncClient, one
   connection each) each send `--requests` requests one after the other; p50/p99/max latency of
   every request. Target: p99 < 50 ms.
3. The server is restarted with the sandbox answering every call after `--latency` seconds
   (a slow cloud), one boot warms the offer cache (as a search before a boot does), then
   `--boots` concurrent `POST /api/v1/instances` (each its own Idempotency-Key): time to the
   `202`. Target: p99 < 100 ms: a boot is answered once its intent and operation are written,
   the provider call continues in the server.

4. The floor: `bench/_http_floor.py`, FastAPI on uvicorn with the same routes answering saved
   real answers and doing nothing else, under the same loads. What gpuherd adds is the difference.

This script is the load tool: it is a different process from the server, on loopback only. On a
machine with two or more CPUs the load (this process and wrk) is pinned to the last CPU and the
server to the others, so neither steals the other's core (with both floating, wrk's second thread
and the server take turns on one core and p99 measures the scheduler: 80-330 ms on a bare
FastAPI app here). wrk runs with one thread for the same reason. Each wrk load runs `--runs`
times: the tail differs from run to run, so every run is printed.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
from _loop_fleet import build_fleet, make_service

DEFAULT_PG = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(p / 100 * len(ordered) + 0.5) - 1))]


def _cpus() -> tuple[set[int] | None, set[int] | None]:
    """(server CPUs, load CPUs), or (None, None) where pinning is not possible."""
    if not hasattr(os, "sched_getaffinity"):
        return None, None
    mine = sorted(os.sched_getaffinity(0))
    if len(mine) < 2:
        return None, None
    return set(mine[:-1]), {mine[-1]}


SERVER_CPUS, LOAD_CPUS = _cpus()


def _pinned_to_server() -> None:
    if SERVER_CPUS:
        os.sched_setaffinity(0, SERVER_CPUS)


class Server:
    def __init__(self, home: Path, url: str, latency: float, floor: tuple[Path, Path] | None = None) -> None:
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "GPUHERD_HOME": str(home), "GPUHERD_DATABASE_URL": url,
               "GPUHERD_SANDBOX_SEED": "7", "GPUHERD_SANDBOX_TIME_SCALE": "0",
               "GPUHERD_SANDBOX_LATENCY_S": str(latency), "GPUHERD_API_RATE_PER_MINUTE": "1000000",
               "GPUHERD_API_BURST": "100000", "GPUHERD_LOCAL_USER": "bench"}
        exe = Path(sys.executable).with_name("gpuherd")
        argv = [str(exe), "serve", "--host", "127.0.0.1", "--port", str(self.port)]
        if floor is not None:
            argv = [sys.executable, str(Path(__file__).with_name("_http_floor.py")), str(self.port),
                    str(floor[0]), str(floor[1])]
        self.proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     preexec_fn=_pinned_to_server)

    async def ready(self, timeout: float = 60) -> None:
        until = time.monotonic() + timeout
        async with httpx.AsyncClient() as c:
            while time.monotonic() < until:
                if self.proc.poll() is not None:
                    err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                    raise SystemExit(f"gpuherd serve exited: {err[-2000:]}")
                try:
                    if (await c.get(f"{self.base}/health", timeout=1)).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(0.2)
        raise SystemExit("gpuherd serve did not come up")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


async def list_load(base: str, key: str, clients: int, requests: int, path: str = "/api/v1/instances") -> list[float]:
    headers = {"Authorization": f"Bearer {key}"}
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=base, headers=headers, limits=limits, timeout=30) as c:
        await c.get("/api/v1/instances", params={"limit": 50})        # warm: listing cache, connection

        async def client() -> list[float]:
            out = []
            for _ in range(requests):
                t = time.perf_counter()
                r = await c.get(path, params={"limit": 50})
                out.append(time.perf_counter() - t)
                if r.status_code != 200:
                    raise SystemExit(f"GET {path} answered {r.status_code}: {r.text[:300]}")
            return out
        return [x for chunk in await asyncio.gather(*(client() for _ in range(clients))) for x in chunk]


async def boot_load(base: str, key: str, boots: int) -> tuple[list[float], int, bytes]:
    headers = {"Authorization": f"Bearer {key}"}
    limits = httpx.Limits(max_connections=boots, max_keepalive_connections=boots)
    async with httpx.AsyncClient(base_url=base, headers=headers, limits=limits, timeout=60) as c:
        warm = await c.post("/api/v1/instances", json={"template": "budget"},
                            headers={"Idempotency-Key": f"warm-{uuid.uuid4().hex}"})
        if warm.status_code not in (200, 202):
            raise SystemExit(f"the warm-up boot answered {warm.status_code}: {warm.text[:300]}")

        async def one(i: int) -> tuple[float, int]:
            t = time.perf_counter()
            r = await c.post("/api/v1/instances", json={"template": "budget"},
                             headers={"Idempotency-Key": f"bench-{i}-{uuid.uuid4().hex[:8]}"})
            return time.perf_counter() - t, r.status_code
        got = await asyncio.gather(*(one(i) for i in range(boots)))
    return [t for t, _ in got], sum(1 for _, st in got if st == 202), warm.content


def wrk(base: str, key: str, path: str, clients: int, seconds: int) -> str:
    """Debian's `wrk` (a C load tool), when installed: one connection per client, keep-alive."""
    out = subprocess.run(["wrk", "-t1", f"-c{clients}", f"-d{seconds}s", "--latency", "-H",
                          f"Authorization: Bearer {key}", f"{base}{path}"], capture_output=True, text=True,
                         timeout=seconds + 30).stdout
    dist = dict(re.findall(r"^\s+(50|75|90|99)%\s+(\S+)$", out, re.M))
    rate = re.search(r"^Requests/sec:\s+(\S+)", out, re.M)
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    total = re.search(r"(\d+) requests in", out)
    return (f"wrk {clients} connections, {seconds} s: {total.group(1) if total else '?'} requests, "
            f"{rate.group(1) if rate else '?'}/s, p50 {dist.get('50', '?')}, p90 {dist.get('90', '?')}, "
            f"p99 {dist.get('99', '?')}" + (f", {errors.group(1)} non-2xx" if errors else ""))


def _line(name: str, values: list[float], target: str) -> str:
    ms = [v * 1000 for v in values]
    return (f"{name}: n={len(ms)} p50 {statistics.median(ms):.1f} ms, p99 {_pct(ms, 99):.1f} ms, "
            f"max {max(ms):.1f} ms  [{target}]")


async def reads(base: str, key: str, args: argparse.Namespace, who: str) -> bytes:
    """The read loads against one server; returns its answer to the listing (the floor replays it)."""
    async with httpx.AsyncClient(base_url=base, headers={"Authorization": f"Bearer {key}"}) as c:
        listed = (await c.get("/api/v1/instances", params={"limit": 50})).content
    if shutil.which("wrk"):
        for path in ("/health", "/api/v1/instances?limit=50"):
            for run in range(args.runs):
                print(f"{who}: GET {path} (run {run + 1}): {wrk(base, key, path, args.clients, 10)}", flush=True)
    else:
        print("(wrk is not installed: apt-get install wrk for a load tool that is not itself the bottleneck)",
              flush=True)
    health = await list_load(base, key, args.clients, args.requests, path="/health")
    lat = await list_load(base, key, args.clients, args.requests)
    print(_line(f"{who}: GET /health from {args.clients} httpx clients in one process", health, "the client's own "
                "floor"), flush=True)
    p99 = _pct(lat, 99) * 1000
    print(_line(f"{who}: GET /api/v1/instances?limit=50 from {args.clients} httpx clients", lat,
                f"p99 < 50 ms: {'met' if p99 < 50 else 'NOT MET'}"), flush=True)
    return listed


async def main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        if args.db == "sqlite":
            url = f"sqlite:///{home / 'gpuherd.db'}"
        else:
            schema = f"bench_{uuid.uuid4().hex[:8]}"
            from sqlalchemy import create_engine, text
            admin_engine = create_engine(args.pg_url)
            with admin_engine.begin() as conn:
                conn.execute(text(f'CREATE SCHEMA "{schema}"'))
            url = f"{args.pg_url}{'&' if '?' in args.pg_url else '?'}options=-csearch_path%3D{schema}"
        try:
            svc, sandbox = make_service(url, home)
            fleet = await build_fleet(svc, sandbox, args.instances, seed=11)
            key = (await svc.create_key(fleet.admin, "api:bench", role="admin")).key
            await svc.aclose()
            print(f"{args.instances:,} instances on {args.db}; {os.cpu_count()} CPUs; load average "
                  f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}", flush=True)
            if LOAD_CPUS and SERVER_CPUS:
                os.sched_setaffinity(0, LOAD_CPUS)
                print(f"server on CPU {sorted(SERVER_CPUS)}, load (this process, wrk) on CPU {sorted(LOAD_CPUS)}",
                      flush=True)
            server = Server(home, url, 0.0)
            try:
                await server.ready()
                await asyncio.sleep(args.settle)   # start-up's reconcile and first guard pass done
                listed = await reads(server.base, key, args, "gpuherd")
            finally:
                server.stop()
            server = Server(home, url, args.latency)
            try:
                await server.ready()
                await asyncio.sleep(args.settle)
                times, accepted, booted = await boot_load(server.base, key, args.boots)
            finally:
                server.stop()
            p99 = _pct(times, 99) * 1000
            print(_line(f"gpuherd: POST /api/v1/instances, {args.boots} concurrent boots, provider "
                        f"{args.latency:g} s", times,
                        f"{accepted} answered 202; p99 < 100 ms: {'met' if p99 < 100 else 'NOT MET'}"), flush=True)
            (home / "listed.json").write_bytes(listed)
            (home / "booted.json").write_bytes(booted)
            floor = Server(home, url, 0.0, floor=(home / "listed.json", home / "booted.json"))
            try:
                await floor.ready()
                await reads(floor.base, key, args, "floor")
                times, accepted, _ = await boot_load(floor.base, key, args.boots)
                print(_line(f"floor: POST /api/v1/instances, {args.boots} concurrent", times, "no gpuherd work"),
                      flush=True)
            finally:
                floor.stop()
        finally:
            if args.db == "postgres":
                with admin_engine.begin() as conn:
                    conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--instances", type=int, default=1000)
    ap.add_argument("--clients", type=int, default=100)
    ap.add_argument("--requests", type=int, default=20)
    ap.add_argument("--boots", type=int, default=100)
    ap.add_argument("--latency", type=float, default=2.0)
    ap.add_argument("--runs", type=int, default=3, help="wrk runs per path (the tail varies between runs)")
    ap.add_argument("--settle", type=float, default=10.0, help="seconds to let the server settle after start")
    ap.add_argument("--db", choices=["sqlite", "postgres"], default="sqlite")
    ap.add_argument("--pg-url", default=os.environ.get("GPUHERD_TEST_POSTGRES_URL") or DEFAULT_PG)
    asyncio.run(main(ap.parse_args()))
