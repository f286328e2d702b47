"""What the notebook surfaces (the panel, `%gpu`, the Python API) talk to: the local core in
this process, or a team's `gpuherd serve` through `gpuherd.client`. Both answer core's own
result models and raise core's errors (the client's `ApiError` is a `GpuherdError` of the same
code), so nothing above this module knows which one it has.

Decisions:
- Every coroutine here runs on the core loop (`corethread.CoreLoop`); callers hop with
  `CoreLoop.call` / `CoreLoop.run`.
- `connect()` picks the team server when `GPUHERD_SERVER` and `GPUHERD_API_KEY` are set, the
  local core otherwise. The local core runs a `Runtime` with guards in this process; whether it
  holds the guard lock (or another process on the same database does, or none) is what
  `describe()` says, since "idle armed" means nothing if nobody runs the guards.
- Notices and progress arrive through one pump per backend: the database feed woken in-process
  (`GpuService.watch`) locally, the server's event stream remotely. Listeners (`subscribe`) are
  called on the core loop; the panel hops to its own loop. The pump keeps the last events of
  each operation for a while, so a follower that subscribes just after a boot answered misses
  none of its events (the remote stream is live before the first call is made).
- Following one operation (`follow`) reads the core's own operation stream locally; remotely it
  filters the pump, and looks at the machine itself every `FOLLOW_POLL_S` without events, so a
  missed final event (a reconnect) cannot leave a progress bar hanging.
- A button's action becomes the façade call it stands for in `perform` (stop, start, keep,
  destroy, confirm, cancel, boot); core checks the presser again. Destroy is asked without
  `confirmed`: core's own question (with the machine's cost) comes back as a Confirmation."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from gpuherd.core.actions import Action, Op
from gpuherd.core.errors import GpuherdError, InvalidInput
from gpuherd.core.feed import FeedEntry
from gpuherd.core.models import InstanceState
from gpuherd.core.results import (
    ActivityResult,
    BootResult,
    BudgetResult,
    Cancelled,
    Confirmation,
    CostReport,
    DestroyResult,
    InstanceView,
    KeepResult,
    ProgressEvent,
    SearchResult,
    StartResult,
    StatusResult,
    StopResult,
    TemplateDetail,
    TemplateList,
)

if TYPE_CHECKING:
    from gpuherd.bot.replies import Reply
    from gpuherd.client import AsyncClient
    from gpuherd.core.auth import Actor
    from gpuherd.core.runtime import Runtime
    from gpuherd.core.service import GpuService

log = logging.getLogger(__name__)
Listener = Callable[[FeedEntry], None]
FOLLOW_POLL_S = 5.0
KEEP_EVENTS_S = 600.0           # how long the pump remembers an operation's events for late followers
MAX_OPERATIONS = 256
ENDED = {InstanceState.STOPPED, InstanceState.DESTROYED, InstanceState.ERROR, InstanceState.FAILED}


class Connection(BaseModel):
    """Where the notebook's gpuherd runs, in words a user can act on."""

    mode: str                   # local | remote
    where: str                  # "http://gpu.example:8000" or "SQLite at ~/.local/share/gpuherd/gpuherd.db"
    principal: str
    role: str
    guards: str                 # who runs the idle and lifetime guards for these machines
    guards_here: bool = False
    simulated: bool = False

    def sentence(self) -> str:
        what = (f"gpuherd server {self.where} as {self.principal} ({self.role})" if self.mode == "remote"
                else f"local gpuherd ({self.where}) as {self.principal} ({self.role})")
        sim = " · simulated sandbox provider: no real machines, no real charges" if self.simulated else ""
        return f"Connected to {what}. {self.guards}{sim}"


@dataclass
class _Recent:
    events: list[ProgressEvent]
    at: float


