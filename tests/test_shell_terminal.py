"""The shell as a terminal user meets it: replies laid out at 80 columns (every reply kind a
scripted session produces), and the real `gpuherd shell` on a pseudo-terminal for what only a
terminal shows (a notice above a half-typed line, Ctrl-C at the prompt and during a boot, the
farewell). The pty tests drive `.venv-test/bin/gpuherd shell` with a fresh GPUHERD_HOME and
the default sandbox provider; each takes a few seconds."""

from __future__ import annotations

import asyncio
import fcntl
import io
import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from rich.console import Console

from gpuherd.bot import render_text
from gpuherd.bot.replies import Action, Reply, ReplyField, Table
from gpuherd.bot.shell import Shell
from gpuherd.core.service import GpuService

WIDTH = 80
ID = re.compile(r"Booted (g-[0-9a-f]{4,8})")
ANSI_STYLE = re.compile(r"\x1b\[[0-9;]*m")
COMMAND = re.compile(r"/gpu [a-z]+(?: [^\s\]`]+)*")


def session(service: GpuService, script: str, *, yes: bool = True, width: int = WIDTH) -> tuple[Shell, Console]:
    """A piped session on a console of `width` columns; its text as a terminal would show it."""
    console = Console(record=True, width=width)
    shell = Shell(service, yes=yes, console=console, stdin=io.StringIO(script), interactive=False)
    return shell, console


# Every kind of reply a session gives: help (a table too wide for two columns), search,
# templates and one template (prose columns), boots (fields with an endpoint, actions), a
# confirmation refused and one given, status with two machines, one machine, keep, costs two
# ways, guards, audit, budgets, reconcile, stop, start, destroy, and an error.
SCRIPT = """help
help boot
/gpu providers
/gpu search 4090
/gpu templates
/gpu templates budget
/gpu boot budget
/gpu boot research max_dph=0.01
/gpu status
/gpu budget set team=default 200
/gpu budget
/gpu costs
/gpu costs by=template
/gpu guards
/gpu audit
/gpu reconcile
/gpu frobnicate
"""


def recording(shell: Shell) -> list[Reply]:
    """The replies a shell renders, kept (its dispatch wrapped) to lay each out again."""
    seen: list[Reply] = []
    dispatch = shell.dispatch

    async def kept(line: str) -> Reply:
        reply = await dispatch(line)
        seen.append(reply)
        return reply
    shell.dispatch = kept
    return seen


def tokens(text: str) -> set[str]:
    return {w for line in text.splitlines() if not line.startswith("Not shown at ")
            for w in line.split() if not w.endswith("…") and set(w) != {"─"}}


