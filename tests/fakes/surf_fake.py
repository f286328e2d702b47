"""A loopback fake of the SURF Research Cloud workspace API, answering in the shapes the public
clients derived from SURF's Swagger read (core/providers/surf.py says which facts are official
and which are third-party).

- Auth: `auth="bare"` (default) accepts only the bare token in `authorization`, `auth="token"`
  only `Token <token>`, `auth="either"` both; anything else ("Bearer <token>" included) is a 401.
  The 401 body deliberately echoes what it was sent, so tests prove the client scrubs the token.
- Error bodies are SURF's envelope, `{"code", "status", "message"}`, with `message` a *list* of
  strings for a 400 (the Swagger's BadRequestSchema) and a string for a 404; the 401 uses the
  same envelope with a list (its exact shape is not in the Swagger subset we know: an assumption).
- Workspaces carry `resource_meta.flavor_name` (e.g. "gpu-a10-11core-88gb"), not a GPU field.
- `GET {prefix}/workspace/workspaces/` (op "list"): filters `application_type` and hides deleted
  workspaces with `deleted=false`; pages of `page_size` with absolute `next`/`previous` links
  built on `public_url` (default: this server), so a test can make SURF name another host.
- `GET {prefix}/workspace/workspaces/{id}/` (op "get"): 404 for an unknown id; a deleted one is
  still answered, with `deleted: true`.
- `POST .../{id}/actions/pause/` (op "stop") and `.../actions/resume/` (op "start"): strict like
  SURF's gateway is said to be: the body must be a JSON object (`{}`) and the Content-Type
  `application/json;pause` (resp. `;resume`), else 415 (wrong type) or 400 (no body). Then 202, the
  workspace goes pausing/resuming and records a workspace_action; reads (get or list) move it on,
  `reads_per_phase` reads per step. `fail_resume()` makes the next resume fail with a
  workspace_actions error, as SURF reports no free GPUs; `late_actions` lists a new action only
  once it is done; `lose_answer()` acts but answers 502.
No route exists for search, create or destroy: gpuherd must never send them.
"""

from __future__ import annotations

import itertools
import uuid
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

from .loopback import Fault, Handled, LoopbackServer, Request, Response

TOKEN = "surf-test-token-0f9e8d7c6b5a"
AUTH_FORMS = ("bare", "token", "either")
NO_GPUS = "Resume failed: no GPUs available for flavour 'gpu-a10-11core-88gb' (No valid host was found)"


@dataclass
class _Step:
    reads: int                  # reads left before this step applies
    status: str
    action_status: str
    error: str | None = None


@dataclass
class Workspace:
    id: str
    name: str
    status: str = "running"
    application_type: str = "Compute"
    deleted: bool = False
    ip: str = "145.100.0.10"
    flavor: str | None = None               # resource_meta.flavor_name
    actions: list[dict[str, Any]] = field(default_factory=list)
    plan: list[_Step] = field(default_factory=list)
    unseen: dict[str, Any] | None = None   # an action not yet listed in workspace_actions

    def body(self) -> dict[str, Any]:
        meta: dict[str, Any] = {"ip": self.ip}
        if self.flavor is not None:
            meta["flavor_name"] = self.flavor
        return {"id": self.id, "name": self.name, "status": self.status, "active": not self.deleted,
                "deleted": self.deleted, "application_type": self.application_type,
                "resource_meta": meta, "workspace_actions": [dict(a) for a in self.actions]}


