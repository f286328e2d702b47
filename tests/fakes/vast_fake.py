"""A loopback fake of the vast.ai REST API, modelled on shared/reference/vast.md §11.

* Bearer auth only (a legacy `?api_key=` is tolerated); a bad key gets
  401 `{"success": false, "error": "auth_error", "msg": "Invalid user key"}`.
* `POST /api/v0/bundles/` filters a seeded catalogue (a few hundred offers, deterministic):
  operator objects with string-typed numbers coerced ("1" == 1), `verified` against
  `verification`, `rentable` assumed true when absent, `rented` accepted and ignored; every
  field of the CLI's table that an offer carries is applied (`gpu_name` by its exact spelling,
  eq/in/neq/notin; `gpu_total_ram` and `cpu_ram` in MB; `duration` in seconds; `geolocation`
  against the offer's two-letter country code; `datacenter` as `hosting_type == 1`;
  `driver_version` against `driver_vers`); other unknown fields are ignored; `order` as
  [[field, dir]], `limit` (64 when absent, capped), `type`
  on-demand/bid/reserved; `allocated_storage` prices the disk part of `dph_total` (a 720-hour
  month, as the reference's numbers suggest). Content-Type is exactly application/json.
  `catalogue=` replaces the seeded market with given offers (e.g. 2000 cheap cards + a few H100s).
* `PUT /api/v0/asks/{id}/` -> `{"success": true, "new_contract": N}`; 404 unknown offer, 410
  offer taken (both `no_such_ask`), 400 `invalid_args` without an image.
* `GET /api/v1/instances/` with JSON-in-query params, keyset pages of at most 25 and
  `next_token`; `GET /api/v0/instances/{id}/` wraps the row in `instances` (null when absent).
* `PUT /api/v0/instances/{id}/` `{"state": "running"|"stopped"}` (ops "start"/"stop") or
  `{"label": ...}`; `DELETE` destroys (404 `no_such_instance` when unknown).
* `actual_status` walks null -> loading -> running after a create or start, running -> stopped
  after a stop: one step every `phase_steps` reads of the instance (`GET /api/v0/instances/{id}/`)
  by default, or every `phase_s` seconds of wall time when given.
* Stopped instances keep billing storage (`instance.diskHour`), GPU cost 0.
* Faults (`fault(op, kind)`, ops search/create/get/list/start/stop/destroy): capacity -> 410
  no_such_ask, auth -> the 401 above, rate_limit -> 429 `{"detail": ...}` (Retry-After only when
  asked); `quota_exceeded()` answers the next search with the `search_quota_exceeded` 429;
  `respond(op, Response)` queues any canned answer (e.g. HTTP 200 with `success: false`).
"""

from __future__ import annotations

import base64
import functools
import io
import json
import random
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .loopback import Fault, Handled, LoopbackServer, Request, Response

OPS = ("search", "create", "get", "list", "start", "stop", "destroy", "label", "user")
STORAGE_MONTH_HOURS = 720          # the reference infers storage_total_cost = cost x GB / 720
FIRST_INSTANCE_ID = 20_000_001

# (vast's name, MB per GPU, typical $/h per GPU, weight, datacenter share)
GPUS: tuple[tuple[str, int, float, int, float], ...] = (
    ("RTX 3090", 24576, 0.20, 16, 0.2), ("RTX 4090", 24564, 0.36, 20, 0.3),
    ("RTX 3060", 12288, 0.07, 4, 0.0), ("RTX 4080", 16376, 0.24, 4, 0.1),
    ("RTX 5090", 32607, 0.65, 6, 0.4), ("RTX A4000", 16376, 0.15, 4, 0.5),
    ("RTX A6000", 49140, 0.48, 8, 0.7), ("RTX 6000Ada", 49140, 0.80, 4, 0.8),
    ("L40S", 46068, 0.85, 5, 0.9), ("Tesla V100", 16384, 0.18, 3, 0.6),
    ("A100 PCIE", 40960, 0.75, 4, 0.9), ("A100 SXM4", 81920, 1.20, 6, 1.0),
    ("H100 PCIE", 81559, 1.90, 4, 1.0), ("H100 SXM", 81559, 2.30, 7, 1.0),
    ("H200", 143771, 3.20, 3, 1.0),
)
PLACES = ("Oregon, US", "Texas, US", "Quebec, CA", "Bavaria, DE", "Noord-Holland, NL", "Tokyo, JP",
          "Sao Paulo, BR", "Stockholm, SE", "Virginia, US", "Taipei, TW", "Guangxi, CN", "Warsaw, PL")
