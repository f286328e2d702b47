"""The Python client of `gpuherd serve` for scripts and notebooks: `AsyncClient` and `Client`
(httpx), answering core's own result models (`SearchResult`, `BootResult | Confirmation`,
`StatusResult`, ...), so code written against `GpuService` reads the same over HTTP.

Decisions:

- Every call is described once (`_Call`: method, path, query, body, headers, how to parse the
  answer); the async and the sync client only differ in how they send it.
- Answers are parsed by their `kind` (every core result has one) into the result model; a
  union answer (a boot: `BootResult` or `Confirmation`) is the model its `kind` names.
- A problem-detail answer (RFC 9457) raises `ApiError` carrying `status`, `code`, `detail` (and
  `retry_after` for a 429). Where core has an error class for the code the raised class is both:
  `except NotFound` works as with the service itself. A reply that is no problem detail (a proxy's
  HTML page) is an `ApiError` with code `http_<status>`; a connection failure is httpx's own.
- The API key is sent as `Authorization: Bearer` and kept only in the httpx client's headers
  (httpx masks them in its repr); no message, repr or log line of this module contains it.
- `events()` follows `/api/v1/events`: it yields `FeedEntry` (cursor + item) and, when the
  connection drops or the server ends the stream, reconnects with `Last-Event-ID` so nothing is
  repeated or lost; `after=` starts from a cursor a caller kept."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import httpx
from pydantic import BaseModel, TypeAdapter

from gpuherd.bot.replies import Reply
from gpuherd.core import errors as core_errors
from gpuherd.core.feed import FeedEntry
from gpuherd.core.results import (
    ActivityResult,
    AuditResult,
    BootResult,
    BudgetResult,
    Cancelled,
    Confirmation,
    CostReport,
    CreatedKey,
    DestroyResult,
    InstanceCost,
    InstanceView,
    KeepResult,
    KeyView,
    SearchResult,
    StartResult,
    StatusResult,
    StopResult,
    TemplateDetail,
    TemplateList,
    UserView,
)

T = TypeVar("T")
API = "/api/v1"
DEFAULT_TIMEOUT = 30.0


# --- errors ------------------------------------------------------------------------------------

class ApiError(core_errors.GpuherdError):
    """An error answer of the server. `code` is gpuherd's error code (`not_found`, ...)."""

    code = "error"

    def __init__(self, status: int, code: str, detail: str, *, hint: str | None = None,
                 errors: list[dict[str, Any]] | None = None, retry_after: float | None = None) -> None:
        core_errors.GpuherdError.__init__(self, detail, hint=hint)
        self.status = status
        self.code = code
        self.detail = detail
        self.errors = errors or []
        self.retry_after = retry_after
        self.provider = ""             # what ProviderError's subclasses carry

    def __str__(self) -> str:
        return f"{self.status} {self.code}: {self.detail}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}(status={self.status}, code={self.code!r}, detail={self.detail!r})"


_CORE: dict[str, type[core_errors.GpuherdError]] = {
    "invalid_input": core_errors.InvalidInput, "validation": core_errors.InvalidInput,
    "bad_query": core_errors.QueryError, "not_found": core_errors.NotFound,
    "forbidden": core_errors.PermissionDenied, "unauthenticated": core_errors.Unauthenticated,
    "conflict": core_errors.Conflict, "no_offer": core_errors.NoMatchingOffer, "config": core_errors.ConfigError,
    "provider": core_errors.ProviderError, "provider_unavailable": core_errors.ProviderUnavailable,
    "provider_timeout": core_errors.ProviderTimeout, "rate_limited": core_errors.RateLimited,
    "capacity": core_errors.CapacityError, "auth": core_errors.AuthError,
    "provider_state": core_errors.ProviderStateError,
}
_CLASSES: dict[str, type[ApiError]] = {
    code: type(f"{base.__name__}Error" if not base.__name__.endswith("Error") else f"Api{base.__name__}",
               (ApiError, base), {"code": code})
    for code, base in _CORE.items()
}


class TooManyRequests(ApiError):
    code = "too_many_requests"


_CLASSES["too_many_requests"] = TooManyRequests


def error_from(response: httpx.Response) -> ApiError:
    """The exception for an error answer (never carrying a request header)."""
    status = response.status_code
    try:
        body = response.json()
    except ValueError:
        body = None
    retry = response.headers.get("Retry-After")
    retry_after = float(retry) if retry and retry.isdigit() else None
    if not isinstance(body, dict) or "code" not in body:
        return ApiError(status, f"http_{status}", f"The server answered {status} {response.reason_phrase}.",
                        retry_after=retry_after)
    code = str(body.get("code"))
    cls = _CLASSES.get(code, ApiError)
    return cls(status, code, str(body.get("detail") or body.get("title") or ""), hint=body.get("hint"),
               errors=body.get("errors"), retry_after=retry_after)


