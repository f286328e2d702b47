"""Providers: one module per cloud behind `Provider` (base.py); `registry` builds the configured set."""

from .base import Capabilities, CreateRequest, Provider, ProviderInstance, ProviderState

__all__ = ["Capabilities", "CreateRequest", "Provider", "ProviderInstance", "ProviderState"]
