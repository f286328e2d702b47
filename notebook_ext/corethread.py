"""The loop gpuherd's core runs on inside a kernel or a script: one asyncio loop on a daemon
thread ("gpuherd-core").

Decisions:
- The core (the local `GpuService` with its guards and readiness watcher, or the HTTP client of a
  team server, and the kernel's activity pings) does not run on ipykernel's loop. A notebook cell
  that blocks — a training loop, `time.sleep`, a blocking `Gpu.boot(wait=True)` — blocks that loop
  for as long as it runs, and the guards, a boot's progress and the pings that keep a busy machine
  alive must not stop with it. The panel's handlers are coroutines on ipykernel's loop that await
  the core here (`call`), so they never block the kernel either.
- Sync callers (`Gpu.boot`, a script) wait with `run`, which may not be called from this loop
  (it would wait on itself). An interrupted wait (Ctrl-C, a kernel interrupt) does not cancel the
  work: a boot that reached the provider must finish so the caller's cleanup can stop it
  (`shielded=True` leaves the future running; the caller decides).
- `call` from another loop cancels the core side when the awaiting task is cancelled, unless
  `shielded`."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


class CoreLoop:
    def __init__(self, name: str = "gpuherd-core") -> None:
        self.name = name
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None or self._loop.is_closed():
                ready = threading.Event()
                loop = asyncio.new_event_loop()

                def main() -> None:
                    asyncio.set_event_loop(loop)
                    loop.call_soon(ready.set)
                    loop.run_forever()
                self._thread = threading.Thread(target=main, name=self.name, daemon=True)
                self._thread.start()
                ready.wait()
                self._loop = loop
            return self._loop

    def on_core_thread(self) -> bool:
        return self._thread is not None and threading.current_thread() is self._thread

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Coroutine[Any, Any, T], *, timeout: float | None = None, shielded: bool = False) -> T:
        """Run `coro` on the core loop and wait for it here (a sync caller)."""
        if self.on_core_thread():
            coro.close()
            raise RuntimeError("gpuherd: a blocking call on the core's own loop; use the async form (await …)")
        future = self.submit(coro)
        try:
            return future.result(timeout)
        except BaseException:
            if not shielded and not future.done():
                future.cancel()
            raise

    async def call(self, coro: Coroutine[Any, Any, T], *, shielded: bool = False) -> T:
        """Await `coro` on the core loop from any loop (the kernel's, a test's)."""
        if self.on_core_thread():
            return await coro
        future = self.submit(coro)
        if shielded:
            return await asyncio.shield(asyncio.wrap_future(future))
        return await asyncio.wrap_future(future)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the loop (after the caller closed what runs on it)."""
        with self._lock:
            loop, thread = self._loop, self._thread
            self._loop = self._thread = None
        if loop is None or loop.is_closed():
            return
        loop.call_soon_threadsafe(loop.stop)
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
        if not loop.is_running():
            loop.close()


class InlineCore(CoreLoop):
    """The core on the caller's own loop (headless tests, benchmarks): `call` awaits directly, so
    a test that clicks a button can await the work it started; blocking `run` is refused."""

    def __init__(self) -> None:
        super().__init__("inline")
        self._inline: asyncio.AbstractEventLoop | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._inline is None:
            self._inline = asyncio.get_running_loop()
        return self._inline

    def on_core_thread(self) -> bool:
        return True

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        raise RuntimeError("InlineCore runs on the caller's loop: await call() instead")

    async def call(self, coro: Coroutine[Any, Any, T], *, shielded: bool = False) -> T:
        if shielded:
            return await asyncio.shield(coro)
        return await coro

    def stop(self, timeout: float = 5.0) -> None:
        self._inline = None
