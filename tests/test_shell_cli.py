"""The terminal surfaces: `bot.shell.Shell` over the test service, and the real `gpuherd` CLI in
a subprocess (fresh data directory, instant sandbox)."""

from __future__ import annotations

import asyncio
import io
import re
import subprocess
from pathlib import Path

import pytest
from conftest import cli_environment, gpuherd_cmd
from rich.console import Console

from gpuherd.bot.grammar import REGISTRY
from gpuherd.bot.shell import Shell
from gpuherd.core.db import head_revision
from gpuherd.core.models import Instance
from gpuherd.core.providers.sandbox import SIMULATED_NOTE
from gpuherd.core.service import GpuService

ID = re.compile(r"Booted (g-[0-9a-f]{4,8})")


def make_shell(service: GpuService, script: str, *, yes: bool = False) -> tuple[Shell, Console]:
    console = Console(record=True, width=160)
    return Shell(service, yes=yes, console=console, stdin=io.StringIO(script), interactive=False), console


def state_of(service: GpuService, iid: str) -> str:
    with service.db.session() as s:
        inst = s.get(Instance, iid)
        assert inst is not None
        return inst.state


# --- the Shell class ----------------------------------------------------------------------------


async def test_piped_script_searches_boots_and_shows_costs(service: GpuService) -> None:
    shell, console = make_shell(service, "/gpu search 4090\n/gpu boot budget\n/gpu costs\n", yes=True)
    assert await shell.run() == 0
    out = console.export_text()
    assert "gpu> /gpu search 4090" in out                        # piped lines are echoed
    assert re.search(r"offer\s+gpu\s+n\s+GB\s+\$/h", out), out   # the offers table
    assert "sandbox:sb-" in out and "RTX 4090" in out
    match = ID.search(out)
    assert match, out
    iid = match.group(1)
    assert state_of(service, iid) == "running"
    assert "Costs · this month" in out and "run-rate" in out and "month-end projection" in out
    assert iid in out.split("Costs · this month")[1]             # listed under "Billing now"
    assert SIMULATED_NOTE in out
    assert "Traceback" not in out
    assert shell.errors == 0


async def test_a_bad_line_makes_the_script_fail_but_the_rest_still_runs(service: GpuService) -> None:
    shell, console = make_shell(service, "# a comment\n\n/gpu status\n/gpu frobnicate\n/gpu costs\n")
    assert await shell.run() == 1
    out = console.export_text()
    assert "Unknown command 'frobnicate'" in out
    assert "Costs · this month" in out                           # the line after the bad one ran
    assert "a comment" not in out                                # comments are skipped, not echoed
    assert shell.errors == 1


async def test_exit_stops_reading(service: GpuService) -> None:
    shell, console = make_shell(service, "/gpu status\nexit\n/gpu boot budget\n", yes=True)
    assert await shell.run() == 0
    assert await service.instance_count() == 0
    assert "Booted" not in console.export_text()


async def test_piped_without_yes_does_not_confirm_and_says_how(service: GpuService) -> None:
    shell, console = make_shell(service, "/gpu boot budget max_dph=0.01\n")
    assert await shell.run() == 1                                # not done: the script fails
    out = console.export_text()
    assert "Price above limit" in out
    assert "Needs a yes" in out and "/gpu confirm c_" in out and "--yes" in out
    assert "Not done." in out
    assert await service.instance_count() == 0


async def test_piped_with_yes_confirms(service: GpuService) -> None:
    shell, console = make_shell(service, "/gpu boot budget max_dph=0.01\n", yes=True)
    assert await shell.run() == 0
    out = console.export_text()
    assert "(--yes: confirmed)" in out
    match = ID.search(out)
    assert match and state_of(service, match.group(1)) == "running"
    assert await service.instance_count() == 1


async def test_destroy_in_a_script_needs_yes(service: GpuService) -> None:
    boot, console = make_shell(service, "/gpu boot budget\n")
    assert await boot.run() == 0
    match = ID.search(console.export_text())
    assert match
    iid = match.group(1)
    shell, console = make_shell(service, f"/gpu destroy {iid}\n")
    assert await shell.run() == 1                                # not done: the script fails
    assert state_of(service, iid) == "running"
    assert "Needs a yes: run `/gpu confirm c_" in console.export_text()
    shell, console = make_shell(service, f"/gpu destroy {iid}\n", yes=True)
    assert await shell.run() == 0
    assert state_of(service, iid) == "destroyed"
    assert f"Destroyed {iid}" in console.export_text()


@pytest.mark.parametrize(("answer", "booted"), [("y", True), ("n", False), ("", False)])
async def test_interactive_confirmation_asks(service: GpuService, monkeypatch: pytest.MonkeyPatch,
                                             answer: str, booted: bool) -> None:
    asked: list[str] = []

    def fake_input(prompt: str = "") -> str:
        asked.append(prompt)
        return answer

    monkeypatch.setattr("builtins.input", fake_input)
    console = Console(record=True, width=160)
    shell = Shell(service, console=console, stdin=io.StringIO(""), interactive=True)
    await shell.run_line("/gpu boot budget max_dph=0.01")
    assert asked == ["Confirm? [y/N] "]
    assert await service.instance_count() == (1 if booted else 0)
    assert ("Not done." in console.export_text()) is not booted


