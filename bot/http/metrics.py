"""`GET /metrics` in Prometheus' exposition format, and the latency of every HTTP request.

Decisions:

- **prometheus-client, a registry per app.** Each app keeps its own `CollectorRegistry` on
  `app.state` (made on first use from `request.app`), never the library's global default
  registry: tests and benchmarks build several apps in one process, and a global registry would
  mix their histograms (or refuse the second one as a duplicate).
- **A custom collector** turns the core's figures into metric families at scrape time: the
  in-process counters of `gpuherd.core.telemetry.TELEMETRY` (provider calls, guard passes) and
  the database gauges of `telemetry.gauges` (instances, $/h, month spend, budgets, pending
  notices), read off the event loop in one unit of work before the text is built. Nothing here
  computes a business figure; the core does. When the database does not answer, the scrape
  still succeeds with the in-process metrics and `gpuherd_database_up 0` (an alert can fire on
  it, and a failed scrape would hide the rest).
- **Floats only here.** Money is Decimal everywhere in gpuherd; Prometheus sample values are
  floats, so Decimal is converted with `float()` at this exposition edge and nowhere else.
- **Names** are prefixed `gpuherd_` and carry their unit (`_seconds`, `_dollars`,
  `_dollars_per_hour`, `_ratio`; counters end in `_total`), per Prometheus' naming conventions.
- **Bounded labels, no secrets.** Labels are providers, outcome kinds, instance states, teams,
  surfaces, guard blindness reasons, and for HTTP the route *template* (e.g.
  `/api/v1/instances/{instance_id}`, never the raw path; a path no route matched is
  `unmatched`), the method (an unknown one is `OTHER`) and the status class (`2xx`…). No
  principal, instance id, key, token or error message is ever a label value; user budgets are
  left out because their name is a principal.
- **No API key by default.** Scrapers usually send none, and nothing exposed is secret or per
  person (team spend is what every team member's `/gpu costs` shows). Put the endpoint behind
  the network (or a reverse proxy's auth) where team spend must stay internal.
- **Latency** is measured by app.py's middleware from the request's arrival to the response's
  start (for the event stream: until its headers go out, not for the stream's whole life).
- Known label combinations start at zero (configured providers x outcome kinds, every state x
  provider, every notice surface), so `rate()` sees the first error and a series does not
  vanish when its last instance goes.
- Replicas: the database gauges are the same on every replica (aggregate them with `max`); the
  provider and guard counters are per process (aggregate with `sum`); guard figures are zero on
  standbys, and `gpuherd_guards_leader` says which replica runs them."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import Response
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric, SummaryMetricFamily
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector
from starlette.routing import compile_path

from gpuherd.core.service import GpuService
from gpuherd.core.telemetry import BLIND_REASONS, OUTCOMES, TELEMETRY, Gauges, Telemetry, gauges

log = logging.getLogger(__name__)
router = APIRouter(tags=["meta"])

UNMATCHED = "unmatched"
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
# seconds; the API's target is a p99 under 50 ms, so the buckets are dense there
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def status_class(status: int) -> str:
    return f"{status // 100}xx" if 100 <= status <= 599 else "other"


class CoreCollector(Collector):
    """The core's figures as metric families. `latest` is the database snapshot of the last
    scrape (the endpoint sets it and builds the text with no await in between, so concurrent
    scrapes each see their own); None when the database did not answer."""

    def __init__(self, service: GpuService, app: FastAPI | None = None, telemetry: Telemetry = TELEMETRY) -> None:
        self.service = service
        self.app = app
        self.telemetry = telemetry
        self.latest: Gauges | None = None

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        providers = self.service.providers.names()
        yield from _provider_families(self.telemetry, providers)
        yield from _guard_families(self.telemetry)
        yield from _leader_family(self.app)
        up = GaugeMetricFamily("gpuherd_database_up", "Whether this scrape could read the database (1) or not (0)")
        up.add_metric([], 1 if self.latest is not None else 0)
        yield up
        if self.latest is not None:
            yield from _gauge_families(self.latest, [r.surface for r in self.service.outbox.routes])


def _provider_families(telemetry: Telemetry, providers: list[str]) -> Iterator[Metric]:
    calls = CounterMetricFamily("gpuherd_provider_calls", "Provider API call attempts by provider and outcome "
                                "(ok, or the error kind: rate_limited, unavailable, timeout, capacity, auth, error)",
                                labels=["provider", "kind"])
    counted = dict.fromkeys(((p, k) for p in providers for k in OUTCOMES), 0)
    counted.update(telemetry.provider_calls())
    for (provider, kind), n in sorted(counted.items()):
        calls.add_metric([provider, kind], n)
    yield calls


def _guard_families(telemetry: Telemetry) -> Iterator[Metric]:
    g = telemetry.guards()
    passes = SummaryMetricFamily("gpuherd_guard_pass_seconds", "Guard passes run by this process and their duration",
                                 count_value=g.passes, sum_value=g.seconds_total)
    yield passes
    if g.last_seconds is not None and g.last_started is not None:
        last = GaugeMetricFamily("gpuherd_guard_last_pass_seconds", "Duration of this process's last guard pass")
        last.add_metric([], g.last_seconds)
        yield last
        when = GaugeMetricFamily("gpuherd_guard_last_pass_timestamp_seconds",
                                 "When this process's last guard pass started (Unix time)")
        when.add_metric([], g.last_started.timestamp())
        yield when
    for name, value, what in (("checked", g.checked, "Due instances the guards checked"),
                              ("warned", g.warned, "Warnings the guards sent"),
                              ("acted", g.acted, "Instances the guards stopped or destroyed"),
                              ("errors", g.errors, "Instances a guard pass could not check or act on")):
        family = CounterMetricFamily(f"gpuherd_guard_{name}", what)
        family.add_metric([], value)
        yield family
    blind = GaugeMetricFamily("gpuherd_guards_blind", "Instances the last guard pass could not check, by reason "
                              "(provider_unreachable, activity_unknown)", labels=["reason"])
    for reason in BLIND_REASONS:
        blind.add_metric([reason], g.blind.get(reason, 0))
    yield blind


def _leader_family(app: FastAPI | None) -> Iterator[Metric]:
    runtime = getattr(app.state, "runtime", None) if app is not None else None
    if runtime is None or getattr(runtime, "scheduler", None) is None:
        return
    leader = GaugeMetricFamily("gpuherd_guards_leader", "Whether this replica holds the guard lock and runs the "
                               "guards (1) or stands by (0)")
    leader.add_metric([], 1 if getattr(runtime, "is_leader", False) else 0)
    yield leader


def _gauge_families(g: Gauges, surfaces: list[str]) -> Iterator[Metric]:
    instances = GaugeMetricFamily("gpuherd_instances", "Instances by state and provider", labels=["state", "provider"])
    for (state, provider), n in sorted(g.instances.items()):
        instances.add_metric([state, provider], n)
    yield instances
    rate = GaugeMetricFamily("gpuherd_running_dollars_per_hour",
                             "USD per hour billed right now: compute of machines up, storage of stopped ones")
    rate.add_metric([], float(g.billed_per_hour))
    yield rate
    spend = GaugeMetricFamily("gpuherd_month_spend_dollars", "This month's spend (UTC) by team, USD", labels=["team"])
    for team, amount in sorted(g.month_spend.items()):
        spend.add_metric([team], float(amount))
    yield spend
    limit = GaugeMetricFamily("gpuherd_budget_limit_dollars", "Monthly team budget, USD", labels=["team"])
    used = GaugeMetricFamily("gpuherd_budget_used_ratio", "This month's spend over the team's monthly budget "
                             "(1 = used up)", labels=["team"])
    for b in g.team_budgets:
        limit.add_metric([b.name], float(b.limit))
        used.add_metric([b.name], float(b.fraction))
    yield limit
    yield used
    pending = GaugeMetricFamily("gpuherd_notices_pending", "Notice deliveries not delivered and not given up, by "
                                "surface", labels=["surface"])
    for surface, n in sorted({**dict.fromkeys(surfaces, 0), **g.notices_pending}.items()):
        pending.add_metric([surface], n)
    yield pending


class RouteTemplates:
    """The full template of the route a request matched, e.g. `/api/v1/instances/{instance_id}`.

    FastAPI puts the matched route in `scope["route"]`, but for a router included with a prefix
    that is the router's own route, whose `path` lacks the prefix (`/instances/{instance_id}`).
    The full template is found among the app's own templates (its OpenAPI paths and top-level
    routes): the one that ends with the route's path and whose pattern matches the request's
    path. Only templates written in code can come out of here, never a raw path; when nothing
    fits, the route's own path is used (still a template)."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app
        self._known: list[tuple[str, re.Pattern[str]]] | None = None
        self._single: dict[int, str] = {}

    def _templates(self) -> list[tuple[str, re.Pattern[str]]]:
        if self._known is None:
            paths = {p for r in self.app.routes if isinstance(p := getattr(r, "path", None), str) and p}
            try:
                paths |= set(self.app.openapi().get("paths", {}))
            except Exception as exc:  # a schema that does not build must not break requests
                log.warning("metrics: no OpenAPI paths for route templates (%s)", type(exc).__name__)
            self._known = [(p, compile_path(p)[0]) for p in sorted(paths)]
        return self._known

    def warm(self) -> None:
        """Build the template list now (it renders the OpenAPI schema, a few hundred
        milliseconds of CPU): the server calls this before it accepts requests, so no request
        pays it on the loop."""
        self._templates()

    def resolve(self, route: object, path: str) -> str:
        own = getattr(route, "path", None)
        if not isinstance(own, str) or not own:
            return UNMATCHED
        if id(route) in self._single:
            return self._single[id(route)]
        candidates = [(t, rx) for t, rx in self._templates() if t.endswith(own)]
        if len(candidates) == 1:
            self._single[id(route)] = candidates[0][0]
            return candidates[0][0]
        return next((t for t, rx in candidates if rx.match(path)), own)


