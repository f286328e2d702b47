"""`run_until_signalled`: the one start/stop sequence of every standalone surface (`gpuherd slack`,
`gpuherd discord`): the guest registers before the runtime starts, holds its connections while it
runs, and a SIGTERM ends both in order, the guard lock released."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import AsyncIterator

from gpuherd.core.leader import guards_held_elsewhere
from gpuherd.core.runtime import Runtime, run_until_signalled
from gpuherd.core.service import GpuService


class _Guest:
    def __init__(self) -> None:
        self.events: list[str] = []

    def prepare(self, runtime: Runtime) -> None:
        self.events.append("prepare")
        assert runtime.scheduler is None          # before the runtime started

    @contextlib.asynccontextmanager
    async def around(self, runtime: Runtime) -> AsyncIterator[None]:
        self.events.append("enter")
        assert runtime.scheduler is not None      # inside the running runtime
        try:
            yield
        finally:
            self.events.append("leave")


async def test_sigterm_ends_the_guest_then_the_runtime(service: GpuService) -> None:
    guest = _Guest()
    settings = service.settings
    task = asyncio.create_task(run_until_signalled(service, guest, "test"))
    for _ in range(200):
        if "enter" in guest.events:
            break
        await asyncio.sleep(0.02)
    assert guest.events == ["prepare", "enter"]
    os.kill(os.getpid(), signal.SIGTERM)          # handled by the loop: this test process lives on
    assert await asyncio.wait_for(task, 10) == 0
    assert guest.events == ["prepare", "enter", "leave"]
    assert not await asyncio.to_thread(guards_held_elsewhere, settings.database_url, settings.home)
    asyncio.get_running_loop().remove_signal_handler(signal.SIGTERM)
    asyncio.get_running_loop().remove_signal_handler(signal.SIGINT)
