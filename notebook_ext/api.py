"""gpuherd for code in a notebook or a script: boot from a template, wait until it is ready,
read its endpoint (and the OpenAI base URL of a vLLM machine), stop, destroy — and a context
manager that boots and always stops (or destroys) the machine when the block is left, also when
the block raises or is interrupted.

    from gpuherd.notebook_ext import connect
    gpu = connect()                                  # GPUHERD_SERVER/GPUHERD_API_KEY, or the local core
    with gpu.machine("budget", overrides={"idle": "45m"}) as m:
        print(m.endpoint)                            # it is ready here
    # stopped here, whatever happened inside

Every call has an async twin for the kernel's loop (`await gpu.aboot(...)`, `async with
gpu.machine(...)`): the blocking forms hold the cell while they wait (a boot's progress bar in
the panel then waits too), the async forms do not.

Decisions:
- Results are core's models (`SearchResult`, `StopResult`, `InstanceView` inside `Machine.view`)
  and errors core's `GpuherdError`s (`NotFound`, `PermissionDenied`, the client's `ApiError`
  over HTTP). Two more, both `GpuherdError`s: `NeedsConfirmation` (core asked for a yes — a
  price above the template's limit or past a budget; it carries the Confirmation with $/h,
  $/day and $/month; `boot(accept=True)` says yes up front) and `BootFailed` (the operation
  ended without a healthy machine).
- Destroy from code is explicit, so `Machine.destroy()` says yes to core's question itself.
- The context manager boots with an idempotency key of its own. If the block is interrupted
  while the boot call is in flight, the boot is not cancelled (the core goes on with it on its
  own thread); the exit waits for its answer and stops what it started. A stop refused because
  the machine is still `pending` (not yet at the provider) is tried again for up to
  `STOP_RETRY_S`; a machine already stopped or gone counts as stopped."""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import threading
import time
import uuid
from collections.abc import Coroutine
from types import TracebackType
from typing import Any, Literal, TypeVar

from gpuherd.core.errors import Conflict, GpuherdError
from gpuherd.core.models import InstanceState
from gpuherd.core.results import (
    BootResult,
    Confirmation,
    CostReport,
    DestroyResult,
    InstanceView,
    KeepResult,
    Phase,
    ProgressEvent,
    SearchResult,
    StartResult,
    StatusResult,
    StopResult,
    TemplateList,
    openai_base_url,
)

from .activity import KernelActivity
from .backend import Backend, Connection, from_environment
from .corethread import CoreLoop

log = logging.getLogger(__name__)
T = TypeVar("T")
STOP_RETRY_S = 60.0
BOOT_ANSWER_S = 120.0
OnExit = Literal["stop", "destroy"]
GONE = {InstanceState.DESTROYED, InstanceState.FAILED, InstanceState.ERROR}


class NeedsConfirmation(GpuherdError):
    """Core asked for a yes before spending (price above the limit, a budget passed)."""

    code = "needs_confirmation"

    def __init__(self, confirmation: Confirmation) -> None:
        cost = confirmation.cost
        figures = (f" (${cost.per_hour:.2f}/h, ${cost.per_day:.2f}/day, ${cost.per_month:.0f}/month)"
                   if cost is not None else "")
        super().__init__(f"{confirmation.prompt}{figures}",
                         hint="Say yes with boot(..., accept=True), or gpu.confirm(err.confirmation).")
        self.confirmation = confirmation


class BootFailed(GpuherdError):
    code = "boot_failed"


