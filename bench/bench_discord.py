"""Discord under a burst: 100 `/gpu` INTERACTION_CREATEs within one second, sent over the gateway
websocket to a real `gpuherd serve` process (DISCORD_BOT_TOKEN set; REST and gateway pointed at
the loopback fake, tests/discord_fake.py, running in this process) while every provider call
takes 2 s. Prints the time from writing each interaction on the websocket to the fake receiving
its interaction callback (a defer or an answer: p50, p99, max; Discord's limit is 3 s, our target
p99 is under 50 ms) and how long until all results arrived.

The mix is what a busy server types: 60 `/gpu search query:24gb`, 20 `/gpu status` and 20
`/gpu boot template:budget`, from 20 different users (first seen: the default member role). A
search or a status is done when its deferred original response was edited with the result; a
boot when its original was edited to say "Booted g-". An answer that went to the asker alone
(an error) counts as done but is reported.

Decisions: the fake shares this process's loop with the sender, so a callback's arrival time
includes any delay of that loop (as in bench_slack.py, where the HTTP client shares it); the
server's log goes to a file in its temporary home (a pipe nobody reads could fill and block it).
Exits 1 if any interaction got no callback or any result is missing.

    .venv-test/bin/python bench/bench_discord.py [--interactions 100] [--over 1.0] [--latency 2.0]"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _path  # noqa: F401
import httpx

from tests import discord_payloads as P
from tests.discord_fake import EPHEMERAL, LOADING, FakeDiscord

TOKEN = "bench-discord-token-0123456789abcdef"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(p / 100 * len(ordered)) - 1))]


def plan(n: int) -> list[tuple[str, dict[str, Any]]]:
    """(kind, payload) per interaction: of every 5, 3 searches, 1 status, 1 boot; 20 users."""
    out = []
    for i in range(n):
        kind = ("search", "search", "search", "status", "boot")[i % 5]
        options = {"search": {"query": "24gb"}, "status": {}, "boot": {"template": "budget"}}[kind]
        user = str(int(P.USER_ID) + 1000 + i % 20)
        out.append((kind, P.command("gpu", kind, options, user_id=user)))
    return out


def finished(fake: FakeDiscord, kind: str, token: str) -> str | None:
    """"result", "private" (an answer for the asker alone) or None (not yet)."""
    record = fake.interactions.get(token)
    if record is None:
        return None
    if any(fid in fake.messages and fake.messages[fid]["flags"] & EPHEMERAL for fid in record.followup_ids):
        return "private"
    try:
        original = fake.original(token)
    except KeyError:
        return None
    if original["flags"] & LOADING or not original["edited_timestamp"]:
        return None
    if kind == "boot":
        return "result" if "Booted g-" in json.dumps(original) else None
    return "result"


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--interactions", type=int, default=100)
    ap.add_argument("--over", type=float, default=1.0, help="seconds the burst is spread over")
    ap.add_argument("--latency", type=float, default=2.0, help="seconds every provider call takes")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for all results")
    args = ap.parse_args()

    home = Path(tempfile.mkdtemp(prefix="gpuherd-bench-discord-"))
    async with FakeDiscord(token=TOKEN) as fake:
        port = free_port()
        env = {**os.environ, "GPUHERD_HOME": str(home), "DISCORD_BOT_TOKEN": TOKEN,
               "GPUHERD_DISCORD_API_URL": fake.api_url, "GPUHERD_DISCORD_GATEWAY_URL": fake.gateway_url,
               "GPUHERD_SANDBOX_LATENCY_S": str(args.latency), "GPUHERD_SANDBOX_TIME_SCALE": "0"}
        for name in ("SLACK_BOT_TOKEN", "SLACK_APP_TOKEN", "SLACK_SIGNING_SECRET"):
            env.pop(name, None)
        log_path = home / "serve.log"
        gpuherd = Path(sys.executable).with_name("gpuherd")
        with open(log_path, "w") as log:
            server = subprocess.Popen([str(gpuherd), "serve", "--port", str(port)], env=env,
                                      stdout=subprocess.DEVNULL, stderr=log)
        url = f"http://127.0.0.1:{port}"
        code: int | None = None
        try:
            async with httpx.AsyncClient(timeout=5) as c:
                deadline = time.monotonic() + 60
                while True:
                    try:
                        if (await c.get(url + "/health")).status_code == 200:
                            break
                    except httpx.TransportError:
                        pass
                    if time.monotonic() > deadline or server.poll() is not None:
                        print(f"the server did not start (log: {log_path}):\n{log_path.read_text()}", file=sys.stderr)
                        return 2
                    await asyncio.sleep(0.1)
            conn = await fake.wait_connected(timeout=30)

            work = plan(args.interactions)
            sent: dict[str, float] = {}
            began = time.monotonic()

            async def one(i: int, payload: dict[str, Any]) -> None:
                await asyncio.sleep(i * args.over / args.interactions)
                sent[payload["token"]] = await fake.send_interaction(payload)

            await asyncio.gather(*(one(i, p) for i, (_, p) in enumerate(work)))
            burst_s = time.monotonic() - began

            def outcomes() -> dict[str, str | None]:
                return {p["token"]: finished(fake, kind, p["token"]) for kind, p in work}

            while None in outcomes().values() and time.monotonic() - began < args.timeout:
                await asyncio.sleep(0.05)
            total_s = time.monotonic() - began
            done = outcomes()
        finally:
            if server.poll() is None:
                server.send_signal(signal.SIGTERM)
                end = time.monotonic() + 30
                while server.poll() is None and time.monotonic() < end:
                    await asyncio.sleep(0.05)     # not server.wait(): the fake must keep answering meanwhile
                if server.poll() is None:
                    server.kill()
            code = server.wait()

        first_callback: dict[str, Any] = {}
        for cb in fake.callbacks():
            first_callback.setdefault(cb.token, cb)
        acks = [(first_callback[t].call.received_at - at) * 1000 for t, at in sent.items() if t in first_callback]
        types = sorted({cb.type for cb in first_callback.values()})
        missing = [t for t in sent if t not in first_callback]
        closed = [c for c in fake.connections if c is conn and not c.open]

    by_kind: dict[str, list[str | None]] = {}
    for kind, p in work:
        by_kind.setdefault(kind, []).append(done[p["token"]])
    private = sum(1 for v in done.values() if v == "private")
    results = sum(1 for v in done.values() if v is not None)
    print(f"{args.interactions} interactions over {burst_s:.2f} s on the gateway ({conn.compress or 'text'} frames), "
          f"providers answering in {args.latency:g} s")
    if acks:
        print(f"  interaction callback: p50 {statistics.median(acks):.1f} ms, p99 {pct(acks, 99):.1f} ms, "
              f"max {max(acks):.1f} ms (callback types {types}; {len(missing)} without a callback)")
    else:
        print("  interaction callback: none arrived")
    shown = ", ".join(f"{k} {sum(v is not None for v in vs)}/{len(vs)}" for k, vs in by_kind.items())
    print(f"  results: {results} of {len(work)} after {total_s:.2f} s ({shown}; {private} answered privately)")
    print(f"  SIGTERM: exit {code}, gateway closed by the "
          f"{closed[0].closed_by + f' with {closed[0].close_code}' if closed else 'nobody (still open)'}")
    return 0 if not missing and results == len(work) and private == 0 and code == 0 else 1


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
