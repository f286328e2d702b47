"""SURF Research Cloud (SRC): workspaces that already exist, paused and resumed.

gpuherd rents nothing at SURF. Workspaces are created (and deleted) in the SURF Research Cloud
portal; gpuherd finds the Compute workspaces whose name contains `surf_name_filter`, shows their
status, and pauses (= stop) and resumes (= start) them, so the idle guard can pause an idle GPU
workspace. Hence `can_search`, `can_create` and `can_destroy` are False: `search()` returns no
offers, and `create()`/`destroy()` refuse with a message saying what to do instead, without
sending anything to SURF.

Where the API facts come from (shared reference §3.2). Treat the third-party ones as unverified:
- Official (servicedesk.surf.nl wiki, "Research Cloud API - First Steps", "SRC API", "Workspace
  actions"): the workspace API lives under https://gw.live.surfresearchcloud.nl/v1/workspace/;
  a personal API token is made in the portal (Profile -> API tokens) and shown once; 1000
  requests per 60 s per token; the API is a "pilot release"; documented states are running,
  pausing, paused and resuming; a paused workspace uses no CPU/GPU credits, while its storage is
  still charged on RCCS-contract wallets but not on grant wallets.
- Third-party client code and scripts, NOT official documentation: the bare token in an
  `authorization` header (no "Bearer " prefix; a `Token <tok>` form is also seen in the wild); the list
  `GET workspace/workspaces/?application_type=Compute&deleted=false`, paginated as
  `{count, next, previous, results}`; `POST workspace/workspaces/{id}/actions/pause/` and
  `.../actions/resume/`; the fields id, name, status, active, resource_meta.ip and
  workspace_actions[] (type, status, result.error; a failed resume, e.g. no GPUs free, shows up
  there); and the extra states creating, updating, rebooting and deleting.
- From the public clients generated from SURF's Swagger (`<base>workspace/swagger/docs/`; e.g. the
  PyPI surf-cli models and surf-controller), also third-party: an action is POSTed with the body
  `{}` and `Content-Type: application/json;<action>` (`application/json;pause`), some clients add
  an `X-CSRFTOKEN`; a 400 is `{"code": 400, "status": "Bad Request", "message": [str, ...]}`
  (`message` a list); `resource_meta.flavor_name` names the flavour (there is no GPU field); the
  workspace statuses also include failed, unhealthy and unknown; action statuses are
  initialized/pending/success/failed/cancelled.
- Our own assumptions, documented nowhere: `GET workspace/workspaces/{id}/` for one workspace; a
  workspace carries `deleted: true` (or status "deleted") once deleted; a failed action has
  status "failed"/"error" or a non-empty `result.error`; the GPU model and count are read from
  the flavour name ("gpu-a10-11core-88gb" -> A10 x1, "2gpu-a100-..." -> A100 x2; a name with no
  GPU model word gives no GPU); the page of a `next` link is carried by its query string
  (DRF-style `page=`).

Decisions:
- Auth form. Public clients disagree (the bare token vs `Token <tok>`); the reference confirms
  only the bare form (third-party clients, §3.2). The client sends the form it was given
  (`auth="bare"` by default), and on the first 401 retries that request once with the other form;
  whichever works is kept for the provider's lifetime, and once one form worked or both were
  refused it never switches again (a revoked token costs no extra request per call). A 401
  means SURF did not act, so repeating even an action is safe. 403 is never retried.
- Actions are sent as every Swagger-derived client sends them: `{}` with
  `Content-Type: application/json;<action>`, plus `X-CSRFTOKEN` when a `csrf_token` is given
  (only some clients send one; it is not needed with an API token as far as known).
- Error bodies: `message` may be a list of strings (SURF's 400) or a string; all its items are
  joined, so a refusal carries SURF's reason and a capacity refusal is recognised.
- States: failed and unhealthy map to ERROR (a workspace SURF itself reports broken; it may still
  bill, so pause is still sent), unknown to UNKNOWN.
- The token is sent only to the configured host. A `next` link is never
  requested as given: its query (the page number or cursor) is applied to the list path on the
  configured base URL. So a base URL pointed elsewhere (a proxy, a test server; SURF_URL /
  GPUHERD_SURF_URL) keeps working when SURF writes its own public host into `next`, and a link
  naming another host never receives the token.
- Pausing a workspace that is already pausing or paused (or resuming one already resuming or
  running) succeeds without sending the action: workspaces are also paused and resumed in the
  portal, so gpuherd's record often lags, and the caller's goal is reached either way. A refused
  action whose read-back shows the workspace on its way to the goal anyway (an action repeated
  after a lost answer) also succeeds.
- After an action the workspace is read back. If the newest action of that kind that appeared
  with our request failed: a resume whose error speaks of GPUs/capacity/availability (OpenStack's
  "No valid host was found" included) is a CapacityError ("... the resume failed: <SURF's
  text>"), anything else a ProviderStateError. A failure that SURF records later shows in the
  `message` of get()/list().
- Label: SURF has no label field, so `label` is None; workspaces come in by `gpuherd attach
  surf:<id>` or by the name filter. get() does not apply the name filter (an explicitly attached
  workspace is found whatever its name).
- `message` is the workspace name (plus the IP while running, and any note); `endpoint` is None:
  resource_meta.ip is known but no port for a model server is.
- Money: SURF bills credits from a wallet, not USD, and reports no per-hour price here, so
  workspaces cost $0/h in the ledger unless `dph`/`storage_dph` are given to the constructor.
  `storage_bills_while_stopped` is False by default (grant wallets); pass True for an
  RCCS-contract wallet.
- Retries: the shared ApiClient retries 429/502/503/504 and connection errors itself
  (Retry-After up to 60 s), so `retries_internally` is True. Actions are sent as repeatable:
  repeating a pause or resume asks for the same end state.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from decimal import Decimal
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, quote, urlsplit

import httpx

from ..clock import Clock
from ..errors import AuthError, CapacityError, ConfigError, ProviderError, ProviderStateError
from ..offers import Offer, normalise_gpu_name
from ..query import GPU_MODELS
from .base import Capabilities, CreateRequest, Provider, ProviderInstance, ProviderState
from .http import ApiClient, NotFoundAtProvider, error_text

if TYPE_CHECKING:
    from ..config import Settings
    from ..query import OfferQuery

log = logging.getLogger(__name__)

NAME = "surf"
DISPLAY = "SURF Research Cloud"
DEFAULT_URL = "https://gw.live.surfresearchcloud.nl/v1"
WORKSPACES = "/workspace/workspaces/"
LIST_PARAMS = {"application_type": "Compute", "deleted": "false"}
MAX_PAGES = 500          # 1000 requests/min per token; a longer list is a server that never ends

_STATES: dict[str, ProviderState] = {
    "running": ProviderState.RUNNING,
    "pausing": ProviderState.STOPPING,
    "paused": ProviderState.STOPPED,
    "resuming": ProviderState.STARTING,
    "creating": ProviderState.PROVISIONING,
    "updating": ProviderState.LOADING,      # software being (re)applied to a workspace
    "rebooting": ProviderState.STARTING,    # a reboot is a pause followed by a resume
    "deleting": ProviderState.DESTROYED,
    "deleted": ProviderState.DESTROYED,
    "failed": ProviderState.ERROR,          # SURF reports the workspace broken
    "unhealthy": ProviderState.ERROR,
    "unknown": ProviderState.UNKNOWN,
}
# Where each action is going: reaching (or heading to) these means there is nothing left to do.
_GOAL = {
    "pause": (ProviderState.STOPPING, ProviderState.STOPPED),
    "resume": (ProviderState.STARTING, ProviderState.RUNNING),
}
_FAILED = {"failed", "failure", "error", "errored"}
AUTH_FORMS = ("bare", "token")
_GPU_COUNT = re.compile(r"(\d{1,2})(?:x|gpus?)|gpus?(\d{1,2})|x(\d{1,2})")


class _TokenRefused(AuthError):
    """HTTP 401: the token (or the form it was sent in) was not accepted; SURF did not act."""


_CAPACITY = re.compile(r"gpu|capacity|no valid host|not enough (?:hosts|resources)|available|no free|"
                       r"insufficient (?:compute )?(?:resources|capacity)|out of resources", re.IGNORECASE)


class SurfProvider(Provider):
    name = NAME
    display_name = DISPLAY
    capabilities = Capabilities(
        can_search=False,
        can_create=False,
        can_stop=True,
        can_start=True,
        can_destroy=False,
        can_list=True,
        reports_gpu_utilisation=False,
        storage_bills_while_stopped=False,
        reports_actual_billing=False,
        retries_internally=True,
    )

    def __init__(self, token: str, *, base_url: str = DEFAULT_URL, name_filter: str = "",
                 timeout_s: float = 30.0, attempts: int = 3, backoff_s: float = 0.15,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep, clock: Clock | None = None,
                 transport: httpx.AsyncBaseTransport | None = None,
                 dph: Decimal = Decimal(0), storage_dph: Decimal = Decimal(0),
                 storage_bills_while_stopped: bool = False, auth: str = "bare",
                 csrf_token: str | None = None) -> None:
        token = (token or "").strip()
        if not token:
            raise ConfigError("SURF Research Cloud needs an API token (SURF_API_TOKEN).")
        if auth not in AUTH_FORMS:
            raise ConfigError(f"SURF auth form must be one of {', '.join(AUTH_FORMS)}, not {auth!r}.")
        self._token = token
        self._auth = auth                 # the form sent now
        self._auth_settled = False        # True once a form worked, or both were refused
        self._csrf = (csrf_token or "").strip() or None
        self.base_url = _normalise_base(base_url)
        self.name_filter = (name_filter or "").strip()
        self.clock = clock or Clock()
        self.dph = Decimal(dph)
        self.storage_dph = Decimal(storage_dph)
        if storage_bills_while_stopped:
            self.capabilities = self.capabilities.model_copy(update={"storage_bills_while_stopped": True})
        self._origin = _origin(self.base_url)
        self._api = ApiClient(provider=NAME, display=DISPLAY, base_url=self.base_url,
                              headers={"accept": "application/json"},
                              secrets=[s for s in (token, self._csrf) if s], timeout_s=timeout_s, attempts=attempts,
                              backoff_s=backoff_s, sleep=sleep, transport=transport)

    @classmethod
    def from_settings(cls, settings: Settings) -> SurfProvider | None:
        """The provider when SURF_API_TOKEN (or GPUHERD_SURF_API_TOKEN) is set, else None."""
        secret = settings.surf_api_token
        token = secret.get_secret_value().strip() if secret is not None else ""
        if not token:
            return None
        return cls(token, base_url=settings.surf_url, name_filter=settings.surf_name_filter)

    async def aclose(self) -> None:
        await self._api.aclose()

    @property
    def auth_form(self) -> str:
        """The authorization form in use: "bare" (the token as is) or "token" (`Token <tok>`)."""
        return self._auth

    # ------------------------------------------------------------------ transport

    def _authorization(self, form: str) -> str:
        return self._token if form == "bare" else f"Token {self._token}"

    async def _call(self, method: str, path: str, *, extra_headers: dict[str, str] | None = None,
                    **kwargs: Any) -> Any:
        """One API request with the current auth form; on its first 401 the other form is tried
        once and the one that works is kept (see the module docstring)."""
        def headers(form: str) -> dict[str, str]:
            return {**(extra_headers or {}), "authorization": self._authorization(form)}

        form = self._auth
        try:
            result = await self._api.request(method, path, headers=headers(form), **kwargs)
        except _TokenRefused:
            if self._auth_settled:
                raise
        else:
            self._auth_settled = True     # this form works: a later 401 is the token, not the form
            return result
        other = AUTH_FORMS[1 - AUTH_FORMS.index(form)]
        try:
            result = await self._api.request(method, path, headers=headers(other), **kwargs)
        except _TokenRefused:
            self._auth_settled = True     # neither form: the token itself is refused
            raise
        self._auth, self._auth_settled = other, True
        log.info("%s: the token was refused as %s and accepted as %s; using that form from now on",
                 DISPLAY, _FORM_NAMES[form], _FORM_NAMES[other])
        return result

    # ------------------------------------------------------------------ what gpuherd does not do

    async def search(self, query: OfferQuery | None = None) -> list[Offer]:
        return []  # nothing to rent: workspaces are made in the portal

    async def create(self, request: CreateRequest) -> ProviderInstance:
        raise ProviderError(DISPLAY, "gpuherd does not create SURF workspaces. Create the workspace in "
                                     "the SURF Research Cloud portal, then attach it to gpuherd by its id.")

    async def destroy(self, provider_id: str) -> None:
        raise ProviderError(DISPLAY, f"gpuherd does not delete SURF workspaces; delete {provider_id} in the "
                                     "SURF Research Cloud portal. What gpuherd does is pause it "
                                     "(stop), which ends its CPU/GPU credit use.")

    # ------------------------------------------------------------------ reading

    async def list(self) -> list[ProviderInstance]:
        wanted = self.name_filter.casefold()
        found: dict[str, ProviderInstance] = {}
        async for ws in self._pages():
            if _is_deleted(ws) or wanted not in str(ws.get("name") or "").casefold():
                continue
            inst = self._instance(ws)
            found.setdefault(inst.provider_id, inst)  # a page that shifted under us repeats a row
        return list(found.values())

    async def get(self, provider_id: str) -> ProviderInstance | None:
        ws = await self._read(provider_id)
        return None if ws is None else self._instance(ws)

    # ------------------------------------------------------------------ actions

    async def stop(self, provider_id: str) -> ProviderInstance:
        return await self._act(provider_id, "pause")

    async def start(self, provider_id: str) -> ProviderInstance:
        return await self._act(provider_id, "resume")

    async def _act(self, provider_id: str, action: str) -> ProviderInstance:
        goal = _GOAL[action]
        ws = await self._read(provider_id)
        if ws is None:
            raise ProviderStateError(DISPLAY, f"cannot {action} workspace {provider_id}: SURF does not "
                                              "know it (deleted in the portal?)")
        now = self._instance(ws)
        if now.state in goal:
            return now  # already there or on its way: nothing to send (see the module docstring)
        if now.state is ProviderState.DESTROYED:
            raise ProviderStateError(DISPLAY, f"cannot {action} workspace {provider_id}: it is being deleted")
        before = _action_keys(ws, action)
        try:
            await self._call("POST", f"{_ws_path(provider_id)}actions/{action}/", json_body={},
                             extra_headers=self._action_headers(action),
                             what=f"{action} workspace {provider_id}", expect_json=False,
                             classify=self._classify_action(action, provider_id))
        except ProviderStateError:
            again = await self._read(provider_id)
            if again is None or self._instance(again).state not in goal:
                raise
            ws = again  # refused because it is already happening (a repeated request)
        else:
            ws = await self._read(provider_id) or ws
        failure = _new_failure(ws, action, before)
        if failure is not None:
            raise self._action_failed(action, provider_id, ws, failure)
        return self._instance(ws)

    def _action_failed(self, action: str, provider_id: str, ws: dict[str, Any], error: str) -> ProviderError:
        error = self._api.scrub(error)[:300]
        which = _which(ws, provider_id)
        if action == "resume" and _CAPACITY.search(error):
            return CapacityError(DISPLAY, f"workspace {which} could not be resumed: SURF has no free GPUs "
                                          f"for it right now; the resume failed: {error}",
                                 hint="It stays paused. Try again later.")
        if action == "resume":
            return ProviderStateError(DISPLAY, f"workspace {which} could not be resumed; the resume "
                                               f"failed: {error}")
        return ProviderStateError(DISPLAY, f"workspace {which} could not be paused; the pause failed: "
                                           f"{error}. It may still be running and using credits.")

    # ------------------------------------------------------------------ HTTP helpers

    def _action_headers(self, action: str) -> dict[str, str]:
        """As SURF's Swagger-derived clients send an action: the action named in the media type."""
        headers = {"content-type": f"application/json;{action}"}
        if self._csrf:
            headers["x-csrftoken"] = self._csrf
        return headers

    async def _read(self, provider_id: str) -> dict[str, Any] | None:
        provider_id = (provider_id or "").strip()
        if not provider_id:
            return None
        try:
            ws = await self._call("GET", _ws_path(provider_id), what=f"get workspace {provider_id}",
                                  classify=self._classify_auth)
        except NotFoundAtProvider:
            return None
        if not isinstance(ws, dict) or ws.get("id") in (None, ""):
            raise ProviderError(DISPLAY, f"get workspace {provider_id}: unexpected answer (no workspace)")
        return None if _is_deleted(ws) else ws

    async def _pages(self) -> AsyncIterator[dict[str, Any]]:
        """Every workspace on every page. A `next` link only contributes its query string; the
        request always goes to the configured base URL (see the module docstring)."""
        params = dict(LIST_PARAMS)
        seen = {_params_key(params)}
        for page in range(1, MAX_PAGES + 1):
            body = await self._call("GET", WORKSPACES, params=params, what=f"list workspaces (page {page})",
                                    classify=self._classify_auth)
            if isinstance(body, list):  # an unpaginated answer
                results, link = body, None
            elif isinstance(body, dict) and isinstance(body.get("results"), list):
                results, link = body["results"], body.get("next")
            else:
                raise ProviderError(DISPLAY, "list workspaces: unexpected answer (no results)")
            for ws in results:
                if isinstance(ws, dict) and ws.get("id") not in (None, ""):
                    yield ws
            if not link:
                return
            params = self._follow(str(link))
            key = _params_key(params)
            if key in seen:
                raise ProviderError(DISPLAY, "list workspaces: the next-page link repeats an earlier page")
            seen.add(key)
        raise ProviderError(DISPLAY, f"list workspaces: more than {MAX_PAGES} pages; gave up")

    def _follow(self, link: str) -> dict[str, str]:
        split = urlsplit(link)
        query = dict(parse_qsl(split.query, keep_blank_values=True))
        if not query:
            raise ProviderError(DISPLAY, "list workspaces: cannot follow the next-page link (no page in it)")
        if split.netloc and _origin(link) != self._origin:
            log.info("%s: the next-page link names %s, not the configured %s; asking the configured "
                     "host for that page", DISPLAY, self._api.scrub(split.netloc),
                     self._api.scrub(urlsplit(self.base_url).netloc))
        return {**LIST_PARAMS, **query}

    def _auth_error(self, response: httpx.Response, body: Any) -> AuthError:
        detail = self._api.scrub(surf_error_text(body))[:200]
        suffix = f": {detail}" if detail else ""
        kind = _TokenRefused if response.status_code == 401 else AuthError
        return kind(DISPLAY, f"the API token was refused (HTTP {response.status_code}{suffix}). Check "
                             "SURF_API_TOKEN: a personal token from the SURF Research Cloud portal "
                             "(Profile -> API tokens).")

    def _classify_auth(self, response: httpx.Response, body: Any) -> ProviderError | None:
        if response.status_code in (401, 403):
            return self._auth_error(response, body)
        return None

    def _classify_action(self, action: str, provider_id: str) -> Callable[[httpx.Response, Any], ProviderError | None]:
        def classify(response: httpx.Response, body: Any) -> ProviderError | None:
            status = response.status_code
            if status in (401, 403):
                return self._auth_error(response, body)
            if status in (400, 409, 422):
                detail = self._api.scrub(surf_error_text(body))[:300] or "no reason given"
                if action == "resume" and _CAPACITY.search(detail):
                    return CapacityError(DISPLAY, f"workspace {provider_id} could not be resumed: SURF has no "
                                                  f"free GPUs for it right now; the resume failed: {detail}",
                                         hint="It stays paused. Try again later.")
                return ProviderStateError(DISPLAY, f"SURF refused to {action} workspace {provider_id} "
                                                   f"(HTTP {status}): {detail}")
            return None
        return classify

    # ------------------------------------------------------------------ mapping

    def _instance(self, ws: dict[str, Any]) -> ProviderInstance:
        status = str(ws.get("status") or "").strip().lower()
        state = _STATES.get(status, ProviderState.UNKNOWN)
        raw_meta = ws.get("resource_meta")
        meta: dict[str, Any] = raw_meta if isinstance(raw_meta, dict) else {}
        flavour = meta.get("flavor_name")
        gpu_name, num_gpus = gpu_from_flavour(flavour) if isinstance(flavour, str) else ("", 0)
        name = str(ws.get("name") or "").strip()
        parts = [name] if name else []
        ip = meta.get("ip")
        if state is ProviderState.RUNNING and isinstance(ip, str) and ip.strip():
            parts.append(f"at {ip.strip()}")
        if state is ProviderState.UNKNOWN:
            parts.append(f"(SURF status {status!r})" if status else "(SURF reports no status)")
        last = _actions(ws)
        if last and (error := _failure(last[-1])) is not None:
            kind = str(last[-1].get("type") or "action")
            parts.append(f"(the last {kind} failed: {self._api.scrub(error)[:200]})")
        return ProviderInstance(
            provider=NAME,
            provider_id=str(ws["id"]),
            label=None,
            state=state,
            gpu_name=gpu_name,
            num_gpus=num_gpus,
            dph=self.dph,
            storage_dph=self.storage_dph if self.capabilities.storage_bills_while_stopped else Decimal(0),
            endpoint=None,
            message=" ".join(parts) or None,
        )


