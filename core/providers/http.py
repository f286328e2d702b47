"""The HTTP layer every REST/GraphQL provider shares: one httpx.AsyncClient per provider, retries
the way vast.ai's official client does them, and every failure turned into a typed error whose
message names the provider and never the key.

Retry policy (vast.ai CLI 1.9.1, `VastClient._request`): statuses 429, 502, 503, 504 and
connection errors/timeouts are retried; a numeric Retry-After up to 60 s is honoured, a longer one
stops retrying; otherwise exponential backoff with jitter. Requests that are not safe to repeat
(creating a machine) are only retried when the server certainly did not act on them: a 429, or a
connection that was never established. Everything else is reported, and the service looks for the
machine by its label instead of creating a second one.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

import httpx

from ..errors import (
    AuthError,
    CapacityError,
    ProviderError,
    ProviderStateError,
    ProviderTimeout,
    ProviderUnavailable,
    RateLimited,
)

log = logging.getLogger(__name__)

RETRY_STATUSES = frozenset({429, 502, 503, 504})
MAX_RETRY_AFTER_S = 60.0


class NotFoundAtProvider(ProviderError):
    """404 for a machine id: callers turn this into `None` (get) or success (destroy)."""

    code = "provider_not_found"


class ApiClient:
    """JSON over HTTP with retries and error mapping. `display` is the provider's name in
    messages ("vast.ai"); `secrets` are scrubbed from every message that could reach a user."""

    def __init__(self, *, provider: str, display: str, base_url: str, headers: Mapping[str, str],
                 secrets: Iterable[str] = (), timeout_s: float = 30.0, attempts: int = 3,
                 backoff_s: float = 0.15, backoff_factor: float = 1.5, max_backoff_s: float = 10.0,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                 rng: random.Random | None = None,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.provider = provider
        self.display = display
        self.base_url = base_url.rstrip("/")
        self.attempts = max(1, attempts)
        self.backoff_s = backoff_s
        self.backoff_factor = backoff_factor
        self.max_backoff_s = max_backoff_s
        self._sleep = sleep
        self._rng = rng or random.Random()
        self._secrets = [s for s in secrets if s]
        self._client = httpx.AsyncClient(base_url=self.base_url, headers=dict(headers),
                                         timeout=httpx.Timeout(timeout_s), transport=transport,
                                         follow_redirects=False)

    async def aclose(self) -> None:
        await self._client.aclose()

    # --- public ------------------------------------------------------------------------
    async def request(self, method: str, path: str, *, json_body: Any = None,
                      params: Mapping[str, Any] | None = None, idempotent: bool = True,
                      what: str = "", expect_json: bool = True,
                      classify: Callable[[httpx.Response, Any], ProviderError | None] | None = None,
                      headers: Mapping[str, str] | None = None) -> Any:
        """Send, retry where safe, and return the decoded JSON (None for an empty body).
        `classify` lets a provider map its own error bodies before the generic mapping;
        `headers` are added to (and override) the client's for this request only."""
        what = what or f"{method} {path}"
        delay = self.backoff_s
        for attempt in range(1, self.attempts + 1):
            last = attempt == self.attempts
            try:
                response = await self._client.request(method, path, json=json_body, params=params,
                                                      headers=headers)
            except httpx.TimeoutException as exc:
                if idempotent and not last and not isinstance(exc, httpx.PoolTimeout):
                    await self._pause(delay, what, "timeout")
                    delay *= self.backoff_factor
                    continue
                raise ProviderTimeout(self.display, f"{what} timed out: {self.display} did not answer "
                                                    "in time") from None
            except httpx.ConnectError:
                # the request never reached the server, so even a create is safe to repeat
                if not last:
                    await self._pause(delay, what, "connection refused")
                    delay *= self.backoff_factor
                    continue
                raise ProviderUnavailable(self.display, f"cannot connect to {self._where()} ({what})") from None
            except httpx.TransportError as exc:
                if idempotent and not last:
                    await self._pause(delay, what, type(exc).__name__)
                    delay *= self.backoff_factor
                    continue
                raise ProviderUnavailable(self.display, f"{what} failed: connection error "
                                                        f"({type(exc).__name__})") from None
            status = response.status_code
            if status in RETRY_STATUSES and not last and (idempotent or status == 429):
                body = _body(response)
                if status == 429 and _is_search_quota(body):
                    raise self._error(response, body, what, classify)
                wait = _retry_after(response)
                if wait is not None and wait > MAX_RETRY_AFTER_S:
                    raise self._error(response, body, what, classify)
                await self._pause(wait if wait is not None else delay, what, f"HTTP {status}",
                                  jitter=wait is None)
                delay *= self.backoff_factor
                continue
            if status >= 400:
                raise self._error(response, _body(response), what, classify)
            if not expect_json:
                return response.text
            if not response.content or status == 204:
                return None
            try:
                decoded = response.json()
            except (json.JSONDecodeError, UnicodeDecodeError, ValueError):
                raise ProviderError(self.display, f"{what}: {self.display} answered with malformed JSON "
                                                  f"(HTTP {status})") from None
            if classify is not None:
                problem = classify(response, decoded)
                if problem is not None:
                    # an error inside a 200 (GraphQL) that says "try again" is retried like a 503
                    if problem.retryable and idempotent and not last:
                        wait = getattr(problem, "retry_after", None)
                        await self._pause(wait if wait is not None else delay, what, problem.code,
                                          jitter=wait is None)
                        delay *= self.backoff_factor
                        continue
                    raise problem
            return decoded
        raise AssertionError("unreachable")

    # --- helpers -----------------------------------------------------------------------
    def scrub(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    def _where(self) -> str:
        return self.scrub(self.base_url)

    async def _pause(self, delay: float, what: str, why: str, *, jitter: bool = True) -> None:
        wait = min(delay, self.max_backoff_s) if jitter else delay
        if jitter:
            wait = wait * (0.5 + self._rng.random())  # ±50 %: replicas do not retry in lockstep
        log.info("%s: %s %s, retrying in %.2fs", self.display, what, why, wait)
        await self._sleep(wait)

    def _error(self, response: httpx.Response, body: Any, what: str,
               classify: Callable[[httpx.Response, Any], ProviderError | None] | None) -> ProviderError:
        if classify is not None:
            problem = classify(response, body)
            if problem is not None:
                return problem
        status = response.status_code
        detail = self.scrub(error_text(body))[:300]
        suffix = f": {detail}" if detail else ""
        if status in (401, 403):
            return AuthError(self.display, f"the API key was refused (HTTP {status}{suffix}). Check the key "
                                           "gpuherd is configured with.")
        if status == 429:
            if _is_search_quota(body):
                reset = response.headers.get("X-RateLimit-Reset")
                when = f"; it resets at {reset} (unix time)" if reset else "; it resets at midnight UTC"
                return ProviderError(self.display, f"daily search quota used up{when}")
            wait = _retry_after(response)
            more = f"; it asks to wait {wait:g}s" if wait is not None else ""
            return RateLimited(self.display, f"too many requests (HTTP 429){more}", retry_after=wait)
        if status == 404:
            return NotFoundAtProvider(self.display, f"{what}: not found (HTTP 404{suffix})")
        if status == 410:
            return CapacityError(self.display, f"{what}: gone (HTTP 410{suffix})")
        if status == 409:
            return ProviderStateError(self.display, f"{what}: refused in the current state (HTTP 409{suffix})")
        if status >= 500:
            return ProviderUnavailable(self.display, f"{what}: server error (HTTP {status}{suffix})")
        return ProviderError(self.display, f"{what}: refused (HTTP {status}{suffix})")


def _body(response: httpx.Response) -> Any:
    try:
        return response.json()
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError):
        return response.text


def error_text(body: Any) -> str:
    """The human part of the many error shapes providers use: msg, message, detail, error, title,
    GraphQL's errors[0].message, or plain text."""
    if isinstance(body, dict):
        errors = body.get("errors")
        if isinstance(errors, list) and errors and isinstance(errors[0], dict) and errors[0].get("message"):
            return str(errors[0]["message"])
        for key in ("msg", "message", "detail", "error_description", "title"):
            value = body.get(key)
            if isinstance(value, str) and value:
                return value
        error = body.get("error")
        if isinstance(error, dict):
            return str(error.get("message") or error.get("code") or "")
        if isinstance(error, str):
            return error
        return ""
    if isinstance(body, str):
        text = body.strip()
        return "" if text.startswith("<") else text  # an HTML error page says nothing useful
    return ""


def _is_search_quota(body: Any) -> bool:
    return isinstance(body, dict) and body.get("error") == "search_quota_exceeded"


def _retry_after(response: httpx.Response) -> float | None:
    raw = response.headers.get("Retry-After")
    if raw is None:
        return None
    try:
        return max(0.0, float(raw))
    except ValueError:
        return None  # an HTTP date: fall back to backoff
