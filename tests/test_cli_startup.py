"""Start-up cost of the `gpuherd` CLI (issue: `--help` took 1.0-1.2 s of CPU, a one-shot
1.6-2.0 s, almost all imports). Loose regression bounds that do not depend on the machine's
speed: what a command imports, checked in a fresh interpreter; and that the shortcuts the CLI
takes (the grammar read with `ast`, the migration head read from the files) agree with the real
thing. The figures come from `bench/bench_startup.py`."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from gpuherd.bot import cli
from gpuherd.bot.grammar import REGISTRY
from gpuherd.core.db import MIGRATIONS, head_revision, known_head

HEAVY = ("sqlalchemy", "sqlmodel", "alembic", "pydantic", "httpx", "boto3", "gpuherd.core.service",
         "gpuherd.bot.grammar")

# Runs main() with the given argv in this fresh interpreter and prints, as JSON, its exit code
# and which heavy modules it had loaded by then.
RUNNER = """
import json, sys
from gpuherd.bot.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
heavy = %r
loaded = sorted(m for m in sys.modules if m in heavy or m.split('.')[0] in heavy)
sys.stderr.write('\\nRESULT ' + json.dumps({"code": code, "loaded": loaded}) + '\\n')
"""


def env_for(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUHERD_")}
    env.update(GPUHERD_HOME=str(home), GPUHERD_SANDBOX_TIME_SCALE="0", COLUMNS="160")
    return env


def run_main(home: Path, *argv: str) -> tuple[int, list[str], str]:
    """(exit code, heavy modules loaded, stdout) of `gpuherd <argv>` in a new interpreter."""
    done = subprocess.run([sys.executable, "-c", RUNNER % (HEAVY,), *argv], capture_output=True, text=True,
                          env=env_for(home), timeout=120)
    match = re.search(r"^RESULT (.*)$", done.stderr, re.M)
    assert match, done.stderr
    result = json.loads(match.group(1))
    return result["code"], result["loaded"], done.stdout


@pytest.mark.parametrize("argv", [("--help",), (), ("--version",), ("frobnicate",), ("db", "--bogus")])
def test_help_version_and_usage_errors_load_no_database_layer(tmp_path: Path, argv: tuple[str, ...]) -> None:
    code, loaded, out = run_main(tmp_path / "home", *argv)
    assert loaded == [], f"gpuherd {' '.join(argv)} imported {loaded}"
    assert code == (0 if argv in ((), ("--help",), ("--version",)) else cli.USAGE)
    if argv in ((), ("--help",)):
        assert "chat commands" in out and "exit codes" in out
    assert not (tmp_path / "home" / "gpuherd.db").exists()     # nothing touched the data directory


def test_a_one_shot_on_a_current_database_does_not_load_alembic(tmp_path: Path) -> None:
    home = tmp_path / "home"
    code, loaded, _ = run_main(home, "status")                  # first run: creates and migrates
    assert code == 0 and "alembic" in loaded
    code, loaded, out = run_main(home, "status")                # at head: one query, no alembic
    assert code == 0 and "0 instances" in out
    assert "alembic" not in loaded and "sqlalchemy" in loaded


def test_only_a_database_at_the_head_skips_alembic(tmp_path: Path) -> None:
    """The cheap check says "current" only for the exact head: an older revision, no version
    table, or an empty file all go to alembic's upgrade."""
    import sqlite3

    from gpuherd.core.db import Database

    path = tmp_path / "gpuherd.db"
    db = Database(f"sqlite:///{path}")
    try:
        assert not db.at_head()                              # no tables at all
        db.upgrade()
        assert db.at_head()
        with sqlite3.connect(path) as conn:
            conn.execute("UPDATE alembic_version SET version_num = '0001'")
        assert not db.at_head()
        with sqlite3.connect(path) as conn:
            conn.execute("DELETE FROM alembic_version")
        assert not db.at_head()
    finally:
        db.dispose()