class Backend:
    """The calls the notebook makes; subclasses send them (see the module docstring)."""

    mode = "?"

    def __init__(self) -> None:
        self._listeners: list[Listener] = []
        self._recent: OrderedDict[str, _Recent] = OrderedDict()
        self._waiters: dict[str, list[asyncio.Queue[ProgressEvent]]] = {}
        self._pump: asyncio.Task[None] | None = None
        self.started = False

    # --- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        if self._pump is not None:
            self._pump.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._pump
            self._pump = None

    async def describe(self) -> Connection:
        raise NotImplementedError

    # --- events ------------------------------------------------------------------------------
    def subscribe(self, fn: Listener) -> Callable[[], None]:
        """`fn(entry)` for every notice and progress event of this user, on the core loop."""
        self._listeners.append(fn)
        return lambda: self._listeners.remove(fn) if fn in self._listeners else None

    def _source(self) -> AsyncIterator[FeedEntry]:
        raise NotImplementedError

    def _start_pump(self) -> None:
        self._pump = asyncio.get_running_loop().create_task(self._run_pump(), name="gpuherd-notebook-events")

    async def _run_pump(self) -> None:
        while True:
            try:
                async for entry in self._source():
                    self._dispatch(entry)
                return
            except asyncio.CancelledError:
                raise
            except GpuherdError as exc:      # a refused key: the calls say so too; retry slowly
                log.warning("gpuherd notebook: event stream refused: %s", exc.message)
                await asyncio.sleep(30)
            except Exception:
                log.exception("gpuherd notebook: event stream failed; reconnecting")
                await asyncio.sleep(2)

    def _dispatch(self, entry: FeedEntry) -> None:
        item = entry.item
        if isinstance(item, ProgressEvent):
            now = time.monotonic()
            recent = self._recent.setdefault(item.operation_id, _Recent([], now))
            recent.events.append(item)
            recent.at = now
            self._recent.move_to_end(item.operation_id)
            while self._recent and (len(self._recent) > MAX_OPERATIONS
                                    or now - next(iter(self._recent.values())).at > KEEP_EVENTS_S):
                self._recent.popitem(last=False)
            for queue in self._waiters.get(item.operation_id, []):
                queue.put_nowait(item)
        for fn in list(self._listeners):
            try:
                fn(entry)
            except Exception:          # one listener (a closed panel) never stops the others
                log.exception("gpuherd notebook: an event listener failed")

    async def follow(self, operation_id: str, instance_id: str | None = None,
                     timeout_s: float | None = None) -> AsyncIterator[ProgressEvent]:
        """The operation's progress events until it ends."""
        queue: asyncio.Queue[ProgressEvent] = asyncio.Queue()
        self._waiters.setdefault(operation_id, []).append(queue)
        seen = -1
        loop = asyncio.get_running_loop()
        until = None if timeout_s is None else loop.time() + timeout_s
        try:
            for event in list(self._recent.get(operation_id, _Recent([], 0)).events):
                if event.seq > seen:
                    seen = event.seq
                    yield event
                    if event.final:
                        return
            while until is None or loop.time() < until:
                wait = FOLLOW_POLL_S if until is None else max(0.0, min(FOLLOW_POLL_S, until - loop.time()))
                try:
                    event = await asyncio.wait_for(queue.get(), timeout=wait)
                except TimeoutError:
                    if instance_id is not None and await self._ended(instance_id):
                        return
                    continue
                if event.seq <= seen:
                    continue
                seen = event.seq
                yield event
                if event.final:
                    return
        finally:
            waiting = self._waiters.get(operation_id, [])
            if queue in waiting:
                waiting.remove(queue)
            if not waiting:
                self._waiters.pop(operation_id, None)

    async def _ended(self, instance_id: str) -> bool:
        """No event for a while: is the machine's operation over anyway (ready, or gone)?"""
        try:
            view = await self.view(instance_id)
        except GpuherdError:
            return True
        return view.operation_id is None or view.ready or view.state in ENDED

    # --- calls (each subclass sends them) -------------------------------------------------------
    async def command(self, line: str, delivery_id: str | None = None) -> Reply:
        raise NotImplementedError

    async def search(self, query: str = "", limit: int | None = None) -> SearchResult:
        raise NotImplementedError

    async def templates(self) -> TemplateList:
        raise NotImplementedError

    async def template(self, name: str) -> TemplateDetail:
        raise NotImplementedError

    async def boot(self, template: str, *, offer: str | None = None, overrides: dict[str, str] | None = None,
                   key: str | None = None) -> BootResult | Confirmation:
        raise NotImplementedError

    async def confirm(self, token: str) -> BootResult | DestroyResult | Confirmation:
        raise NotImplementedError

    async def cancel(self, token: str) -> Cancelled:
        raise NotImplementedError

    async def status(self, *, include_ended: bool = False, refresh: bool = True, limit: int = 100) -> StatusResult:
        raise NotImplementedError

    async def view(self, instance_id: str) -> InstanceView:
        raise NotImplementedError

    async def start_machine(self, instance_id: str, key: str | None = None) -> StartResult:
        raise NotImplementedError

    async def stop(self, instance_id: str, key: str | None = None) -> StopResult:
        raise NotImplementedError

    async def destroy(self, instance_id: str, *, confirmed: bool = False,
                      key: str | None = None) -> DestroyResult | Confirmation:
        raise NotImplementedError

    async def keep(self, instance_id: str, duration: str | None = None) -> KeepResult:
        raise NotImplementedError

    async def activity(self, instance_id: str, source: str = "notebook", detail: str | None = None) -> ActivityResult:
        raise NotImplementedError

    async def costs(self, period: str | None = None, by: str | None = None) -> CostReport:
        raise NotImplementedError

    async def budgets(self) -> BudgetResult:
        raise NotImplementedError

    async def perform(self, action: Action, key: str | None = None) -> BaseModel:
        """What pressing a button with core's `action` does (core checks the presser again)."""
        iid = action.instance_id or ""
        if action.op is Op.STOP:
            return await self.stop(iid, key)
        if action.op is Op.START:
            return await self.start_machine(iid, key)
        if action.op is Op.KEEP:
            return await self.keep(iid, action.args.get("duration"))
        if action.op is Op.DESTROY:
            return await self.destroy(iid, key=key)
        if action.op is Op.CONFIRM:
            return await self.confirm(action.args.get("token", ""))
        if action.op is Op.CANCEL:
            return await self.cancel(action.args.get("token", ""))
        if action.op is Op.BOOT:
            return await self.boot(action.args.get("template", ""), offer=action.args.get("offer") or None, key=key)
        from gpuherd.bot.replies import phrase

        return await self.command(phrase(action).command, key)


