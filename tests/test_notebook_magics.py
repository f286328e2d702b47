"""`%gpu` in an in-process IPython shell (notebook_ext/magics.py), on the core of the `service`
fixture through the shared connection (`api.connect(backend=LocalBackend(service))`, the core on
its own thread as in a kernel). The service is only used from that thread: the tests read core
back through `gpu.core.run(...)`.

Covered: %load_ext twice and %reload_ext register one magic and say where gpuherd runs; search,
status, boot, help, an unknown command and a broken connection show replies and never a
traceback; a boot's progress bar follows it to healthy; a Stop button stops the machine in core
(twice clicked, stopped once), on the kernel's loop and without one; Destroy asks inline first;
%gpu use and %gpu panel; %unload_ext removes the magic and the cell hooks."""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Iterator
from typing import Any

import ipywidgets as w
import pytest
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell
from IPython.utils.capture import capture_output
from sqlalchemy import func, select
from sqlmodel import col

from gpuherd.core.auth import Actor
from gpuherd.core.models import AuditEvent, InstanceState
from gpuherd.core.service import GpuService
from gpuherd.notebook_ext import api, magics
from gpuherd.notebook_ext.api import Gpu
from gpuherd.notebook_ext.backend import LocalBackend, RemoteBackend
from gpuherd.notebook_ext.render_html import RichReply

EXT = "gpuherd.notebook_ext"


@pytest.fixture
def shell() -> Iterator[InteractiveShell]:
    sh = InteractiveShell.instance()
    if EXT in sh.extension_manager.loaded:
        sh.run_line_magic("unload_ext", EXT)
    yield sh
    if EXT in sh.extension_manager.loaded:
        sh.run_line_magic("unload_ext", EXT)
    api._close_default()


@pytest.fixture
def gpu(service: GpuService, shell: InteractiveShell) -> Gpu:
    return api.connect(backend=LocalBackend(service, guards=False))


def run(sh: InteractiveShell, magic: str, line: str = "") -> Any:
    with capture_output() as cap:
        sh.run_line_magic(magic, line)
    return cap


def shown(cap: Any) -> list[dict[str, Any]]:
    return [o.data for o in cap.outputs]


def html(cap: Any) -> str:
    return "\n".join(d.get("text/html", "") for d in shown(cap))


def no_traceback(cap: Any) -> None:
    everything = cap.stdout + cap.stderr + "".join(str(d) for d in shown(cap))
    assert "Traceback" not in everything and 'File "' not in everything, everything


def settle(timeout: float = 10) -> None:
    """Wait for what the buttons scheduled without a running loop (on the core loop)."""
    for task in list(magics.STATE.tasks):
        assert isinstance(task, concurrent.futures.Future)
        task.result(timeout)


def audit_count(gpu: Gpu, service: GpuService, event: str, iid: str) -> int:
    def count() -> int:
        with service.db.session() as s:
            return int(s.execute(select(func.count()).select_from(AuditEvent).where(
                col(AuditEvent.event) == event, col(AuditEvent.instance_id) == iid)).scalar_one())
    return count()


def state_of(gpu: Gpu, service: GpuService, admin: Actor, iid: str) -> InstanceState:
    return gpu.core.run(service.view(admin, iid)).state


def load(sh: InteractiveShell) -> Any:
    cap = run(sh, "load_ext", EXT)
    no_traceback(cap)
    return cap


def test_load_twice_registers_one_magic_and_says_where_gpuherd_runs(shell: InteractiveShell, gpu: Gpu) -> None:
    first = load(shell)
    again = run(shell, "load_ext", EXT)
    assert shell.magics_manager.magics["line"]["gpu"] is magics.gpu_magic
    sentences = [d for d in shown(first) if "Connected to local gpuherd" in d.get("text/plain", "")]
    assert len(sentences) == 1 and "No process runs the guards" in sentences[0]["text/html"]
    assert "simulated sandbox provider" in sentences[0]["text/html"]
    assert "Connected to" not in html(again) and "already loaded" in again.stdout

    reloaded = run(shell, "reload_ext", EXT)
    no_traceback(reloaded)
    assert shell.magics_manager.magics["line"]["gpu"] is magics.gpu_magic
    assert list(shell.magics_manager.magics["line"]).count("gpu") == 1
    assert api.connect() is gpu, "a reload keeps the connection"
    assert "Connected to local gpuherd" in html(reloaded)
    assert "offers" in html(run(shell, "gpu", "search 4090"))