# --- parsing -----------------------------------------------------------------------------------

def _optional_models() -> tuple[type[BaseModel], ...]:
    """Result models of core modules that may not exist in every version (statistics)."""
    try:
        from gpuherd.core.statistics import StatisticsResult
    except ImportError:  # pragma: no cover - an older core
        return ()
    return (StatisticsResult,)


_BY_KIND: dict[str, type[BaseModel]] = {
    m.model_fields["kind"].default: m for m in (
        SearchResult, TemplateList, TemplateDetail, BootResult, Confirmation, StatusResult, InstanceView,
        StartResult, StopResult, DestroyResult, KeepResult, ActivityResult, Cancelled, CostReport, InstanceCost,
        BudgetResult, AuditResult, UserView, KeyView, CreatedKey, *_optional_models())
}


def parse_result(data: Any) -> Any:
    """A core result model from its JSON (by `kind`); a wrapper holding one under `result` is
    unwrapped; anything else is returned as the JSON it is."""
    if isinstance(data, dict):
        model = _BY_KIND.get(str(data.get("kind")))
        if model is not None:
            return model.model_validate(data)
        for key in ("result", "data"):
            if isinstance(data.get(key), dict) and data[key].get("kind") in _BY_KIND:
                return parse_result(data[key])
    return data


def _as(model: Any) -> Callable[[Any], Any]:
    adapter: TypeAdapter[Any] = TypeAdapter(model)

    def parse(data: Any) -> Any:
        if isinstance(data, dict) and "kind" not in data:
            for key in ("result", "data"):
                if isinstance(data.get(key), dict):
                    return adapter.validate_python(data[key])
        return adapter.validate_python(parse_result(data) if isinstance(data, dict) else data)
    return parse


def _list_of(model: type[BaseModel]) -> Callable[[Any], Any]:
    adapter: TypeAdapter[list[Any]] = TypeAdapter(list[model])  # type: ignore[valid-type]

    def parse(data: Any) -> Any:
        if isinstance(data, dict):
            data = next((v for k, v in data.items() if isinstance(v, list) and k not in ("errors",)), [])
        return adapter.validate_python(data)
    return parse


@dataclass
class _Call:
    method: str
    path: str
    parse: Callable[[Any], Any] = parse_result
    params: dict[str, Any] = field(default_factory=dict)
    json: Any = None
    headers: dict[str, str] = field(default_factory=dict)

    def query(self) -> dict[str, Any]:
        return {k: v for k, v in self.params.items() if v is not None}


def _q(value: bool | None) -> str | None:
    return None if value is None else ("true" if value else "false")


