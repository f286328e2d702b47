"""Builds the set of configured providers. Real providers join here as they are written; a
provider without credentials is simply not configured. The sandbox is used when nothing else is
(or when asked for) so gpuherd always runs, clearly labelled as simulated."""

from __future__ import annotations

import difflib
import logging
from collections.abc import Callable

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
    from .runpod import RunPodProvider
    from .sandbox import SandboxProvider
    from .surf import SurfProvider
    from .vast import VastProvider

    providers: dict[str, Provider] = {}
    wanted = set(settings.providers) if settings.providers is not None else None
    factories: list[tuple[str, Callable[[Settings], Provider | None]]] = [
        ("vast", VastProvider.from_settings),
        ("runpod", RunPodProvider.from_settings),
        ("aws", _aws),
        ("surf", SurfProvider.from_settings),
    ]
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


def _aws(settings: Settings) -> Provider | None:
    """AWS needs boto3 (the `aws` extra); without it AWS is simply not configured."""
    try:
        from .aws import AwsProvider
    except ImportError as exc:
        if settings.aws == "on":
            log.warning("aws=on but boto3 is not installed (pip install 'gpuherd[aws]'): %s", exc)
        return None
    return AwsProvider.from_settings(settings)
