"""Notices across real processes on PostgreSQL (SPEC §9, §10): one process holds the guard lock
and writes the idle warnings (`gpuherd guards --run`), another delivers them (`gpuherd shell`,
which prints each notice as a line starting with "» "). The delivering process is SIGKILLed in
the middle of a burst and started again: every warning reaches the shell, none is lost, and
none is printed twice except the one in flight at the kill (sent, not yet marked delivered).

The warnings come in two waves: the first, more than one deliverer batch, is written before the
shell starts (the killed shell leaves most of it claimed under its lease, so the restarted shell
sends those only when the lease has run out, the shell's 6 s); the second comes due while no
shell runs."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO

import pytest
from conftest import PG_SKIP, PG_URL, _pg_database
from sqlalchemy import select
from sqlmodel import col

from gpuherd.core.clock import as_utc
from gpuherd.core.config import Settings
from gpuherd.core.db import Database
from gpuherd.core.guard_plan import replan
from gpuherd.core.models import AuditEvent, Instance, NoticeDelivery, NoticeRecord, SchedulerState
from gpuherd.core.notify import NotifierHub
from gpuherd.core.providers.registry import ProviderRegistry
from gpuherd.core.providers.sandbox import SandboxProvider
from gpuherd.core.service import GpuService
from gpuherd.core.templates import TemplateCatalog

pytestmark = pytest.mark.postgres

FIRST = 60            # due when the guards start: more than one deliverer batch (50)
LATER = 12            # come due while no shell runs
KILL_AFTER = 5        # warnings the first shell prints before it is killed
LEASE_S = 6           # a personal surface's lease (Runtime.deliver_to_person)
PIPE_BYTES = 4096     # the first shell's stdout pipe: a warning is ~110 bytes, so however late the
                      # reader's kill, the shell blocks after ~KILL_AFTER + 37 warnings, fewer than FIRST
WARNING = re.compile(r"^» (g-[0-9a-z]+) idle for .+ — stops in ")
REPO = Path(__file__).resolve().parents[1]
F_SETPIPE_SZ = 1031   # Linux fcntl


def _service(home: Path, url: str, lock: str) -> GpuService:
    s = Settings(home=home, database_url=url, local_user="alice", poll_interval_s=0.01, sandbox_time_scale=0,
                 guard_lock_name=lock)
    home.mkdir(parents=True, exist_ok=True)
    db = Database(url)
    db.upgrade()
    sandbox = SandboxProvider(home / "sandbox.json", seed=3, time_scale=0)
    return GpuService(s, db, ProviderRegistry({"sandbox": sandbox}), TemplateCatalog.load(None), hub=NotifierHub())


def _warn_now(service: GpuService, iids: list[str]) -> None:
    """Make the idle warning of each instance due now and its stop an hour away (only the
    warnings are counted; no stop notice comes during the test)."""
    now = datetime.now(UTC)
    with service.db.session() as s:
        for iid in iids:
            inst = s.get(Instance, iid)
            assert inst is not None
            inst.idle_window_s = 7200
            inst.warn_lead_s = 3600
            inst.last_activity_at = now - timedelta(seconds=3601)
            inst.guard_checked_at = now
            replan(inst)
            s.add(inst)
        s.commit()


def _warned(service: GpuService, iids: list[str]) -> int:
    with service.db.session() as s:
        return len(s.execute(select(col(Instance.id)).where(col(Instance.id).in_(iids),
                                                            col(Instance.idle_warned_at).is_not(None))).all())


def _leader(service: GpuService) -> str | None:
    with service.db.session() as s:
        row = s.get(SchedulerState, "guards")
        return row.leader if row else None


def _shell_rows(service: GpuService) -> dict[str, list[NoticeDelivery]]:
    """The shell's delivery rows of every idle warning, by instance."""
    with service.db.session() as s:
        rows = s.execute(select(NoticeRecord.instance_id, NoticeDelivery)
                         .join(NoticeDelivery, col(NoticeDelivery.notice_id) == col(NoticeRecord.id))
                         .where(NoticeRecord.kind == "guard.warn_idle", NoticeDelivery.surface == "shell")).all()
    out: dict[str, list[NoticeDelivery]] = {}
    for iid, row in rows:
        out.setdefault(iid, []).append(row)
    return out


def _wait(what: str, done: Callable[[], bool], limit_s: float, why: Callable[[], str] = lambda: "") -> None:
    deadline = time.monotonic() + limit_s
    while not done():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {limit_s:g} s waiting for {what}\n{why()}")
        time.sleep(0.05)