class _Calls:
    """Every call the clients make, once. `_send` is the sync or async transport."""

    def _send(self, call: _Call) -> Any:  # pragma: no cover - overridden
        raise NotImplementedError

    # offers and templates
    def search(self, q: str = "", *, limit: int | None = None, cursor: str | None = None) -> Any:
        return self._send(_Call("GET", "/offers", _as(SearchResult), {"q": q or None, "limit": limit, "cursor": cursor}))

    def templates(self) -> Any:
        return self._send(_Call("GET", "/templates", _as(TemplateList)))

    def template(self, name: str) -> Any:
        return self._send(_Call("GET", f"/templates/{_seg(name)}", _as(TemplateDetail)))

    # instances
    def boot(self, template: str, *, offer: str | None = None, provider: str | None = None,
             overrides: dict[str, str] | None = None, idempotency_key: str | None = None) -> Any:
        body = {"template": template, "offer": offer, "provider": provider, "overrides": overrides or {}}
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return self._send(_Call("POST", "/instances", _as(BootResult | Confirmation),
                                json={k: v for k, v in body.items() if v is not None}, headers=headers))

    def status(self, *, include_ended: bool | None = None, refresh: bool | None = None, limit: int | None = None,
               cursor: str | None = None, mine: bool | None = None) -> Any:
        return self._send(_Call("GET", "/instances", _as(StatusResult),
                                {"include_ended": _q(include_ended), "refresh": _q(refresh), "limit": limit,
                                 "cursor": cursor, "mine": _q(mine)}))

    def instance(self, instance_id: str) -> Any:
        return self._send(_Call("GET", f"/instances/{_seg(instance_id)}", _as(InstanceView)))

    def start(self, instance_id: str, *, idempotency_key: str | None = None) -> Any:
        return self._send(_Call("POST", f"/instances/{_seg(instance_id)}/start", _as(StartResult),
                                headers=_key(idempotency_key)))

    def stop(self, instance_id: str, *, idempotency_key: str | None = None) -> Any:
        return self._send(_Call("POST", f"/instances/{_seg(instance_id)}/stop", _as(StopResult),
                                headers=_key(idempotency_key)))

    def destroy(self, instance_id: str, *, confirmed: bool = False, idempotency_key: str | None = None) -> Any:
        return self._send(_Call("POST", f"/instances/{_seg(instance_id)}/destroy", _as(DestroyResult | Confirmation),
                                {"confirmed": _q(confirmed) if confirmed else None}, headers=_key(idempotency_key)))

    def keep(self, instance_id: str, duration: str | None = None) -> Any:
        return self._send(_Call("POST", f"/instances/{_seg(instance_id)}/keep", _as(KeepResult),
                                json={"duration": duration} if duration else {}))

    def activity(self, instance_id: str, *, source: str = "ping", detail: str | None = None) -> Any:
        body = {"source": source, "detail": detail}
        return self._send(_Call("POST", f"/instances/{_seg(instance_id)}/activity", _as(ActivityResult),
                                json={k: v for k, v in body.items() if v is not None}))

    def instance_cost(self, instance_id: str) -> Any:
        return self._send(_Call("GET", f"/instances/{_seg(instance_id)}/cost", _as(InstanceCost)))

    # confirmations
    def confirm(self, token: str) -> Any:
        return self._send(_Call("POST", f"/confirmations/{_seg(token)}", _as(BootResult | DestroyResult | Confirmation)))

    def cancel(self, token: str) -> Any:
        return self._send(_Call("DELETE", f"/confirmations/{_seg(token)}", _as(Cancelled)))

    # money, audit, people
    def costs(self, period: str | None = None, *, by: str | None = None) -> Any:
        return self._send(_Call("GET", "/costs", _as(CostReport), {"period": period, "by": by}))

    def statistics(self) -> Any:
        return self._send(_Call("GET", "/statistics"))

    def budgets(self) -> Any:
        return self._send(_Call("GET", "/budgets", _as(BudgetResult)))

    def audit(self, n: int | None = None, *, instance_id: str | None = None, cursor: str | None = None) -> Any:
        return self._send(_Call("GET", "/audit", _as(AuditResult),
                                {"limit": n, "instance": instance_id, "cursor": cursor}))

    def set_budget(self, scope: str, name: str, amount: str, *, hard_cap: bool | None = None) -> Any:
        body: dict[str, Any] = {"amount": str(amount), **({"hard_cap": hard_cap} if hard_cap is not None else {})}
        return self._send(_Call("PUT", f"/budgets/{_seg(scope)}/{_seg(name)}", _as(BudgetResult), json=body))

    def clear_budget(self, scope: str, name: str) -> Any:
        return self._send(_Call("DELETE", f"/budgets/{_seg(scope)}/{_seg(name)}", _as(BudgetResult)))

    def me(self) -> Any:
        """Who this key is (principal, role, team)."""
        return self._send(_Call("GET", "/me", _as(UserView)))

    def users(self) -> Any:
        return self._send(_Call("GET", "/users", _list_of(UserView)))

    def set_user(self, principal: str, *, role: str | None = None, team: str | None = None) -> Any:
        body = {k: v for k, v in {"role": role, "team": team}.items() if v is not None}
        return self._send(_Call("PUT", f"/users/{_seg(principal)}", _as(UserView), json=body))

    def keys(self, *, include_revoked: bool | None = None) -> Any:
        return self._send(_Call("GET", "/keys", _list_of(KeyView), {"include_revoked": _q(include_revoked)}))

    def create_key(self, principal: str, *, role: str | None = None, name: str = "") -> Any:
        """A new key (admins): the answer is the only place it is shown."""
        body = {"principal": principal, "name": name, **({"role": role} if role else {})}
        return self._send(_Call("POST", "/keys", _as(CreatedKey), json=body))

    def revoke_key(self, key_id: str) -> Any:
        return self._send(_Call("DELETE", f"/keys/{_seg(key_id)}", _as(KeyView)))

    # the grammar
    def command(self, text: str, *, idempotency_key: str | None = None) -> Any:
        """Run one `/gpu …` line on the server; the Reply its chat surfaces would show."""
        return self._send(_Call("POST", "/commands", Reply.model_validate, json={"text": text},
                                headers=_key(idempotency_key)))


def _seg(value: str) -> str:
    """One path segment, quoted (an id never changes the path it is put in)."""
    from urllib.parse import quote

    return quote(value, safe="")


def _key(idempotency_key: str | None) -> dict[str, str]:
    return {"Idempotency-Key": idempotency_key} if idempotency_key else {}


def _headers(api_key: str) -> dict[str, str]:
    if not api_key or not api_key.strip():
        raise core_errors.Unauthenticated("No API key given (set GPUHERD_API_KEY or pass api_key=).")
    return {"Authorization": f"Bearer {api_key.strip()}", "Accept": "application/json",
            "User-Agent": "gpuherd-client"}