class Gpu:
    """One connection to gpuherd (see the module docstring). `backend` defaults to what the
    environment says (`backend.from_environment`)."""

    def __init__(self, backend: Backend | None = None, *, core: CoreLoop | None = None,
                 ping_interval_s: float | None = None) -> None:
        _log_to_file()
        self.backend = backend if backend is not None else from_environment()
        self.core = core or CoreLoop()
        self.activity = KernelActivity(self.core, self._ping, interval_s=ping_interval_s)
        self._start_lock = threading.Lock()
        self._starting: asyncio.Future[None] | None = None
        self.connection: Connection | None = None
        self.closed = False

    def __repr__(self) -> str:
        return f"Gpu({self.backend.mode})"

    # --- connecting ----------------------------------------------------------------------------
    async def _start_on_core(self) -> None:
        if self.backend.started:
            return
        if self._starting is None:
            self._starting = asyncio.get_running_loop().create_future()
            try:
                await self.backend.start()
                self.connection = await self.backend.describe()
            except BaseException as exc:
                self._starting.set_exception(exc)
                self._starting.exception()       # retrieved: a failed start is reported to each caller
                self._starting = None
                raise
            self._starting.set_result(None)
        else:
            await asyncio.shield(self._starting)

    def _run(self, coro: Coroutine[Any, Any, T], *, shielded: bool = False) -> T:
        try:
            if self.closed:
                raise GpuherdError("This gpuherd connection is closed; connect() again.")
            if not self.backend.started:
                self.core.run(self._start_on_core())
        except BaseException:
            coro.close()
            raise
        return self.core.run(coro, shielded=shielded)

    async def _call(self, coro: Coroutine[Any, Any, T], *, shielded: bool = False) -> T:
        try:
            if self.closed:
                raise GpuherdError("This gpuherd connection is closed; connect() again.")
            if not self.backend.started:
                await self.core.call(self._start_on_core())
        except BaseException:
            coro.close()
            raise
        return await self.core.call(coro, shielded=shielded)

    def connect(self) -> Connection:
        """Start (once) and say where this gpuherd runs and who runs its guards."""
        self._run(asyncio.sleep(0))
        assert self.connection is not None
        return self.connection

    async def aconnect(self) -> Connection:
        await self._call(asyncio.sleep(0))
        assert self.connection is not None
        return self.connection

    def close(self) -> None:
        """Stop pinging, close the connection (the local core's guards stop with it)."""
        if self.closed:
            return
        self.closed = True
        self.activity.close()
        if self.backend.started:
            with contextlib.suppress(Exception):
                self.core.run(self.backend.close(), timeout=15)
        self.core.stop()

    # --- reading -------------------------------------------------------------------------------
    def search(self, query: str = "", limit: int | None = None) -> SearchResult:
        return self._run(self.backend.search(query, limit))

    async def asearch(self, query: str = "", limit: int | None = None) -> SearchResult:
        return await self._call(self.backend.search(query, limit))

    def templates(self) -> TemplateList:
        return self._run(self.backend.templates())

    async def atemplates(self) -> TemplateList:
        return await self._call(self.backend.templates())

    def status(self, *, include_ended: bool = False) -> StatusResult:
        """Your machines (newest first) and what they cost you an hour."""
        return self._run(self.backend.status(include_ended=include_ended))

    async def astatus(self, *, include_ended: bool = False) -> StatusResult:
        return await self._call(self.backend.status(include_ended=include_ended))

    def machines(self, *, include_ended: bool = False) -> list[Machine]:
        return [Machine(self, v) for v in self.status(include_ended=include_ended).instances]

    def get(self, instance_id: str) -> Machine:
        return Machine(self, self._run(self.backend.view(instance_id)))

    async def aget(self, instance_id: str) -> Machine:
        return Machine(self, await self._call(self.backend.view(instance_id)))

    def costs(self, period: str | None = None, by: str | None = None) -> CostReport:
        return self._run(self.backend.costs(period, by))

    async def acosts(self, period: str | None = None, by: str | None = None) -> CostReport:
        return await self._call(self.backend.costs(period, by))

    def command(self, line: str) -> Any:
        """One `/gpu …` line of the shared grammar; the platform-neutral Reply."""
        return self._run(self.backend.command(line))

    async def acommand(self, line: str, delivery_id: str | None = None) -> Any:
        return await self._call(self.backend.command(line, delivery_id))

    # --- booting -------------------------------------------------------------------------------
    def boot(self, template: str, *, offer: str | None = None, overrides: dict[str, str] | None = None,
             key: str | None = None, wait: bool = True, accept: bool = False, timeout_s: float | None = None,
             ) -> Machine:
        """Boot from `template` (with `overrides` like `{"idle": "45m"}`); with `wait`, return
        once its model server is healthy (BootFailed if it never gets there)."""
        return self._run(self._boot(template, offer, overrides, key, wait, accept, timeout_s), shielded=True)

    async def aboot(self, template: str, *, offer: str | None = None, overrides: dict[str, str] | None = None,
                    key: str | None = None, wait: bool = True, accept: bool = False,
                    timeout_s: float | None = None) -> Machine:
        return await self._call(self._boot(template, offer, overrides, key, wait, accept, timeout_s), shielded=True)

    async def _boot(self, template: str, offer: str | None, overrides: dict[str, str] | None, key: str | None,
                    wait: bool, accept: bool, timeout_s: float | None) -> Machine:
        answer = await self.backend.boot(template, offer=offer, overrides=overrides, key=key)
        if isinstance(answer, Confirmation):
            if not accept:
                raise NeedsConfirmation(answer)
            again = await self.backend.confirm(answer.token)
            if isinstance(again, Confirmation):      # the price moved between the question and the yes
                raise NeedsConfirmation(again)
            if not isinstance(again, BootResult):
                raise GpuherdError("That yes answered something other than a boot.")
            answer = again
        machine = Machine(self, answer.instance, operation_id=answer.operation_id)
        if wait:
            await machine._wait_ready(timeout_s)
        return machine

    def confirm(self, confirmation: Confirmation | str) -> Any:
        token = confirmation.token if isinstance(confirmation, Confirmation) else confirmation
        return self._run(self.backend.confirm(token))

    def machine(self, template: str, *, on_exit: OnExit = "stop", wait: bool = True, use: bool = True,
                offer: str | None = None, overrides: dict[str, str] | None = None, accept: bool = False,
                timeout_s: float | None = None) -> MachineSession:
        """A context manager (`with` or `async with`) that boots and always stops (or, with
        `on_exit="destroy"`, destroys) the machine when the block is left. With `use`, this
        notebook keeps it alive while cells run (see `use`)."""
        if on_exit not in ("stop", "destroy"):
            raise GpuherdError(f"on_exit takes 'stop' or 'destroy', not {on_exit!r}.")
        return MachineSession(self, template, on_exit=on_exit, wait=wait, use=use, offer=offer,
                              overrides=overrides, accept=accept, timeout_s=timeout_s)

    # --- keeping alive ---------------------------------------------------------------------------
    def use(self, machine: Machine | str, *, in_cell: bool = True) -> None:
        """This notebook works on `machine`: while its cells run, it sends activity pings, so the
        idle guard does not stop a machine in use (none while the kernel is idle)."""
        iid = machine.id if isinstance(machine, Machine) else machine
        self.activity.use(iid, in_cell=in_cell)

    def release(self) -> None:
        self.activity.release()

    async def _ping(self, instance_id: str, detail: str) -> Any:
        await self._start_on_core()          # use() may be the first call of a fresh connection
        return await self.backend.activity(instance_id, "notebook", detail)