async def test_every_reply_fits_80_columns_without_splitting_words(service: GpuService) -> None:
    shell, console = session(service, SCRIPT)
    seen = recording(shell)
    await shell.run()
    out = console.export_text()
    iid = ID.findall(out)[0]
    more, console2 = session(service, f"/gpu status {iid}\n/gpu keep {iid} 2h\n/gpu costs {iid}\n"
                             f"/gpu stop {iid}\n/gpu start {iid}\n/gpu destroy {iid}\n/gpu status all=yes\n")
    later = recording(more)
    await more.run()
    seen += later
    out += console2.export_text()
    kinds = {r.title.split()[0] for r in seen}
    assert {"gpuherd", "Templates", "Template", "Booted", "Price", "Costs", "Guards", "Audit", "Budget",
            "Budgets", "Reconciled", "Cannot", "Keeping", "Stopped", "Started", "Destroyed", "Providers", "Cost"} <= kinds, sorted(kinds)

    for reply in seen:
        narrow, wide = render_text.to_text(reply, WIDTH), render_text.to_text(reply, 400)
        commands = {a.command for a in reply.actions}
        for line in narrow.splitlines():
            if len(line.rstrip()) > WIDTH:       # only a line carrying a command may be longer
                assert any(c in line for c in commands), f"{reply.title}: {line!r}"
        split = tokens(narrow) - tokens(wide)    # a word cut in two leaves pieces the wide one lacks
        assert not split, f"{reply.title}: {sorted(split)[:10]}\n{narrow}"
        for line in render_text.action_lines(reply, WIDTH):
            assert line in narrow.splitlines(), f"{reply.title}: {line!r} not whole on one line"

    # the session as printed: every line fits, bar the ones that are a command to copy
    for line in out.splitlines():
        if len(line.rstrip()) > WIDTH:
            assert COMMAND.search(line), line
    for token in ("Qwen/Qwen2.5-Coder-7B-Instruct-AWQ", "http://sbx-000001.sandbox.invalid:8000"):
        assert token in out, token                  # long words whole (rich's fold would cut them)
    assert f"[Keep 1 h] /gpu keep {iid} 1h" in out.splitlines()
    # the status table: one row a machine, the columns that matter kept, the rest named
    status = out.split("gpu> /gpu status\n", 1)[1].split("gpu> ", 1)[0]
    rows = [line for line in status.splitlines() if line.startswith("g-")]
    assert len(rows) == 2, status
    for row in rows:
        # which machine (template) before when its guard acts (next, the widest cell); a narrow
        # column dropped before it comes back when next's going leaves room (owner, accrued)
        assert "running" in row and "/h" in row and ("research" in row or "budget" in row), row
        assert "alice" in row and "warn (stop in 5 min)" not in row, row
    hidden = status.split("Not shown at 80 columns:")[1].split("\n")[0]
    assert "next" in hidden and "uptime" in hidden and "template" not in hidden
    # help at 80 columns: each usage line whole, its summary below it
    assert "/gpu boot <template> [offer=<provider>:<id>] [provider=<name>] [key=value …]\n" in out
    assert "    Start an instance from a template" in out


def test_a_table_drops_low_priority_columns_first_and_names_them() -> None:
    t = Table(columns=["id", "owner", "template", "state", "gpu", "$/h", "accrued", "uptime", "idle", "next"],
              rows=[["g-7f3a", "alice", "research", "running", "H100 SXM x1", "$2.890/h", "$12.04", "4h 10m",
                     "2m", "stop (idle) 12-03 14:30"]])
    lay = render_text.layout(t, 80)
    kept = [t.columns[i] for i in lay.keep]
    assert kept[0] == "id" and "next" in kept and "state" in kept and "$/h" in kept
    assert "uptime" in lay.dropped and "idle" in lay.dropped
    assert sum(lay.widths[i] for i in lay.keep) + render_text.GAP * (len(lay.keep) - 1) <= 80
    assert render_text.layout(t, 200).dropped == []
    text = render_text.to_text(Reply(title="x", tables=[t]), width=80)
    assert max(len(line.rstrip()) for line in text.splitlines()) <= 80, text
    assert "stop (idle) 12-03 14:30" in text and "Not shown at 80 columns: owner" in text
    # the plain (many rows) layout keeps the same columns
    many = t.model_copy(update={"rows": t.rows * (render_text.PLAIN_ROWS + 1)})
    plain = render_text.to_text(Reply(title="x", tables=[many]), width=80)
    assert max(len(line.rstrip()) for line in plain.splitlines()) <= 80
    assert plain.count("stop (idle) 12-03 14:30") == render_text.PLAIN_ROWS + 1


def test_action_lines_are_never_broken_and_long_values_go_below_their_label() -> None:
    token = "c_" + "x" * 90
    reply = Reply(title="t", fields=[ReplyField(label="endpoint", value="https://" + "e" * 85 + ".example:8000")],
                  actions=[Action(label="Yes", command=f"/gpu confirm {token}"),
                           Action(label="Stop", command="/gpu stop g-7f3a")])
    text = render_text.to_text(reply, width=80)
    lines = text.splitlines()
    assert f"[Yes] /gpu confirm {token}" in lines            # whole, on its own line (over 80: allowed)
    assert "[Stop] /gpu stop g-7f3a" in lines
    assert "  https://" + "e" * 85 + ".example:8000" in lines
    short = render_text.to_text(Reply(title="t", actions=[Action(label="Stop", command="/gpu stop g-1")]), 80)
    assert "[Stop] /gpu stop g-1" in short.splitlines()