_COUNTS = (1, 1, 1, 1, 2, 2, 4, 8)
_CUDA = (11.8, 12.0, 12.2, 12.4, 12.6, 12.8)


def _r(x: float, places: int = 6) -> float:
    return round(x, places)


def make_offer(i: int, rng: random.Random, *, allocated_storage: float = 50.0) -> dict[str, Any]:
    """One offer as `POST /bundles/` returns it (a realistic subset of its ~90 fields)."""
    name, mb, price, _, dc_share = rng.choices(GPUS, weights=[g[3] for g in GPUS])[0]
    n = rng.choice(_COUNTS)
    per_gpu = price * rng.uniform(0.7, 1.6)
    dph_base = _r(per_gpu * n, 4)
    storage_cost = _r(rng.uniform(0.05, 0.40), 4)
    storage_total = _r(storage_cost * allocated_storage / STORAGE_MONTH_HOURS)
    datacenter = rng.random() < dc_share
    verification = "verified" if rng.random() < 0.85 else rng.choice(("unverified", "deverified"))
    reliability = _r(min(0.9999, rng.betavariate(30, 1)), 4)
    cores = rng.choice((8, 16, 32, 64, 128))
    inet_down = _r(rng.uniform(50, 5000), 1)
    offer_id = 9_000_000 + i
    flops = _r(80.0 * n * per_gpu / max(price, 0.01), 2)
    return {
        "id": offer_id,
        "ask_contract_id": offer_id,
        "bundle_id": 600_000_000 + i,
        "bundled_results": None,
        "machine_id": 10_000 + i // 2,
        "host_id": 100_000 + i // 5,
        "num_gpus": n,
        "gpu_name": name,
        "gpu_ram": mb,
        "gpu_total_ram": mb * n,
        "gpu_frac": 1.0 if n == 8 else _r(n / 8, 3),
        "gpu_arch": "nvidia",
        "gpu_mem_bw": _r(rng.uniform(500, 3300), 1),
        "gpu_max_power": 450.0,
        "gpu_max_temp": 90.0,
        "gpu_lanes": 16,
        "gpu_display_active": False,
        "compute_cap": 890 if "40" in name else 800,
        "cuda_max_good": rng.choice(_CUDA),
        "driver_version": "550.54.15",
        "driver_vers": 550054015,
        "bw_nvlink": 0.0,
        "cpu_name": "AMD EPYC 7543 32-Core Processor",
        "cpu_arch": "amd64",
        "cpu_cores": cores,
        "cpu_cores_effective": float(min(cores, 8 * n)),
        "cpu_ghz": 3.5,
        "cpu_ram": rng.choice((32768, 65536, 64332, 131072, 257660)) * max(1, n // 2),
        "disk_space": _r(rng.choice((50, 100, 250, 500, 1000, 2000)) * rng.uniform(0.8, 1.0), 1),
        "disk_bw": _r(rng.uniform(500, 4000), 1),
        "disk_name": "Samsung SSD 980",
        "mobo_name": "ROMED8-2T",
        "os_version": "22.04",
        "inet_down": inet_down,
        "inet_up": _r(inet_down * rng.uniform(0.3, 1.0), 1),
        "inet_down_cost": 0.0,
        "inet_up_cost": 0.0,
        "direct_port_count": rng.choice((0, 20, 100, 500)),
        "pci_gen": 4.0,
        "pcie_bw": 24.5,
        "has_avx": 1,
        "dph_base": dph_base,
        "dph_total": _r(dph_base + storage_total),
        "storage_cost": storage_cost,
        "storage_total_cost": storage_total,
        "vram_costperhour": _r(dph_base / (mb * n / 1024)),
        "min_bid": _r(dph_base * rng.uniform(0.35, 0.6), 4),
        "is_bid": False,
        "dlperf": flops,
        "dlperf_per_dphtotal": _r(flops / (dph_base + storage_total), 3),
        "flops_per_dphtotal": _r(flops / (dph_base + storage_total), 3),
        "total_flops": flops,
        "score": _r(flops / (dph_base + storage_total) * reliability, 3),
        "reliability": reliability,
        "reliability2": reliability,
        "reliability_mult": 1.0,
        "verification": verification,
        "vericode": 1 if verification == "verified" else 0,
        "rentable": rng.random() < 0.97,
        "rented": False,
        "external": None if rng.random() < 0.9 else True,
        "hosting_type": 1 if datacenter else 0,
        "geolocation": rng.choice(PLACES),
        "geolocode": rng.randint(10**8, 10**9),
        "public_ipaddr": f"198.51.100.{i % 250 + 1}",
        "static_ip": datacenter,
        "vms_enabled": False,
        "duration": _r(rng.uniform(86400, 86400 * 90), 1),
        "start_date": 1_790_000_000.0,
        "end_date": 1_800_000_000.0,
        "credit_discount_max": 0.4,
        "cluster_id": None,
        "resource_type": "gpu",
        "search": {"gpuCostPerHour": dph_base, "diskHour": storage_total,
                   "totalHour": _r(dph_base + storage_total), "discountTotalHour": 0,
                   "discountedTotalPerHour": _r(dph_base + storage_total)},
    }


def make_offers(n: int, seed: int = 7, *, allocated_storage: float = 50.0) -> list[dict[str, Any]]:
    """`n` offers as the API returns them, deterministic under `seed` (the benchmark's input)."""
    rng = random.Random(seed)
    return [make_offer(i, rng, allocated_storage=allocated_storage) for i in range(n)]


@functools.lru_cache(maxsize=8)
def _catalogue(n: int, seed: int) -> tuple[dict[str, Any], ...]:
    """A fake's catalogue, built once per (size, seed): the fake only reads these dicts."""
    return tuple(make_offers(n, seed))


# ------------------------------------------------------------------------------ matching


def _as_bool(value: Any) -> bool | None:
    if isinstance(value, bool):
        return value
    if value is None:
        return None
    if isinstance(value, (int, float)):
        return bool(value)
    text = str(value).strip()
    return {"true": True, "True": True, "false": False, "False": False}.get(text)


def _coerce(want: Any, have: Any) -> Any:
    """The filter value as the type of the offer's value (the CLI sends numbers as strings)."""
    if isinstance(have, bool) or have is None:
        return _as_bool(want)
    if isinstance(have, (int, float)):
        try:
            return float(want)
        except (TypeError, ValueError):
            return None
    return want if isinstance(want, str) else str(want)


def _compare(have: Any, op: str, want: Any) -> bool:
    if op in ("in", "notin"):
        items = want if isinstance(want, list) else [want]
        hit = any(_compare(have, "eq", item) for item in items)
        return hit if op == "in" else not hit
    if isinstance(have, bool) or have is None or isinstance(want, bool):
        a, b = _as_bool(have) or False, _as_bool(want)
        if b is None:
            return False
        return a == b if op == "eq" else a != b if op == "neq" else False
    value = _coerce(want, have)
    if value is None:
        return False
    try:
        if op == "eq":
            return have == value
        if op == "neq":
            return have != value
        if op == "gt":
            return have > value
        if op == "gte":
            return have >= value
        if op == "lt":
            return have < value
        if op == "lte":
            return have <= value
    except TypeError:
        return False
    raise Handled(Response(400, {"success": False, "error": "invalid_args",
                                 "msg": f"error 400: unknown operator {op}"}))


_CONTROL = {"order", "type", "limit", "allocated_storage", "disable_bundling", "target_reliability",
            "extra_ids", "show_incompatible", "sort_option", "template_id", "gpu_option"}


# Filter names that compare another column of the offer (vastai 1.9.1 `vastai/data/query.py`
# notes: datacenter -> hosting_type, driver_version -> driver_vers, ubuntu_version -> os_version).
_COLUMNS = {"driver_version": "driver_vers", "ubuntu_version": "os_version",
            "cuda_vers": "cuda_max_good", "dph": "dph_total"}


def _offer_value(offer: dict[str, Any], name: str) -> tuple[bool, Any]:
    if name == "verified":
        return True, offer.get("verification") == "verified"
    if name == "external":
        return True, bool(offer.get("external"))
    if name == "datacenter":
        return True, offer.get("hosting_type") == 1
    name = _COLUMNS.get(name, name)
    if name in offer:
        return True, offer[name]
    return False, None


def _country(geolocation: Any) -> str:
    """'Oregon, US' -> 'US': what vast's `geolocation` filter compares (CLI help: "Two letter
    country code. Works with operators =, !=, in, notin")."""
    text = str(geolocation or "").strip()
    return text[-2:] if len(text) >= 2 else text


# ------------------------------------------------------------------------------ instances


@dataclass
class _Sim:
    queue: list[str | None] = field(default_factory=list)
    reads: int = 0
    since: float = field(default_factory=time.monotonic)


class FakeVast(LoopbackServer):
    def __init__(self, *, api_key: str = "vast-fake-key", offers: int = 300, seed: int = 7,
                 phase_steps: int = 1, phase_s: float | None = None, latency_s: float = 0.0,
                 default_limit: int = 64, max_limit: int = 3000,
                 catalogue: list[dict[str, Any]] | None = None) -> None:
        self.api_key = api_key
        self.phase_steps = max(1, phase_steps)
        self.phase_s = phase_s
        self.default_limit = default_limit
        self.max_limit = max_limit
        market = catalogue if catalogue is not None else _catalogue(offers, seed)
        self.catalogue: dict[int, dict[str, Any]] = {o["id"]: o for o in market}
        self.taken: dict[int, int] = {}              # offer id -> instance id renting it
        self.instances: dict[int, dict[str, Any]] = {}
        self._sims: dict[int, _Sim] = {}
        self._next_id = FIRST_INSTANCE_ID
        self._quota: deque[float | None] = deque()
        self._canned: dict[str, deque[Response]] = {}
        self._tls = threading.local()
        self.user: dict[str, Any] = {"id": 4242, "username": "gpuherd-ci", "email": "ci@example.org",
                                     "fullname": "gpuherd CI", "balance": -1.25, "credit": 25.0,
                                     "balance_threshold": 5.0, "balance_threshold_enabled": False,
                                     "can_pay": True, "has_billing": True, "email_verified": True}
        super().__init__(latency_s=latency_s)

    # --- routing ----------------------------------------------------------------------
    def routes(self) -> None:
        self.route("POST", "/api/v0/bundles/", self._wrap("search", self._search), "search")
        self.route("PUT", "/api/v0/asks/{id}/", self._wrap("create", self._create), "create")
        self.route("GET", "/api/v1/instances/", self._wrap("list", self._list), "list")
        self.route("GET", "/api/v0/instances/{id}/", self._wrap("get", self._show), "get")
        self.route("PUT", "/api/v0/instances/{id}/", self._manage, "manage")
        self.route("DELETE", "/api/v0/instances/{id}/", self._wrap("destroy", self._destroy), "destroy")
        self.route("GET", "/api/v0/users/current", self._wrap("user", self._user), "user")

    def _serve(self, h: Any) -> None:
        # The op of `PUT /instances/{id}/` (start, stop or label) is in its body: read the body
        # first so `_match` can tell, then let the base class read it again from a copy.
        length = int(h.headers.get("Content-Length") or 0)
        raw = h.rfile.read(length) if length else b""
        original = h.rfile
        h.rfile = io.BytesIO(raw)
        self._tls.raw = raw
        try:
            super()._serve(h)
        finally:
            h.rfile = original
            self._tls.raw = b""

    def _match(self, method: str, path: str) -> Any:
        found = super()._match(method, path)
        if found is None or found[2] != "manage":
            return found
        handler, params, _ = found
        try:
            body = json.loads(getattr(self._tls, "raw", b"") or b"{}")
        except ValueError:
            body = {}
        state = body.get("state") if isinstance(body, dict) else None
        op = {"running": "start", "stopped": "stop"}.get(state, "label")  # type: ignore[arg-type]
        return self._wrap(op, handler), params, op

    def _wrap(self, op: str, handler: Any) -> Any:
        def serve(request: Request, params: dict[str, str]) -> Response:
            queue = self._canned.get(op)
            if queue:
                return queue.popleft()
            return handler(request, params)
        return serve

    # --- auth and faults ----------------------------------------------------------------
    def authorised(self, request: Request) -> bool:
        headers = {k.lower(): v for k, v in request.headers.items()}
        if headers.get("authorization") == f"Bearer {self.api_key}":
            return True
        return request.query.get("api_key") == self.api_key       # legacy, tolerated

    def unauthorised(self, request: Request) -> Response:
        return Response(401, {"success": False, "error": "auth_error", "msg": "Invalid user key"})

    def fault_response(self, fault: Fault, request: Request) -> Response:
        if fault.kind == "capacity":
            ask = request.path.rstrip("/").rsplit("/", 1)[-1]
            return Response(410, {"success": False, "error": "no_such_ask",
                                  "msg": f"error 410/3603: no_such_ask Instance type by id {ask} is not available."})
        return self.unauthorised(request)

    def quota_exceeded(self, *, times: int = 1, reset: float | None = None) -> None:
        """The next `times` searches answer the daily-quota 429 (X-RateLimit-Reset when given)."""
        with self._lock:
            self._quota.extend([reset] * times)

    def respond(self, op: str, response: Response, *, times: int = 1) -> None:
        """Answer the next `times` calls of `op` (after auth) with `response`."""
        with self._lock:
            self._canned.setdefault(op, deque()).extend([response] * times)

    def clear_faults(self) -> None:
        super().clear_faults()
        with self._lock:
            self._quota.clear()
            self._canned.clear()

    # --- test helpers -------------------------------------------------------------------
    def forget(self, provider_id: str | int) -> None:
        """vast.ai loses the instance without a destroy (reconcile's 'gone' case)."""
        with self._lock:
            self._drop(int(provider_id))

    def set_instance(self, provider_id: str | int, **fields: Any) -> dict[str, Any]:
        """Overwrite fields of an instance (e.g. actual_status='exited'); stops its progression."""
        with self._lock:
            record = self.instances[int(provider_id)]
            record.update(fields)
            self._sims[int(provider_id)].queue.clear()
            return dict(record)

    def tick(self) -> None:
        """Every instance takes its next step now."""
        with self._lock:
            for iid in list(self.instances):
                self._step(iid)

    def seed_instances(self, count: int, *, label_prefix: str = "seeded") -> list[int]:
        """`count` running instances rented from fresh offers (for pagination tests)."""
        ids = []
        with self._lock:
            offers = [o for oid, o in sorted(self.catalogue.items()) if oid not in self.taken]
            for i in range(count):
                offer = offers[i]
                iid = self._new_instance(offer, {"image": "nginx:latest", "label": f"{label_prefix}-{i}",
                                                 "disk": 16.0, "env": {}, "price": None, "runtype": "ssh"})
                self._sims[iid].queue = []
                self._enter(iid, "running")
                ids.append(iid)
        return ids

    # --- search -------------------------------------------------------------------------
    def _search(self, request: Request, params: dict[str, str]) -> Response:
        if self._quota:
            reset = self._quota.popleft()
            headers = {"X-RateLimit-Reset": f"{reset:.0f}"} if reset is not None else {}
            return Response(429, {"success": False, "error": "search_quota_exceeded",
                                  "msg": "Daily search quota exceeded"}, headers)
        q = request.body
        if not isinstance(q, dict):
            return Response(400, {"success": False, "error": "invalid_args", "msg": "query must be an object"})
        kind = q.get("type", "on-demand")
        if kind not in ("on-demand", "bid", "reserved"):
            return Response(400, {"success": False, "error": "invalid_args", "msg": f"bad type {kind!r}"})
        try:
            storage = float(q.get("allocated_storage", 8.0))
        except (TypeError, ValueError):
            return Response(400, {"success": False, "error": "invalid_args", "msg": "bad allocated_storage"})
        for name, ops in q.items():
            if name not in _CONTROL and not isinstance(ops, dict):
                return Response(400, {"success": False, "error": "invalid_args",
                                      "msg": f"error 400: {name} needs an operator object"})
        results = self._filtered(q, storage, kind)
        for key in reversed(q.get("order") or []):
            if not (isinstance(key, (list, tuple)) and len(key) == 2):
                continue
            name, direction = key
            desc = str(direction).lower() == "desc"
            present = [o for o in results if isinstance(o.get(name), (int, float))]
            missing = [o for o in results if not isinstance(o.get(name), (int, float))]
            present.sort(key=lambda o: o[name], reverse=desc)
            results = present + missing
        try:
            limit = int(q["limit"]) if "limit" in q else self.default_limit
        except (TypeError, ValueError):
            return Response(400, {"success": False, "error": "invalid_args", "msg": "bad limit"})
        return Response(200, {"offers": results[:max(0, min(limit, self.max_limit))]})

    def _filtered(self, q: dict[str, Any], storage: float, kind: str) -> list[dict[str, Any]]:
        filters = {k: v for k, v in q.items() if k not in _CONTROL}
        if "rentable" not in filters:
            filters["rentable"] = {"eq": True}                # the server's own default
        filters.pop("rented", None)                           # accepted, not filtered
        results = []
        for oid, base in self.catalogue.items():
            if oid in self.taken:
                continue
            offer = self._priced(base, storage, kind)
            if all(self._keeps(offer, name, ops) for name, ops in filters.items()):
                results.append(offer)
        return results

    def select(self, body: dict[str, Any]) -> list[dict[str, Any]]:
        """Every offer the filters of a search body keep, before order and limit: what two
        bodies let through can be compared without the cap in the way."""
        return self._filtered(body, float(body.get("allocated_storage", 8.0)), body.get("type", "on-demand"))

    @staticmethod
    def _priced(base: dict[str, Any], storage_gb: float, kind: str) -> dict[str, Any]:
        offer = dict(base)
        disk_hour = _r(base["storage_cost"] * storage_gb / STORAGE_MONTH_HOURS)
        gpu_hour = base["min_bid"] if kind == "bid" else base["dph_base"]
        offer["is_bid"] = kind == "bid"
        offer["storage_total_cost"] = disk_hour
        offer["dph_total"] = _r(gpu_hour + disk_hour)
        offer["search"] = {"gpuCostPerHour": gpu_hour, "diskHour": disk_hour,
                           "totalHour": offer["dph_total"], "discountTotalHour": 0,
                           "discountedTotalPerHour": offer["dph_total"]}
        return offer

    @staticmethod
    def _keeps(offer: dict[str, Any], name: str, ops: dict[str, Any]) -> bool:
        if name == "geolocation":
            code = _country(offer.get("geolocation"))
            return all(_compare(code, op, want) for op, want in ops.items())
        known, have = _offer_value(offer, name)
        if not known:
            return True                                       # unknown fields are ignored
        return all(_compare(have, op, want) for op, want in ops.items())

    # --- create -------------------------------------------------------------------------
    def _create(self, request: Request, params: dict[str, str]) -> Response:
        ask = params["id"]
        body = request.body if isinstance(request.body, dict) else {}
        if not ask.isdigit() or int(ask) not in self.catalogue:
            return Response(404, {"success": False, "error": "no_such_ask",
                                  "msg": f"error 404/3603: no_such_ask Instance type by id {ask} is not available."})
        offer = self.catalogue[int(ask)]
        if int(ask) in self.taken or not offer.get("rentable", True):
            return Response(410, {"success": False, "error": "no_such_ask",
                                  "msg": f"error 410/3603: no_such_ask Instance type by id {ask} is not available."})
        if not body.get("image"):
            return Response(400, {"success": False, "error": "invalid_args", "ask_id": int(ask),
                                  "msg": "error 400/3467: Invalid args: image is required"})
        try:
            disk = float(body.get("disk", 10.0))
        except (TypeError, ValueError):
            disk = -1.0
        if disk < 8:
            return Response(400, {"success": False, "error": "invalid_args", "ask_id": int(ask),
                                  "msg": "error 400/3467: Invalid args: disk must be at least 8 GB"})
        price = body.get("price")
        if price is not None and (not isinstance(price, (int, float)) or price < offer["min_bid"]):
            return Response(400, {"success": False, "error": "invalid_price", "ask_id": int(ask),
                                  "msg": f"error 400: bid must be at least {offer['min_bid']}"})
        iid = self._new_instance(offer, body)
        return Response(200, {"success": True, "new_contract": iid})

    def _new_instance(self, offer: dict[str, Any], body: dict[str, Any]) -> int:
        iid = self._next_id
        self._next_id += 1
        disk = float(body.get("disk", 10.0))
        bid = body.get("price")
        dph_base = float(bid) if bid is not None else offer["dph_base"]
        storage_hour = _r(offer["storage_cost"] * disk / STORAGE_MONTH_HOURS)
        env = body.get("env") or {}
        runtype = body.get("runtype") or "ssh"
        record = {
            "id": iid, "machine_id": offer["machine_id"], "host_id": offer["host_id"],
            "actual_status": None, "intended_status": "running", "cur_state": "running", "next_state": "running",
            "status_msg": None, "label": body.get("label"), "template_id": None, "template_hash_id": None,
            "image_uuid": body.get("image"), "image_args": list(body.get("args") or []),
            "image_runtype": runtype, "extra_env": [[str(k), str(v)] for k, v in env.items()],
            "onstart": body.get("onstart"), "jupyter_token": None,
            "public_ipaddr": offer["public_ipaddr"], "local_ipaddrs": "10.0.0.2 ",
            "ssh_host": f"ssh{iid % 9 + 1}.vast.ai", "ssh_port": 20000 + iid % 10000, "ssh_idx": "1",
            "direct_port_start": 40000, "direct_port_end": 40099, "direct_port_count": 100,
            "ports": None, "start_date": round(time.time(), 3), "end_date": offer["end_date"],
            "uptime_mins": None, "duration": None,
            "num_gpus": offer["num_gpus"], "gpu_name": offer["gpu_name"], "gpu_ram": offer["gpu_ram"],
            "gpu_totalram": offer["gpu_total_ram"], "gpu_util": None, "gpu_temp": None,
            "gpu_arch": "nvidia", "gpu_frac": offer["gpu_frac"], "cpu_name": offer["cpu_name"],
            "cpu_cores": offer["cpu_cores"], "cpu_cores_effective": offer["cpu_cores_effective"],
            "cpu_ram": offer["cpu_ram"], "cpu_util": None, "mem_usage": None, "mem_limit": None,
            "disk_space": disk, "disk_usage": 0.0, "disk_util": 0.0,
            "inet_up": offer["inet_up"], "inet_down": offer["inet_down"],
            "dph_base": dph_base, "dph_total": _r(dph_base + storage_hour),
            "storage_cost": offer["storage_cost"], "storage_total_cost": storage_hour,
            "min_bid": offer["min_bid"], "is_bid": bid is not None,
            "reliability2": offer["reliability2"], "verification": offer["verification"],
            "geolocation": offer["geolocation"], "static_ip": offer["static_ip"],
            "credit_balance": None, "credit_discount": None, "volume_info": [], "time_remaining": "",
            "cuda_max_good": offer["cuda_max_good"], "driver_version": offer["driver_version"],
            "instance": {"gpuCostPerHour": dph_base, "diskHour": storage_hour,
                         "totalHour": _r(dph_base + storage_hour)},
            "ask_contract_id": offer["id"],
        }
        self.instances[iid] = record
        self.taken[offer["id"]] = iid
        self._sims[iid] = _Sim(queue=["loading", "running"])
        return iid

    # --- state progression ----------------------------------------------------------------
    def _observe(self, iid: int, *, read: bool) -> None:
        sim = self._sims[iid]
        if self.phase_s is not None:
            now = time.monotonic()
            while sim.queue and now - sim.since >= self.phase_s:
                sim.since += self.phase_s
                self._enter(iid, sim.queue.pop(0))
            return
        if read and sim.queue:
            sim.reads += 1
            if sim.reads >= self.phase_steps:
                self._step(iid)

    def _step(self, iid: int) -> None:
        sim = self._sims[iid]
        sim.reads = 0
        sim.since = time.monotonic()
        if sim.queue:
            self._enter(iid, sim.queue.pop(0))

    def _enter(self, iid: int, status: str | None) -> None:
        rec = self.instances[iid]
        rec["actual_status"] = status
        storage_hour = rec["storage_total_cost"]
        if status == "running":
            ports = {"22/tcp": [{"HostIp": "0.0.0.0", "HostPort": str(rec["ssh_port"])}]}
            for i, (key, _) in enumerate(rec["extra_env"]):
                if key.startswith("-p "):
                    inner = key.split()[1].split(":")[-1].split("/")[0]
                    host = str(40000 + (iid % 500) * 10 + i)
                    ports[f"{inner}/tcp"] = [{"HostIp": "0.0.0.0", "HostPort": host},
                                             {"HostIp": "::", "HostPort": host}]
            rec.update(ports=ports, gpu_util=37.5, gpu_temp=61.0, cpu_util=12.0,
                       status_msg=f"success, running {rec['image_uuid']}/{rec['image_runtype']}",
                       instance={"gpuCostPerHour": rec["dph_base"], "diskHour": storage_hour,
                                 "totalHour": rec["dph_total"]})
        else:
            rec.update(ports=None, gpu_util=None, gpu_temp=None, cpu_util=None)
            if status == "loading":
                rec["status_msg"] = f"Pulling image {rec['image_uuid']}"
            elif status == "stopped":
                rec.update(status_msg="Stopped (disk kept)",
                           instance={"gpuCostPerHour": 0, "diskHour": storage_hour, "totalHour": storage_hour})

    def _drop(self, iid: int) -> None:
        self.instances.pop(iid, None)
        self._sims.pop(iid, None)
        for oid, holder in list(self.taken.items()):
            if holder == iid:
                del self.taken[oid]

    # --- instances ------------------------------------------------------------------------
    def _instance_id(self, params: dict[str, str]) -> int | None:
        raw = params.get("id", "")
        return int(raw) if raw.isdigit() and int(raw) in self.instances else None

    @staticmethod
    def _no_such_instance(raw: str) -> Response:
        return Response(404, {"success": False, "error": "no_such_instance",
                              "msg": f"error 404: Instance {raw} not found."})

    def _show(self, request: Request, params: dict[str, str]) -> Response:
        iid = self._instance_id(params)
        if iid is None:
            return Response(200, {"instances": None})
        self._observe(iid, read=True)
        return Response(200, {"instances": json.loads(json.dumps(self.instances[iid]))})

    _LIST_COLUMNS: ClassVar[set[str]] = {"id", "actual_status", "intended_status", "cur_state", "gpu_name", "verification",
                     "label", "machine_id", "host_id", "image_uuid"}

    def _list(self, request: Request, params: dict[str, str]) -> Response:
        try:
            filters = json.loads(request.query.get("select_filters", "{}"))
            order_by = json.loads(request.query.get("order_by", '[{"col": "id", "dir": "asc"}]'))
            limit = int(json.loads(request.query.get("limit", "25")))
        except (ValueError, TypeError):
            return Response(400, {"success": False, "error": "invalid_args",
                                  "msg": "Error in query parameters: not JSON"})
        if not isinstance(filters, dict) or not isinstance(order_by, list):
            return Response(400, {"success": False, "error": "invalid_args", "msg": "Error in query parameters"})
        for name in filters:
            if name not in self._LIST_COLUMNS:
                return Response(400, {"success": False, "error": "invalid_args",
                                      "msg": f"Error in query parameters: {name} is not a valid search key"})
        limit = 5 if limit <= 0 else min(limit, 25)
        after = 0
        token = request.query.get("after_token")
        if token:
            try:
                after = int(json.loads(base64.urlsafe_b64decode(token.encode()))["after_id"])
            except (ValueError, KeyError, TypeError):
                return Response(400, {"success": False, "error": "invalid_token", "msg": "invalid after_token"})
        for iid in self.instances:
            self._observe(iid, read=False)
        rows = [r for _, r in sorted(self.instances.items())
                if all(_compare(r.get(name), op, want) for name, ops in filters.items()
                       for op, want in (ops.items() if isinstance(ops, dict) else [("eq", ops)]))]
        later = [r for r in rows if r["id"] > after]
        page = later[:limit]
        more = len(later) > limit
        next_token = (base64.urlsafe_b64encode(json.dumps({"after_id": page[-1]["id"]}).encode()).decode()
                      if more else None)
        counts: dict[str, int] = {}
        for r in rows:
            counts[r.get("label") or ""] = counts.get(r.get("label") or "", 0) + 1
        return Response(200, {"success": True, "instances_found": len(page), "total_instances": len(rows),
                              "label_counts": counts, "next_token": next_token,
                              "instances": json.loads(json.dumps(page))})

    def _manage(self, request: Request, params: dict[str, str]) -> Response:
        iid = self._instance_id(params)
        if iid is None:
            return self._no_such_instance(params.get("id", ""))
        body = request.body if isinstance(request.body, dict) else {}
        rec, sim = self.instances[iid], self._sims[iid]
        if "label" in body and "state" not in body:
            label = str(body["label"] or "")
            if len(label) > 1024:
                return Response(400, {"success": False, "error": "label_too_long", "msg": "label too long"})
            rec["label"] = label or None
            return Response(200, {"success": True, "msg": f"label for {iid} set to '{label}'"})
        state = body.get("state")
        if state == "running":
            rec.update(intended_status="running", cur_state="running", next_state="running")
            if rec["actual_status"] != "running":
                sim.queue = ["loading", "running"]
                sim.reads, sim.since = 0, time.monotonic()
        elif state == "stopped":
            rec.update(intended_status="stopped", cur_state="stopped", next_state="stopped")
            if rec["actual_status"] != "stopped":
                sim.queue = ["stopped"]
                sim.reads, sim.since = 0, time.monotonic()
        else:
            return Response(400, {"success": False, "error": "invalid_args", "msg": f"bad state {state!r}"})
        return Response(200, {"success": True})

    def _destroy(self, request: Request, params: dict[str, str]) -> Response:
        iid = self._instance_id(params)
        if iid is None:
            return self._no_such_instance(params.get("id", ""))
        self._drop(iid)
        return Response(200, {"success": True})

    def _user(self, request: Request, params: dict[str, str]) -> Response:
        return Response(200, dict(self.user))