@dataclass
class AppMetrics:
    """What one app keeps on `app.state.metrics`."""

    registry: CollectorRegistry
    latency: Histogram
    core: CoreCollector
    routes: RouteTemplates


def app_metrics(app: FastAPI) -> AppMetrics:
    """The app's registry, made on first use."""
    found: AppMetrics | None = getattr(app.state, "metrics", None)
    if found is None:
        registry = CollectorRegistry()
        latency = Histogram("gpuherd_http_request_duration_seconds", "HTTP request latency until the response "
                            "starts, by route template, method and status class",
                            ["route", "method", "status_class"], registry=registry, buckets=BUCKETS)
        core = CoreCollector(app.state.service, app)
        registry.register(core)
        found = AppMetrics(registry, latency, core, RouteTemplates(app))
        app.state.metrics = found
    return found


def observe(app: FastAPI, route: str, method: str, status: int, seconds: float) -> None:
    """Record one request's latency under a route template (never a raw path)."""
    m = method.upper()
    app_metrics(app).latency.labels(route, m if m in METHODS else "OTHER",
                                    status_class(status)).observe(max(seconds, 0.0))


def observe_request(request: Request, status: int, seconds: float) -> None:
    """Record one request's latency by the template of the route it matched (`unmatched` when
    none did). Called by app.py's middleware once the response has started."""
    app: FastAPI = request.app
    route = request.scope.get("route")
    template = UNMATCHED if route is None else app_metrics(app).routes.resolve(route, request.scope.get("path", ""))
    observe(app, template, request.method, status, seconds)


@router.get("/metrics", summary="Prometheus metrics (text exposition format)", response_class=Response,
            responses={200: {"description": "Metrics in Prometheus' text format (OpenMetrics when asked for "
                                            "in Accept)", "content": {"text/plain": {"schema": {"type": "string"}},
                                                        "application/openmetrics-text": {"schema": {"type": "string"}}}}})
async def metrics(request: Request) -> Response:
    app: FastAPI = request.app
    m = app_metrics(app)
    service: GpuService = app.state.service
    try:
        latest: Gauges | None = await gauges(service.db, service.clock, service.providers.names())
    except Exception as exc:  # the database is down: say so in the metrics, keep the rest
        log.warning("metrics: the database did not answer (%s)", type(exc).__name__)
        latest = None
    encoder, content_type = choose_encoder(request.headers.get("accept", ""))
    m.core.latest = latest          # no await from here to the text: this scrape's snapshot
    body = encoder(m.registry)
    return Response(body, media_type=content_type)
