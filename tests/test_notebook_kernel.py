"""notebook_ext/examples/quickstart.ipynb in a real kernel (nbclient, the `python3` kernel of this
environment), twice: on the local core (a temporary GPUHERD_HOME, the sandbox provider with
instant timings) and against a live `gpuherd serve` on loopback with alice's API key.

The kernel runs in a directory holding the user's own `core/` and `bot/` packages: gpuherd
installs as `gpuherd.core` / `gpuherd.bot`, so neither shadows the other (a cell appended here
checks that gpuherd imported neither, and that the user's own still import). Afterwards the
database says what the notebook did: exactly one machine booted, and it is stopped."""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from nbformat import NotebookNode
from nbformat.v4 import new_code_cell
from sqlalchemy import select
from sqlmodel import col

from gpuherd.core.db import Database
from gpuherd.core.models import AuditEvent, Instance, InstanceState
from tests.live_server import start_live, stop_live

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebook_ext" / "examples" / "quickstart.ipynb"
CHECK = """import sys
print("shadowed:", sorted(m for m in ("core", "bot") if m in sys.modules))
import bot
import core
import gpuherd.core
print("user packages:", core.WHO, bot.WHO)
print("gpuherd.core from:", gpuherd.core.__file__)"""


def user_directory(tmp_path: Path) -> Path:
    work = tmp_path / "work"
    for name in ("core", "bot"):
        (work / name).mkdir(parents=True)
        (work / name / "__init__.py").write_text(f'WHO = "the user\'s own {name}"\n')
    return work


def execute(work: Path) -> NotebookNode:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in nb.cells if c.cell_type == "code"), \
        "the example is saved without outputs"
    nb.cells.append(new_code_cell(CHECK))
    NotebookClient(nb, kernel_name="python3", timeout=120, resources={"metadata": {"path": str(work)}}).execute()
    return nb


def outputs(nb: NotebookNode, source: str) -> str:
    """Everything the cell whose source starts with `source` showed (streams and displays)."""
    (cell,) = [c for c in nb.cells if c.cell_type == "code" and c.source.startswith(source)]
    parts = []
    for out in cell.outputs:
        assert out.output_type != "error", out
        parts.append(out.get("text", ""))
        parts += [str(v) for k, v in out.get("data", {}).items() if k.startswith("text/")]
    return "\n".join(parts)


def check_cells(nb: NotebookNode) -> None:
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors, errors
    everything = json.dumps([c.get("outputs", []) for c in nb.cells])
    assert "Traceback" not in everything
    search = outputs(nb, "%gpu search 4090")
    assert "offers · gpu=4090" in search and "<table" in search and "Boot RTX 4090" in search
    machine = outputs(nb, "with gpu.machine")
    assert machine.startswith("g-") and "http" in machine, machine
    assert "running: none" in outputs(nb, "# nothing of yours")
    assert "instance" in outputs(nb, "%gpu status")
    check = outputs(nb, "import sys")
    assert "shadowed: []" in check
    assert "user packages: the user's own core the user's own bot" in check
    repo_core = str(Path(__file__).resolve().parents[1] / "core" / "__init__.py")
    assert repo_core in check or "site-packages/gpuherd/core" in check, check


def test_quickstart_on_the_local_core(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "home"                          # GPUHERD_HOME (tests/conftest.py); the kernel inherits it
    monkeypatch.setenv("GPUHERD_SANDBOX_TIME_SCALE", "0")
    nb = execute(user_directory(tmp_path))
    check_cells(nb)
    loaded = outputs(nb, "%load_ext")
    assert f"Connected to local gpuherd (SQLite at {home / 'gpuherd.db'})" in loaded
    assert "simulated sandbox provider" in loaded

    db = Database(f"sqlite:///{home / 'gpuherd.db'}")
    try:
        with db.session() as s:
            instances = list(s.execute(select(Instance)).scalars())
            events = [e.event for e in s.execute(select(AuditEvent).where(col(AuditEvent.ok))).scalars()]
    finally:
        db.dispose()
    assert len(instances) == 1, [(i.id, i.state) for i in instances]
    (machine,) = instances
    assert machine.state == InstanceState.STOPPED.value and machine.template == "budget" and machine.simulated
    assert machine.id in outputs(nb, "with gpu.machine")
    assert events.count("boot") == 1 and events.count("stop") == 1, events


def test_quickstart_against_a_team_server(tmp_path: Path, db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    live = start_live(tmp_path / "server", db_url)
    try:
        monkeypatch.setenv("GPUHERD_SERVER", live.url)
        monkeypatch.setenv("GPUHERD_API_KEY", live.keys["alice"])
        nb = execute(user_directory(tmp_path))
        check_cells(nb)
        loaded = outputs(nb, "%load_ext")
        assert f"Connected to gpuherd server {live.url} as api:alice (member)" in loaded
        assert live.keys["alice"] not in json.dumps(nb), "the key is never shown"
        with live.service.db.session() as s:
            mine = list(s.execute(select(Instance).where(col(Instance.owner) == "api:alice")).scalars())
            everyone = list(s.execute(select(Instance)).scalars())
        assert len(mine) == len(everyone) == 1, [(i.id, i.owner, i.state) for i in everyone]
        assert mine[0].state == InstanceState.STOPPED.value and mine[0].id in outputs(nb, "with gpu.machine")
        assert not (tmp_path / "home" / "gpuherd.db").exists(), "a remote notebook opens no local core"
    finally:
        stop_live(live)
