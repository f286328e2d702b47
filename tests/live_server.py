"""One real gpuherd server for the HTTP tests: uvicorn serving `create_app` on a loopback port
in a thread, the core's Runtime in the app's lifespan (readiness watcher, guards) as `gpuherd
serve` runs it, four API keys (admin in team ops, members alice in ml and bob in vision, a
viewer in ml). Shared by test_http_api, test_http_schema, test_http_stream and test_client."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from fastapi import FastAPI
from sqlalchemy import func, select

from gpuherd.bot.http.app import create_app
from gpuherd.bot.http.routes_stream import stop_streams
from gpuherd.core.config import Settings
from gpuherd.core.models import ApiKeyRecord, Budget, Instance, User
from gpuherd.core.runtime import Runtime
from gpuherd.core.service import GpuService

COUNTED = (Instance, Budget, User, ApiKeyRecord)
USERS = (("admin", "admin", "ops"), ("alice", "member", "ml"), ("bob", "member", "vision"), ("viewer", "viewer", "ml"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Server(uvicorn.Server):
    """uvicorn that ends the event streams first when it shuts down (as `gpuherd serve` does)."""

    app: FastAPI

    async def shutdown(self, sockets: Any = None) -> None:
        stop_streams(self.app)
        await super().shutdown(sockets)


@dataclass
class LiveServer:
    url: str
    service: GpuService
    app: FastAPI
    keys: dict[str, str]              # name -> API key
    server: _Server
    thread: threading.Thread

    def headers(self, who: str, **extra: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[who]}", **extra}

    def client(self, who: str | None = "admin", **headers: str) -> httpx.Client:
        auth = self.headers(who) if who else {}
        return httpx.Client(base_url=self.url + "/api/v1", headers={**auth, **headers}, timeout=30)

    def counts(self) -> dict[str, int]:
        """Rows in the tables a refused request must not touch."""
        with self.service.db.session() as s:
            return {m.__tablename__: int(s.execute(select(func.count()).select_from(m)).scalar_one())  # type: ignore[attr-defined]
                    for m in COUNTED}


def start_live(tmp_path: Path, db_url: str, *, time_scale: float = 0.0, boot_timeout_s: float = 30,
               **settings: Any) -> LiveServer:
    config = Settings(home=tmp_path / "home", database_url=db_url, local_user="root", local_role="admin",
                      sandbox_time_scale=time_scale, poll_interval_s=0.05, boot_timeout_s=boot_timeout_s, **settings)
    service = GpuService.from_settings(config)

    async def setup() -> dict[str, str]:
        root = service.local_actor("cli")
        made = {}
        for name, role, team in USERS:
            await service.set_user(root, f"api:{name}", role=role, team=team)
            made[name] = (await service.create_key(root, f"api:{name}")).key
        return made
    keys = asyncio.run(setup())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with Runtime(service, close_service=False):
            yield
    app = create_app(service, lifespan=lifespan)
    app.state.stream_poll_s = 0.1
    app.state.stream_heartbeat_s = 0.5
    port = free_port()
    server = _Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on",
                                    timeout_graceful_shutdown=5))
    server.app = app
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    return LiveServer(f"http://127.0.0.1:{port}", service, app, keys, server, thread)


def stop_live(live: LiveServer) -> None:
    live.server.should_exit = True
    live.thread.join(timeout=20)
    assert not live.thread.is_alive(), "the server did not shut down"
    asyncio.run(live.service.aclose())