def test_the_grammar_scan_matches_the_registry() -> None:
    """--help and the argv split read grammar.py's decorators without importing it: they must
    see exactly the registry's commands, aliases and summaries, in order."""
    source = Path(cli.__file__).with_name("grammar.py").read_text(encoding="utf-8")
    scanned = cli._scan_grammar(source)
    assert scanned == [cli.ChatCommand(c.name, tuple(c.aliases), c.summary) for c in REGISTRY.all()]


def test_a_decorator_the_scan_cannot_read_falls_back() -> None:
    source = 'SUMMARY = "x"\n@REGISTRY.command("odd", summary=SUMMARY)\nasync def _odd(ctx, args): ...\n'
    assert cli._scan_grammar(source) is None
    assert cli._scan_grammar("x = 1\n") is None
    plain = '@REGISTRY.command("ok", summary="fine")\nasync def _ok(ctx, args): ...\n'
    assert cli._scan_grammar(plain) == [cli.ChatCommand("ok", (), "fine")]
    assert cli._scan_grammar(plain + 'REGISTRY.command("late", summary="x")(_ok)\n') is None


def test_the_known_head_matches_alembic(tmp_path: Path) -> None:
    assert known_head(MIGRATIONS / "versions") == head_revision()
    versions = tmp_path / "versions"
    versions.mkdir()
    (versions / "a.py").write_text("revision = 'a'\ndown_revision = None\n")
    (versions / "b.py").write_text("revision: str = \"b\"\ndown_revision: str | None = 'a'\n")
    assert known_head(versions) == "b"
    (versions / "c.py").write_text("revision = 'c'\ndown_revision = 'a'\n")          # two heads
    assert known_head(versions) is None
    (versions / "c.py").write_text("revision = 'c'\ndown_revision = ('a', 'b')\n")   # a merge
    assert known_head(versions) == "c"
    (versions / "d.py").write_text("REVISION = compute()\n")                          # unreadable
    assert known_head(versions) is None


def test_help_lists_each_command_once(tmp_path: Path) -> None:
    out = run_main(tmp_path / "home", "--help")[2]
    listed = [m.group(1) for m in re.finditer(r"^ {2,4}([a-z]+) {2,}\S", out, re.M)]
    assert len(listed) == len(set(listed)), sorted(n for n in listed if listed.count(n) > 1)
    for cmd in REGISTRY.all():
        assert cmd.name in listed
    for name in ("shell", "db", "users", "keys", "serve", "completion"):
        assert name in listed
    assert "{shell,db" not in out                      # argparse's brace list of every subparser


# main() under a collector watch: how many full (generation 2) collections ran, whether what
# start-up built was frozen, and whether the collector is back on at the end.
GC_RUNNER = """
import gc, json, sys
full = []
gc.callbacks.append(lambda phase, info: full.append(1) if phase == "start" and info["generation"] == 2 else None)
from gpuherd.bot.cli import main
code = main(sys.argv[1:])
sys.stderr.write('\\nRESULT ' + json.dumps({"code": code, "full": len(full), "frozen": gc.get_freeze_count(),
                                           "enabled": gc.isenabled()}) + '\\n')
"""


def test_a_one_shot_starts_without_a_full_collection_and_freezes_what_start_up_built(tmp_path: Path) -> None:
    """A full collection walks every object start-up made (20 ms and more of a 0.5 s one-shot):
    start-up runs with the collector off, then freezes its objects and turns it back on."""
    home = tmp_path / "home"
    run_main(home, "status")                                     # create and migrate first
    done = subprocess.run([sys.executable, "-c", GC_RUNNER, "status"], capture_output=True, text=True,
                          env=env_for(home), timeout=120)
    match = re.search(r"^RESULT (.*)$", done.stderr, re.M)
    assert match, done.stderr
    result = json.loads(match.group(1))
    assert result["code"] == 0 and "0 instances" in done.stdout
    assert result["full"] == 0, f"{result['full']} full collections during a one-shot"
    assert result["frozen"] > 50_000 and result["enabled"] is True
