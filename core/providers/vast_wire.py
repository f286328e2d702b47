"""How vast.ai's JSON becomes gpuherd's Offer and states.

The reading half of the vast.ai provider (vast.py holds `VastProvider`, its HTTP calls and the
query -> `POST /bundles/` translation): offer objects normalised to `Offer` (a fast path with
caches for GPU names, places and storage prices, and a forgiving path for unusual offers), the
GPU memory unit, and an instance's JSON read as a state, prices, endpoint and start time. The
unit and price decisions are described in vast.py's docstring. An offer keeps vast's own GPU
spelling in `extra["gpu_name"]` ("A100 SXM4" for what gpuherd shows as "A100 80GB"), so a
`gpu_name=A100_SXM4` typed in vast's spelling, as the official CLI takes it, still matches.
"""

from __future__ import annotations

import contextlib
import gc
import math
import operator
import re
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from ..offers import SEARCH_DISK_GB, Offer, normalise_gpu_name, storage_hourly
from .base import ProviderState

NAME = "vast"
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


# --------------------------------------------------------------------------------- offers

_OFFER_FIELDS = tuple(Offer.model_fields)
_name_cache: dict[tuple[Any, bool], str] = {}
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
    except Exception:
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
            values["extra"] = {"machine_id": str(machine_id), "gpu_name": raw_name if raw_name.__class__ is str else ""}
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
            "extra": {"machine_id": str(get("machine_id")), "gpu_name": str(get("gpu_name") or "")},
        }
        return Offer(**values)          # validated: this path is rare
    except (TypeError, ValueError, AttributeError, ArithmeticError, OverflowError):
        return None


# --------------------------------------------------------------------------------- instances


def _dec(value: Any, low: float = 0, high: float = 1e9) -> Decimal | None:
    """A JSON number as an exact Decimal (through its shortest repr, so 0.1 stays 0.1), or None
    for anything missing, non-numeric or outside [low, high)."""
    if value is None or isinstance(value, bool):
        return None
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    if not low <= x < high:       # also NaN and infinities
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
    if math.isnan(x) or x < 0:
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
    start = raw.get("start_date")
    if start is None:
        return None
    try:
        seconds = float(start)
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
