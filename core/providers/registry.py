"""Builds the set of configured providers. Real providers join here as they are written; a
provider without credentials is simply not configured. The sandbox is used when nothing else is
(or when asked for) so gpuherd always runs, clearly labelled as simulated."""

from __future__ import annotations

import difflib
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path

from ..config import Settings
from ..errors import NotFound
from .base import Capabilities, Provider

log = logging.getLogger(__name__)


class ProviderRegistry:
    def __init__(self, providers: dict[str, Provider]) -> None:
        self._providers = dict(providers)

    def names(self) -> list[str]:
        return list(self._providers)

    def all(self) -> list[Provider]:
        return list(self._providers.values())

    def get(self, name: str) -> Provider:
        try:
            return self._providers[name]
        except KeyError:
            close = difflib.get_close_matches(name, self._providers, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise NotFound(f"Provider '{name}' is not configured{hint}. Configured: "
                           f"{', '.join(self._providers) or 'none'}.") from None

    def __contains__(self, name: str) -> bool:
        return name in self._providers

    def capabilities(self) -> dict[str, Capabilities]:
        """What each configured provider can do, by name (views offer only what it can)."""
        return {name: p.capabilities for name, p in self._providers.items()}

    async def aclose(self) -> None:
        for provider in self._providers.values():
            await provider.aclose()


def build_registry(settings: Settings) -> ProviderRegistry:
    """Every provider whose credentials are set, in a fixed order, plus the sandbox when nothing
    real is configured (sandbox=auto) or when asked for (sandbox=on)."""
    from ..clock import Clock
    from .sandbox import SandboxProvider

    providers: dict[str, Provider] = {}
    wanted = set(settings.providers) if settings.providers is not None else None
    factories: list[tuple[str, Callable[[Settings], Provider | None]]] = [
        ("vast", _vast), ("runpod", _runpod), ("aws", _aws), ("surf", _surf)]
    for name, factory in factories:
        if wanted is not None and name not in wanted:
            continue
        provider = factory(settings)
        if provider is not None:
            providers[name] = provider
            log.info("provider %s configured", name)
    if settings.sandbox == "on" or (settings.sandbox == "auto" and not providers):
        if wanted is None or "sandbox" in wanted:
            providers["sandbox"] = SandboxProvider(
                settings.home / "sandbox.json", seed=settings.sandbox_seed,
                time_scale=settings.sandbox_time_scale, clock=Clock(), faults=settings.sandbox_faults,
                latency_s=settings.sandbox_latency_s)
    return ProviderRegistry(providers)


# A provider's module (and httpx with it) is imported only when its credential is set: a start on
# the sandbox alone loads none of them.
def _vast(settings: Settings) -> Provider | None:
    if settings.vast_api_key is None:
        return None
    from .vast import VastProvider

    return VastProvider.from_settings(settings)


def _runpod(settings: Settings) -> Provider | None:
    if settings.runpod_api_key is None:
        return None
    from .runpod import RunPodProvider

    return RunPodProvider.from_settings(settings)


def _surf(settings: Settings) -> Provider | None:
    if settings.surf_api_token is None:
        return None
    from .surf import SurfProvider

    return SurfProvider.from_settings(settings)


# What the AWS credential chain reads before it would ask the network (instance metadata): with
# none of these, `aws=auto` does not import boto3 at all (about 0.15 s of every start).
_AWS_ENV = ("AWS_ACCESS_KEY_ID", "AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_WEB_IDENTITY_TOKEN_FILE",
            "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI",
            "AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE", "AWS_ENDPOINT_URL")


def aws_configuration_present(environ: Mapping[str, str] | None = None, home: Path | None = None) -> bool:
    """Whether anything on this machine configures AWS without asking the network: the
    environment variables the chain reads, or `~/.aws/credentials` / `~/.aws/config` (which also
    hold SSO profiles). An EC2 instance role alone is found only with `aws=on` (documented): asking
    instance metadata on every start of every machine that is not on EC2 costs a timeout."""
    env = os.environ if environ is None else environ
    if any(env.get(name) for name in _AWS_ENV):
        return True
    base = (home or Path.home()) / ".aws"
    return (base / "credentials").is_file() or (base / "config").is_file()


def _aws(settings: Settings) -> Provider | None:
    """AWS needs boto3 (the `aws` extra); without it AWS is simply not configured. `aws=auto`
    without any AWS configuration (see `aws_configuration_present`) is not configured either."""
    if settings.aws == "off" or (settings.aws == "auto" and not aws_configuration_present()):
        return None
    try:
        from .aws import AwsProvider
    except ImportError as exc:
        if settings.aws == "on":
            log.warning("aws=on but boto3 is not installed (pip install 'gpuherd[aws]'): %s", exc)
        return None
    return AwsProvider.from_settings(settings)
