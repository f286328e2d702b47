"""Hostile lines through the shell: every line of `tests/data/hostile_lines.txt` (unicode
look-alikes, control and escape characters, huge and malformed numbers, quoting, SQL, paths,
very long values, conflicting options) is run by `Shell.run_line` against a database with a
running and a stopped machine, a team budget and a user budget. Each must get an error reply
containing the words the corpus expects (not "Something went wrong"), show no control
character and no traceback, and change no row of any table — the audit log included: the
product does not audit refusals (nothing was done), so its count must not move either.

The whole corpus runs on SQLite and on PostgreSQL (where a NUL reaching a query is a database
error, not a miss): about 1,400 lines take 5 s on either.

Names at the core (no grammar in between): `set_user`, `create_key` and `set_budget` refuse the
corpus's names with the same messages on both databases."""

from __future__ import annotations

import importlib.util
import io
import json
import re
import time
import unicodedata
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console
from sqlalchemy import func, select, text
from sqlmodel import SQLModel

from gpuherd.bot.render_text import to_text
from gpuherd.bot.replies import Reply
from gpuherd.bot.shell import Shell
from gpuherd.core.errors import InvalidInput
from gpuherd.core.service import GpuService

DATA = Path(__file__).parent / "data"
CORPUS = DATA / "hostile_lines.txt"


def _generator() -> Any:
    spec = importlib.util.spec_from_file_location("make_hostile_lines", DATA / "make_hostile_lines.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def corpus() -> list[tuple[str, str]]:
    rows = [json.loads(line) for line in CORPUS.read_text(encoding="utf-8").splitlines() if line]
    return [(line, expected) for line, expected in rows]


def test_the_corpus_is_large_and_what_its_generator_writes() -> None:
    rows = corpus()
    assert len(rows) >= 400
    assert CORPUS.read_text(encoding="utf-8") == _generator().render(_generator().cases()), \
        "tests/data/hostile_lines.txt is stale: run python tests/data/make_hostile_lines.py"
    lines = [line for line, _ in rows]
    # it covers what it claims to
    assert any("\x00" in line for line in lines) and any("\x1b[" in line for line in lines)
    assert any("\u202e" in line for line in lines) and any("\u043c" in line for line in lines)
    assert any("../../etc" in line for line in lines) and any("DROP" in line for line in lines)
    assert any(len(line) > 2000 for line in lines) and any("1e309" in line for line in lines)


def snapshot(service: GpuService) -> dict[str, Any]:
    """Every row of every table (the audit log by count and last id)."""
    out: dict[str, Any] = {}
    with service.db.engine.connect() as conn:
        for table in SQLModel.metadata.sorted_tables:
            if table.name == "audit_events":
                out[table.name] = conn.execute(text("SELECT count(*), max(id) FROM audit_events")).one()
                continue
            rows = conn.execute(select(table)).all()
            out[table.name] = sorted(tuple(str(v) for v in row) for row in rows)
    return out


def _words(reply: Reply) -> str:
    parts = [reply.title, reply.text, *reply.notes, *(f"{f.label} {f.value}" for f in reply.fields)]
    parts += [" ".join(cell for row in t.rows for cell in row) for t in reply.tables]
    return "\n".join(parts)


def _controls(shown: str) -> list[str]:
    return [f"U+{ord(c):04X}" for c in shown
            if c != "\n" and (unicodedata.category(c) in ("Cc", "Cf") or c in "\u2028\u2029")]


async def _fleet(service: GpuService) -> dict[str, str]:
    admin = service.local_actor()
    shell = Shell(service, yes=True, console=Console(file=io.StringIO(), width=200), stdin=io.StringIO(""),
                  interactive=False)
    ids = []
    for _ in range(2):
        reply = await shell.run_line("/gpu boot budget")
        assert reply is not None and reply.level == "success", reply
        ids.append(reply.title.split()[1])
    stopped = await shell.run_line(f"/gpu stop {ids[1]}")
    assert stopped is not None and stopped.level != "error", stopped
    await service.set_user(admin, "slack:U2", role="member", team="ml")
    await service.set_budget(admin, "team", "ml", "500")
    await service.set_budget(admin, "user", "slack:U2", "100")
    await service.create_key(admin, "api:ci")
    return {"run": ids[0], "stopped": ids[1]}


@pytest.fixture
async def fleet(service: GpuService) -> dict[str, str]:
    return await _fleet(service)


async def test_every_hostile_line_is_refused_by_name_and_changes_nothing(service: GpuService,
                                                                        fleet: dict[str, str]) -> None:
    rows = corpus()
    console = Console(file=io.StringIO(), record=True, width=200)
    shell = Shell(service, console=console, stdin=io.StringIO(""), interactive=False)
    before = snapshot(service)
    problems: list[str] = []
    began = time.perf_counter()
    for n, (template, expected) in enumerate(rows):
        line = template.replace("{run}", fleet["run"]).replace("{stopped}", fleet["stopped"])
        reply = await shell.run_line(line)
        shown = repr(line[:80])
        if reply is None:
            problems.append(f"{shown}: no reply")
            continue
        words = _words(reply)
        rendered = to_text(reply)
        if reply.level != "error":
            problems.append(f"{shown}: {reply.level}, not an error: {words[:200]!r}")
        if expected not in words:
            problems.append(f"{shown}: expected {expected!r} in {words[:300]!r}")
        if "Something went wrong" in words or reply.title == "Internal error":
            problems.append(f"{shown}: internal error")
        if _controls(rendered):
            problems.append(f"{shown}: the reply shows control characters {_controls(rendered)[:5]}")
        if len(rendered) > 1500:
            problems.append(f"{shown}: a {len(rendered)}-character reply")
        if n % 100 == 99 and snapshot(service) != before:
            problems.append(f"rows changed by one of the lines before {shown}")
            before = snapshot(service)
    elapsed = time.perf_counter() - began
    out = console.export_text()
    assert "Traceback" not in out
    assert not problems, f"{len(problems)} problems:\n" + "\n".join(problems[:60])
    assert snapshot(service) == before
    assert shell.errors == len(rows)
    print(f"{len(rows)} hostile lines in {elapsed:.1f} s ({service.db.engine.dialect.name})")


# --- names at the core ------------------------------------------------------------------------------

BAD_NAMES = ["ml\x00", "\x00", "ml\x1b[31m", "\u202eml", "m\u200bl", "\u043cl", "ML", "../../etc", "/etc",
             "..", "a b", "x';DROP TABLE budgets;--", "%", "", "t" * 65, "ml\n", "ml\x85", "\uff4d\uff4c"]


@pytest.mark.parametrize("name", BAD_NAMES)
async def test_core_refuses_bad_names_everywhere_they_enter(service: GpuService, name: str) -> None:
    """users set, keys create, budgets: each refuses with a message naming the field, and no
    row is written, identically on SQLite and PostgreSQL."""
    admin = service.local_actor()
    await service.set_user(admin, "slack:U2", role="member", team="ml")
    before = snapshot(service)
    with pytest.raises(InvalidInput, match="team name"):
        await service.set_user(admin, "slack:U2", team=name)
    for principal in (name, f"slack:{name}"):
        if re.fullmatch(r"[a-z][a-z0-9]{0,15}:[A-Za-z0-9][A-Za-z0-9._@+-]*", principal):
            continue          # slack:ML is a well-formed principal (core/names.py)
        with pytest.raises(InvalidInput, match="user id"):
            await service.set_user(admin, principal, role="member")
        with pytest.raises(InvalidInput, match="user id"):
            await service.create_key(admin, principal)
        with pytest.raises(InvalidInput, match="budget user"):
            await service.set_budget(admin, "user", principal, "5")
        with pytest.raises(InvalidInput, match="budget user"):
            await service.clear_budget(admin, "user", principal)
    with pytest.raises(InvalidInput, match="budget team"):
        await service.set_budget(admin, "team", name, "5")
    with pytest.raises(InvalidInput, match="budget team"):
        await service.clear_budget(admin, "team", name)
    if name and any(unicodedata.category(c) in ("Cc", "Cf") for c in name):
        with pytest.raises(InvalidInput, match="key's name"):
            await service.create_key(admin, "api:ci", name=name)
    with pytest.raises(InvalidInput, match="idempotency key"):
        await service.boot(admin, "budget", idempotency_key=name + "\x00")
    assert snapshot(service) == before


async def test_a_budget_for_an_unknown_user_is_refused(service: GpuService) -> None:
    admin = service.local_actor()
    from gpuherd.core.errors import NotFound

    with pytest.raises(NotFound, match="does not know the user 'slack:U404'"):
        await service.set_budget(admin, "user", "slack:U404", "5")
    await service.set_user(admin, "slack:U404", role="viewer")
    result = await service.set_budget(admin, "user", "slack:U404", "5")
    assert [(b.scope.value, b.name) for b in result.budgets] == [("user", "slack:U404")]
    with service.db.engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(SQLModel.metadata.tables["budgets"])).scalar_one() == 1