class FakeSurf(LoopbackServer):
    def __init__(self, *, token: str = TOKEN, prefix: str = "/v1", page_size: int = 3,
                 reads_per_phase: int = 2, public_url: str | None = None, latency_s: float = 0.0,
                 auth: str = "bare") -> None:
        if auth not in AUTH_FORMS:
            raise ValueError(f"auth must be one of {AUTH_FORMS}")
        self.token = token
        self.auth = auth                      # which header forms are accepted
        self.prefix = "/" + prefix.strip("/") if prefix.strip("/") else ""
        self.page_size = page_size
        self.reads_per_phase = reads_per_phase
        self.public_url = public_url          # base written into next/previous links
        self.late_actions = False             # new actions appear in workspace_actions only when done
        self.workspaces: dict[str, Workspace] = {}
        self._resume_failures: list[tuple[str, int]] = []
        self._lost_answers: list[str] = []
        self._action_ids = itertools.count(1)
        super().__init__(latency_s=latency_s)

    def start(self) -> FakeSurf:
        super().start()
        # answers go out as two writes (headers, body): without this, Nagle's algorithm and the
        # client's delayed ACK add ~40 ms to every request on a kept-alive connection
        assert self._server is not None
        self._server.RequestHandlerClass.disable_nagle_algorithm = True  # type: ignore[attr-defined]
        return self

    # --- state -------------------------------------------------------------------------
    def add(self, name: str, status: str = "running", **kw: Any) -> str:
        ws = Workspace(id=kw.pop("id", None) or str(uuid.uuid4()), name=name, status=status, **kw)
        with self._lock:
            self.workspaces[ws.id] = ws
        return ws.id

    def fail_resume(self, error: str = NO_GPUS, *, after_reads: int = 1) -> None:
        """The next resume is accepted, then fails `after_reads` reads later with `error`."""
        with self._lock:
            self._resume_failures.append((error, after_reads))

    def lose_answer(self, op: str) -> None:
        """The next `op` ("stop"/"start") is carried out, but its answer is lost in a 502, as when
        a gateway times out after the backend acted."""
        with self._lock:
            self._lost_answers.append(op)

    def delete(self, ws_id: str) -> None:
        with self._lock:
            ws = self.workspaces[ws_id]
            ws.deleted, ws.status, ws.plan = True, "deleted", []

    def reset(self) -> None:
        """Back to empty, so one running server can serve many tests (stopping one takes 0.5 s)."""
        with self._lock:
            self.workspaces.clear()
            self._resume_failures.clear()
            self._lost_answers.clear()
            self.requests.clear()
            self.public_url = None
            self.late_actions = False
            self.auth = "bare"
        self.clear_faults()

    def forget(self, ws_id: str) -> None:
        with self._lock:
            self.workspaces.pop(ws_id, None)

    # --- routes ------------------------------------------------------------------------
    def routes(self) -> None:
        base = f"{self.prefix}/workspace/workspaces"
        self.route("GET", f"{base}/", self._list, "list")
        self.route("GET", f"{base}/{{id}}/", self._get, "get")
        self.route("POST", f"{base}/{{id}}/actions/pause/", self._pause, "stop")
        self.route("POST", f"{base}/{{id}}/actions/resume/", self._resume, "start")

    def authorised(self, request: Request) -> bool:
        got = _header(request, "authorization")
        accepted = {"bare": {self.token}, "token": {f"Token {self.token}"},
                    "either": {self.token, f"Token {self.token}"}}[self.auth]
        return got in accepted

    def unauthorised(self, request: Request) -> Response:
        got = _header(request, "authorization")
        return error(401, f"Invalid token: {got!r}" if got else "Authentication credentials were not provided.")

    def fault_response(self, fault: Fault, request: Request) -> Response:
        if fault.kind == "capacity":
            return error(400, "No GPUs available for this flavour right now.")
        return self.unauthorised(request)

    def _link(self, request: Request, page: int) -> str:
        base = self.public_url.rstrip("/") if self.public_url else f"{self.url}{self.prefix}"
        query = {**request.query, "page": str(page)}
        return f"{base}/workspace/workspaces/?{urlencode(query)}"

    def _list(self, request: Request, params: dict[str, str]) -> Response:
        kind = request.query.get("application_type")
        hide_deleted = request.query.get("deleted", "").lower() == "false"
        rows = [ws for ws in self.workspaces.values()
                if (kind is None or ws.application_type == kind) and not (hide_deleted and ws.deleted)]
        try:
            page = int(request.query.get("page", "1"))
        except ValueError:
            raise Handled(error(404, "Invalid page.")) from None
        pages = max(1, -(-len(rows) // self.page_size))
        if not 1 <= page <= pages:
            raise Handled(error(404, "Invalid page."))
        chunk = rows[(page - 1) * self.page_size: page * self.page_size]
        for ws in chunk:
            self._advance(ws)
        return Response(200, {"count": len(rows),
                              "next": self._link(request, page + 1) if page < pages else None,
                              "previous": self._link(request, page - 1) if page > 1 else None,
                              "results": [ws.body() for ws in chunk]})

    def _find(self, ws_id: str) -> Workspace:
        ws = self.workspaces.get(ws_id)
        if ws is None:
            raise Handled(error(404, "Not found."))
        return ws

    def _get(self, request: Request, params: dict[str, str]) -> Response:
        ws = self._find(params["id"])
        self._advance(ws)
        return Response(200, ws.body())

    @staticmethod
    def _check_action_request(request: Request, action: str) -> None:
        """What every Swagger-derived client sends: `{}` as `application/json;<action>`."""
        content_type = (_header(request, "content-type") or "").replace(" ", "").lower()
        if content_type != f"application/json;{action}":
            raise Handled(error(415, f"Unsupported media type {content_type or 'none'!r} in request; "
                                     f"expected 'application/json;{action}'."))
        if not isinstance(request.body, dict):
            raise Handled(error(400, "A JSON object is required as the request body."))

    def _pause(self, request: Request, params: dict[str, str]) -> Response:
        self._check_action_request(request, "pause")
        ws = self._find(params["id"])
        if ws.deleted or ws.status != "running":
            raise Handled(error(400, f"Workspace cannot be paused while {ws.status}."))
        action = self._record(ws, "pause")
        ws.status = "pausing"
        ws.plan = [_Step(self.reads_per_phase, "paused", "finished")]
        return self._accepted("stop", action)

    def _resume(self, request: Request, params: dict[str, str]) -> Response:
        self._check_action_request(request, "resume")
        ws = self._find(params["id"])
        if ws.deleted or ws.status != "paused":
            raise Handled(error(400, f"Workspace cannot be resumed while {ws.status}."))
        action = self._record(ws, "resume")
        ws.status = "resuming"
        if self._resume_failures:
            why, after = self._resume_failures.pop(0)
            ws.plan = [_Step(after, "paused", "failed", why)]
        else:
            ws.plan = [_Step(self.reads_per_phase, "running", "finished")]
        return self._accepted("start", action)

    def _accepted(self, op: str, action: dict[str, Any]) -> Response:
        if op in self._lost_answers:
            self._lost_answers.remove(op)
            return Response(502, "<html>Bad Gateway</html>", content_type="text/html")
        return Response(202, {"id": action["id"], "type": action["type"], "status": action["status"]})

    def _record(self, ws: Workspace, kind: str) -> dict[str, Any]:
        action = {"id": next(self._action_ids), "type": kind, "status": "running", "result": {}}
        if self.late_actions:
            ws.unseen = action
        else:
            ws.actions.append(action)
        return action

    @staticmethod
    def _advance(ws: Workspace) -> None:
        """One read: the next step of the workspace's plan comes closer, and applies when due."""
        if not ws.plan:
            return
        step = ws.plan[0]
        step.reads -= 1
        if step.reads > 0:
            return
        ws.plan.pop(0)
        ws.status = step.status
        if ws.unseen is not None:
            ws.actions.append(ws.unseen)
            ws.unseen = None
        if ws.actions:
            ws.actions[-1]["status"] = step.action_status
            ws.actions[-1]["result"] = {"error": step.error} if step.error else {}


_REASONS = {400: "Bad Request", 401: "Unauthorized", 404: "Not Found", 415: "Unsupported Media Type"}


def error(status: int, text: str) -> Response:
    """SURF's error envelope: `message` is a list of strings, except for a 404 (a string)."""
    message: Any = text if status == 404 else [text]
    return Response(status, {"code": status, "status": _REASONS.get(status, "Error"), "message": message})


def _header(request: Request, name: str) -> str | None:
    for key, value in request.headers.items():
        if key.lower() == name:
            return value
    return None