class Machine:
    """One machine: its `view` (core's InstanceView, as last read) and what can be done with it."""

    def __init__(self, gpu: Gpu, view: InstanceView, *, operation_id: str | None = None) -> None:
        self.gpu = gpu
        self.view = view
        self.operation_id = operation_id or view.operation_id
        self._openai: bool | None = None

    def __repr__(self) -> str:
        return f"Machine({self.id!r}, {self.view.template!r}, {self.state.value})"

    @property
    def id(self) -> str:
        return self.view.id

    @property
    def state(self) -> InstanceState:
        return self.view.state

    @property
    def ready(self) -> bool:
        return self.view.ready

    @property
    def endpoint(self) -> str | None:
        return self.view.endpoint

    @property
    def openai_base_url(self) -> str | None:
        """`<endpoint>/v1` for a vLLM template (pass it to `openai.OpenAI(base_url=...)`); None
        for a template that serves no OpenAI API, or before the machine has an endpoint."""
        if self._openai is None:
            detail = self.gpu._run(self.gpu.backend.template(self.view.template))
            self._openai = detail.summary.openai_api
        return openai_base_url(self.endpoint) if self._openai else None

    # --- refreshing and waiting ---------------------------------------------------------------
    def refresh(self) -> Machine:
        self.view = self.gpu._run(self.gpu.backend.view(self.id))
        return self

    async def arefresh(self) -> Machine:
        self.view = await self.gpu._call(self.gpu.backend.view(self.id))
        return self

    def wait_ready(self, timeout_s: float | None = None) -> Machine:
        """Until its model server is healthy (BootFailed when the boot or start fails)."""
        return self.gpu._run(self._wait_ready(timeout_s))

    async def await_ready(self, timeout_s: float | None = None) -> Machine:
        return await self.gpu._call(self._wait_ready(timeout_s))

    async def _wait_ready(self, timeout_s: float | None = None) -> Machine:
        backend = self.gpu.backend
        last: ProgressEvent | None = None
        if self.operation_id:
            async for event in backend.follow(self.operation_id, self.id, timeout_s=timeout_s):
                last = event
        self.view = await backend.view(self.id)
        if self.view.ready:
            self.operation_id = None
            return self
        if last is not None and last.phase is Phase.FAILED:
            raise BootFailed(f"{self.id} did not become ready: {last.text}")
        if self.view.state in GONE or self.view.state is InstanceState.STOPPED:
            raise BootFailed(f"{self.id} is {self.view.state.value}: {self.view.message or 'it did not become ready'}.")
        raise BootFailed(f"{self.id} is not ready yet ({self.view.state.value}) after "
                         f"{'the timeout' if timeout_s is not None else 'its boot ended'}.")

    # --- acting ------------------------------------------------------------------------------
    def stop(self) -> StopResult:
        result = self.gpu._run(self.gpu.backend.stop(self.id))
        self.view = result.instance
        return result

    async def astop(self) -> StopResult:
        result = await self.gpu._call(self.gpu.backend.stop(self.id))
        self.view = result.instance
        return result

    def start(self, *, wait: bool = True, timeout_s: float | None = None) -> StartResult:
        result = self.gpu._run(self._start(wait, timeout_s))
        return result

    async def astart(self, *, wait: bool = True, timeout_s: float | None = None) -> StartResult:
        return await self.gpu._call(self._start(wait, timeout_s))

    async def _start(self, wait: bool, timeout_s: float | None) -> StartResult:
        result = await self.gpu.backend.start_machine(self.id)
        self.view, self.operation_id = result.instance, result.operation_id
        if wait and result.operation_id:
            await self._wait_ready(timeout_s)
        return result

    def destroy(self) -> DestroyResult:
        """Destroy (no further charges, disk gone). Code is explicit: no question is asked."""
        return self.gpu._run(self._destroy())

    async def adestroy(self) -> DestroyResult:
        return await self.gpu._call(self._destroy())

    async def _destroy(self) -> DestroyResult:
        result = await self.gpu.backend.destroy(self.id, confirmed=True)
        if isinstance(result, Confirmation):       # cannot happen with confirmed=True; never pass it on silently
            raise NeedsConfirmation(result)
        self.view = result.instance
        return result

    def keep(self, duration: str | None = None) -> KeepResult:
        result = self.gpu._run(self.gpu.backend.keep(self.id, duration))
        self.view = result.instance
        return result

    def use(self) -> Machine:
        """Keep it alive while this notebook's cells run (`Gpu.use`)."""
        self.gpu.use(self)
        return self


