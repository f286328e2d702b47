"""Starting Slack: inside `gpuherd serve` (HTTP mode at `/slack/events` when the signing secret
is set, Socket Mode when the app token is) or on its own (`gpuherd slack`, Socket Mode).

Either way the Slack surface registers its notice deliverer with the core `Runtime` before the
runtime starts (`prepare`), and its Socket Mode connection lives inside the runtime (`around`),
so it connects after recovery and the guards have started and disconnects before they stop."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from gpuherd.core.config import Settings
from gpuherd.core.errors import ConfigError
from gpuherd.core.runtime import Runtime, run_until_signalled
from gpuherd.core.service import GpuService

from .app import SlackSurface
from .deliver import SlackNotices

log = logging.getLogger(__name__)


def check(settings: Settings) -> None:
    """Say what is missing, naming the variables, instead of starting half a Slack app."""
    if settings.slack_bot_token is None:
        raise ConfigError("Slack needs SLACK_BOT_TOKEN (the bot token, xoxb-…; README, Slack).")
    if settings.slack_app_token is None and settings.slack_signing_secret is None:
        raise ConfigError("Slack needs SLACK_APP_TOKEN (Socket Mode, xapp-…) or SLACK_SIGNING_SECRET (HTTP mode "
                          "at /slack/events).")
    token = settings.slack_app_token.get_secret_value() if settings.slack_app_token else None
    if token is not None and not token.startswith("xapp-"):
        raise ConfigError("SLACK_APP_TOKEN must be an app-level token (it starts with xapp-).")


class SlackRunner:
    """The Slack surface of one process: the bolt app, its deliverer and its Socket Mode
    connection (when an app token is set)."""

    def __init__(self, service: GpuService, settings: Settings | None = None) -> None:
        self.settings = settings or service.settings
        check(self.settings)
        self.surface = SlackSurface(service, self.settings)
        self.notices = SlackNotices(self.surface)
        self.socket: Any = None

    @property
    def http_mode(self) -> bool:
        return self.settings.slack_signing_secret is not None

    @property
    def socket_mode(self) -> bool:
        return self.settings.slack_app_token is not None

    def prepare(self, runtime: Runtime) -> None:
        runtime.deliver("slack", self.notices.send, targets=None)

    @contextlib.asynccontextmanager
    async def around(self, runtime: Runtime) -> AsyncIterator[None]:
        await self.surface.warm()
        if self.socket_mode:
            from slack_bolt.adapter.socket_mode.async_handler import AsyncSocketModeHandler

            assert self.settings.slack_app_token is not None
            self.socket = AsyncSocketModeHandler(self.surface.app, self.settings.slack_app_token.get_secret_value())
            await self.socket.connect_async()
            log.info("slack: connected in Socket Mode")
        try:
            yield
        finally:
            if self.socket is not None:
                with contextlib.suppress(Exception):
                    await self.socket.close_async()
            await self.surface.aclose()

    def mount(self, app: Any) -> None:
        """HTTP mode: Slack's requests at POST /slack/events (verified by bolt; a bad or old
        signature is refused with 401 before anything runs)."""
        from slack_bolt.adapter.starlette.async_handler import AsyncSlackRequestHandler
        from slack_sdk.signature import SignatureVerifier
        from starlette.responses import JSONResponse

        handler = AsyncSlackRequestHandler(self.surface.app)
        assert self.settings.slack_signing_secret is not None
        verifier = SignatureVerifier(self.settings.slack_signing_secret.get_secret_value())

        async def slack_events(request: Any) -> Any:
            """A plain Starlette route (bolt reads the raw body). The signature is checked here
            first, as bolt would, because bolt parses the body before its own check and a
            payload that is not JSON would otherwise end in a 500."""
            body = await request.body()
            stamp = request.headers.get("x-slack-request-timestamp", "")
            signature = request.headers.get("x-slack-signature", "")
            # a missing or non-numeric timestamp would make slack_sdk's check raise: refuse it first
            if not (stamp.isascii() and stamp.isdigit() and len(stamp) <= 12) or not signature \
                    or not verifier.is_valid(body, stamp, signature):
                return JSONResponse({"error": "invalid request"}, status_code=401)
            try:
                return await handler.handle(request)
            except ValueError:                # a form `payload` that is not JSON
                return JSONResponse({"error": "the payload is not JSON"}, status_code=400)

        app.add_route("/slack/events", slack_events, methods=["POST"], include_in_schema=False)


async def run_socket_mode(settings: Settings | None = None) -> int:
    """`gpuherd slack`: Slack in Socket Mode with the core runtime, until SIGINT or SIGTERM."""
    service = GpuService.from_settings(settings)
    runner = SlackRunner(service)
    if not runner.socket_mode:
        raise ConfigError("gpuherd slack runs Socket Mode: set SLACK_APP_TOKEN (xapp-…). HTTP mode runs inside "
                          "gpuherd serve at /slack/events.")
    return await run_until_signalled(service, runner, "slack")
