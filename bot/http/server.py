"""`gpuherd serve`: the team server. One process: the HTTP API on uvicorn, and around it the
core's `Runtime` (migrations were run by `GpuService.from_settings`; then pending-boot recovery,
the guard scheduler with leader election, the readiness watcher, notice delivery).

Decisions:

- The Runtime lives in the app's lifespan, so it starts before the first request is accepted
  and is left only after the last in-flight request has finished; it is on `app.state.runtime`
  for `/ready` (is this replica the guard leader?).
- The listening socket is bound here, before anything starts: a port in use is a one-line error
  (exit 2), not a Runtime started and torn down again. `--port 0` takes a free port; the
  "serving on" log line names the real one.
- Shutdown on SIGTERM or SIGINT: uvicorn stops accepting, tells open connections to close,
  waits up to `GRACEFUL_S` for in-flight requests (then cancels them), and runs the lifespan's
  exit, which leaves the Runtime: the scheduler finishes its pass, releases the guard lock (a
  standby takes over at its next retry, `guard_leader_retry_s`), and the service closes. Event
  streams are told to end at the first signal (`routes_stream.stop_streams`), since uvicorn
  waits for open responses before the lifespan exit. A second SIGINT forces an exit at once
  (uvicorn's rule); the OS then drops the lock with the process.
- uvicorn's own `capture_signals` re-raises the captured signal after a graceful shutdown, so a
  SIGTERM'd server would die of SIGTERM (exit -15) even though it shut down cleanly. Our
  `Server` installs its handlers on the event loop and does not re-raise: a clean shutdown exits
  0, which is what systemd's `Restart=on-failure` and Kubernetes read.
- No access log: paths can carry confirmation tokens; request latency by route is in
  `/metrics`. Logging goes to stderr (containers and journald collect it).
- Budget of a stop: `GRACEFUL_S` (15 s) for requests + the Runtime's exit (its tasks get 10 s,
  a guard pass in progress up to 60 s, usually milliseconds). The manifests give 45 s before a
  SIGKILL."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any, Protocol

import uvicorn
from fastapi import FastAPI

from gpuherd.core.config import Settings
from gpuherd.core.errors import ConfigError
from gpuherd.core.runtime import Runtime
from gpuherd.core.service import GpuService

from .app import create_app
from .metrics import app_metrics
from .routes_stream import stop_streams

log = logging.getLogger(__name__)
GRACEFUL_S = 15.0
SIGNALS = (signal.SIGINT, signal.SIGTERM)
Prepare = Callable[[Runtime], None]


class Hosted(Protocol):
    """A chat surface the server hosts (Slack, Discord): it registers its notice deliverer
    (`prepare`, before the Runtime starts), runs its connections inside the Runtime (`around`),
    and may add its own routes (`mount`, e.g. Slack's /slack/events)."""

    def prepare(self, runtime: Runtime) -> None: ...

    def around(self, runtime: Runtime) -> contextlib.AbstractAsyncContextManager[None]: ...

    def mount(self, app: FastAPI) -> None: ...


def hosted_surfaces(service: GpuService) -> list[Hosted]:
    """The chat surfaces configured for this server (none without their tokens)."""
    out: list[Hosted] = []
    if service.settings.slack_bot_token is not None:
        try:
            from gpuherd.bot.slack.run import SlackRunner
        except ImportError as exc:
            raise ConfigError(f"Slack is configured but its extra is missing ({exc.name}): "
                              "pip install 'gpuherd[slack]'.") from None
        out.append(SlackRunner(service))
    if service.settings.discord_bot_token is not None:
        try:
            from gpuherd.bot.discord.run import DiscordRunner
        except ImportError as exc:
            raise ConfigError(f"Discord is configured but its extra is missing ({exc.name}): "
                              "pip install 'gpuherd[discord]'.") from None
        out.append(DiscordRunner(service))
    return out


def make_app(service: GpuService, *, prepare: list[Prepare] | None = None,
             hosted: Sequence[Hosted] = (), tune_collector: bool = False) -> FastAPI:
    """The app with the Runtime in its lifespan. `prepare` hooks see the Runtime before it is
    entered (a chat surface registers its notice deliverer there with `runtime.deliver`);
    `hosted` surfaces also run inside it and may mount routes. `tune_collector` is for the
    serving process (`serve`): an app started inside another process (a test) keeps its
    collector as it is."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        runtime = Runtime(service, tune_collector=tune_collector)
        for hook in prepare or ():
            hook(runtime)
        for surface in hosted:
            surface.prepare(runtime)
        app_metrics(app).routes.warm()     # before the first request, not during it
        async with runtime, contextlib.AsyncExitStack() as stack:
            for surface in hosted:
                await stack.enter_async_context(surface.around(runtime))
            app.state.runtime = runtime
            log.info("runtime started as %s (%s)", runtime.identity,
                     runtime.scheduler.leadership.describe() if runtime.scheduler else "no guards")
            try:
                yield
            finally:
                log.info("leaving the runtime: guards stop, the guard lock is released")
        log.info("runtime stopped")

    app = create_app(service, lifespan=lifespan)
    for surface in hosted:
        surface.mount(app)
    return app


class Server(uvicorn.Server):
    """uvicorn's server with signal handling that ends in exit code 0 (see the module docstring)."""

    def __init__(self, config: uvicorn.Config, app: FastAPI) -> None:
        super().__init__(config)
        self.app = app
        self.signals: list[int] = []

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        try:
            loop = asyncio.get_running_loop()
            for sig in SIGNALS:
                loop.add_signal_handler(sig, self._on_signal, sig)
        except (RuntimeError, ValueError):    # not the main thread (tests run servers in threads)
            yield
            return
        try:
            yield
        finally:
            for sig in SIGNALS:
                loop.remove_signal_handler(sig)

    def _on_signal(self, sig: int) -> None:
        first = not self.should_exit
        self.signals.append(sig)
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True
        self.should_exit = True
        if first:
            self.app.state.stopping = True    # /ready answers 503 from now on
            log.info("%s: finishing in-flight requests (up to %.0f s), then leaving the runtime",
                     signal.Signals(sig).name, self.config.timeout_graceful_shutdown or 0)
            try:
                stop_streams(self.app)
            except Exception:  # never let ending the streams keep the server from stopping
                log.exception("could not end the event streams")


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, or a ConfigError naming the address (in use, not ours, bad host)."""
    if not 0 <= port <= 65535:
        raise ConfigError(f"--port must be between 0 and 65535, not {port}.")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        sock = socket.create_server((host, port), family=family, backlog=2048)
    except OSError as exc:
        raise ConfigError(f"Cannot listen on {host}:{port}: {exc.strerror or exc}.") from None
    sock.set_inheritable(True)
    return sock


def build_server(service: GpuService, sock: socket.socket, *, graceful_s: float = GRACEFUL_S,
                 prepare: list[Prepare] | None = None, hosted: Sequence[Hosted] = (), tune_collector: bool = False,
                 **config: Any) -> Server:
    host, port = sock.getsockname()[:2]
    app = make_app(service, prepare=prepare, hosted=hosted, tune_collector=tune_collector)
    cfg = uvicorn.Config(app, host=host, port=port, lifespan="on", log_config=None, access_log=False,
                         server_header=False, timeout_graceful_shutdown=int(graceful_s) or 1, **config)
    return Server(cfg, app)


def serve(host: str = "127.0.0.1", port: int = 8080, settings: Settings | None = None, *,
          graceful_s: float = GRACEFUL_S) -> int:
    """Run the team server until SIGTERM or SIGINT; 0 after a clean shutdown."""
    logging.getLogger("apscheduler").setLevel(logging.WARNING)   # it logs every guard wake-up at INFO
    sock = bind(host, port)
    try:
        service = GpuService.from_settings(settings)
    except BaseException:
        sock.close()
        raise
    try:
        hosted = hosted_surfaces(service)
    except BaseException:
        sock.close()
        raise
    server = build_server(service, sock, graceful_s=graceful_s, hosted=hosted, tune_collector=True)
    bound_host, bound_port = sock.getsockname()[:2]
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    log.info("gpuherd serving on http://%s:%d (API /api/v1, docs /docs)", shown, bound_port)
    try:
        server.run(sockets=[sock])
    except SystemExit as exc:         # uvicorn's exit when the lifespan (the Runtime) failed to start
        if exc.code:
            raise ConfigError("The server did not start: its runtime failed (the log above says why).") from None
    finally:
        sock.close()
    if not server.started:
        raise ConfigError("The server did not start (the log above says why).")
    log.info("gpuherd stopped (%s)", ", ".join(signal.Signals(s).name for s in server.signals) or "no signal")
    return 0
