"""Typed errors. Every error a user can cause carries a message fit to show in chat as-is;
surfaces print `error.message` and never a traceback."""

from __future__ import annotations


class GpuherdError(Exception):
    """Base of every error meant for a user. `message` is safe to show (no secrets)."""

    code = "error"

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


class ConfigError(GpuherdError):
    code = "config"


class InvalidInput(GpuherdError):
    """Bad user input: a command, a query, an override, a budget amount."""

    code = "invalid_input"


class QueryError(InvalidInput):
    """A search query that cannot be parsed; names the offending token."""

    code = "bad_query"

    def __init__(self, message: str, *, token: str | None = None, position: int | None = None,
                 hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.token = token
        self.position = position


class NotFound(GpuherdError):
    code = "not_found"


class PermissionDenied(GpuherdError):
    code = "forbidden"


class Unauthenticated(GpuherdError):
    """No credentials, or credentials that are not (any longer) valid: an API key unknown,
    malformed or revoked. The message never repeats the key."""

    code = "unauthenticated"


class Conflict(GpuherdError):
    """The action does not fit the current state (stopping a stopped instance)."""

    code = "conflict"


class NoMatchingOffer(GpuherdError):
    code = "no_offer"


class ProviderError(GpuherdError):
    """A provider call failed. `retryable` says whether trying again may help."""

    code = "provider"
    retryable = False

    def __init__(self, provider: str, message: str, *, hint: str | None = None) -> None:
        super().__init__(f"{provider}: {message}", hint=hint)
        self.provider = provider


class ProviderUnavailable(ProviderError):
    """5xx, connection refused: retry with backoff."""

    code = "provider_unavailable"
    retryable = True


class ProviderTimeout(ProviderError):
    code = "provider_timeout"
    retryable = True


class RateLimited(ProviderError):
    code = "rate_limited"
    retryable = True

    def __init__(self, provider: str, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(provider, message)
        self.retry_after = retry_after


class CapacityError(ProviderError):
    """The offer was taken or the region has no capacity: pick another offer, do not retry it."""

    code = "capacity"


class AuthError(ProviderError):
    code = "auth"


class ProviderStateError(ProviderError):
    """The provider refused the action in the machine's current state."""

    code = "provider_state"