class LocalBackend(Backend):
    """The core in this process: its own Runtime (recovery, guards when it gets the lock,
    readiness watcher)."""

    mode = "local"

    def __init__(self, service: GpuService | None = None, *, guards: bool = True, source: str = "notebook",
                 close_service: bool | None = None) -> None:
        super().__init__()
        self._given = service
        self._guards = guards
        self._source_name = source
        self._close_service = service is None if close_service is None else close_service
        self.service: GpuService | None = service
        self.actor: Actor | None = None
        self.runtime: Runtime | None = None

    async def start(self) -> None:
        from gpuherd.core.runtime import Runtime
        from gpuherd.core.service import GpuService

        if self.service is None:       # reads config, migrates the embedded SQLite: off the loop
            self.service = await asyncio.to_thread(GpuService.from_settings)
        self.actor = self.service.local_actor(self._source_name)
        self.runtime = Runtime(self.service, guards=self._guards, close_service=self._close_service)
        await self.runtime.__aenter__()
        self._start_pump()
        self.started = True

    async def close(self) -> None:
        await super().close()
        if self.runtime is not None:
            runtime, self.runtime = self.runtime, None
            await runtime.__aexit__(None, None, None)

    @property
    def svc(self) -> GpuService:
        if self.service is None:
            raise RuntimeError("the local gpuherd backend is not started")
        return self.service

    @property
    def me(self) -> Actor:
        if self.actor is None:
            raise RuntimeError("the local gpuherd backend is not started")
        return self.actor

    async def describe(self) -> Connection:
        svc, me = self.svc, self.me
        runtime = self.runtime
        for _ in range(40):            # the scheduler takes the lock on its first tick
            if runtime is None or runtime.is_leader or not self._guards:
                break
            await asyncio.sleep(0.05)
        here = bool(runtime and runtime.is_leader)
        leader = None
        if not here:
            with contextlib.suppress(GpuherdError):
                leader = (await svc.guard_overview(me, limit=1)).leader
            here = bool(runtime and leader and runtime.scheduler is not None
                        and leader.startswith(runtime.scheduler.identity))
        if here:
            guards = "Guards run in this kernel (idle and lifetime stops, warnings, budgets)."
        else:
            guards = (f"Guards run in another process on the same database ({leader})." if leader and self._guards
                      else "No process runs the guards for this database: idle machines will not be stopped "
                           "(run `gpuherd serve` or `gpuherd guards --run`).")
        url = svc.settings.resolved_database_url
        where = (f"SQLite at {url.split(':///', 1)[-1]}" if url.startswith("sqlite") else "PostgreSQL")
        return Connection(mode="local", where=where, principal=me.principal, role=me.role.value, guards=guards,
                          guards_here=here, simulated=svc.simulated)

    def _source(self) -> AsyncIterator[FeedEntry]:
        return self.svc.watch(self.me)

    async def follow(self, operation_id: str, instance_id: str | None = None,
                     timeout_s: float | None = None) -> AsyncIterator[ProgressEvent]:
        async for event in self.svc.follow(self.me, operation_id, timeout_s=timeout_s):
            yield event

    async def command(self, line: str, delivery_id: str | None = None) -> Reply:
        from gpuherd.bot import grammar

        ctx = grammar.Context(service=self.svc, actor=self.me, delivery_id=delivery_id, wait=False)
        return await grammar.dispatch(ctx, line)

    async def search(self, query: str = "", limit: int | None = None) -> SearchResult:
        return await self.svc.search(self.me, query, limit=limit)

    async def templates(self) -> TemplateList:
        return await self.svc.list_templates(self.me)

    async def template(self, name: str) -> TemplateDetail:
        return await self.svc.show_template(self.me, name)

    async def boot(self, template: str, *, offer: str | None = None, overrides: dict[str, str] | None = None,
                   key: str | None = None) -> BootResult | Confirmation:
        return await self.svc.boot(self.me, template, offer=offer, overrides=overrides, idempotency_key=key,
                                   detach=True)

    async def confirm(self, token: str) -> BootResult | DestroyResult | Confirmation:
        return await self.svc.confirm(self.me, token)

    async def cancel(self, token: str) -> Cancelled:
        return await self.svc.cancel(self.me, token)

    async def status(self, *, include_ended: bool = False, refresh: bool = True, limit: int = 100) -> StatusResult:
        return await self.svc.status(self.me, include_ended=include_ended, refresh=refresh, limit=limit,
                                     share=True, mine=True)

    async def view(self, instance_id: str) -> InstanceView:
        return await self.svc.view(self.me, instance_id)

    async def start_machine(self, instance_id: str, key: str | None = None) -> StartResult:
        return await self.svc.start(self.me, instance_id, idempotency_key=key)

    async def stop(self, instance_id: str, key: str | None = None) -> StopResult:
        return await self.svc.stop(self.me, instance_id, idempotency_key=key)

    async def destroy(self, instance_id: str, *, confirmed: bool = False,
                      key: str | None = None) -> DestroyResult | Confirmation:
        return await self.svc.destroy(self.me, instance_id, confirmed=confirmed, idempotency_key=key)

    async def keep(self, instance_id: str, duration: str | None = None) -> KeepResult:
        return await self.svc.keep(self.me, instance_id, duration)

    async def activity(self, instance_id: str, source: str = "notebook", detail: str | None = None) -> ActivityResult:
        return await self.svc.record_activity(self.me, instance_id, source, detail)

    async def costs(self, period: str | None = None, by: str | None = None) -> CostReport:
        return await self.svc.costs(self.me, period, by)

    async def budgets(self) -> BudgetResult:
        return await self.svc.budgets(self.me)


