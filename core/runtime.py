"""One async context manager that starts and stops everything a gpuherd process needs around
the service, in order, so no surface copies the start-up sequence:

1. pending-boot recovery (intents a crash left: adopted or failed) and configured attachments;
2. the guard scheduler, which takes the guard lock when it can (PostgreSQL advisory lock, or a
   file lock with SQLite), and the readiness watcher, which works only while this process holds
   that lock (one process probes health and announces `instance.ready`);
3. one notice deliverer per surface this process serves (registered with `deliver` before the
   runtime is entered), each woken at once by notices written in this process and polling the
   outbox for those written by others.

Leaving it stops the deliverers, the watcher and the scheduler (releasing the lock, so a standby
takes over at once) and closes the service. A serving process passes `tune_collector=True` so
the garbage collector's full passes skip what start-up built (see `collector.py`). The shell, `gpuherd guards --run` and every later
surface (`gpuherd serve`, Slack, Discord, the notebook) enter it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Protocol

from .auth import Actor
from .collector import tune_for_serving
from .outbox import DeliveredNotice, Deliverer, audience
from .service import GpuService

if TYPE_CHECKING:
    from .scheduler import GuardScheduler

log = logging.getLogger(__name__)
Send = Callable[[DeliveredNotice], Awaitable[None]]


@dataclass
class _Surface:
    surface: str
    send: Send
    targets: set[str] | None
    recipient: str | None
    collapse: bool
    lease_s: float = 30.0
    deliverer: Deliverer | None = None


@dataclass
class Runtime:
    service: GpuService
    guards: bool = True                        # run the guard scheduler (and readiness watcher) here
    close_service: bool = True
    tune_collector: bool = False               # a serving process: set the collector up once start-up is done
    identity: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}")
    adopted: list[str] = field(default_factory=list)
    attached: list[str] = field(default_factory=list)
    _surfaces: list[_Surface] = field(default_factory=list)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _unsubscribe: list[Callable[[], None]] = field(default_factory=list)
    scheduler: GuardScheduler | None = None

    def deliver(self, surface: str, send: Send, *, targets: set[str] | None, recipient: str | None = None,
                collapse: bool = False, lease_s: float = 30.0) -> None:
        """Deliver the notices addressed to `targets` (None: every destination written for the
        surface) on `surface` through `send` while the runtime runs (register before entering
        it). `lease_s` is how long a claimed delivery is this process's: after a crash, what it
        had claimed waits that long to be sent again."""
        self._surfaces.append(_Surface(surface, send, targets, recipient, collapse, lease_s))

    def deliver_to_person(self, surface: str, actor: Actor, send: Send) -> None:
        """A surface that is one person's (the shell, a notebook): what core addresses to them.
        Writing to a terminal takes milliseconds, so a short lease: a shell killed mid-burst and
        opened again shows the rest within seconds."""
        self.deliver(surface, send, targets=audience(actor), recipient=actor.principal, collapse=True,
                     lease_s=6.0)

    @property
    def is_leader(self) -> bool:
        return bool(getattr(self.scheduler, "is_leader", False))

    async def __aenter__(self) -> Runtime:
        svc = self.service
        try:
            self.adopted = await svc.resolve_pending()
        except Exception:  # recovery must not keep the product from starting; reconcile retries
            log.exception("pending boots could not be resolved at start")
        try:
            self.attached = await svc.attach_configured()
        except Exception:
            log.exception("configured attachments failed")
        if self.guards:
            from .scheduler import GuardScheduler

            scheduler = GuardScheduler(svc)
            self.scheduler = scheduler
            await scheduler.start()
            self._tasks.append(asyncio.create_task(svc.operations.run(self._stop, lambda: scheduler.is_leader),
                                                   name="gpuherd-readiness"))
        for spec in self._surfaces:
            d = Deliverer(svc.db, svc.clock, surface=spec.surface, targets=spec.targets, send=spec.send,
                          identity=f"{self.identity}:{spec.surface}", recipient=spec.recipient,
                          collapse=spec.collapse, lease_s=spec.lease_s)
            spec.deliverer = d
            self._unsubscribe.append(svc.outbox.wake_on_commit(d.nudge))
            self._tasks.append(asyncio.create_task(d.run(self._stop), name=f"gpuherd-deliver-{spec.surface}"))
        if self.tune_collector:
            state = tune_for_serving()
            log.debug("collector: %d start-up objects frozen, thresholds %s", state.frozen, state.thresholds)
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        self._stop.set()
        for unsubscribe in self._unsubscribe:
            unsubscribe()
        if self._tasks:
            _done, pending = await asyncio.wait(self._tasks, timeout=10)
            for task in pending:
                task.cancel()
        if self.scheduler is not None:
            await self.scheduler.stop()
        if self.close_service:
            await self.service.aclose()

    async def deliver_now(self) -> int:
        """Deliver what is due on every surface once (tests, and the end of a one-shot command)."""
        sent = 0
        for spec in self._surfaces:
            if spec.deliverer is not None:
                sent += await spec.deliverer.deliver_once()
        return sent


class Guest(Protocol):
    """A surface that runs inside a Runtime (Slack's and Discord's runners): it registers its
    notice deliverer before the runtime starts (`prepare`) and holds its connections while the
    runtime runs (`around`)."""

    def prepare(self, runtime: Runtime) -> None: ...

    def around(self, runtime: Runtime) -> contextlib.AbstractAsyncContextManager[None]: ...


async def run_until_signalled(service: GpuService, guest: Guest, name: str) -> int:
    """Run one surface alone (`gpuherd slack`, `gpuherd discord`) with the core runtime until
    SIGINT or SIGTERM, then leave in order (the guest's connections first, then the runtime,
    which releases the guard lock). The same sequence for every standalone surface."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    runtime = Runtime(service, tune_collector=True)
    guest.prepare(runtime)
    async with runtime, guest.around(runtime):
        log.info("gpuherd %s running (Ctrl-C to stop)", name)
        await stop.wait()
    return 0
