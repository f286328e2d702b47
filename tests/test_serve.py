"""`gpuherd serve` as a real process on a loopback port: health, readiness (guards running,
migrations current), an authenticated request, and SIGTERM: the in-flight request finishes, the
process exits 0 within seconds, and the guard lock is free again (a standby takes over).
`/ready`'s not-ready answers (schema behind, database unreachable) run in-process.

`Served` is also what tests/test_replicas.py starts its replicas with."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from alembic import command
from alembic.script import ScriptDirectory

from gpuherd.bot import cli
from gpuherd.bot.http.app import create_app
from gpuherd.core.config import Settings
from gpuherd.core.db import Database, alembic_config, head_revision
from gpuherd.core.leader import GUARDS_LOCK_FILE, FileLeadership
from gpuherd.core.providers.registry import ProviderRegistry
from gpuherd.core.service import GpuService
from gpuherd.core.templates import TemplateCatalog

START_S = 30.0


class Served:
    """One `gpuherd serve --port 0` subprocess; its log (stderr) goes to a file, read for the port."""

    def __init__(self, home: Path, name: str = "serve", **env: str) -> None:
        self.log_path = home.parent / f"{name}.log"
        self.env = {**os.environ, "GPUHERD_HOME": str(home), "GPUHERD_SANDBOX_TIME_SCALE": "0", **env}
        self.log = open(self.log_path, "w")                  # closed in stop()
        self.proc = subprocess.Popen([sys.executable, "-m", "gpuherd.bot.cli", "serve", "--port", "0"],
                                     env=self.env, stdout=self.log, stderr=subprocess.STDOUT)
        self.url = ""

    def text(self) -> str:
        return self.log_path.read_text()

    def wait_healthy(self, timeout: float = START_S) -> str:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise AssertionError(f"gpuherd serve exited with {self.proc.returncode}:\n{self.text()}")
            m = re.search(r"serving on (http://127\.0\.0\.1:\d+)", self.text())
            if m:
                try:
                    if httpx.get(m.group(1) + "/health", timeout=2).status_code == 200:
                        self.url = m.group(1)
                        return self.url
                except httpx.HTTPError:
                    pass
            time.sleep(0.05)
        raise AssertionError(f"gpuherd serve did not come up in {timeout} s:\n{self.text()}")

    def ready(self) -> httpx.Response:
        return httpx.get(self.url + "/ready", timeout=5)

    def terminate(self, timeout: float = 10.0, sig: int = signal.SIGTERM) -> tuple[int, float]:
        """SIGTERM (or `sig`); (exit code, seconds it took)."""
        began = time.monotonic()
        self.proc.send_signal(sig)
        code = self.proc.wait(timeout)
        return code, time.monotonic() - began

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.log.close()


def wait_for(predicate, timeout: float, what: str, step: float = 0.1):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def _key(capsys: pytest.CaptureFixture[str], principal: str, role: str = "member") -> str:
    assert cli.main(["keys", "create", "--user", principal, "--role", role]) == 0
    out = capsys.readouterr().out.strip()
    assert re.fullmatch(r"ghk_k[0-9a-f]{8}_[A-Za-z0-9_-]{43}", out), out
    return out


def test_serve_answers_then_stops_cleanly_on_sigterm(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    home = Path(os.environ["GPUHERD_HOME"])
    key = _key(capsys, "api:alice")                   # the CLI, in the server's home, before it starts
    # every provider call takes 2 s, so a search is still in flight when SIGTERM arrives
    server = Served(home, GPUHERD_SANDBOX_LATENCY_S="2")
    try:
        url = server.wait_healthy()
        assert httpx.get(url + "/health").json() == {"status": "ok"}
        ready = wait_for(lambda: (r := server.ready()).json().get("guards") == "running" and r, 10,
                         "this only replica to run the guards")
        body = ready.json()
        assert ready.status_code == 200 and body["status"] == "ready" and body["database"] == "ok"
        assert body["migrations"] == {"current": head_revision(), "head": head_revision()}
        assert body["replica"].endswith(f":{server.proc.pid}")
        # it holds the guard lock: nobody else can take it
        probe = FileLeadership(home / GUARDS_LOCK_FILE)
        assert not probe.try_acquire()

        auth = {"Authorization": f"Bearer {key}"}
        r = httpx.post(url + "/api/v1/commands", json={"text": "/gpu guards"}, headers=auth, timeout=10)
        assert r.status_code == 200 and r.json()["level"] != "error", r.text
        assert httpx.post(url + "/api/v1/commands", json={"text": "/gpu guards"}).status_code == 401
        assert httpx.post(url + "/api/v1/commands", json={"text": "/gpu guards"},
                          headers={"X-API-Key": key}).status_code == 200

        answer: dict[str, object] = {}

        def slow_search() -> None:
            began = time.monotonic()
            try:
                resp = httpx.post(url + "/api/v1/commands", json={"text": "/gpu search 4090"}, headers=auth,
                                  timeout=20)
                answer.update(status=resp.status_code, level=resp.json().get("level"))
            except httpx.HTTPError as exc:
                answer.update(error=repr(exc))
            answer["took"] = time.monotonic() - began

        t = threading.Thread(target=slow_search)
        t.start()
        time.sleep(0.7)                                # the request is being served
        code, took = server.terminate()
        t.join(10)
        assert code == 0, server.text()
        assert took < 8, f"stopping took {took:.1f} s"
        assert answer.get("status") == 200 and answer.get("level") != "error", answer
        assert answer["took"] >= 1.5                   # it was in flight, not refused or cut short
        log = server.text()
        assert "Traceback" not in log
        assert log.index("leaving the runtime") < log.index("gpuherd stopped (SIGTERM)")
        assert key not in log
        assert probe.try_acquire()                     # the guard lock was released
        probe.release()
    finally:
        server.stop()


def test_a_standby_on_the_same_home_takes_over_the_guards(tmp_path: Path) -> None:
    """Two servers on one SQLite home: one runs the guards; SIGTERM it and the other does within seconds."""
    home = Path(os.environ["GPUHERD_HOME"])
    fast = {"GPUHERD_GUARD_LEADER_RETRY_S": "0.5", "GPUHERD_GUARD_MAX_SLEEP_S": "1"}
    first = Served(home, "first", **fast)
    second = None
    try:
        first.wait_healthy()
        wait_for(lambda: first.ready().json()["guards"] == "running", 10, "the first server to lead")
        second = Served(home, "second", **fast)
        second.wait_healthy()
        r = second.ready()
        assert r.status_code == 200 and r.json()["guards"] == "standby"
        time.sleep(1.2)                                # a couple of the standby's retries
        assert second.ready().json()["guards"] == "standby"
        assert first.ready().json()["guards"] == "running"
        code, _ = first.terminate()
        assert code == 0
        began = time.monotonic()
        wait_for(lambda: second.ready().json()["guards"] == "running", 5, "the standby to take over")
        assert time.monotonic() - began < 5
        assert second.terminate(sig=signal.SIGINT)[0] == 0          # Ctrl-C is a clean stop too
        assert "gpuherd stopped (SIGINT)" in second.text()
    finally:
        first.stop()
        if second is not None:
            second.stop()


def test_a_port_in_use_is_one_clear_line(tmp_path: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {**os.environ, "GPUHERD_SANDBOX_TIME_SCALE": "0"}
        p = subprocess.run([sys.executable, "-m", "gpuherd.bot.cli", "serve", "--port", str(port)],
                           env=env, capture_output=True, text=True, timeout=30)
    assert p.returncode == 2
    assert f"Cannot listen on 127.0.0.1:{port}" in p.stderr
    assert "Traceback" not in p.stderr + p.stdout


# --- /ready's answers in-process ----------------------------------------------------------------

async def _get(service: GpuService, path: str) -> httpx.Response:
    app = create_app(service)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        return await client.get(path)


async def test_ready_is_503_when_the_schema_is_behind(service: GpuService) -> None:
    ok = await _get(service, "/ready")
    assert ok.status_code == 200 and ok.json()["guards"] == "off"      # no Runtime in this app
    cfg = alembic_config(service.db.engine)
    previous = ScriptDirectory.from_config(cfg).get_revision(head_revision()).down_revision
    command.stamp(cfg, previous)
    r = await _get(service, "/ready")
    assert r.status_code == 503 and r.headers["content-type"].startswith("application/problem+json")
    body = r.json()
    assert body["code"] == "not_ready" and body["status"] == 503 and body["database"] == "ok"
    assert body["migrations"] == {"current": previous, "head": head_revision()}
    assert any("gpuherd db upgrade" in reason for reason in body["reasons"])
    assert (await _get(service, "/health")).status_code == 200           # alive all the same


async def test_ready_is_503_when_the_database_does_not_answer(tmp_path: Path) -> None:
    url = "postgresql+psycopg://gpuherd:s3cret-pw@127.0.0.1:1/nowhere"
    settings = Settings(home=tmp_path / "home", database_url=url, sandbox_time_scale=0)
    service = GpuService(settings, Database(url), ProviderRegistry({}), TemplateCatalog.load(None))
    r = await _get(service, "/ready")
    assert r.status_code == 503
    body = r.json()
    assert body["database"] == "unreachable" and body["migrations"] is None
    assert body["reasons"][0].startswith("the database did not answer")
    assert "s3cret-pw" not in r.text and "127.0.0.1" not in r.text
    assert (await _get(service, "/health")).json() == {"status": "ok"}
