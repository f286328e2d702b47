"""A threaded HTTP server on 127.0.0.1 that a fake API builds on: routing, a request log, a fixed
latency, and faults queued per operation (429 with Retry-After, 500, a hang past the client's
timeout, malformed JSON, and the provider's own capacity and auth errors).

It runs in its own threads, so it answers while the test's event loop waits on the client, and a
slow answer (the benchmarks' 0.5/1/2 s providers) does not hold up the other fakes."""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlsplit

FAULT_KINDS = ("rate_limit", "server_error", "bad_gateway", "timeout", "malformed", "capacity", "auth",
               "disconnect")


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: Any                      # decoded JSON, or the raw text when not JSON
    raw: bytes = b""
    op: str = ""


@dataclass
class Response:
    status: int = 200
    body: Any = None               # dict/list -> JSON; str/bytes sent as is
    headers: dict[str, str] = field(default_factory=dict)
    content_type: str = "application/json"


@dataclass
class Fault:
    kind: str
    retry_after: float | None = None
    hang_s: float = 5.0


class Handled(Exception):
    """Raised by a route to answer with `response` (errors deep inside a handler)."""

    def __init__(self, response: Response) -> None:
        self.response = response


Route = Callable[[Request, dict[str, str]], Response]


class LoopbackServer:
    """Subclasses register routes in `routes()` and map faults of kind capacity/auth to their API's
    own error bodies in `fault_response()`."""

    def __init__(self, *, latency_s: float = 0.0) -> None:
        self.latency_s = latency_s
        self.requests: list[Request] = []
        self._faults: dict[str, deque[Fault]] = {}
        self._lock = threading.RLock()
        self._routes: list[tuple[str, list[str], Route, str]] = []
        self.routes()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        # op -> called with the request after the fake acted on it, before it answers: a test can
        # kill the client at the worst moment (the machine exists, the client never hears of it)
        self.after: dict[str, Callable[[Request], None]] = {}

    # --- to override ---------------------------------------------------------------------
    def routes(self) -> None:
        raise NotImplementedError

    def authorised(self, request: Request) -> bool:
        return True

    def unauthorised(self, request: Request) -> Response:
        return Response(401, {"message": "unauthorised"})

    def fault_response(self, fault: Fault, request: Request) -> Response:
        if fault.kind == "capacity":
            return Response(409, {"message": "no capacity"})
        return self.unauthorised(request)

    # --- setup ---------------------------------------------------------------------------
    def route(self, method: str, pattern: str, handler: Route, op: str) -> None:
        """`pattern` like '/api/v0/instances/{id}/'; a trailing slash is optional when matching."""
        self._routes.append((method.upper(), [p for p in pattern.strip("/").split("/") if p], handler, op))

    def fault(self, op: str, kind: str, *, times: int = 1, retry_after: float | None = None,
              hang_s: float = 5.0) -> None:
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault {kind!r}; one of {FAULT_KINDS}")
        with self._lock:
            queue = self._faults.setdefault(op, deque())
            for _ in range(times):
                queue.append(Fault(kind, retry_after, hang_s))

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def calls(self, op: str) -> list[Request]:
        with self._lock:
            return [r for r in self.requests if r.op == op]

    @property
    def url(self) -> str:
        assert self._server is not None, "server not started"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> LoopbackServer:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True   # else each kept-alive answer waits ~40 ms for its ACK

            def log_message(self, format: str, *args: Any) -> None:  # quiet
                return

            def _handle(self) -> None:
                fake._serve(self)

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _handle

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=type(self).__name__, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> LoopbackServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- serving -------------------------------------------------------------------------
    def _match(self, method: str, path: str) -> tuple[Route, dict[str, str], str] | None:
        parts = [p for p in path.strip("/").split("/") if p]
        for m, pattern, handler, op in self._routes:
            if m != method or len(pattern) != len(parts):
                continue
            params: dict[str, str] = {}
            for want, got in zip(pattern, parts, strict=True):
                if want.startswith("{") and want.endswith("}"):
                    params[want[1:-1]] = got
                elif want != got:
                    break
            else:
                return handler, params, op
        return None

    def _serve(self, h: BaseHTTPRequestHandler) -> None:
        split = urlsplit(h.path)
        length = int(h.headers.get("Content-Length") or 0)
        raw = h.rfile.read(length) if length else b""
        try:
            body: Any = json.loads(raw) if raw else None
        except ValueError:
            body = raw.decode("utf-8", "replace")
        request = Request(method=h.command, path=split.path, query=dict(parse_qsl(split.query)),
                          headers={k: v for k, v in h.headers.items()}, body=body, raw=raw)
        found = self._match(h.command, split.path)
        if found is None:
            with self._lock:
                self.requests.append(request)
            return self._send(h, Response(404, {"message": f"no route {h.command} {split.path}"}))
        handler, params, op = found
        request.op = op
        with self._lock:
            self.requests.append(request)
            queue = self._faults.get(op)
            fault = queue.popleft() if queue else None
        if self.latency_s:
            time.sleep(self.latency_s)
        if fault is not None:
            return self._send_fault(h, fault, request)
        if not self.authorised(request):
            return self._send(h, self.unauthorised(request))
        try:
            with self._lock:
                response = handler(request, params)
        except Handled as answer:
            response = answer.response
        hook = self.after.get(op)
        if hook is not None:
            hook(request)
        self._send(h, response)

    def _send_fault(self, h: BaseHTTPRequestHandler, fault: Fault, request: Request) -> None:
        if fault.kind == "timeout":
            time.sleep(fault.hang_s)
            return self._send(h, Response(504, {"message": "late"}))
        if fault.kind == "disconnect":
            h.close_connection = True
            h.wfile.flush()
            return
        if fault.kind == "rate_limit":
            headers = {"Retry-After": f"{fault.retry_after:g}"} if fault.retry_after is not None else {}
            return self._send(h, Response(429, {"detail": "API requests too frequent endpoint threshold=1.0"},
                                          headers))
        if fault.kind == "server_error":
            return self._send(h, Response(500, "Internal Server Error", content_type="text/plain"))
        if fault.kind == "bad_gateway":
            return self._send(h, Response(502, "<html>Bad Gateway</html>", content_type="text/html"))
        if fault.kind == "malformed":
            return self._send(h, Response(200, b'{"offers": [{"id": 1, "gpu_na'))
        return self._send(h, self.fault_response(fault, request))

    @staticmethod
    def _send(h: BaseHTTPRequestHandler, response: Response) -> None:
        body = response.body
        if isinstance(body, (dict, list)) or (body is None and response.status != 204):
            data = json.dumps(body).encode() if body is not None else b""
        elif isinstance(body, str):
            data = body.encode()
        elif isinstance(body, bytes):
            data = body
        else:
            data = b""
        try:
            h.send_response(response.status)
            h.send_header("Content-Type", response.content_type)
            h.send_header("Content-Length", str(len(data)))
            for key, value in response.headers.items():
                h.send_header(key, value)
            h.end_headers()
            if data:
                h.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (its timeout), as real clients do