def test_search_status_help_and_bad_input(shell: InteractiveShell, gpu: Gpu) -> None:
    load(shell)
    search = run(shell, "gpu", "search 4090 <$0.5 limit=3")
    no_traceback(search)
    (data,) = shown(search)
    assert "4090" in data["text/html"] and "dph&lt;0.5" in data["text/html"] and "<table" in data["text/html"]
    assert "application/vnd.jupyter.widget-view+json" in data, "its Boot buttons are a widget"
    assert [b.description.startswith("Boot RTX 4090") for b in magics.STATE.last.widget.buttons] == [True] * 3

    for line in ("status", "/gpu status", "gpu status"):
        (status,) = shown(run(shell, "gpu", line))
        assert status["text/plain"].startswith("0 instances"), (line, status["text/plain"])
        assert "application/vnd.jupyter.widget-view+json" not in status, "no buttons: static HTML"

    for line in ("", "help", "/gpu"):
        (help_,) = shown(run(shell, "gpu", line))
        assert "%gpu search [query]" in help_["text/html"] and "%gpu panel" in help_["text/html"], line
        assert "%gpu use &lt;id&gt;" in help_["text/html"]
    (one,) = shown(run(shell, "gpu", "help boot"))
    assert "/gpu boot" in one["text/plain"] and "In a notebook: %gpu boot &lt;template&gt;" in one["text/html"]

    for line, words in (("bogus", "Unknown command 'bogus'"), ("help frobnicate", "Unknown command 'frobnicate'"),
                        ("boot", "Which template?"), ("search gpu_ram>>24", ""), ("stop g-nosuch", ""),
                        ("use g-nosuch", ""), ("use a b", "Usage: %gpu use")):
        cap = run(shell, "gpu", line)
        no_traceback(cap)
        (reply,) = shown(cap)
        assert 'data-level="error"' in reply["text/html"], (line, reply["text/plain"])
        assert words in reply["text/plain"], (line, reply["text/plain"])
    assert "%gpu help" in shown(run(shell, "gpu", "help frobnicate"))[0]["text/plain"]
    # the line reaches the grammar as typed: no $-expansion by IPython
    shell.user_ns["x"] = "oops"
    assert "oops" not in html(run(shell, "gpu", "search {x} <$0.5"))


def test_boot_follows_progress_and_a_stop_button_stops_it_once(shell: InteractiveShell, gpu: Gpu,
                                                               service: GpuService, admin: Actor) -> None:
    load(shell)
    cap = run(shell, "gpu", "boot budget")
    no_traceback(cap)
    booted = magics.STATE.last
    assert booted.reply.title.startswith("Booted g-")
    iid = booted.reply.instance_id
    assert iid and booted.reply.operation_id and booted.progress is not None
    settle()                                   # the follower ran on the core loop (no kernel loop here)
    assert booted.progress.value == booted.progress.max and booted.progress.bar_style == "success"
    assert "healthy" in booted.phase.value
    assert state_of(gpu, service, admin, iid) is InstanceState.RUNNING

    labels = [b.description for b in booted.widget.buttons]
    assert labels == [a.label for a in booted.reply.actions] and "Stop" in labels
    assert booted.out in booted.widget.children
    stop = booted.widget.buttons[labels.index("Stop")]
    stop.click()
    stop.click()                               # a double click: the same button on the same reply
    settle()
    assert state_of(gpu, service, admin, iid) is InstanceState.STOPPED
    assert audit_count(gpu, service, "stop", iid) == 1, "stopped once"
    stop.click()                               # pressed again later: the same answer, not "already stopped"
    settle()
    assert audit_count(gpu, service, "stop", iid) == 1
    (answer,) = booted.out.outputs
    assert answer["output_type"] == "display_data" and answer["data"]["text/plain"].startswith(f"Stopped {iid}")
    assert "application/vnd.jupyter.widget-view+json" in answer["data"], "the answer has its own buttons"
    assert "Traceback" not in str(answer)