class RemoteBackend(Backend):
    """A team's `gpuherd serve`, with this user's API key (kept only in the client's headers)."""

    mode = "remote"

    def __init__(self, url: str, api_key: str, *, ready_timeout_s: float = 5.0, **client_kw: Any) -> None:
        super().__init__()
        if not url.strip():
            raise InvalidInput("GPUHERD_SERVER is empty: set it to the team server's URL, like http://gpu.example:8000.")
        if not api_key.strip():
            raise InvalidInput("Set GPUHERD_API_KEY to your API key for that server (an admin makes one with "
                               "`gpuherd keys create --user <you>`).")
        self.url = url.rstrip("/")
        self._key = api_key
        self._client_kw = client_kw
        self._ready_timeout_s = ready_timeout_s
        self.client: AsyncClient | None = None

    def __repr__(self) -> str:
        return f"RemoteBackend({self.url!r})"

    async def start(self) -> None:
        from gpuherd.client import AsyncClient

        self.client = AsyncClient(self.url, self._key, **self._client_kw)
        self._start_pump()
        loop = asyncio.get_running_loop()
        until = loop.time() + self._ready_timeout_s
        while self.client.cursor is None and self._pump is not None and not self._pump.done() and loop.time() < until:
            await asyncio.sleep(0.02)      # the stream is live before the first call: no event is missed
        self.started = True

    async def close(self) -> None:
        await super().close()
        if self.client is not None:
            client, self.client = self.client, None
            await client.aclose()

    @property
    def api(self) -> AsyncClient:
        if self.client is None:
            raise RuntimeError("the remote gpuherd backend is not started")
        return self.client

    def _source(self) -> AsyncIterator[FeedEntry]:
        return self.api.events()

    async def describe(self) -> Connection:
        import httpx

        me = await self.api.me()
        guards_state = "unknown"
        with contextlib.suppress(httpx.HTTPError, ValueError):
            async with httpx.AsyncClient(timeout=5) as http:
                guards_state = str((await http.get(self.url + "/ready")).json().get("guards", "unknown"))
        guards = {"running": "The server runs the guards (idle and lifetime stops, warnings, budgets).",
                  "standby": "The server's guards are run by another of its replicas.",
                  "off": "This server runs no guards: idle machines will not be stopped by it."}.get(
                      guards_state, "Whether the server runs the guards is unknown (its /ready did not say).")
        status = await self.status(refresh=False, limit=1)
        return Connection(mode="remote", where=self.url, principal=me.principal, role=me.role, guards=guards,
                          guards_here=False, simulated=status.simulated)

    async def command(self, line: str, delivery_id: str | None = None) -> Reply:
        return await self.api.command(line, idempotency_key=delivery_id)

    async def search(self, query: str = "", limit: int | None = None) -> SearchResult:
        return await self.api.search(query, limit=limit)

    async def templates(self) -> TemplateList:
        return await self.api.templates()

    async def template(self, name: str) -> TemplateDetail:
        return await self.api.template(name)

    async def boot(self, template: str, *, offer: str | None = None, overrides: dict[str, str] | None = None,
                   key: str | None = None) -> BootResult | Confirmation:
        return await self.api.boot(template, offer=offer, overrides=overrides, idempotency_key=key)

    async def confirm(self, token: str) -> BootResult | DestroyResult | Confirmation:
        return await self.api.confirm(token)

    async def cancel(self, token: str) -> Cancelled:
        return await self.api.cancel(token)

    async def status(self, *, include_ended: bool = False, refresh: bool = True, limit: int = 100) -> StatusResult:
        return await self.api.status(include_ended=include_ended, refresh=refresh, limit=limit, mine=True)

    async def view(self, instance_id: str) -> InstanceView:
        return await self.api.instance(instance_id)

    async def start_machine(self, instance_id: str, key: str | None = None) -> StartResult:
        return await self.api.start(instance_id, idempotency_key=key)

    async def stop(self, instance_id: str, key: str | None = None) -> StopResult:
        return await self.api.stop(instance_id, idempotency_key=key)

    async def destroy(self, instance_id: str, *, confirmed: bool = False,
                      key: str | None = None) -> DestroyResult | Confirmation:
        return await self.api.destroy(instance_id, confirmed=confirmed, idempotency_key=key)

    async def keep(self, instance_id: str, duration: str | None = None) -> KeepResult:
        return await self.api.keep(instance_id, duration)

    async def activity(self, instance_id: str, source: str = "notebook", detail: str | None = None) -> ActivityResult:
        return await self.api.activity(instance_id, source=source, detail=detail)

    async def costs(self, period: str | None = None, by: str | None = None) -> CostReport:
        return await self.api.costs(period, by=by)

    async def budgets(self) -> BudgetResult:
        return await self.api.budgets()


def from_environment(environ: dict[str, str] | None = None) -> Backend:
    """The team server when GPUHERD_SERVER and GPUHERD_API_KEY are set, else the local core."""
    env = os.environ if environ is None else environ
    url = env.get("GPUHERD_SERVER", "").strip()
    if url:
        return RemoteBackend(url, env.get("GPUHERD_API_KEY", ""))
    return LocalBackend()
