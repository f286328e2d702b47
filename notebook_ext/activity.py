"""Keeping the machine a notebook works on alive while its cells run.

The idle guard stops a machine nobody uses; a notebook whose cells train on the GPU for an hour
is using it even if its model server sees no request. While this kernel executes a cell, the
machine the notebook said it works on (`Gpu.use`, the panel's "Use in this notebook") gets an
activity ping every `interval_s`; when the kernel is idle, or shut down, the pings stop and the
idle clock runs again.

Decisions:
- The pings are sent from the core loop's thread (`corethread`), not ipykernel's loop: a cell
  that blocks (the common case: a training loop) blocks that loop for as long as it runs, and
  that is exactly when the pings matter.
- Cells are seen through IPython's `pre_run_cell` / `post_run_cell` events. The first ping goes
  out at once when a cell starts, then one every interval while it runs; none while idle.
- The interval defaults to 20 s (`GPUHERD_NOTEBOOK_PING_S`), a third of the shortest idle window
  a template may set (1 minute), so a cell running through a whole window always pings in it.
- A ping that fails (the machine was stopped from chat, the server is unreachable) is recorded
  in `last_error` and logged once; the pinger goes on, so a machine started again is kept
  alive again without a call."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

from gpuherd.core.errors import GpuherdError

from .corethread import CoreLoop

log = logging.getLogger(__name__)
DEFAULT_INTERVAL_S = 20.0
MIN_INTERVAL_S = 0.2
Ping = Callable[[str, str], Awaitable[Any]]


def interval_from_env() -> float:
    raw = os.environ.get("GPUHERD_NOTEBOOK_PING_S", "").strip()
    if not raw:
        return DEFAULT_INTERVAL_S
    try:
        return max(MIN_INTERVAL_S, float(raw))
    except ValueError:
        log.warning("GPUHERD_NOTEBOOK_PING_S=%r is not a number of seconds; using %g", raw[:20], DEFAULT_INTERVAL_S)
        return DEFAULT_INTERVAL_S


class KernelActivity:
    def __init__(self, core: CoreLoop, ping: Ping, *, interval_s: float | None = None) -> None:
        self.core = core
        self._ping = ping                     # (instance id, detail) -> the façade's record_activity
        self.interval_s = interval_s if interval_s is not None else interval_from_env()
        self.instance_id: str | None = None
        self.busy = False
        self.pings = 0
        self.last_ping_at: float | None = None      # time.time() of the last ping that was recorded
        self.last_error: str | None = None
        self._task: asyncio.Task[None] | None = None
        self._ipython: Any = None

    # --- what the notebook says -------------------------------------------------------------
    def use(self, instance_id: str, *, in_cell: bool, ipython: Any = None) -> None:
        """This notebook works on `instance_id`: ping it while cells run. `in_cell`: the call
        comes from a running cell (code), not a button (a comm message between cells). Outside
        IPython (a script) the process is busy as long as it uses the machine."""
        self.instance_id = instance_id
        self.last_error = None
        attached = self.attach(ipython)
        if in_cell or not attached:
            self.busy = True
        if self.busy:
            self._start()

    def release(self) -> None:
        """No machine any more: no more pings."""
        self.instance_id = None
        self._stop()

    def attach(self, ipython: Any = None) -> bool:
        """Listen to the kernel's cells (once; safe to call again after `%reload_ext`). False
        outside IPython."""
        shell = ipython if ipython is not None else _current_ipython()
        if shell is None:
            return self._ipython is not None
        if shell is self._ipython:
            return True
        self.detach()
        shell.events.register("pre_run_cell", self.cell_started)
        shell.events.register("post_run_cell", self.cell_finished)
        self._ipython = shell
        return True

    def detach(self) -> None:
        shell, self._ipython = self._ipython, None
        if shell is None:
            return
        for name, fn in (("pre_run_cell", self.cell_started), ("post_run_cell", self.cell_finished)):
            with contextlib.suppress(ValueError):
                shell.events.unregister(name, fn)

    def close(self) -> None:
        """The kernel is shutting down (or the extension unloads)."""
        self.detach()
        self.busy = False
        self._stop()

    # --- the kernel's cells ---------------------------------------------------------------------
    def cell_started(self, *_: Any) -> None:
        self.busy = True
        self._start()

    def cell_finished(self, *_: Any) -> None:
        self.busy = False
        self._stop()

    def describe(self) -> str:
        if self.instance_id is None:
            return "No machine is kept alive by this notebook."
        last = ("no ping yet" if self.last_ping_at is None
                else f"last ping {int(time.time() - self.last_ping_at)} s ago")
        error = f"; last ping failed: {self.last_error}" if self.last_error else ""
        return f"Keeping {self.instance_id} alive while this notebook's cells run ({last}{error})."

    # --- the pinger, on the core loop ----------------------------------------------------------
    def _start(self) -> None:
        if self.instance_id is None:
            return
        self.core.loop.call_soon_threadsafe(self._ensure_task)

    def _stop(self) -> None:
        if self._task is not None:
            with contextlib.suppress(RuntimeError):   # the core loop is already closed (shutdown)
                self.core.loop.call_soon_threadsafe(self._cancel_task)

    def _ensure_task(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name="gpuherd-kernel-activity")

    def _cancel_task(self) -> None:
        task, self._task = self._task, None
        if task is not None and not self.busy:
            task.cancel()
        elif task is not None:
            self._task = task      # a new cell started before the cancel ran: keep pinging

    async def _run(self) -> None:
        while self.busy and self.instance_id is not None:
            iid = self.instance_id
            try:
                await self._ping(iid, "a notebook cell is running")
                self.pings += 1
                self.last_ping_at = time.time()
                self.last_error = None
            except asyncio.CancelledError:
                raise
            except GpuherdError as exc:
                if self.last_error != exc.message:
                    log.info("gpuherd: activity ping for %s refused: %s", iid, exc.message)
                self.last_error = exc.message
            except Exception as exc:          # the server is unreachable: try again next interval
                self.last_error = f"{type(exc).__name__}"
                log.info("gpuherd: activity ping for %s failed (%s)", iid, type(exc).__name__)
            await asyncio.sleep(self.interval_s)


def _current_ipython() -> Any:
    try:
        from IPython import get_ipython
    except ImportError:
        return None
    return get_ipython()