async def test_square_brackets_in_lines_are_shown_not_read_as_markup(service: GpuService) -> None:
    script = "/gpu search gpu_name in [rtx_4090,a100] limit=2\n/gpu search x [/foo]\n"
    shell, console = make_shell(service, script)
    assert await shell.run() == 1                                # the second query is bad
    out = console.export_text()
    assert "gpu> /gpu search gpu_name in [rtx_4090,a100] limit=2" in out
    assert "gpu> /gpu search x [/foo]" in out
    assert "Traceback" not in out


async def test_other_peoples_actions_are_announced_own_are_not(service: GpuService) -> None:
    from gpuherd.core.runtime import Runtime

    runtime = Runtime(service, guards=False, close_service=False)
    console = Console(record=True, width=160)
    shell = Shell(service, console=console, stdin=io.StringIO("/gpu boot budget\n"), interactive=False,
                  runtime=runtime)
    async with runtime:
        assert await shell.run() == 0
        await runtime.deliver_now()
        assert "»" not in console.export_text()                  # own boot: the reply says it
        await service.set_user(service.local_actor(), "slack:U2", role="member")
        bob = service.actor("slack:U2", source="slack")
        result = await service.boot(bob, "budget")
        out = ""
        for _ in range(100):          # the runtime's deliverer or this call sends it, once
            await runtime.deliver_now()
            out += console.export_text()
            if "» slack:U2 booted" in out:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.2)
        out += console.export_text()
        assert f"» slack:U2 booted {result.instance.id}" in out  # type: ignore[union-attr]
        assert out.count("» slack:U2 booted") == 1, "delivered once"


# --- the real CLI -------------------------------------------------------------------------------


@pytest.fixture
def cli_env(tmp_path: Path) -> dict[str, str]:
    return cli_environment(tmp_path / "cli-home")


def cli(env: dict[str, str], *args: str, stdin: str | None = None, cwd: Path | None = None,
        **extra: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([*gpuherd_cmd(), *args], input=stdin, capture_output=True, text=True,
                          env={**env, **extra}, cwd=cwd, timeout=60)
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    return proc


def test_cli_shell_boots_and_state_persists_across_invocations(cli_env: dict[str, str], tmp_path: Path) -> None:
    proc = cli(cli_env, "shell", "--yes", stdin="/gpu search 4090\n/gpu boot budget\n/gpu costs\n", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    match = ID.search(out)
    assert match, out
    iid = match.group(1)
    assert "RTX 4090" in out and "Costs · this month" in out and "Simulated" in out
    assert (tmp_path / "cli-home" / "gpuherd.db").exists()

    status = cli(cli_env, "status", cwd=tmp_path)                  # a second process, same data dir
    assert status.returncode == 0, status.stdout + status.stderr
    row = next((line for line in status.stdout.splitlines() if line.startswith(iid)), "")
    assert "budget" in row and "running" in row, status.stdout
    assert "1 instance" in status.stdout and "Simulated" in status.stdout

    # a one-shot search passes the query as typed: no shell quoting added, `-o` is not an option
    search = cli(cli_env, "search", "-o", "dph-", "4090", "<$0.5", "limit=2", cwd=tmp_path)
    assert search.returncode == 0, search.stdout + search.stderr
    assert "dph<0.5" in search.stdout and "top 2" in search.stdout and "priciest first" in search.stdout


def test_cli_help_and_db_upgrade(cli_env: dict[str, str], tmp_path: Path) -> None:
    proc = cli(cli_env, "--help", cwd=tmp_path)
    assert proc.returncode == 0
    for cmd in REGISTRY.all():
        assert re.search(rf"^\s+{re.escape(cmd.name)}\s+{re.escape(cmd.summary[:30])}", proc.stdout, re.M), cmd.name
    assert "gpuherd shell" in proc.stdout
    one = cli(cli_env, "stop", "--help", cwd=tmp_path)
    assert one.returncode == 0 and re.search(r"usage +/gpu stop <id>", one.stdout), one.stdout + one.stderr
    from importlib.metadata import version
    shown = cli(cli_env, "--version", cwd=tmp_path)
    assert shown.returncode == 0 and shown.stdout.strip() == f"gpuherd {version('gpuherd')}", shown.stdout

    db = cli(cli_env, "db", "upgrade", cwd=tmp_path)
    assert db.returncode == 0, db.stderr
    assert db.stdout.strip() == f"database revision {head_revision()} (latest {head_revision()})"


def test_cli_bad_config_names_the_key(cli_env: dict[str, str], tmp_path: Path) -> None:
    for args in (("status",), ("shell",)):
        proc = cli(cli_env, *args, stdin="", cwd=tmp_path, GPUHERD_SANDBOX_TIME_SCALE="fast")
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert "GPUHERD_SANDBOX_TIME_SCALE" in proc.stderr and "number" in proc.stderr
        assert not (tmp_path / "cli-home" / "gpuherd.db").exists()   # refused before touching anything


def test_cli_one_shot_is_not_echoed_and_a_refused_yes_fails(cli_env: dict[str, str], tmp_path: Path) -> None:
    status = cli(cli_env, "status", cwd=tmp_path)
    assert status.returncode == 0, status.stdout + status.stderr
    assert "gpu> " not in status.stdout and "0 instances" in status.stdout
    boot = cli(cli_env, "boot", "budget", "max_dph=0.01", cwd=tmp_path)
    assert boot.returncode != 0, boot.stdout + boot.stderr      # not done: a script must see it
    assert "gpu> " not in boot.stdout
    assert "Needs a yes: run `/gpu confirm c_" in boot.stdout and "Not done." in boot.stdout