# ---------------------------------------------------------------------- helpers

_FORM_NAMES = {"bare": "the bare token", "token": "'Token <token>'"}


def surf_error_text(body: Any) -> str:
    """SURF's reason from an error body: `message` is a list of strings in SURF's 400s (the
    Swagger's BadRequestSchema), a string elsewhere; other shapes go to the shared reader."""
    if isinstance(body, dict):
        message = body.get("message")
        if isinstance(message, list):
            parts = [str(m).strip() for m in message if isinstance(m, (str, int, float)) and str(m).strip()]
            parts += [error_text(m) for m in message if isinstance(m, dict) and error_text(m)]
            if parts:
                return "; ".join(parts)
        elif isinstance(message, dict):
            nested = "; ".join(f"{k}: {v}" for k, v in message.items() if isinstance(v, (str, int, float)))
            if nested:
                return nested
    return error_text(body)


def gpu_from_flavour(flavour: str) -> tuple[str, int]:
    """(GPU model, count) from a SURF flavour name: "gpu-a10-11core-88gb" -> ("A10", 1),
    "2gpu-a100-..." -> ("A100", 2). No known GPU model word in it -> ("", 0): SURF reports no GPU
    field, so a flavour that names none is treated as CPU-only."""
    words = [w for w in re.split(r"[^0-9a-z]+", flavour.casefold()) if w]
    count: int | None = None
    model: str | None = None
    memory: float | None = None
    for i, word in enumerate(words):
        glued = re.fullmatch(r"([a-z]+[0-9]+[a-z]*)x([0-9]{1,2})", word)   # "h100x4"
        if glued is not None and glued.group(1) in GPU_MODELS:
            word, count = glued.group(1), count or int(glued.group(2))
        if model is None and word in GPU_MODELS:
            model = word
            after = re.fullmatch(r"([0-9]{2,3})gb", words[i + 1]) if i + 1 < len(words) else None
            memory = float(after.group(1)) if after is not None else None   # "a100-80gb": GPU memory
            continue
        match = _GPU_COUNT.fullmatch(word)
        if count is None and match is not None:
            count = int(next(g for g in match.groups() if g is not None))
    if model is None:
        return "", 0
    return normalise_gpu_name(model.upper(), memory), max(1, count or 1)