# --- keep on a stopped machine ----------------------------------------------------------------------


async def test_keep_on_a_stopped_machine_postpones_only_its_destroy_guard(service: GpuService, tmp_path: Path) -> None:
    """A stopped machine is not in use: `keep` records no activity on it. With a
    destroy-after-stopped guard it postpones that guard; without one it is refused and writes
    nothing."""
    from gpuherd.core.models import Activity, Instance
    from gpuherd.core.templates import TemplateCatalog

    path = tmp_path / "templates.toml"
    path.write_text('[templates.keeper]\nextends = "budget"\ndestroy_after_stopped_days = 3\n')
    service.templates = TemplateCatalog.load(path)
    shell = Shell(service, yes=True, console=Console(file=io.StringIO(), width=200), stdin=io.StringIO(""),
                  interactive=False)
    ids = {}
    for name in ("budget", "keeper"):
        booted = await shell.run_line(f"/gpu boot {name}")
        assert booted is not None and booted.level == "success", booted
        ids[name] = booted.title.split()[1]
        stopped = await shell.run_line(f"/gpu stop {ids[name]}")
        assert stopped is not None and stopped.level == "success", stopped

    before = snapshot(service)
    refused = await shell.run_line(f"/gpu keep {ids['budget']} 2h")
    assert refused is not None and refused.level == "error"
    assert "is stopped and no guard will destroy it, so there is nothing to keep" in refused.text
    assert snapshot(service) == before

    with service.db.session() as s:
        row = s.get(Instance, ids["keeper"])
        assert row is not None
        used_at = row.last_activity_at
    kept = await shell.run_line(f"/gpu keep {ids['keeper']} 2d")
    assert kept is not None and kept.level == "success", kept
    assert "will not be destroyed for being stopped before" in kept.text
    with service.db.session() as s:
        row = s.get(Instance, ids["keeper"])
        assert row is not None and row.keep_until is not None and row.state == "stopped"
        assert row.last_activity_at == used_at                 # no activity recorded
        sources = [a.source for a in s.execute(select(Activity).where(Activity.instance_id == row.id)).scalars()]
        assert "keep" not in sources
        events = [e for (e,) in s.execute(text("SELECT event FROM audit_events WHERE instance_id = :i"),
                                          {"i": row.id})]
        assert events.count("keep") == 1