async def test_refused_confirmation_fails_and_one_shots_are_not_echoed(service: GpuService) -> None:
    shell, console = session(service, "", yes=False)
    await shell.run_line("/gpu boot budget max_dph=0.01")     # what `gpuherd boot …` does
    out = console.export_text()
    assert shell.errors == 1 and "Not done." in out
    assert "gpu> " not in out
    assert re.search(r"^Needs a yes: run `/gpu confirm c_\S+`$", out, re.M), out
    assert await service.instance_count() == 0
    piped, console = session(service, "/gpu status\n", yes=False)
    assert await piped.run() == 0
    assert "gpu> /gpu status" in console.export_text()       # a piped script still reads as a session


async def test_farewell_lists_billing_machines_and_says_nothing_guards_them(service: GpuService) -> None:
    from gpuherd.bot.shell import farewell

    shell, console = session(service, "/gpu boot budget\n")
    await shell.run()
    iid = ID.findall(console.export_text())[0]
    bye = Console(record=True, width=WIDTH)
    await farewell(service, shell.actor, bye)
    text = bye.export_text()
    assert "You leave 1 machine billing" in text and iid in text and "running" in text
    assert "Nothing guards them now" in text
    assert f"gpuherd stop {iid}" in text.splitlines()[-1]
    from gpuherd.core.leader import leadership_for

    settings = service.settings          # another process holding the guard lock (a second holder)
    with leadership_for(settings.resolved_database_url, settings.home) as other:
        assert await asyncio.to_thread(other.try_acquire)
        held = Console(record=True, width=WIDTH)
        await farewell(service, shell.actor, held)
    assert "Another gpuherd process runs the guards" in held.export_text()
    assert "Nothing guards them now" not in held.export_text()
    quiet = Console(record=True, width=WIDTH)
    await service.destroy(shell.actor, iid, confirmed=True)
    await farewell(service, shell.actor, quiet)
    assert quiet.export_text() == ""


# --- the real shell on a pseudo-terminal ----------------------------------------------------------


def gpuherd() -> str:
    path = Path(sys.executable).with_name("gpuherd")
    if not path.exists():
        pytest.skip("the gpuherd script is not installed next to this Python")
    return str(path)


class Terminal:
    """`gpuherd shell` on a pty of 80 columns: write keystrokes, wait for text."""

    def __init__(self, env: dict[str, str]) -> None:
        self.master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, WIDTH, 0, 0))
        self.proc = subprocess.Popen([gpuherd(), "shell"], stdin=slave, stdout=slave, stderr=slave, env=env,
                                     start_new_session=True, close_fds=True,
                                     preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0))
        os.close(slave)
        self.raw = self.out = ""

    def read(self) -> None:
        """What the terminal shows, without colours (escape sequences that move the cursor stay)."""
        self.raw += os.read(self.master, 65536).decode(errors="replace")
        self.out = ANSI_STYLE.sub("", self.raw)

    def send(self, keys: str) -> None:
        os.write(self.master, keys.encode())

    def expect(self, pattern: str, timeout: float = 10.0, start: int = 0) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while True:
            found = re.compile(pattern).search(self.out, start)
            if found:
                return found
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{pattern!r} not seen in:\n{self.out}")
            ready, _, _ = select.select([self.master], [], [], min(left, 0.2))
            if ready:
                try:
                    self.read()
                except OSError:          # the child closed the terminal
                    if self.proc.poll() is not None:
                        raise AssertionError(f"{pattern!r} not seen; the shell ended:\n{self.out}") from None

    def wait(self, timeout: float = 15.0) -> int:
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            ready, _, _ = select.select([self.master], [], [], 0.1)
            if ready:
                try:
                    self.read()
                except OSError:
                    break
        return self.proc.wait(timeout=max(0.1, deadline - time.monotonic()))

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        os.close(self.master)


@pytest.fixture
def term_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GPUHERD_", "COLUMNS", "LINES"))}
    env.update(GPUHERD_HOME=str(tmp_path / "home"), GPUHERD_SANDBOX_TIME_SCALE="0", TERM="xterm",
               GPUHERD_POLL_INTERVAL_S="0.05", GPUHERD_LOCAL_USER="alice")
    return env