def _normalise_base(base_url: str) -> str:
    """'https://host/v1', tolerating a trailing slash and the workspace API's own base
    ('https://host/v1/workspace/'), which the SURF wiki also calls a base URL."""
    url = (base_url or DEFAULT_URL).strip().rstrip("/")
    split = urlsplit(url)
    if split.scheme not in ("http", "https") or not split.netloc:
        raise ConfigError(f"surf_url must be an http(s) URL such as {DEFAULT_URL}, not {url!r}.")
    if url.endswith("/workspace"):
        url = url[: -len("/workspace")]
    return url


def _origin(url: str) -> tuple[str, str, int | None]:
    split = urlsplit(url)
    scheme = split.scheme.lower()
    port = split.port or {"http": 80, "https": 443}.get(scheme)
    return scheme, (split.hostname or "").lower(), port


def _ws_path(provider_id: str) -> str:
    return f"{WORKSPACES}{quote(provider_id.strip(), safe='')}/"


def _params_key(params: dict[str, str]) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(params.items()))


def _is_deleted(ws: dict[str, Any]) -> bool:
    return ws.get("deleted") is True or str(ws.get("status") or "").lower() == "deleted"


def _which(ws: dict[str, Any], provider_id: str) -> str:
    name = str(ws.get("name") or "").strip()
    return f"{name} ({provider_id})" if name else provider_id


