"""The real `gpuherd` command run one-shot, in subprocesses on a fresh data directory with the
instant sandbox: `--json` (the result models on stdout, nothing else), the documented exit codes,
the warning after a one-shot boot when nothing guards the machine, and the bash completion
script (sourced in a real bash and driven the way bash drives it)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import cli_environment, gpuherd_cmd

from gpuherd.bot.grammar import REGISTRY
from gpuherd.bot.oneshot import GUARDS_HINT


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return cli_environment(tmp_path / "home")


def run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([*gpuherd_cmd(), *args], capture_output=True, text=True, env=env, timeout=90,
                          stdin=subprocess.DEVNULL)
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    return proc


def as_json(proc: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    """stdout must be exactly one JSON document (nothing else printed there)."""
    data = json.loads(proc.stdout)
    assert isinstance(data, dict)
    return data


# --- --json ----------------------------------------------------------------------------------------


def test_json_status_either_side_of_the_command(env: dict[str, str]) -> None:
    for args in (("--json", "status"), ("status", "--json")):
        proc = run(env, *args)
        assert proc.returncode == 0, proc.stderr
        data = as_json(proc)
        assert data["exit_code"] == 0 and data["command"] == "status"
        assert [r["model"] for r in data["results"]] == ["StatusResult"]
        status = data["results"][0]["data"]
        assert status["total"] == 0 and status["instances"] == [] and status["simulated"] is True
        assert status["run_rate"]["per_hour"] == "0"               # money stays a decimal string
        assert data["reply"]["title"].startswith("0 instances")


def test_json_boot_gives_the_boot_result_and_the_ready_view(env: dict[str, str]) -> None:
    proc = run(env, "boot", "budget", "--json")
    assert proc.returncode == 0, proc.stderr
    data = as_json(proc)
    models = [r["model"] for r in data["results"]]
    assert models[0] == "BootResult" and models[-1] == "InstanceView", models
    iid = data["results"][0]["data"]["instance"]["id"]
    assert data["results"][-1]["data"]["id"] == iid and data["results"][-1]["data"]["state"] == "running"
    assert "…" in proc.stderr                                      # progress went to stderr
    listed = as_json(run(env, "--json", "ls"))["results"][0]["data"]["instances"]
    assert [i["id"] for i in listed] == [iid]


def test_json_of_a_refusal_and_of_a_question(env: dict[str, str]) -> None:
    missing = run(env, "--json", "stop", "g-0000")
    assert missing.returncode == 1
    data = as_json(missing)
    assert data["exit_code"] == 1 and data["results"] == [] and data["reply"]["level"] == "error"
    asked = run(env, "--json", "boot", "budget", "max_dph=0.01")
    assert asked.returncode == 3, asked.stderr
    data = as_json(asked)
    assert [r["model"] for r in data["results"]] == ["Confirmation"]
    assert "/gpu confirm c_" in asked.stderr
    assert as_json(run(env, "--json", "status"))["results"][0]["data"]["total"] == 0   # nothing booted
    yes = run(env, "--json", "--yes", "boot", "budget", "max_dph=0.01")
    assert yes.returncode == 0, yes.stderr
    assert [r["model"] for r in as_json(yes)["results"]][:2] == ["Confirmation", "BootResult"]


def test_json_of_the_admin_commands(env: dict[str, str]) -> None:
    db = run(env, "db", "upgrade", "--json")
    assert db.returncode == 0 and as_json(db)["current"] is True
    users = run(env, "users", "list", "--json")
    assert users.returncode == 0, users.stderr
    listed = json.loads(users.stdout)
    assert isinstance(listed, list) and all("principal" in u for u in listed)
    shell = run(env, "--json", "shell")
    assert shell.returncode == 2 and "--json" in shell.stderr and shell.stdout == ""


# --- exit codes ------------------------------------------------------------------------------------


def test_exit_codes(env: dict[str, str]) -> None:
    assert run(env, "status").returncode == 0
    refused = run(env, "stop", "g-0000")                            # an error reply
    assert refused.returncode == 1 and "g-0000" in refused.stdout
    assert run(env, "stop", "--frob").returncode == 1              # a bad /gpu argument is the command's error
    unknown = run(env, "stauts")
    assert unknown.returncode == 2 and "Did you mean `gpuherd status`" in unknown.stderr
    assert run(env, "db", "sideways").returncode == 2              # argparse's usage error
    declined = run(env, "boot", "budget", "max_dph=0.01")          # a question without --yes
    assert declined.returncode == 3 and "Not done." in declined.stdout
    iid = re.search(r"Booted (g-[0-9a-f]+)", run(env, "boot", "budget").stdout)
    assert iid
    destroy = run(env, "destroy", iid.group(1))
    assert destroy.returncode == 3
    assert run(env, "--yes", "destroy", iid.group(1)).returncode == 0
    help_text = run(env, "--help").stdout
    assert "exit codes: 0 done; 1 refused or failed" in help_text and "3 a yes was needed" in help_text


def test_one_shot_output_is_the_reply_only(env: dict[str, str]) -> None:
    proc = run(env, "status")
    assert "gpu> " not in proc.stdout and proc.stdout.startswith("0 instances")


# --- who guards a one-shot boot ----------------------------------------------------------------


def test_a_one_shot_boot_says_when_nothing_guards_it(env: dict[str, str]) -> None:
    alone = run(env, "boot", "budget")
    assert alone.returncode == 0
    assert GUARDS_HINT in alone.stderr and "gpuherd guards --run" in alone.stderr
    assert GUARDS_HINT not in run(env, "status").stderr            # only after a boot or start
    guards = subprocess.Popen([*gpuherd_cmd(), "guards", "--run"], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    try:
        assert guards.stdout is not None and guards.stderr is not None
        line = guards.stdout.readline()                            # printed once it holds the lock
        assert "guards running" in line, line + (guards.stderr.read() if guards.poll() is not None else "")
        guarded = run(env, "boot", "budget")
        assert guarded.returncode == 0 and GUARDS_HINT not in guarded.stderr
    finally:
        guards.terminate()
        guards.wait(timeout=30)


# --- completion --------------------------------------------------------------------------------


def complete(env: dict[str, str], script: Path, *words: str) -> list[str]:
    """What bash offers after `gpuherd <words>` (the last word being completed), by calling the
    completion function as bash does: COMP_WORDS, COMP_CWORD, then COMPREPLY."""
    quoted = " ".join("'" + w + "'" for w in ("gpuherd", *words))
    program = (f"source {script}\nCOMP_WORDS=({quoted})\nCOMP_CWORD={len(words)}\n"
               "_gpuherd_complete\nprintf '%s\\n' \"${COMPREPLY[@]}\"\n")
    done = subprocess.run(["bash", "--norc", "--noprofile", "-c", program], capture_output=True, text=True,
                          env=env, timeout=30)
    assert done.returncode == 0, done.stderr
    return [w for w in done.stdout.splitlines() if w]


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_bash_completion(env: dict[str, str], tmp_path: Path) -> None:
    proc = run(env, "completion", "bash")
    assert proc.returncode == 0
    script = tmp_path / "gpuherd.bash"
    script.write_text(proc.stdout)
    gpuherd_dir = str(Path(gpuherd_cmd()[0]).parent)
    registered = subprocess.run(["bash", "--norc", "-c", "source <(gpuherd completion bash); complete -p gpuherd"],
                                capture_output=True, text=True, timeout=60,
                                env={**env, "PATH": gpuherd_dir + os.pathsep + env.get("PATH", "")})
    assert registered.stdout.strip() == "complete -F _gpuherd_complete gpuherd", registered.stderr
    first = complete(env, script, "")
    for cmd in REGISTRY.all():
        assert cmd.name in first
    assert {"shell", "db", "keys", "completion", "ls", "--json", "--yes"} <= set(first)
    assert sorted(complete(env, script, "st")) == ["start", "status", "stop"]
    assert sorted(complete(env, script, "--yes", "sta")) == ["start", "status"]      # after a global option
    assert complete(env, script, "status", "a") == ["all="]
    assert complete(env, script, "costs", "by") == ["by="]
    assert complete(env, script, "help", "de") == ["destroy"]
    assert complete(env, script, "db", "") == ["upgrade", "current", "--json"]
    assert "--run" in complete(env, script, "guards", "--")
    assert set(complete(env, script, "keys", "")) >= {"create", "list", "revoke", "--user"}


def test_zsh_completion_names_every_command(env: dict[str, str]) -> None:
    proc = run(env, "completion", "zsh")
    assert proc.returncode == 0 and proc.stdout.startswith("#compdef gpuherd")
    for cmd in REGISTRY.all():
        assert f"'{cmd.name}:" in proc.stdout and f"        {cmd.name}) opts=(" in proc.stdout
    assert "compdef _gpuherd gpuherd" in proc.stdout
    assert "local -a commands opts" in proc.stdout and "${words[i]}" in proc.stdout   # zsh's words, not shadowed
    if shutil.which("zsh"):
        checked = subprocess.run(["zsh", "-n", "-c", proc.stdout], capture_output=True, text=True, timeout=30)
        assert checked.returncode == 0, checked.stderr
    bad = run(env, "completion", "fish")
    assert bad.returncode == 2


def test_the_bench_script_runs(tmp_path: Path) -> None:
    """bench/bench_startup.py with one run of each command prints a row per command."""
    bench = Path(__file__).resolve().parents[1] / "bench" / "bench_startup.py"
    began = time.monotonic()
    done = subprocess.run([sys.executable, str(bench), "--runs", "1"], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    rows = [line for line in done.stdout.splitlines() if "wall median" in line]
    assert [r.split("  ")[0].strip() for r in rows][:1] == ["gpuherd --help"]
    assert any(r.startswith("gpuherd status") for r in rows) and time.monotonic() - began < 180