async def test_buttons_press_on_the_kernels_running_loop(shell: InteractiveShell, gpu: Gpu,
                                                         service: GpuService, admin: Actor) -> None:
    """As in ipykernel: the click runs on the loop the cells run on; the press is a task there."""
    load(shell)
    run(shell, "gpu", "boot budget")
    booted = magics.STATE.last
    iid = booted.reply.instance_id
    tasks = list(magics.STATE.tasks)
    assert tasks and all(isinstance(t, asyncio.Future) for t in tasks), "the follower is a task on this loop"
    await asyncio.wait_for(asyncio.gather(*tasks), 10)
    assert booted.progress.bar_style == "success"

    destroy = next(b for b in booted.widget.buttons if b.description == "Destroy")
    destroy.click()
    assert not magics.STATE.tasks, "Destroy asks first: nothing is sent yet"
    assert booted.widget.confirm_box.layout.display == "flex"
    booted.widget.confirm_no.click()
    assert not magics.STATE.tasks

    stop = next(b for b in booted.widget.buttons if b.description == "Stop")
    stop.click()
    (task,) = magics.STATE.tasks
    assert isinstance(task, asyncio.Task) and not task.done(), "the click returned at once"
    assert booted.out.outputs[0]["text"] == "Stop…\n"
    await asyncio.wait_for(task, 10)
    assert not magics.STATE.tasks, "the reference is dropped when it is done"
    assert (await gpu.core.call(service.view(admin, iid))).state is InstanceState.STOPPED
    stopped = magics.STATE.last
    assert stopped.reply.title == f"Stopped {iid}"

    destroy = next(b for b in stopped.widget.buttons if b.description == "Destroy")
    destroy.click()
    stopped.widget.confirm_yes.click()          # the inline yes: core is not asked to ask again
    await asyncio.wait_for(asyncio.gather(*magics.STATE.tasks), 10)
    assert magics.STATE.last.reply.title == f"Destroyed {iid}"
    assert (await gpu.core.call(service.view(admin, iid))).state is InstanceState.DESTROYED


def test_use_keeps_the_machine_and_unload_removes_the_magic_and_the_hooks(shell: InteractiveShell, gpu: Gpu) -> None:
    load(shell)
    run(shell, "gpu", "boot budget")
    settle()
    iid = magics.STATE.last.reply.instance_id
    (before,) = shown(run(shell, "gpu", "use"))
    assert "No machine is kept alive" in before["text/plain"]
    (using,) = shown(run(shell, "gpu", f"use {iid}"))
    assert f"Using {iid}" in using["text/plain"] and f"Keeping {iid} alive" in using["text/plain"]
    assert gpu.activity.instance_id == iid
    assert gpu.activity.cell_started in shell.events.callbacks["pre_run_cell"]

    cap = run(shell, "unload_ext", EXT)
    no_traceback(cap)
    assert "gpu" not in shell.magics_manager.magics["line"]
    assert gpu.activity.cell_started not in shell.events.callbacks["pre_run_cell"]
    assert gpu.activity.cell_finished not in shell.events.callbacks["post_run_cell"]
    with pytest.raises(UsageError):
        shell.run_line_magic("gpu", "status")
    load(shell)                                 # back again, and the machine in use is pinged again
    assert gpu.activity.cell_started in shell.events.callbacks["pre_run_cell"]
    assert "1 instance" in html(run(shell, "gpu", "status"))


def test_panel_shows_gpu_panel(shell: InteractiveShell, gpu: Gpu, monkeypatch: pytest.MonkeyPatch) -> None:
    import gpuherd.notebook_ext as ext

    panel = w.HTML(value="the panel")
    calls: list[Any] = []
    monkeypatch.setattr(ext, "gpu_panel", lambda *a, **kw: calls.append((a, kw)) or panel)
    load(shell)
    (data,) = shown(run(shell, "gpu", "panel"))
    assert calls == [((), {})] and data["application/vnd.jupyter.widget-view+json"]["model_id"] == panel.model_id

    def missing(*_: Any, **__: Any) -> Any:
        raise ModuleNotFoundError("No module named 'ipywidgets'")
    monkeypatch.setattr(ext, "gpu_panel", missing)
    cap = run(shell, "gpu", "panel")
    no_traceback(cap)
    assert "The gpuherd panel cannot be loaded here" in shown(cap)[0]["text/plain"]


def test_an_unreachable_server_is_one_sentence(shell: InteractiveShell) -> None:
    api.connect(backend=RemoteBackend("http://127.0.0.1:9", "k", ready_timeout_s=0.2))
    cap = load(shell)
    (reply,) = shown(cap)
    assert 'data-level="error"' in reply["text/html"]
    assert "Cannot reach the gpuherd server http://127.0.0.1:9: ConnectError." in reply["text/plain"]
    cap = run(shell, "gpu", "status")
    no_traceback(cap)
    assert "Cannot reach the gpuherd server" in shown(cap)[0]["text/plain"]


def test_anything_unexpected_is_a_short_sentence(shell: InteractiveShell, gpu: Gpu,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    load(shell)

    def broken(line: str) -> Any:
        raise ZeroDivisionError("deep inside")
    monkeypatch.setattr(gpu, "command", broken)
    cap = run(shell, "gpu", "status")
    no_traceback(cap)
    (reply,) = shown(cap)
    assert "gpuherd could not do that (ZeroDivisionError)" in reply["text/plain"] and "deep inside" not in str(reply)
    assert isinstance(magics.STATE.last, RichReply)