@dataclass
class Shell:
    """One `gpuherd shell` process whose stdout a thread reads line by line; with `kill_after`
    the thread SIGKILLs it the moment it has read that many warnings (as close to the send as a
    reader can get, so the kill lands in the middle of the burst)."""

    proc: subprocess.Popen[bytes]
    stderr_path: Path
    kill_after: int | None = None
    lines: list[tuple[datetime, str]] = field(default_factory=list)   # (when read, line)
    killed_at: float | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _thread: threading.Thread | None = None

    @classmethod
    def start(cls, env: dict[str, str], stderr_path: Path, *, kill_after: int | None = None,
              pipe_bytes: int | None = None) -> Shell:
        proc = subprocess.Popen([sys.executable, "-m", "gpuherd.bot.cli", "--verbose", "shell"], env=env,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr_path.open("wb"),
                                cwd=REPO)
        if pipe_bytes is not None:   # before the shell has written anything (it is still importing)
            assert proc.stdout is not None
            with contextlib.suppress(OSError):
                fcntl.fcntl(proc.stdout.fileno(), F_SETPIPE_SZ, pipe_bytes)
        shell = cls(proc, stderr_path, kill_after)
        shell._thread = threading.Thread(target=shell._read, name=f"read-shell-{proc.pid}", daemon=True)
        shell._thread.start()
        return shell

    @property
    def identity(self) -> str:
        return f"{socket.gethostname()}:{self.proc.pid}:shell"

    def _read(self) -> None:
        out: IO[bytes] | None = self.proc.stdout
        assert out is not None
        warned = 0
        copy = self.stderr_path.with_suffix(".out").open("wb")   # what it printed, for a failure's reader
        for raw in iter(out.readline, b""):
            copy.write(raw)
            copy.flush()
            line = raw.decode("utf-8", "replace").rstrip("\n")
            with self._lock:
                self.lines.append((datetime.now(UTC), line))
            if WARNING.match(line):
                warned += 1
                if self.kill_after is not None and warned == self.kill_after and self.killed_at is None:
                    self.proc.send_signal(signal.SIGKILL)
                    self.killed_at = time.monotonic()
        copy.close()

    def notices(self) -> list[str]:
        with self._lock:
            return [line for _, line in self.lines if line.startswith("» ")]

    def warnings(self) -> list[str]:
        return [m.group(1) for line in self.notices() if (m := WARNING.match(line))]

    def warned_at(self) -> dict[str, datetime]:
        """When each warning was first read."""
        with self._lock:
            lines = list(self.lines)
        out: dict[str, datetime] = {}
        for at, line in lines:
            if m := WARNING.match(line):
                out.setdefault(m.group(1), at)
        return out

    def join(self, limit_s: float) -> None:
        assert self._thread is not None
        self._thread.join(limit_s)
        assert not self._thread.is_alive(), "the shell's stdout was not closed"

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(OSError):
                assert self.proc.stdin is not None
                self.proc.stdin.close()          # end of input: the shell leaves on its own
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        if self._thread is not None:
            self._thread.join(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def test_a_killed_delivering_process_loses_no_warning_and_repeats_only_the_one_in_flight(tmp_path: Path) -> None:
    if not PG_URL:
        pytest.skip(PG_SKIP)
    began = time.monotonic()
    gen = _pg_database()
    url = next(gen)
    guards: subprocess.Popen[bytes] | None = None
    shells: list[Shell] = []
    service: GpuService | None = None
    try:
        lock = f"test-{uuid.uuid4().hex[:8]}"
        home = tmp_path / "home"
        service = _service(home, url, lock)
        svc = service
        actor = svc.local_actor()

        async def boot_all() -> list[str]:
            results = await asyncio.gather(*(svc.boot(actor, "budget", wait=True) for _ in range(FIRST + LATER)))
            return [r.instance.id for r in results]  # type: ignore[union-attr]
        iids = asyncio.run(boot_all())
        first, later = iids[:FIRST], iids[FIRST:]
        _warn_now(svc, first)
        env = {**os.environ, "GPUHERD_HOME": str(home), "GPUHERD_DATABASE_URL": url, "GPUHERD_LOCAL_USER": "alice",
               "GPUHERD_SANDBOX_TIME_SCALE": "0", "GPUHERD_SANDBOX_SEED": "3", "GPUHERD_GUARD_LOCK_NAME": lock,
               "GPUHERD_GUARD_LEADER_RETRY_S": "1", "GPUHERD_GUARD_MAX_SLEEP_S": "1"}
        guards_log = tmp_path / "guards.log"

        # A: the guards. It leads and writes the first wave before any shell exists.
        guards = subprocess.Popen([sys.executable, "-m", "gpuherd.bot.cli", "--verbose", "guards", "--run"],
                                  env=env, stdout=guards_log.open("wb"), stderr=subprocess.STDOUT, cwd=REPO)
        a_identity = f"{socket.gethostname()}:{guards.pid}"
        _wait("the guards to lead and warn the first wave",
              lambda: _warned(svc, first) == FIRST and _leader(svc) == a_identity, 30,
              lambda: guards_log.read_text(errors="replace")[-4000:])

        # B: the shell delivers; killed after a few warnings, its stdout pipe drained to the end.
        b1 = Shell.start(env, tmp_path / "shell1.err", kill_after=KILL_AFTER, pipe_bytes=PIPE_BYTES)
        shells.append(b1)
        _wait("the first shell to print its warnings", lambda: b1.killed_at is not None, 30, b1.stderr)
        b1.proc.wait(timeout=10)
        b1.join(10)
        killed_at = b1.killed_at
        assert killed_at is not None
        printed_first = b1.warnings()
        at_kill = _shell_rows(svc)
        delivered_at_kill = {iid for iid, rows in at_kill.items() if all(r.delivered_at for r in rows)}
        lease_ends = {iid: max(as_utc(r.claimed_until) for r in rows if r.claimed_until)
                      for iid, rows in at_kill.items()
                      if any(r.claimed_by == b1.identity and r.delivered_at is None for r in rows)}
        under_lease = set(lease_ends)
        in_flight = set(printed_first) - delivered_at_kill
        assert KILL_AFTER <= len(printed_first) < FIRST, printed_first     # killed mid-delivery
        assert len(set(printed_first)) == len(printed_first)
        assert delivered_at_kill <= set(printed_first)       # nothing marked delivered unprinted
        assert len(in_flight) <= 1, in_flight                 # sends go one at a time
        assert under_lease, "the kill left nothing claimed: it did not land in a batch"

        # the second wave comes due while no shell runs
        _warn_now(svc, later)
        _wait("the guards to warn the second wave", lambda: _warned(svc, later) == LATER, 20,
              lambda: guards_log.read_text(errors="replace")[-4000:])

        # a new B: delivers the second wave and what the first B left, once its lease ran out
        b2 = Shell.start(env, tmp_path / "shell2.err")
        shells.append(b2)

        def seen() -> set[str]:
            return set(printed_first) | set(b2.warnings())
        _wait("every warning in the shell", lambda: seen() == set(iids), LEASE_S + 30,
              lambda: f"missing {sorted(set(iids) - seen())}\n{b2.stderr()}")
        _wait("every shell delivery of the warnings marked delivered",
              lambda: all(r.delivered_at for rows in _shell_rows(svc).values() for r in rows), 10)
        time.sleep(0.5)  # anything sent twice would show by now
        delivered_s = time.monotonic() - killed_at

        printed_second = b2.warnings()
        counts = Counter(printed_first + printed_second)
        twice = {iid for iid, n in counts.items() if n > 1}
        assert max(counts.values()) <= 2, counts
        assert twice == in_flight, (twice, in_flight)        # only the one in flight, and it did go again
        others = Counter(line for line in b1.notices() + b2.notices() if not WARNING.match(line))
        assert all(n == 1 for n in others.values()), others
        # the rows the dead shell held waited for its lease (taken just before the kill), then went once
        assert under_lease <= set(printed_second)
        second_at = b2.warned_at()
        early = {iid: (second_at[iid] - end).total_seconds() for iid, end in lease_ends.items()
                 if second_at[iid] < end}
        assert not early, early
        # what nobody had claimed (the rest of the first wave, the second wave) went at once
        unclaimed = set(iids) - set(printed_first) - under_lease
        assert set(later) <= unclaimed
        first_end = min(lease_ends.values())
        # "at once": well before the 6 s lease ran out (a slow CI machine prints a few ms late)
        slack = timedelta(seconds=1)
        late = {iid: (second_at[iid] - first_end).total_seconds() for iid in unclaimed
                if second_at[iid] >= first_end + slack}
        assert not late, late

        # the database agrees: one warning per instance, every shell row of it delivered
        rows = _shell_rows(svc)
        assert set(rows) == set(iids)
        assert all(r.delivered_at is not None and r.gave_up_at is None for rs in rows.values() for r in rs)
        with svc.db.session() as s:
            events = list(s.execute(select(AuditEvent).where(AuditEvent.event == "guard.warn_idle")).scalars())
        assert sorted(e.instance_id for e in events) == sorted(iids)

        # A held the lock throughout; no shell ever took it
        assert guards.poll() is None, guards_log.read_text(errors="replace")[-4000:]
        assert _leader(svc) == a_identity
        for shell in shells:
            log = shell.stderr_path.read_text(errors="replace")
            assert "took leadership" not in log and "leadership acquired" not in log, shell.stderr()
        print(f"\nnotice processes: printed before the kill {len(printed_first)}, in flight {sorted(in_flight)}, "
              f"under the dead shell's lease {len(under_lease)}, all delivered {delivered_s:.1f} s after the kill, "
              f"test {time.monotonic() - began:.1f} s")
    finally:
        for shell in shells:
            with contextlib.suppress(Exception):
                shell.stop()
        if guards is not None and guards.poll() is None:
            guards.send_signal(signal.SIGTERM)
            try:
                guards.wait(timeout=10)
            except subprocess.TimeoutExpired:
                guards.kill()
                guards.wait(timeout=10)
        if service is not None:
            with contextlib.suppress(Exception):
                asyncio.run(service.aclose())
            service.db.dispose()
        next(gen, None)
