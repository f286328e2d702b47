"""vast.ai: a GPU marketplace, spoken to over its REST API the way the official `vastai` CLI 1.9.1
does it (facts: shared/reference/vast.md). HTTP, retries and error mapping are `ApiClient`'s; this
module builds vast's requests and reads its answers.

Decisions where the reference leaves room (each one is tested in tests/test_vast.py):

Units
  * `gpu_ram` is MB per GPU (binary: nvidia-smi's MiB). gpuherd shows whole GB, MB/1024 rounded
    to the nearest GB: 24576 -> 24, and an RTX 4090 (vast reports 24564) -> 24 rather than
    23.99, an H100 (81559) -> 80, so `24gb` and a template's "24 GB minimum" find the cards that
    are sold as 24 GB.
  * `cpu_ram` is MB; gpuherd shows MB/1000 as the CLI does (65536 -> 65.5 GB). `disk_space` is
    GB already. `inet_*` as given (Mb/s).
  * `gpu_util` is read as a percentage 0..100, as the CLI prints it ("(72%)"); the OpenAPI
    text calls it a fraction, but a fraction would show as 0.72 % there. Clamped to 0..100,
    only reported while running.

Prices
  * An offer's `dph` is compute plus a SEARCH_DISK_GB (50 GB) disk, `quote(dph_base,
    storage_cost)`, exactly as every provider quotes it; vast's own `dph_total` prices the disk
    its way (a 720-hour month, by the reference's arithmetic), so it is not used. Bid
    (interruptible) offers take `min_bid` as their compute price.
  * An instance's `dph` is what it bills per hour while running, disk included (gpuherd's
    ledger has no separate storage segment while running): `dph_base + storage_dph`, or
    `dph_total` when `dph_base` is missing. Its `storage_dph` is what it bills stopped:
    vast's `storage_total_cost` ($/h), else `storage_cost` x `disk_space` / 730.
  * `balance()` is the account's `credit` (the spendable prepaid amount), else `balance`.

Search: what goes to the server
  A server-side filter may narrow the answer but must never drop an offer the local filter
  (`OfferQuery.matches`) keeps, so a term is sent only when it is provably implied:
  * num_gpus (all operators), disk_space, inet_down/up, cuda (cuda_max_good), cpu_cores
    (cpu_cores_effective), reliability, storage_cost, verified (`eq`), offer_id (`id`):
    the same numbers on both sides.
  * gpu_ram: translated through the rounding above (`gpu_ram>=16` -> `gte 15872.0`, the
    smallest MB shown as 16 GB; the CLI's 16000.0 would drop a 15900 MB card shown as 16 GB).
    cpu_ram: x1000 bracketed to whole MB.
  * dph: on-demand only, widened (upper bounds x1.1 + $0.005, lower x0.95 - $0.005) because
    the server compares its own `dph_total`, whose disk part may differ from ours.
  * Not sent, filtered locally only: GPU model words and gpu_name (vast spells names its own
    way, "RTX 6000Ada", "A100 SXM4", and one missing spelling would silently drop offers),
    gpu_total_ram (the rounding is per GPU), dph_per_gpu, location/country (we match parts
    of the place), provider.
  * `interruptible=true` asks for `"type": "bid"`; anything else is `"on-demand"`.
  * Always `external=false` and `rentable=true` (what the CLI sends: offers that cannot be
    rented are not offers); `verified` only as the query says (its default is `verified=true`;
    `verified=any` sends none).
  * `order` is the query's sort translated while fields map onto vast numbers (so the offers
    vast keeps under its cap are the ones the user wants first); `limit` is always
    SEARCH_LIMIT, because our order can never be reproduced exactly server-side (`dph` differs
    from `dph_total`), so the query's own limit is applied locally after filtering.

Create
  `PUT /asks/{id}/` with the CLI's body. `args` (a vLLM template: the vllm/vllm-openai image's
  entrypoint is the server) -> `runtype "args"` with `args`, which keeps the image ENTRYPOINT.
  `command` (a shell line that replaces the entrypoint) -> `runtype "ssh"` with the command
  appended to `onstart`, which is what the CLI's `--entrypoint` does; neither -> `"ssh"`.
  Ports are `"-p P:P": "1"` env entries (the health port too). `cancel_unavail` is true for
  on-demand rentals so a host that cannot start the machine refuses (CapacityError, the service
  tries the next offer) instead of leaving a stopped instance that bills storage. Never
  retried (`idempotent=False`): after a timeout the service looks for the label.

States (actual_status / intended_status / cur_state -> ProviderState): see `vast_state`.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import math
import operator
import random
import re
from collections.abc import Awaitable, Callable, Iterable, Iterator
from datetime import UTC, datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import httpx

from ..clock import Clock
from ..errors import (
    AuthError,
    CapacityError,
    ConfigError,
    ProviderError,
    ProviderStateError,
    RateLimited,
)
from ..offers import SEARCH_DISK_GB, Offer, normalise_gpu_name, storage_hourly
from ..query import DEFAULT_ORDER, to_vast_filter
from .base import Capabilities, CreateRequest, Provider, ProviderInstance, ProviderState
from .http import ApiClient, NotFoundAtProvider, error_text

if TYPE_CHECKING:
    from ..config import Settings
    from ..query import Filter, OfferQuery

log = logging.getLogger(__name__)

NAME = "vast"
DISPLAY = "vast.ai"
DEFAULT_URL = "https://console.vast.ai"
SEARCH_LIMIT = 1000          # offers asked for per search; the query's limit is applied locally
LIST_PAGE = 25               # v1 instances: default and maximum page size
MAX_PAGES = 400              # 10,000 instances: a pagination loop is a server bug, not an account
_MICRO = Decimal("0.000001")
_ZERO = Decimal(0)
_ID = re.compile(r"\d{1,12}")

# --------------------------------------------------------------------------------- states

_BOOTING = frozenset({None, "", "created", "scheduling"})


def vast_state(actual: str | None, intended: str | None,
               cur_state: str | None = None) -> tuple[ProviderState, str | None]:
    """gpuherd's state for vast's (actual_status, intended_status, cur_state), with a note for
    the user where the state alone would mislead.

    actual \\ intended      running          stopped       frozen
    null/created/scheduling PROVISIONING     STOPPED       PROVISIONING
    loading                 LOADING          STOPPING      LOADING
    running                 RUNNING          STOPPING      RUNNING (being frozen)
    rebooting               STARTING         STOPPING      STARTING
    stopped                 STARTING         STOPPED       STOPPED
    frozen                  RUNNING*         STOPPING      RUNNING*
    exited                  ERROR            STOPPED       ERROR
    unknown/offline         UNKNOWN          UNKNOWN       UNKNOWN
    destroyed, or cur_state unloaded: DESTROYED.   Anything else: UNKNOWN.

    * frozen = paused with its memory kept and the GPU still billed: RUNNING for the money
      (the ledger keeps charging compute, the idle guard can stop it), reported unhealthy and
      without an endpoint because nothing answers."""
    a = (actual or "").strip().lower() or None
    i = (intended or "").strip().lower() or None
    if a == "destroyed" or (cur_state or "").strip().lower() == "unloaded":
        return ProviderState.DESTROYED, None
    if a in _BOOTING:
        if i == "stopped":
            return ProviderState.STOPPED, "created stopped; start it to run"
        if a == "scheduling":
            return ProviderState.PROVISIONING, "waiting for the host's GPUs to become free (scheduling)"
        return ProviderState.PROVISIONING, None
    if a == "loading":
        return (ProviderState.STOPPING, None) if i == "stopped" else (ProviderState.LOADING, None)
    if a == "running":
        if i == "stopped":
            return ProviderState.STOPPING, None
        if i == "frozen":
            return ProviderState.RUNNING, "being frozen (the GPU stays billed)"
        return ProviderState.RUNNING, None
    if a == "rebooting":
        return (ProviderState.STOPPING, None) if i == "stopped" else (ProviderState.STARTING, "rebooting")
    if a == "stopped":
        if i == "running":
            return ProviderState.STARTING, "start requested; waiting for the host"
        return ProviderState.STOPPED, None
    if a == "frozen":
        if i == "stopped":
            return ProviderState.STOPPING, None
        return ProviderState.RUNNING, "frozen: paused with its memory kept; the GPU is still billed"
    if a == "exited":
        if i == "stopped":
            return ProviderState.STOPPED, None
        return ProviderState.ERROR, ("the container exited (its command ended or crashed) and does not "
                                     "restart by itself; check its logs, then start or destroy it")
    if a in ("unknown", "offline"):
        return ProviderState.UNKNOWN, (f"the host is {a}: vast.ai has no heartbeat from it; it does not "
                                       "recover by itself, destroy it if it stays so")
    return ProviderState.UNKNOWN, f"vast.ai reports the unfamiliar status '{actual}'"


# --------------------------------------------------------------------------------- units


def gpu_ram_gb(mb: float) -> float:
    """MB per GPU -> whole GB (MB/1024 rounded half up): 24576 and 24564 -> 24, 81559 -> 80."""
    return float(math.floor(mb / 1024 + 0.5))


def _gpu_ram_terms(op: str, v: float) -> list[tuple[str, float]]:
    """Server terms on gpu_ram (MB) that keep every offer with `gpu_ram_gb(MB) op v`."""
    if op == "gte":      # round(x) >= v  <=>  x >= ceil(v) - 0.5
        return [("gte", (math.ceil(v) - 0.5) * 1024)]
    if op == "gt":       # round(x) > v  <=>  round(x) >= floor(v) + 1
        return [("gte", (math.floor(v) + 0.5) * 1024)]
    if op == "lte":      # round(x) <= floor(v)  <=>  x < floor(v) + 0.5
        return [("lt", (math.floor(v) + 0.5) * 1024)]
    if op == "lt":       # round(x) <= ceil(v) - 1  <=>  x < ceil(v) - 0.5
        return [("lt", (math.ceil(v) - 0.5) * 1024)]
    if op == "eq" and float(v).is_integer():
        return [("gte", (v - 0.5) * 1024), ("lt", (v + 0.5) * 1024)]
    return []


def _decimal_mb_terms(op: str, v: float) -> list[tuple[str, float]]:
    """Server terms on an MB field shown as MB/1000: whole-MB bounds that never exclude an
    integer MB the local float comparison keeps."""
    low = float(math.floor(v * 1000 + 1e-6))
    high = float(math.ceil(v * 1000 - 1e-6))
    if op in ("gte", "gt"):
        return [("gte", low)]
    if op in ("lte", "lt"):
        return [("lte", high)]
    if op == "eq":
        return [("gte", low), ("lte", high)]
    return []


def _dph_terms(op: str, v: float) -> list[tuple[str, float]]:
    """dph_total bounds wide enough for vast pricing the 50 GB disk its own way."""
    upper = round(v * 1.1 + 0.005, 6)
    lower = round(max(0.0, v * 0.95 - 0.005), 6)
    if op in ("lt", "lte"):
        return [("lte", upper)]
    if op in ("gt", "gte"):
        return [("gte", lower)] if lower > 0 else []
    if op == "eq":
        return [("gte", lower), ("lte", upper)] if lower > 0 else [("lte", upper)]
    return []


# Our field -> vast's, for numbers that are the same on both sides.
_EXACT_FIELDS = frozenset({"num_gpus", "disk_space", "inet_down", "inet_up", "cuda", "cpu_cores",
                           "reliability", "storage_cost"})
_SET_OPS_OK = frozenset({"num_gpus"})        # integers: neq/in/notin are exact too
_BOUNDS = frozenset({"gt", "gte", "lt", "lte", "eq"})
_ORDER_FIELDS = {"dph": "dph_total", "reliability": "reliability", "gpu_ram": "gpu_ram",
                 "gpu_total_ram": "gpu_total_ram", "num_gpus": "num_gpus",
                 "cpu_cores": "cpu_cores_effective", "cpu_ram": "cpu_ram", "disk_space": "disk_space",
                 "inet_down": "inet_down", "inet_up": "inet_up", "cuda": "cuda_max_good",
                 "storage_cost": "storage_cost"}


def _wants_bid(filters: Iterable[Filter]) -> bool:
    for f in filters:
        if f.field != "interruptible":
            continue
        if (f.op == "eq" and f.value is True) or (f.op == "neq" and f.value is False) \
                or (f.op == "in" and tuple(f.value) == (True,)):
            return True
    return False


def _terms_for(f: Filter, bid: bool) -> list[tuple[str, str, Any]]:
    """The vast terms (field, op, value) for one of our filters; [] when it stays local."""
    field, op, value = f.field, f.op, f.value
    if field in _EXACT_FIELDS:
        if op not in _BOUNDS and field not in _SET_OPS_OK:
            return []
        mapped = to_vast_filter(field, op, value)
        if mapped is None:
            return []
        name, vop, vvalue = mapped
        if field == "num_gpus":
            vvalue = [int(x) for x in vvalue] if isinstance(vvalue, list) else int(vvalue)
        return [(name, vop, vvalue)]
    value_ok = isinstance(value, (int, float, Decimal)) and not isinstance(value, bool)
    if field == "gpu_ram" and value_ok and op in _BOUNDS:
        return [("gpu_ram", o, x) for o, x in _gpu_ram_terms(op, float(value))]
    if field == "cpu_ram" and value_ok and op in _BOUNDS:
        return [("cpu_ram", o, x) for o, x in _decimal_mb_terms(op, float(value))]
    if field == "dph" and value_ok and not bid and op in _BOUNDS:
        return [("dph_total", o, x) for o, x in _dph_terms(op, float(value))]
    if field == "verified" and isinstance(value, bool) and op in ("eq", "neq"):
        return [("verified", "eq", value if op == "eq" else not value)]
    if field == "offer_id":
        if op == "eq" and isinstance(value, str) and _ID.fullmatch(value):
            return [("id", "eq", int(value))]
        if op == "in":
            ids = [int(v) for v in value if isinstance(v, str) and _ID.fullmatch(v)]
            return [("id", "in", ids)] if ids else []
    return []


def _merge(terms: dict[str, dict[str, Any]], field: str, op: str, value: Any) -> None:
    """Add a term; a repeated bound keeps the tighter one (the local filter ANDs them)."""
    ops = terms.setdefault(field, {})
    if op not in ops:
        ops[op] = value
    elif op in ("gt", "gte"):
        ops[op] = max(ops[op], value)
    elif op in ("lt", "lte"):
        ops[op] = min(ops[op], value)
    # eq/neq/in/notin: the first one stays (a second can only narrow further locally)


def _order(query: OfferQuery | None) -> list[list[str]]:
    keys = query.sort_keys() if query is not None else DEFAULT_ORDER
    order: list[list[str]] = []
    for key in keys:
        name = _ORDER_FIELDS.get(key.field)
        if name is None:
            break            # later keys only break ties of one vast cannot sort by
        order.append([name, "desc" if key.desc else "asc"])
    return order or [["dph_total", "asc"]]


def build_search_body(query: OfferQuery | None, *, limit: int = SEARCH_LIMIT) -> dict[str, Any]:
    """The `POST /api/v0/bundles/` body for `query` (see the module docstring for what is sent)."""
    filters = query.filters if query is not None else ()
    bid = _wants_bid(filters)
    terms: dict[str, dict[str, Any]] = {}
    for f in filters:
        for field, op, value in _terms_for(f, bid):
            _merge(terms, field, op, value)
    body: dict[str, Any] = {}
    if "verified" in terms:
        body["verified"] = terms.pop("verified")
    body["external"] = {"eq": False}
    body["rentable"] = {"eq": True}
    body.update(terms)
    body["order"] = _order(query)
    body["type"] = "bid" if bid else "on-demand"
    body["limit"] = limit
    body["allocated_storage"] = float(SEARCH_DISK_GB)
    return body


# --------------------------------------------------------------------------------- offers

_OFFER_FIELDS = tuple(Offer.model_fields)
_name_cache: dict[str, str] = {}
_place_cache: dict[Any, tuple[str, str]] = {}
_storage_cache: dict[Any, tuple[Decimal, Decimal, int]] = {}


def _gpu_name(raw: Any, ram_mb: Any = None) -> str:
    """Normalised name; the memory tells an 80 GB A100 from a 40 GB one sold under one name."""
    large = isinstance(ram_mb, (int, float)) and ram_mb > 49152
    key = (raw, large)
    name = _name_cache.get(key)
    if name is None:
        name = normalise_gpu_name(str(raw or "").replace("_", " "), 80.0 if large else 24.0 if ram_mb else None) \
            or "unknown"
        if len(_name_cache) > 5000:
            _name_cache.clear()
        _name_cache[key] = name
    return name


def _place(raw: Any) -> tuple[str, str]:
    """'Oregon, US' -> ('Oregon, US', 'US'): the country is the last two letters."""
    place = _place_cache.get(raw)
    if place is None:
        text = " ".join(str(raw).split()) if raw else ""
        tail = text[-2:]
        country = tail if len(tail) == 2 and tail.isalpha() and tail.isupper() and \
            (len(text) == 2 or not text[-3].isalnum()) else ""
        place = (text, country)
        if len(_place_cache) > 5000:
            _place_cache.clear()
        _place_cache[raw] = place
    return place


def _storage(raw: Any) -> tuple[Decimal, Decimal, int]:
    """storage_cost ($/GB-month) -> (as Decimal, $/h of a SEARCH_DISK_GB disk, the same in
    micro-dollars)."""
    hit = _storage_cache.get(raw)
    if hit is None:
        value = float(raw) if raw is not None else 0.0
        if not 0.0 <= value < 1e4:
            raise ValueError("storage cost out of range")
        per_gb = Decimal(repr(value))
        hourly = storage_hourly(per_gb, SEARCH_DISK_GB)
        hit = (per_gb, hourly, int(hourly.scaleb(6)))
        if len(_storage_cache) > 5000:
            _storage_cache.clear()
        _storage_cache[raw] = hit
    return hit


_new = object.__new__
_set = object.__setattr__
# Every field is always given, so every Offer can share one fields-set: pydantic copies it before
# changing it (model_copy), and a frozen model never changes it in place.
_ALL_FIELDS = set(_OFFER_FIELDS)


def _offer_fast(values: dict[str, Any]) -> Offer:
    """An Offer from values this module has already checked and typed: what pydantic's own
    `model_construct` does, minus its per-field loop (about 0.5 µs an offer instead of 6)."""
    offer = _new(Offer)
    _set(offer, "__dict__", values)
    _set(offer, "__pydantic_fields_set__", _ALL_FIELDS)
    _set(offer, "__pydantic_extra__", None)
    _set(offer, "__pydantic_private__", None)
    return offer


def _offer_checked(values: dict[str, Any]) -> Offer:
    return Offer(**values)


def _pick_builder() -> Callable[[dict[str, Any]], Offer]:
    """Use the fast path only if it gives exactly what validation gives (a pydantic upgrade
    that changes the internals falls back to validating)."""
    sample = {"provider": NAME, "offer_id": "1", "gpu_name": "RTX 4090", "num_gpus": 1, "gpu_ram": 24.0,
              "cpu_cores": 8.0, "cpu_ram": 64.0, "disk_space": 100.0, "dph": Decimal("0.3"),
              "storage_cost": Decimal("0.1"), "running_storage_cost": None, "reliability": 0.99,
              "location": "Oregon, US", "country": "US", "inet_down": 1.0, "inet_up": 1.0, "cuda": 12.4,
              "verified": True, "interruptible": False, "simulated": False,
              "fetched_at": datetime(2026, 1, 1, tzinfo=UTC), "priced_at": None, "price_source": "",
              "extra": {"machine_id": "1"}}
    try:
        if set(sample) != _ALL_FIELDS:
            return _offer_checked
        fast, checked = _offer_fast(dict(sample)), Offer(**sample)
        copied = fast.model_copy(update={"dph": Decimal("0.4")})
        if fast == checked and fast.model_dump() == checked.model_dump() and fast.ref == checked.ref \
                and copied.dph == Decimal("0.4") and fast.dph == Decimal("0.3") \
                and fast.model_fields_set == checked.model_fields_set:
            return _offer_fast
    except Exception:  # noqa: BLE001 - any surprise means: validate instead
        pass
    return _offer_checked


_build_offer = _pick_builder()


def normalise_offers(raw_offers: Iterable[Any], *, fetched_at: datetime | None,
                     interruptible: bool = False) -> list[Offer]:
    """vast offer objects (as `POST /bundles/` returns them) -> Offers. An offer missing what
    a price or a machine needs (id, GPUs, a finite price) is skipped, not fatal.

    Hot path (10,000 offers in well under 100 ms): an offer with every usual field is read with
    plain subscripts and typed here, with caches for the few distinct GPU names, places and
    storage prices, and built without a validation pass; anything unusual (a missing field, a
    null, a string number) goes through `_normalise_one`, which is slower and forgiving."""
    with _gc_paused():
        return _normalise(raw_offers, fetched_at, interruptible)


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Every object made while normalising survives (it is the answer), so a garbage collection
    in the middle only walks them, and the raw offers, for nothing; a full one costs more than
    the whole normalisation. Collections resume, as they were, right after."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


_FAST_FIELDS = operator.itemgetter(
    "id", "num_gpus", "dph_base", "min_bid", "storage_cost", "gpu_name", "geolocation", "reliability",
    "gpu_ram", "cpu_cores_effective", "cpu_ram", "disk_space", "inet_down", "inet_up", "cuda_max_good",
    "verification", "machine_id")


def _normalise(raw_offers: Iterable[Any], fetched_at: datetime | None, interruptible: bool) -> list[Offer]:
    build = _build_offer
    fields = _FAST_FIELDS
    names, places, storages = _name_cache, _place_cache, _storage_cache
    micro = _MICRO
    out: list[Offer] = []
    append = out.append
    template: dict[str, Any] = dict.fromkeys(_OFFER_FIELDS)     # every field, in field order
    template.update(provider=NAME, running_storage_cost=None, interruptible=interruptible, simulated=False,
                    fetched_at=fetched_at, priced_at=None, price_source="")
    for o in raw_offers:
        try:
            (oid, num_gpus, dph_base, min_bid, storage_cost, raw_name, raw_place, rel, gpu_ram, cores,
             cpu_ram, disk, inet_down, inet_up, cuda, verification, machine_id) = fields(o)
            compute = min_bid if interruptible else dph_base
            if oid.__class__ is not int or num_gpus.__class__ is not int or num_gpus < 1 \
                    or compute.__class__ is not float or not 0.0 <= compute < 1e5:
                raise _Unusual
            storage = storages.get(storage_cost)
            if storage is None:
                storage = _storage(storage_cost)
            name = names.get((raw_name, gpu_ram.__class__ in (int, float) and gpu_ram > 49152))
            if name is None:
                name = _gpu_name(raw_name, gpu_ram)
            place = places.get(raw_place)
            if place is None:
                place = _place(raw_place)
            rel = float(rel)
            # compute + disk exactly, as quote() gives it: in whole micro-dollars when the price
            # has at most six decimals (nearly always), else through its decimal text
            scaled = compute * 1e6
            whole = round(scaled)
            if -1e-6 < scaled - whole < 1e-6:
                dph = Decimal(whole + storage[2]).scaleb(-6)
            else:
                dph = (Decimal(repr(compute)) + storage[1]).quantize(micro)
            values = template.copy()        # a presized copy beats a 24-key literal by half
            values["offer_id"] = str(oid)
            values["gpu_name"] = name
            values["num_gpus"] = num_gpus
            values["gpu_ram"] = float((gpu_ram + 512) // 1024)
            values["cpu_cores"] = float(cores)
            values["cpu_ram"] = cpu_ram / 1000
            values["disk_space"] = float(disk)
            values["dph"] = dph
            values["storage_cost"] = storage[0]
            values["reliability"] = rel if 0.0 <= rel <= 1.0 else 1.0 if rel > 1.0 else 0.0
            values["location"] = place[0]
            values["country"] = place[1]
            values["inet_down"] = float(inet_down)
            values["inet_up"] = float(inet_up)
            values["cuda"] = float(cuda)
            values["verified"] = verification == "verified"
            values["extra"] = {"machine_id": str(machine_id)}
            append(build(values))
        except (_Unusual, KeyError, TypeError, ValueError, AttributeError, ArithmeticError, OverflowError):
            offer = _normalise_one(o, fetched_at, interruptible)
            if offer is not None:
                append(offer)
    return out


class _Unusual(Exception):
    """An offer the fast path does not take as it is."""


def _num(value: Any) -> float:
    """A number from a JSON value that may be null or a numeric string; 0 when unreadable."""
    if value is None or isinstance(value, bool):
        return 0.0
    try:
        x = float(value)
    except (TypeError, ValueError):
        return 0.0
    return x if math.isfinite(x) else 0.0


def _normalise_one(o: Any, fetched_at: datetime | None, interruptible: bool) -> Offer | None:
    """One offer, forgivingly: missing fields read as 0/empty, string numbers are read, and an
    offer without an id, a GPU count or a finite price is skipped (None)."""
    try:
        get = o.get
        oid = get("id")
        if oid is None or isinstance(oid, bool):
            return None
        offer_id = str(oid).strip()
        if isinstance(oid, float):
            if not oid.is_integer():
                return None
            offer_id = str(int(oid))
        if not _ID.fullmatch(offer_id):
            return None
        num_gpus = _num(get("num_gpus"))
        if num_gpus < 1 or not num_gpus.is_integer():
            return None
        compute: Any = get("min_bid") if interruptible else None
        if compute is None:
            compute = get("dph_base")
        if compute is None:             # no compute price: the total minus its own disk part
            total = get("dph_total")
            if total is None:
                return None
            compute = _num(total) - _num(get("storage_total_cost"))
        compute = float(compute)
        if not 0.0 <= compute < 1e5:    # also NaN
            return None
        per_gb, disk_hourly, _ = _storage(_num(get("storage_cost")))
        location, country = _place(get("geolocation"))
        rel_raw = get("reliability")
        rel = _num(get("reliability2") if rel_raw is None else rel_raw)
        verification = get("verification")
        cores = get("cpu_cores_effective")
        values = {
            "provider": NAME,
            "offer_id": offer_id,
            "gpu_name": _gpu_name(get("gpu_name"), get("gpu_ram")),
            "num_gpus": int(num_gpus),
            "gpu_ram": gpu_ram_gb(_num(get("gpu_ram"))),
            "cpu_cores": _num(get("cpu_cores") if cores is None else cores),
            "cpu_ram": _num(get("cpu_ram")) / 1000,
            "disk_space": _num(get("disk_space")),
            "dph": (Decimal(repr(compute)) + disk_hourly).quantize(_MICRO),
            "storage_cost": per_gb,
            "running_storage_cost": None,
            "reliability": min(1.0, max(0.0, rel)),
            "location": location,
            "country": country,
            "inet_down": _num(get("inet_down")),
            "inet_up": _num(get("inet_up")),
            "cuda": _num(get("cuda_max_good")),
            "verified": verification == "verified" if verification is not None else _num(get("verified")) > 0
            or get("verified") is True,
            "interruptible": interruptible,
            "simulated": False,
            "fetched_at": fetched_at,
            "priced_at": None,
            "price_source": "",
            "extra": {"machine_id": str(get("machine_id"))},
        }
        return Offer(**values)          # validated: this path is rare
    except (TypeError, ValueError, AttributeError, ArithmeticError, OverflowError):
        return None


# --------------------------------------------------------------------------------- instances


def _dec(value: Any) -> Decimal | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    if not 0 <= x < 1e9:          # also NaN and infinities
        return None
    return Decimal(repr(x))


def _storage_dph(raw: dict[str, Any]) -> Decimal:
    total = _dec(raw.get("storage_total_cost"))
    if total is not None and total > 0:
        return total.quantize(_MICRO)
    per_gb = _dec(raw.get("storage_cost"))
    disk = _dec(raw.get("disk_space"))
    if per_gb is None or disk is None:
        return _ZERO
    return storage_hourly(per_gb, float(disk))


def _running_dph(raw: dict[str, Any], storage: Decimal) -> Decimal:
    base = _dec(raw.get("dph_base"))
    if base is not None:
        return (base + storage).quantize(_MICRO)
    total = _dec(raw.get("dph_total"))
    return total.quantize(_MICRO) if total is not None else _ZERO


def _percent(value: Any) -> float | None:
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    if x != x or x < 0:
        return None
    return min(x, 100.0)


def _host_port(ports: Any, container_port: int) -> str | None:
    if not isinstance(ports, dict):
        return None
    for key in (f"{container_port}/tcp", str(container_port)):
        bindings = ports.get(key)
        if isinstance(bindings, list):
            for binding in bindings:
                if isinstance(binding, dict) and str(binding.get("HostPort") or "").isdigit():
                    return str(binding["HostPort"])
    return None


def _exposed_ports(raw: dict[str, Any]) -> list[int]:
    """Container ports asked for at create: the `-p A:B` entries of extra_env, in order."""
    found: list[int] = []
    env = raw.get("extra_env")
    items = env.items() if isinstance(env, dict) else env if isinstance(env, list) else ()
    for item in items:
        key = item[0] if isinstance(item, (list, tuple)) and item else None
        if isinstance(key, str) and key.startswith("-p "):
            m = re.match(r"-p\s+(?:\d+:)?(\d+)(?:/tcp)?$", key.strip())
            if m:
                found.append(int(m.group(1)))
    return found


def _endpoint(raw: dict[str, Any]) -> str | None:
    """http://{public_ipaddr}:{host port} of the model server: the first port asked for at
    create other than ssh (22), else 8000 where mapped."""
    ip = str(raw.get("public_ipaddr") or "").strip()
    ports = raw.get("ports")
    if not ip or not isinstance(ports, dict):
        return None
    candidates = [p for p in _exposed_ports(raw) if p != 22] or [8000]
    for port in candidates:
        host_port = _host_port(ports, port)
        if host_port is not None:
            host = f"[{ip}]" if ":" in ip else ip
            return f"http://{host}:{host_port}"
    return None


def _started(raw: dict[str, Any]) -> datetime | None:
    try:
        seconds = float(raw.get("start_date"))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    if not 0 < seconds < 1e11:
        return None
    return datetime.fromtimestamp(seconds, UTC)


def _text(value: Any) -> str | None:
    if value is None:
        return None
    text = str(value).strip()
    return text or None


# --------------------------------------------------------------------------------- provider


def _api_root(base_url: str) -> str:
    """VAST_URL as the CLI takes it (https://console.vast.ai); a copied `.../api/v0` is fine too."""
    url = (base_url or DEFAULT_URL).strip().rstrip("/")
    return re.sub(r"/api/v\d+$", "", url)


def _reset_time(response: httpx.Response) -> str:
    raw = response.headers.get("X-RateLimit-Reset")
    try:
        when = datetime.fromtimestamp(float(raw), UTC)  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError, OSError):
        return "at midnight UTC"
    return f"at {when:%Y-%m-%d %H:%M} UTC"


