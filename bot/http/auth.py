"""Who is calling: the API key of a request (`Authorization: Bearer <key>`, or `X-API-Key:
<key>` as some clients send it) resolved by core to an `Actor`, and a per-key rate limit.

Decisions: core decides who the key speaks for and what that actor may do (keys.py, auth.py);
this module only reads the header and refuses early. The rate limit is a token bucket per key
id held in this process (`api_rate_per_minute` tokens a minute, bursts of `api_burst`): each
replica limits on its own, so N replicas allow up to N times the rate — a guard against a
runaway script, not an accounting figure. Refusals are 429 with `Retry-After` in whole seconds;
nothing runs for a refused request."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from gpuherd.core.auth import Actor
from gpuherd.core.errors import GpuherdError, Unauthenticated
from gpuherd.core.keys import key_id_of
from gpuherd.core.service import GpuService

bearer = HTTPBearer(auto_error=False, description="an API key made by `gpuherd keys create`")
api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="the same key, as some clients send it")


class TooManyRequests(GpuherdError):
    code = "too_many_requests"

    def __init__(self, message: str, *, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass
class _Bucket:
    tokens: float
    at: float


class RateLimiter:
    def __init__(self, per_minute: int, burst: int, *, monotonic=time.monotonic) -> None:
        self.rate = per_minute / 60.0
        self.burst = float(max(1, burst))
        self._monotonic = monotonic
        self._buckets: dict[str, _Bucket] = {}

    def take(self, key_id: str) -> None:
        """Spend one token of `key_id`'s bucket, or raise TooManyRequests saying when to retry."""
        now = self._monotonic()
        b = self._buckets.get(key_id)
        if b is None:
            if len(self._buckets) > 100_000:
                self._buckets.clear()
            b = self._buckets[key_id] = _Bucket(self.burst, now)
        b.tokens = min(self.burst, b.tokens + (now - b.at) * self.rate)
        b.at = now
        if b.tokens >= 1.0:
            b.tokens -= 1.0
            return
        wait = (1.0 - b.tokens) / self.rate if self.rate > 0 else 60.0
        raise TooManyRequests(f"Too many requests with API key {key_id}; try again in {math.ceil(wait)} s.",
                              retry_after=wait)


def get_service(request: Request) -> GpuService:
    return request.app.state.service


def presented_key(bearer_cred: HTTPAuthorizationCredentials | None, header_key: str | None) -> str:
    if bearer_cred is not None and bearer_cred.credentials:
        return bearer_cred.credentials.strip()
    if header_key:
        return header_key.strip()
    raise Unauthenticated("Send an API key: `Authorization: Bearer <key>` or `X-API-Key: <key>` "
                          "(an admin makes one with `gpuherd keys create --user <you>`).")


async def current_actor(request: Request,
                        bearer_cred: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
                        header_key: Annotated[str | None, Depends(api_key_header)]) -> Actor:
    """The caller, resolved from its key; rate-limited per key before anything runs."""
    key = presented_key(bearer_cred, header_key)
    key_id = key_id_of(key)
    if key_id is not None:            # a malformed key is refused by core below, before any lookup
        request.app.state.limiter.take(key_id)
    actor = await get_service(request).actor_for_key(key, source="api")
    request.state.actor = actor
    return actor


CurrentActor = Annotated[Actor, Depends(current_actor)]


async def authenticate_late(request: Request) -> None:
    """Run the key check for a request whose body FastAPI refused before any dependency ran (a
    body that is not JSON is refused while the request is read): a caller without a valid key
    hears 401 (or 429), never what was wrong with its body. A request whose key was already
    checked (`request.state.actor`) is not checked, or rate-limited, twice."""
    if getattr(request.state, "actor", None) is not None:
        return
    scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
    bearer_cred = (HTTPAuthorizationCredentials(scheme=scheme, credentials=credentials.strip())
                   if scheme.lower() == "bearer" and credentials.strip() else None)
    await current_actor(request, bearer_cred, request.headers.get("x-api-key"))