@pytest.fixture
def terminal(term_env: dict[str, str]) -> Iterator[Terminal]:
    t = Terminal(term_env)
    try:
        yield t
    finally:
        t.close()


def test_ctrl_c_clears_the_line_and_ctrl_d_leaves(terminal: Terminal) -> None:
    terminal.expect(r"gpu> ")
    terminal.send("/gpu frobnicate")
    terminal.expect(r"frobnicate")
    terminal.send("\x03")
    mark = terminal.expect(r"\^C\r?\n").end()
    terminal.expect(r"gpu> ", start=mark)
    terminal.send("/gpu status\r")                       # the cleared text is not run with it
    done = terminal.expect(r"Nothing is running").end()
    assert "Unknown command" not in terminal.out
    terminal.expect(r"gpu> ", start=done)               # keys typed while a command runs go to it
    terminal.send("\x04")
    assert terminal.wait() == 0, terminal.out
    assert "Traceback" not in terminal.out


def test_a_notice_is_printed_above_the_prompt_and_the_typed_text_redrawn(
        terminal: Terminal, term_env: dict[str, str]) -> None:
    terminal.expect(r"gpu> ")
    terminal.send("/gpu sta")
    terminal.expect(r"/gpu sta")
    other = subprocess.run([gpuherd(), "boot", "budget"], env={**term_env, "GPUHERD_LOCAL_USER": "bob"},
                           capture_output=True, text=True, timeout=30)
    assert other.returncode == 0, other.stdout + other.stderr
    at = terminal.expect(r"» [^\r\n]*bob[^\r\n]*booted", timeout=15).end()
    terminal.expect(r"gpu> /gpu sta", start=at)           # the prompt and what was typed, redrawn
    terminal.send("tus\r")
    done = terminal.expect(r"1 instance").end()         # the line the user finished is the one run
    terminal.expect(r"gpu> ", start=done)
    terminal.send("exit\r")
    assert terminal.wait() == 0, terminal.out


def test_ctrl_c_during_a_boot_says_what_the_machine_does_and_the_farewell_lists_it(
        term_env: dict[str, str]) -> None:
    t = Terminal({**term_env, "GPUHERD_SANDBOX_TIME_SCALE": "0.5"})
    try:
        t.expect(r"gpu> ")
        t.send("/gpu boot budget\r")
        t.expect(r"… Booting (g-[0-9a-f]+)", timeout=15)
        t.send("\x03")
        said = t.expect(r"Stopped waiting\. (g-[0-9a-f]+) is still (\w+) and billing \$[0-9.]+/h; it\s+keeps\s+going\.",
                        timeout=10)
        iid = said.group(1)
        assert said.group(2) in ("provisioning", "loading", "pending"), said.group(0)
        t.expect(rf"/gpu status {iid}\s+to follow it")
        t.expect(rf"/gpu destroy {iid}")
        t.expect(r"gpu> ", start=said.end())
        t.send("\x04")
        assert t.wait() == 0, t.out
        t.expect(r"You leave 1 machine billing")
        t.expect(r"Nothing guards them now")
        t.expect(rf"gpuherd stop {iid}")
        assert "Traceback" not in t.out
    finally:
        t.close()


async def test_ctrl_c_before_the_order_is_placed_lets_it_be_placed_then_stops_waiting(service: GpuService) -> None:
    shell, console = session(service, "")
    line = asyncio.create_task(shell._command_task("/gpu boot budget"))
    await asyncio.sleep(0)                       # the line has started; no provider answer yet
    assert shell._command is not None and shell._following is None
    shell._on_interrupt()                        # what Ctrl-C calls
    await line
    out = console.export_text()
    assert "stopping the wait once the provider has the order" in out
    iid = re.search(r"Stopped waiting\. (g-[0-9a-f]+) is still (\w+)", out)
    assert iid, out
    assert await service.instance_count() == 1   # the order was placed, not cut in half
    assert f"/gpu destroy {iid.group(1)}" in out and shell.errors == 1