class MachineSession:
    """`with gpu.machine("budget") as m:` — see `Gpu.machine`."""

    def __init__(self, gpu: Gpu, template: str, *, on_exit: OnExit, wait: bool, use: bool, offer: str | None,
                 overrides: dict[str, str] | None, accept: bool, timeout_s: float | None) -> None:
        self.gpu = gpu
        self.template = template
        self.on_exit = on_exit
        self.wait = wait
        self.use = use
        self.offer = offer
        self.overrides = overrides
        self.accept = accept
        self.timeout_s = timeout_s
        self.key = f"notebook-{uuid.uuid4().hex}"
        self.machine: Machine | None = None
        self.ended: StopResult | DestroyResult | None = None
        self._boot: Any = None               # the boot's future on the core loop

    # --- sync ----------------------------------------------------------------------------------
    def __enter__(self) -> Machine:
        gpu = self.gpu
        if not gpu.backend.started:
            gpu.core.run(gpu._start_on_core())
        self._boot = gpu.core.submit(gpu._boot(self.template, self.offer, self.overrides, self.key, False,
                                               self.accept, None))
        try:
            self.machine = self._boot.result()
            if self.use:
                gpu.use(self.machine)
            if self.wait:
                self.machine.wait_ready(self.timeout_s)
        except BaseException:
            self._end_sync()
            raise
        return self.machine

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._end_sync()

    def _end_sync(self) -> None:
        self.gpu.core.run(self._end(), shielded=True)

    # --- async ---------------------------------------------------------------------------------
    async def __aenter__(self) -> Machine:
        gpu = self.gpu
        if not gpu.backend.started:
            await gpu.core.call(gpu._start_on_core())
        self._boot = gpu.core.submit(gpu._boot(self.template, self.offer, self.overrides, self.key, False,
                                               self.accept, None))
        try:
            self.machine = await asyncio.wrap_future(self._boot)
            if self.use:
                gpu.use(self.machine)
            if self.wait:
                await self.machine.await_ready(self.timeout_s)
        except BaseException:
            await asyncio.shield(gpu.core.call(self._end(), shielded=True))
            raise
        return self.machine

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await asyncio.shield(self.gpu.core.call(self._end(), shielded=True))

    # --- leaving, on the core loop ---------------------------------------------------------------
    async def _end(self) -> None:
        """Stop (or destroy) what this block booted, whatever happened."""
        if self.ended is not None:
            return
        machine = self.machine
        if machine is None and self._boot is not None:
            try:     # interrupted while the boot was in flight: its answer says what to stop
                machine = self.machine = await asyncio.wait_for(asyncio.wrap_future(self._boot), BOOT_ANSWER_S)
            except GpuherdError:
                return                       # refused, or it needs a yes: nothing was booted
            except (TimeoutError, asyncio.CancelledError):
                log.warning("gpuherd: the boot of this block (key %s) did not answer; check `/gpu status`", self.key)
                return
        if machine is None:
            return
        if self.gpu.activity.instance_id == machine.id:
            self.gpu.activity.release()
        backend = self.gpu.backend
        until = time.monotonic() + STOP_RETRY_S
        while True:
            try:
                if self.on_exit == "destroy":
                    result: StopResult | DestroyResult | Confirmation = await backend.destroy(machine.id, confirmed=True)
                else:
                    result = await backend.stop(machine.id)
                if isinstance(result, Confirmation):
                    raise NeedsConfirmation(result)
                machine.view = result.instance
                self.ended = result
                return
            except Conflict:
                view = await backend.view(machine.id)
                machine.view = view
                if view.state in GONE or (view.state is InstanceState.STOPPED and self.on_exit == "stop"):
                    return                   # already stopped or gone (from chat, the panel, a guard)
                if time.monotonic() > until:
                    raise
                await asyncio.sleep(0.5)     # pending (not at the provider yet) or stopping: in a moment


