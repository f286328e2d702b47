"""Builds the set of configured providers. Real providers join here as they are written; a
provider without credentials is simply not configured. The sandbox is used when nothing else is
(or when asked for) so gpuherd always runs, clearly labelled as simulated."""

from __future__ import annotations

import difflib

from ..config import Settings
from ..errors import NotFound
from .base import Provider


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

    async def aclose(self) -> None:
        for provider in self._providers.values():
            await provider.aclose()


def build_registry(settings: Settings) -> ProviderRegistry:
    from ..clock import Clock
    from .sandbox import SandboxProvider

    providers: dict[str, Provider] = {}
    # real providers (vast, runpod, aws, surf) are added here when their credentials are set
    if settings.sandbox == "on" or (settings.sandbox == "auto" and not providers):
        providers["sandbox"] = SandboxProvider(
            settings.home / "sandbox.json", seed=settings.sandbox_seed,
            time_scale=settings.sandbox_time_scale, clock=Clock(), faults=settings.sandbox_faults)
    if settings.providers is not None:
        wanted = set(settings.providers)
        providers = {k: v for k, v in providers.items() if k in wanted}
    return ProviderRegistry(providers)