def _actions(ws: dict[str, Any], kind: str | None = None) -> list[dict[str, Any]]:
    raw = ws.get("workspace_actions")
    if not isinstance(raw, list):
        return []
    return [a for a in raw if isinstance(a, dict)
            and (kind is None or str(a.get("type") or "").lower() == kind)]


def _action_key(action: dict[str, Any], index: int) -> str:
    ident = action.get("id")
    return f"id:{ident}" if ident not in (None, "") else f"#{index}"


def _action_keys(ws: dict[str, Any], kind: str) -> set[str]:
    return {_action_key(a, i) for i, a in enumerate(_actions(ws, kind))}


def _failure(action: dict[str, Any]) -> str | None:
    """The error of a failed workspace action, None when it did not (yet) fail."""
    result = action.get("result")
    error: Any = result.get("error") if isinstance(result, dict) else None
    if isinstance(error, (dict, list)):
        error = surf_error_text({"message": error} if isinstance(error, list) else error) or str(error)
    if error:
        return str(error)
    if str(action.get("status") or "").lower() in _FAILED:
        return error_text(action) or "SURF gave no reason"
    return None


def _new_failure(ws: dict[str, Any], kind: str, before: set[str]) -> str | None:
    """The failure of the newest `kind` action that appeared since `before` was taken."""
    new = [a for i, a in enumerate(_actions(ws, kind)) if _action_key(a, i) not in before]
    return _failure(new[-1]) if new else None