def _answer(call: _Call, response: httpx.Response) -> Any:
    if response.status_code >= 400:
        raise error_from(response)
    if response.status_code == 204 or not response.content:
        return None
    return call.parse(response.json())


# --- SSE ---------------------------------------------------------------------------------------

class _SseParser:
    """Server-Sent Events, one line at a time; yields (event, id, data) per message."""

    def __init__(self) -> None:
        self.event, self.id, self.data = "message", None, []  # type: ignore[var-annotated]

    def feed(self, line: str) -> tuple[str, str | None, str] | None:
        if line == "":
            out = (self.event, self.id, "\n".join(self.data)) if self.data else None
            self.event, self.data = "message", []
            return out
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "event":
            self.event = value
        elif name == "id":
            self.id = value
        elif name == "data":
            self.data.append(value)
        return None


def _entry(event: str, ident: str | None, data: str) -> FeedEntry | None:
    if event not in ("progress", "notice") or ident is None:
        return None
    return FeedEntry.model_validate({"cursor": ident, "item": json.loads(data)})


# --- the clients -------------------------------------------------------------------------------

class AsyncClient(_Calls):
    """`async with AsyncClient("https://gpuherd.example", api_key) as gh: await gh.status()`."""

    def __init__(self, base_url: str, api_key: str, *, timeout: float = DEFAULT_TIMEOUT,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self._http = httpx.AsyncClient(base_url=self.base_url + API, headers=_headers(api_key), timeout=timeout,
                                       transport=transport)
        self.cursor: str | None = None          # the last event cursor events() saw

    def __repr__(self) -> str:
        return f"AsyncClient({self.base_url!r})"

    async def _send(self, call: _Call) -> Any:
        response = await self._http.request(call.method, call.path, params=call.query(), json=call.json,
                                            headers=call.headers)
        return _answer(call, response)

    async def events(self, after: str | None = None, *, reconnect: bool = True,
                     retry_s: float = 1.0) -> AsyncIterator[FeedEntry]:
        """Your progress events and notices as they happen (see the module docstring)."""
        cursor = after
        while True:
            headers = {"Accept": "text/event-stream", **({"Last-Event-ID": cursor} if cursor else {})}
            try:
                async with self._http.stream("GET", "/events", headers=headers,
                                             timeout=httpx.Timeout(self._http.timeout.connect, read=None)) as r:
                    if r.status_code >= 400:
                        await r.aread()
                        raise error_from(r)
                    parser = _SseParser()
                    async for line in r.aiter_lines():
                        msg = parser.feed(line)
                        if msg is None:
                            continue
                        if msg[0] == "ready":
                            cursor = self.cursor = msg[1] or cursor
                            continue
                        entry = _entry(*msg)
                        if entry is not None:
                            cursor = self.cursor = entry.cursor
                            yield entry
            except (httpx.TransportError, httpx.StreamError):
                if not reconnect:
                    raise
            if not reconnect:
                return
            await asyncio.sleep(retry_s)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class Client(_Calls):
    """The same calls, blocking: `with Client(url, key) as gh: gh.boot("budget")`."""

    def __init__(self, base_url: str, api_key: str, *, timeout: float = DEFAULT_TIMEOUT,
                 transport: httpx.BaseTransport | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self._http = httpx.Client(base_url=self.base_url + API, headers=_headers(api_key), timeout=timeout,
                                  transport=transport)
        self.cursor: str | None = None

    def __repr__(self) -> str:
        return f"Client({self.base_url!r})"

    def _send(self, call: _Call) -> Any:
        response = self._http.request(call.method, call.path, params=call.query(), json=call.json,
                                      headers=call.headers)
        return _answer(call, response)

    def events(self, after: str | None = None, *, timeout_s: float | None = None) -> Iterator[FeedEntry]:
        """Events from one connection (blocking); stops when the server ends the stream or after
        `timeout_s` (checked as each line arrives; the server's keep-alive comes every ~15 s).
        Call again with `after=client.cursor` to go on."""
        import time

        deadline = time.monotonic() + timeout_s if timeout_s is not None else None
        headers = {"Accept": "text/event-stream", **({"Last-Event-ID": after} if after else {})}
        with self._http.stream("GET", "/events", headers=headers,
                               timeout=httpx.Timeout(self._http.timeout.connect, read=timeout_s)) as r:
            if r.status_code >= 400:
                r.read()
                raise error_from(r)
            parser = _SseParser()
            try:
                for line in r.iter_lines():
                    if deadline is not None and time.monotonic() >= deadline:
                        return
                    msg = parser.feed(line)
                    if msg is None:
                        continue
                    if msg[0] == "ready":
                        self.cursor = msg[1] or self.cursor
                        continue
                    entry = _entry(*msg)
                    if entry is not None:
                        self.cursor = entry.cursor
                        yield entry
            except httpx.ReadTimeout:
                return

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