class VastProvider(Provider):
    name = NAME
    display_name = DISPLAY
    capabilities = Capabilities(
        reports_gpu_utilisation=True,
        storage_bills_while_stopped=True,
        reports_actual_billing=False,
        retries_internally=True,
    )

    def __init__(self, api_key: str, *, base_url: str = DEFAULT_URL, timeout_s: float = 30.0,
                 attempts: int = 3, backoff_s: float = 0.15,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep, clock: Clock | None = None,
                 transport: httpx.AsyncBaseTransport | None = None,
                 rng: random.Random | None = None) -> None:
        key = (api_key or "").strip()
        if not key:
            raise ConfigError("vast.ai: the API key is empty (set VAST_API_KEY)")
        self.clock = clock or Clock()
        self.base_url = _api_root(base_url)
        self._api = ApiClient(provider=NAME, display=DISPLAY, base_url=self.base_url,
                              headers={"Authorization": f"Bearer {key}", "Accept": "application/json",
                                       "User-Agent": "gpuherd"},
                              secrets=[key], timeout_s=timeout_s, attempts=attempts, backoff_s=backoff_s,
                              sleep=sleep, rng=rng, transport=transport)
        self._bid_offers: set[str] = set()      # ids last seen in a bid search, for get_offer

    @classmethod
    def from_settings(cls, settings: Settings, **kwargs: Any) -> VastProvider | None:
        """The provider when VAST_API_KEY is set (None otherwise), at VAST_URL."""
        secret = settings.vast_api_key
        key = secret.get_secret_value().strip() if secret is not None else ""
        if not key:
            return None
        return cls(key, base_url=settings.vast_url, **kwargs)

    async def aclose(self) -> None:
        await self._api.aclose()

    # ------------------------------------------------------------------ errors

    def _classify(self, what: str, *, offer_id: str | None = None
                  ) -> Callable[[httpx.Response, Any], ProviderError | None]:
        """vast's error bodies: `{"success": false, "error": code, "msg": text}`, also on HTTP 200."""
        def classify(response: httpx.Response, body: Any) -> ProviderError | None:
            if not isinstance(body, dict):
                return None
            status = response.status_code
            code = str(body.get("error") or "")
            text = self._api.scrub(error_text(body)).strip()[:300]
            if status == 429 and code == "search_quota_exceeded":
                return ProviderError(DISPLAY, f"the daily search quota is used up; it resets "
                                              f"{_reset_time(response)}. Cached results still work.")
            if offer_id is not None and (status in (404, 410) or code == "no_such_ask"):
                return CapacityError(DISPLAY, f"offer {offer_id} is no longer available (rented by "
                                              "someone else or withdrawn); pick another offer")
            if status == 401 and "two factor" in text.lower():
                return AuthError(DISPLAY, "the API key was refused: this call needs a two-factor "
                                          "session key")
            if status == 404 and "session expired" in text.lower():
                return AuthError(DISPLAY, "the API key was refused: its session expired")
            if status < 400 and body.get("success") is False:
                if code == "no_such_instance":
                    return NotFoundAtProvider(DISPLAY, f"{what}: no such instance")
                if code in ("auth_error", "invalid_token"):
                    return AuthError(DISPLAY, f"the API key was refused ({text or code})")
                if code == "rate_limit_exceeded":
                    return RateLimited(DISPLAY, f"{what}: too many requests ({text or code})")
                return ProviderError(DISPLAY, f"{what} failed: {text or code or 'no reason given'}")
            if status == 400:
                detail = text or code or "no reason given"
                return ProviderError(DISPLAY, f"{what}: the request was refused: {detail}")
            return None
        return classify

    async def _call(self, method: str, path: str, what: str, *, json_body: Any = None,
                    params: dict[str, Any] | None = None, idempotent: bool = True,
                    offer_id: str | None = None) -> Any:
        return await self._api.request(method, path, json_body=json_body, params=params,
                                       idempotent=idempotent, what=what,
                                       classify=self._classify(what, offer_id=offer_id))

    # ------------------------------------------------------------------ offers

    def search_key(self, query: OfferQuery | None) -> str:
        return json.dumps(build_search_body(query), separators=(",", ":"))

    async def search(self, query: OfferQuery | None = None) -> list[Offer]:
        body = build_search_body(query)
        return await self._search(body)

    async def _search(self, body: dict[str, Any]) -> list[Offer]:
        answer = await self._call("POST", "/api/v0/bundles/", "search offers", json_body=body)
        raw = answer.get("offers") if isinstance(answer, dict) else None
        if not isinstance(raw, list):
            raise ProviderError(DISPLAY, "search offers: the answer has no offer list")
        bid = body.get("type") == "bid"
        offers = normalise_offers(raw, fetched_at=self.clock.now(), interruptible=bid)
        if bid:
            if len(self._bid_offers) > 50_000:
                self._bid_offers.clear()
            self._bid_offers.update(o.offer_id for o in offers)
        if len(offers) < len(raw):
            log.info("vast.ai: %d of %d offers skipped (incomplete)", len(raw) - len(offers), len(raw))
        return offers

    async def get_offer(self, offer_id: str) -> Offer | None:
        if not _ID.fullmatch(offer_id or ""):
            return None
        body = build_search_body(None, limit=5)
        body["id"] = {"eq": int(offer_id)}
        if offer_id in self._bid_offers:
            body["type"] = "bid"
        for offer in await self._search(body):
            if offer.offer_id == offer_id:
                return offer
        return None

    # ------------------------------------------------------------------ create

    def create_body(self, request: CreateRequest) -> dict[str, Any]:
        """The `PUT /api/v0/asks/{id}/` body (the CLI's keys; see the module docstring)."""
        env: dict[str, str] = {str(k): str(v) for k, v in request.env.items()}
        ports = list(dict.fromkeys([*request.ports, *([request.health_port] if request.health_port else [])]))
        for port in ports:
            env[f"-p {int(port)}:{int(port)}"] = "1"
        onstart = request.onstart
        if request.args:
            runtype, args = "args", [str(a) for a in request.args]
        else:
            runtype, args = "ssh", None
        if request.command and not request.args:
            onstart = f"{onstart.rstrip()}\n{request.command}" if onstart else request.command
        if request.interruptible:
            if request.bid_dph is None:
                raise ProviderError(DISPLAY, "an interruptible rental needs a bid (USD/h) to offer")
            price: float | None = float(request.bid_dph)
        else:
            price = None
        body: dict[str, Any] = {
            "client_id": "me",
            "image": request.image,
            "env": env,
            "price": price,
            "disk": float(request.disk_gb),
            "label": request.label,
            "extra": None,
            "onstart": onstart,
            "image_login": None,
            "python_utf8": False,
            "lang_utf8": False,
            "use_jupyter_lab": False,
            "jupyter_dir": None,
            "force": False,
            "cancel_unavail": not request.interruptible,
            "template_hash_id": None,
            "user": None,
            "runtype": runtype,
        }
        if args is not None:
            body["args"] = args
        return body

    async def create(self, request: CreateRequest) -> ProviderInstance:
        offer_id = str(request.offer_id).strip()
        if not _ID.fullmatch(offer_id):
            raise CapacityError(DISPLAY, f"'{offer_id}' is not a vast.ai offer id")
        body = self.create_body(request)
        answer = await self._call("PUT", f"/api/v0/asks/{offer_id}/", f"rent offer {offer_id}",
                                  json_body=body, idempotent=False, offer_id=offer_id)
        contract = answer.get("new_contract") if isinstance(answer, dict) else None
        if isinstance(contract, bool) or not isinstance(contract, (int, str)) or not str(contract).isdigit():
            raise ProviderError(DISPLAY, f"rent offer {offer_id}: the answer names no new instance")
        provider_id = str(contract)
        placeholder = ProviderInstance(provider=NAME, provider_id=provider_id, label=request.label,
                                       state=ProviderState.PROVISIONING, offer_id=offer_id,
                                       image=request.image, interruptible=request.interruptible)
        try:
            got = await self.get(provider_id)
        except ProviderError as exc:   # rented all the same: report what we know
            log.info("vast.ai: instance %s created, reading it failed: %s", provider_id, exc.code)
            return placeholder
        if got is None:
            return placeholder
        return got.model_copy(update={"offer_id": offer_id, "label": got.label or request.label})

    # ------------------------------------------------------------------ instances

    def _instance(self, raw: dict[str, Any]) -> ProviderInstance:
        state, note = vast_state(raw.get("actual_status"), raw.get("intended_status"), raw.get("cur_state"))
        status = _text(raw.get("status_msg"))
        if note and status:
            message: str | None = f"{note} (vast.ai: {status})"
        else:
            message = note or status
        storage = _storage_dph(raw)
        frozen = (raw.get("actual_status") or "") == "frozen"
        running = state is ProviderState.RUNNING and not frozen
        try:
            num_gpus = int(raw.get("num_gpus") or 0)
        except (TypeError, ValueError):
            num_gpus = 0
        return ProviderInstance(
            provider=NAME,
            provider_id=str(raw.get("id")),
            label=_text(raw.get("label")),
            state=state,
            gpu_name=_gpu_name(raw.get("gpu_name"), raw.get("gpu_ram")) if raw.get("gpu_name") else "",
            num_gpus=max(0, num_gpus),
            dph=_running_dph(raw, storage),
            storage_dph=storage,
            endpoint=_endpoint(raw) if running else None,
            healthy=False if frozen else None,
            gpu_util=_percent(raw.get("gpu_util")) if running else None,
            started_at=_started(raw),
            message=self._api.scrub(message)[:500] if message else None,
            image=_text(raw.get("image_uuid")),
            interruptible=bool(raw.get("is_bid")),
        )

    async def get(self, provider_id: str) -> ProviderInstance | None:
        provider_id = str(provider_id).strip()
        if not _ID.fullmatch(provider_id):
            return None
        try:
            answer = await self._call("GET", f"/api/v0/instances/{provider_id}/", f"read instance {provider_id}",
                                      params={"owner": "me"})
        except NotFoundAtProvider:
            return None
        raw = answer.get("instances") if isinstance(answer, dict) else None
        if isinstance(raw, list):                 # tolerate the list form
            raw = next((r for r in raw if isinstance(r, dict) and str(r.get("id")) == provider_id), None)
        if not isinstance(raw, dict):
            return None
        if raw.get("id") is None:
            raw = {**raw, "id": provider_id}
        return self._instance(raw)

    async def list(self) -> list[ProviderInstance]:
        found: dict[str, ProviderInstance] = {}
        token: str | None = None
        seen: set[str] = set()
        for _ in range(MAX_PAGES):
            params = {"select_filters": json.dumps({}),
                      "order_by": json.dumps([{"col": "id", "dir": "asc"}]),
                      "limit": json.dumps(LIST_PAGE)}
            if token:
                params["after_token"] = token
            answer = await self._call("GET", "/api/v1/instances/", "list instances", params=params)
            rows = answer.get("instances") if isinstance(answer, dict) else None
            if not isinstance(rows, list):
                raise ProviderError(DISPLAY, "list instances: the answer has no instance list")
            for row in rows:
                if isinstance(row, dict) and row.get("id") is not None:
                    inst = self._instance(row)
                    found[inst.provider_id] = inst
            token = answer.get("next_token")
            if not token:
                return list(found.values())
            token = str(token)
            if token in seen:
                raise ProviderError(DISPLAY, "list instances: the pages repeat (next_token came back)")
            seen.add(token)
        raise ProviderError(DISPLAY, f"list instances: more than {MAX_PAGES} pages")

    async def _set_state(self, provider_id: str, state: str, verb: str) -> ProviderInstance:
        provider_id = str(provider_id).strip()
        if not _ID.fullmatch(provider_id):
            raise ProviderStateError(DISPLAY, f"cannot {verb} '{provider_id}': not a vast.ai instance id")
        try:
            await self._call("PUT", f"/api/v0/instances/{provider_id}/", f"{verb} instance {provider_id}",
                             json_body={"state": state})
        except NotFoundAtProvider:
            raise ProviderStateError(DISPLAY, f"cannot {verb} instance {provider_id}: "
                                              "vast.ai no longer knows it") from None
        try:
            got = await self.get(provider_id)
        except ProviderError:
            pending = ProviderState.STARTING if state == "running" else ProviderState.STOPPING
            return ProviderInstance(provider=NAME, provider_id=provider_id, state=pending,
                                    message=f"vast.ai accepted the {verb}; its state could not be read yet")
        if got is None:
            raise ProviderStateError(DISPLAY, f"instance {provider_id} is gone")
        return got

    async def start(self, provider_id: str) -> ProviderInstance:
        return await self._set_state(provider_id, "running", "start")

    async def stop(self, provider_id: str) -> ProviderInstance:
        return await self._set_state(provider_id, "stopped", "stop")

    async def destroy(self, provider_id: str) -> None:
        provider_id = str(provider_id).strip()
        if not _ID.fullmatch(provider_id):
            return               # nothing at vast.ai has that id: it is as gone as can be
        try:
            await self._call("DELETE", f"/api/v0/instances/{provider_id}/", f"destroy instance {provider_id}",
                             json_body={})
        except NotFoundAtProvider:
            return               # already gone: the caller wanted it gone

    async def balance(self) -> Decimal | None:
        answer = await self._call("GET", "/api/v0/users/current", "read the account")
        if not isinstance(answer, dict):
            return None
        for key in ("credit", "balance"):
            value = _signed_decimal(answer.get(key))
            if value is not None:
                return value
        return None


def _signed_decimal(value: Any) -> Decimal | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    if not -1e12 < x < 1e12:      # also NaN and infinities
        return None
    return Decimal(repr(x)).quantize(_MICRO)