_default: Gpu | None = None
_default_lock = threading.Lock()


def connect(backend: Backend | None = None, *, fresh: bool = False) -> Gpu:
    """The notebook's shared connection (what `%gpu` and `gpu_panel()` use): the team server when
    GPUHERD_SERVER and GPUHERD_API_KEY are set, else the local core. `backend` or `fresh` makes a
    new one (closing the old)."""
    global _default
    with _default_lock:
        if _default is not None and (fresh or backend is not None):
            old, _default = _default, None
            old.close()
        if _default is None or _default.closed:
            _default = Gpu(backend)
        return _default


def _close_default() -> None:
    global _default
    gpu, _default = _default, None
    if gpu is not None:
        with contextlib.suppress(Exception):
            gpu.close()


def _log_to_file() -> None:
    """Nobody configures logging in a kernel, so Python's last-resort handler would print
    gpuherd's warnings (and a logged exception's traceback) into the user's cells. Unless the
    user set logging up, gpuherd logs to `gpuherd.log` in its data directory, as the CLI does."""
    logger = logging.getLogger("gpuherd")
    if logger.handlers or logging.getLogger().handlers:
        return
    try:
        from gpuherd.core.config import home_from_env

        home = home_from_env()
        home.mkdir(parents=True, exist_ok=True)
        handler: logging.Handler = logging.FileHandler(home / "gpuherd.log")
    except OSError:
        handler = logging.NullHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger.addHandler(handler)
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)


# Close the shared connection when the interpreter exits (a script, a kernel shut down): the local
# core's guards release their lock and its runtime ends cleanly. It must run before the thread
# pools refuse new work (they register with threading's exit hooks, which run before `atexit`'s),
# so it registers there too, after them, and runs first.
_register_exit = getattr(threading, "_register_atexit", None)
if _register_exit is not None:
    _register_exit(_close_default)
else:  # pragma: no cover - every CPython since 3.9 has it
    atexit.register(_close_default)
