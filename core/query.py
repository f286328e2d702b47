"""The search query language: what a user types after `/gpu search`, parsed into an `OfferQuery`
that filters and sorts the provider-neutral `Offer` list.

Syntax (a superset of the vast.ai CLI's `search offers` query, see shared/reference/vast.md §2.1):

    gpu_ram>=24 num_gpus=1 reliability>0.98 gpu_name=RTX_4090 dph<0.6 -o dph

* ``FIELD OP VALUE`` clauses. Operators ``= == != > >= < <= in notin`` and the word forms
  ``eq neq noteq "not eq" gt gte lt lte in notin "not in" nin`` (word forms need spaces around
  them: ``num_gpus gte 2``). Spaces around symbol operators are allowed (``dph < 0.5``).
* VALUE is ``[a,b]`` (brackets, may hold spaces), ``"double quoted"`` or a run of non-spaces.
  In text values ``_`` becomes a space (``RTX_4090`` == ``"RTX 4090"``). ``in``/``notin`` split
  their value on commas. Numbers are converted to the field's type; ``$0.5`` and ``24gb`` units
  are accepted on price and GB fields.
* ``FIELD=any`` (or ``?``, ``*``) drops every earlier filter on FIELD, including a default such
  as ``verified=true``. A wildcard with any other operator is an error.
* Sort: ``-o dph``, ``-o dph-``, ``-o -reliability,+dph``, ``--order ...``, ``order=dph-`` or
  ``order=-dph`` (``sort=`` too): comma lists, a leading or trailing ``-`` means descending.
  Default: cheapest first (``dph`` ascending), then most reliable, then the offer ref.
* ``-n`` / ``--no-default`` drops the defaults, ``--limit N`` is ``limit=N``.
* Every other field of the vast.ai CLI's table (``duration``, ``datacenter``, ``compute_cap``,
  ``driver_version`` …, `MARKET_FIELDS`) is accepted in the CLI's units; vast.ai applies it, and
  offers of providers that cannot show it are not kept. ``gpu_name`` also matches the provider's
  own spelling (``A100_SXM4``), kept in ``Offer.extra["gpu_name"]``.

Chat shorthands:

* a GPU model word, ``4090``, ``a100``, ``h100``, ``l40s``, ``rtx4090`` …: the offer's GPU name
  contains that word (``a100`` matches ``A100 80GB`` and ``A100 SXM4``, ``a6000`` matches
  ``RTX A6000``). Several model words mean any of them (``4090 3090``). ``gpu=NAME`` and
  ``gpu in a,b`` do the same for any name.
* ``x2`` / ``2x`` → ``num_gpus=2``; ``h100x8`` / ``8xh100`` → model and count.
* ``24gb`` → ``gpu_ram>=24``.
* ``<$0.5``, ``<=$1``, ``$<0.5`` (also ``>``/``>=``) → a ``dph`` bound.
* ``provider=runpod`` / ``provider in vast,runpod`` → only those providers are asked.
* ``limit=10`` → at most 10 offers (1..1000).
* a bare boolean field (``interruptible``, ``verified``) → ``FIELD=true``.

Differences from vast.ai on purpose: units are GB and USD/hour everywhere (no ×1000 — see
`to_vast_filter` for the mapping a vast client needs); repeated clauses are ANDed instead of the
later one overwriting the earlier; text comparisons ignore case; ``location`` matches the full
location or any comma-separated part of it or the country code (``location=US``,
``location=Oregon``).

Every problem is raised as `QueryError` with the offending token and its position; no other
exception leaves `parse_query` for any input string.
"""

from __future__ import annotations

import difflib
import heapq
import math
import operator
import re
from collections.abc import Callable, Iterable
from decimal import Decimal
from functools import lru_cache
from typing import Any

from pydantic import BaseModel, ConfigDict, PrivateAttr

from .errors import QueryError
from .offers import Offer
from .text import MAX_QUERY, clip, suggestible, too_long

__all__ = [
    "DEFAULT_ORDER",
    "FIELD_ALIASES",
    "GPU_MODELS",
    "MARKET_DEFAULTS",
    "MARKET_FIELDS",
    "MAX_LIMIT",
    "OFFER_FIELDS",
    "QUERY_KEYWORDS",
    "FieldSpec",
    "Filter",
    "OfferQuery",
    "SortKey",
    "gpu_model_matches",
    "parse_query",
    "to_vast_filter",
]

MAX_QUERY_LENGTH = MAX_QUERY   # 2,000 characters: see core/text.py
MAX_LIMIT = 1000
MAX_GPUS = 64


# --------------------------------------------------------------------------- fields


class FieldSpec(BaseModel):
    """One filterable/sortable attribute of `Offer`.

    `vast_name` / `vast_factor`: the vast.ai search field this maps to and the factor a vast
    client multiplies our value by (vast compares gpu_ram, gpu_total_ram and cpu_ram in MB, so
    GB × 1000 — see vast.md §2.1). None where vast has no server-side equivalent."""

    model_config = ConfigDict(frozen=True)

    name: str
    type: type
    unit: str = ""
    description: str
    vast_name: str | None = None
    vast_factor: float | None = None

    @property
    def kind(self) -> str:
        return {int: "integer", float: "number", Decimal: "price", bool: "true/false", str: "text"}[self.type]


def _f(name: str, typ: type, unit: str, description: str, vast: str | None = None,
       factor: float | None = None) -> tuple[str, FieldSpec]:
    return name, FieldSpec(name=name, type=typ, unit=unit, description=description,
                           vast_name=vast, vast_factor=factor)


OFFER_FIELDS: dict[str, FieldSpec] = dict([
    _f("gpu_name", str, "", "GPU model as named by gpuherd, e.g. RTX_4090, A100_80GB (exact; "
       "for 'contains this model' write the model: 4090, a100)", "gpu_name"),
    _f("num_gpus", int, "", "number of GPUs", "num_gpus"),
    _f("gpu_ram", float, "GB", "memory per GPU", "gpu_ram", 1000),
    _f("gpu_total_ram", float, "GB", "memory of all GPUs together", "gpu_total_ram", 1000),
    _f("cpu_cores", float, "", "vCPUs you get", "cpu_cores_effective"),
    _f("cpu_ram", float, "GB", "system memory", "cpu_ram", 1000),
    _f("disk_space", float, "GB", "disk available", "disk_space"),
    _f("dph", Decimal, "USD/h", "price per hour while running", "dph_total"),
    _f("dph_per_gpu", Decimal, "USD/h", "price per hour per GPU"),
    _f("storage_cost", Decimal, "USD/GB-month", "disk price, billed while stopped too",
       "storage_cost"),
    _f("reliability", float, "0-1", "host reliability score", "reliability"),
    _f("location", str, "", "location, e.g. Oregon,_US (matches the whole or any part)",
       "geolocation"),
    _f("country", str, "", "ISO country code, e.g. US"),
    _f("inet_down", float, "Mb/s", "download bandwidth", "inet_down"),
    _f("inet_up", float, "Mb/s", "upload bandwidth", "inet_up"),
    _f("cuda", float, "", "highest CUDA version the driver supports", "cuda_max_good"),
    _f("verified", bool, "", "host verified by the provider (default: true)", "verified"),
    _f("interruptible", bool, "", "spot/bid offer that can be preempted"),
    _f("provider", str, "", "vast, runpod, aws, surf, sandbox …"),
    _f("offer_id", str, "", "the provider's offer id", "id"),
])

FIELD_ALIASES: dict[str, str] = {
    "dph_total": "dph",
    "price": "dph",
    "cuda_vers": "cuda",
    "cuda_max_good": "cuda",
    "geolocation": "location",
    "id": "offer_id",
}

# The rest of vast.ai's query language (the official CLI's field table, `offers_fields` of
# vastai 1.9.1, reference vast.md §2.1): fields an Offer does not carry. They are accepted so that
# every query in the CLI's syntax parses; the provider that knows the field (vast.ai) applies it
# server-side, and an offer from any other provider is not kept, since nothing shows it meets the
# term. `vast_factor` converts like the CLI (duration: days -> seconds). See vast.py's docstring.
MARKET_PROVIDERS: frozenset[str] = frozenset({"vast"})
MARKET_FIELDS: dict[str, FieldSpec] = dict([
    _f("bw_nvlink", float, "GB/s", "NVLink bandwidth", "bw_nvlink"),
    _f("cluster_id", int, "", "vast.ai cluster id", "cluster_id"),
    _f("compute_cap", int, "", "CUDA compute capability x100 (800 = 8.0)", "compute_cap"),
    _f("cpu_arch", str, "", "host CPU architecture: amd64, arm64", "cpu_arch"),
    _f("cpu_ghz", float, "GHz", "CPU clock", "cpu_ghz"),
    _f("datacenter", bool, "", "offered from a datacenter", "datacenter"),
    _f("direct_port_count", int, "", "open ports on the host's router", "direct_port_count"),
    _f("disk_bw", float, "MB/s", "disk read bandwidth", "disk_bw"),
    _f("dlperf", float, "", "DL-perf score", "dlperf"),
    _f("dlperf_per_dphtotal", float, "", "DL-perf per USD/h", "dlperf_per_dphtotal"),
    _f("driver_version", str, "", "driver version, e.g. 535.86.05 (comparable)", "driver_version"),
    _f("duration", float, "days", "longest rental the host allows", "duration", 86400.0),
    _f("external", bool, "", "offers vast.ai lists from elsewhere (default: false)", "external"),
    _f("flops_per_dphtotal", float, "", "TFLOPs per USD/h", "flops_per_dphtotal"),
    _f("gpu_arch", str, "", "GPU architecture: nvidia, amd", "gpu_arch"),
    _f("gpu_display_active", bool, "", "a display is attached to the GPU", "gpu_display_active"),
    _f("gpu_frac", float, "", "share of the machine's GPUs in the offer", "gpu_frac"),
    _f("gpu_max_power", float, "W", "GPU power limit", "gpu_max_power"),
    _f("gpu_max_temp", float, "C", "GPU temperature limit", "gpu_max_temp"),
    _f("gpu_mem_bw", float, "GB/s", "GPU memory bandwidth", "gpu_mem_bw"),
    _f("has_avx", bool, "", "CPU supports AVX", "has_avx"),
    _f("host_id", int, "", "the host's id", "host_id"),
    _f("inet_down_cost", float, "USD/GB", "download traffic price", "inet_down_cost"),
    _f("inet_up_cost", float, "USD/GB", "upload traffic price", "inet_up_cost"),
    _f("machine_id", int, "", "the machine's id", "machine_id"),
    _f("min_bid", float, "USD/h", "current minimum bid (interruptible)", "min_bid"),
    _f("mobo_name", str, "", "motherboard", "mobo_name"),
    _f("pci_gen", float, "", "PCIe generation", "pci_gen"),
    _f("pcie_bw", float, "GB/s", "PCIe bandwidth CPU to GPU", "pcie_bw"),
    _f("rentable", bool, "", "can be rented now (default: true)", "rentable"),
    _f("rented", bool, "", "already rented (by you)", "rented"),
    _f("static_ip", bool, "", "the IP address is static", "static_ip"),
    _f("total_flops", float, "TFLOPs", "TFLOPs of all GPUs", "total_flops"),
    _f("ubuntu_version", str, "", "host OS version", "ubuntu_version"),
    _f("verification", str, "", "verified, unverified, deverified", "verification"),
    _f("vms_enabled", bool, "", "the machine runs VM instances", "vms_enabled"),
])
MARKET_ALIASES: dict[str, str] = {"display_active": "gpu_display_active", "dlperf_usd": "dlperf_per_dphtotal",
                                  "flops_usd": "flops_per_dphtotal",
                                  "cpu_cores_effective": "cpu_cores"}   # vast's name for ours
# Sent by the vast.ai client as the official CLI does unless the query names the field; `=any`
# or `-n` drops them (recorded in `dropped_defaults`).
MARKET_DEFAULTS: dict[str, Any] = {"external": False, "rentable": True}
_ORDERED_TEXT = frozenset({"driver_version"})   # a version: > and < allowed

# Keys that are not Offer attributes.
QUERY_KEYWORDS: dict[str, str] = {
    "gpu": "GPU model contained in the name: gpu=4090, gpu in a100,h100 (same as typing 4090)",
    "limit": f"at most N offers, 1..{MAX_LIMIT}: limit=10",
    "order": "sort: order=dph (cheapest first), order=-reliability, -o -reliability,dph",
    "sort": "same as order",
}

# GPU model words a user may type bare. Matching is by word of the offer's gpu_name, so this list
# only decides which bare words are accepted; `gpu=<anything>` works for any model.
_MODEL_WORDS = """
    1080 1080ti 2060 2070 2080 2080ti 3060 3060ti 3070 3070ti 3080 3080ti 3090 3090ti
    4060 4060ti 4070 4070ti 4080 4090 4090d 5060 5060ti 5070 5070ti 5080 5090 titan
    a2000 a4000 a4500 a5000 a6000 a10 a10g a16 a30 a40 a100 a800 h100 h200 h800 gh200
    b100 b200 gb200 l4 l40 l40s t4 v100 p100 p40 k80 mi100 mi210 mi250 mi250x mi300x
"""
GPU_MODELS: frozenset[str] = frozenset(_MODEL_WORDS.split())
_MODEL_PREFIXES = ("rtx", "gtx", "tesla", "nvidia", "quadro")

_SORT_NAMES = {**{f: f for f in OFFER_FIELDS}, **FIELD_ALIASES}
_FILTER_KEYS = {**_SORT_NAMES, "gpu": "gpu", **{f: f for f in MARKET_FIELDS}, **MARKET_ALIASES}
_ALL_KEYS = sorted({*_FILTER_KEYS, "limit", "order", "sort"})

DEFAULTS: dict[str, Any] = {"verified": True, "interruptible": False}  # spot only when asked

_GB_FIELDS = {name for name, spec in OFFER_FIELDS.items() if spec.unit == "GB"}
_PRICE_FIELDS = {name for name, spec in OFFER_FIELDS.items() if spec.type is Decimal}
_NO_UNDERSCORE = {"provider", "offer_id", "country"}

# --------------------------------------------------------------------------- model


class Filter(BaseModel):
    """`field op value`. `field` is an Offer attribute, or `gpu` (model-word match on gpu_name).
    `op` is one of eq neq gt gte lt lte in notin; for in/notin `value` is a tuple."""

    model_config = ConfigDict(frozen=True)

    field: str
    op: str
    value: Any
    default: bool = False   # added by gpuherd, not typed by the user


class SortKey(BaseModel):
    model_config = ConfigDict(frozen=True)

    field: str
    desc: bool = False


DEFAULT_ORDER: tuple[SortKey, ...] = (SortKey(field="dph"), SortKey(field="reliability", desc=True))

_OP_SYMBOL = {"eq": "=", "neq": "!=", "gt": ">", "gte": ">=", "lt": "<", "lte": "<=",
              "in": " in ", "notin": " notin "}


class OfferQuery(BaseModel):
    """A parsed query. Treat it as immutable: predicates are compiled once and cached."""

    model_config = ConfigDict(frozen=True)

    text: str = ""
    filters: tuple[Filter, ...] = ()
    order: tuple[SortKey, ...] = DEFAULT_ORDER
    limit: int | None = None
    providers: frozenset[str] | None = None      # None: every configured provider
    dropped_defaults: frozenset[str] = frozenset()

    _predicates: tuple[Callable[[Offer], bool], ...] | None = PrivateAttr(default=None)

    # -- evaluation ---------------------------------------------------------------------

    def predicates(self) -> tuple[Callable[[Offer], bool], ...]:
        if self._predicates is None:
            preds: list[Callable[[Offer], bool]] = []
            if self.providers is not None:
                allowed = self.providers
                preds.append(lambda o: o.provider.lower() in allowed)
            preds.extend(_compile(f) for f in self.filters)
            self._predicates = tuple(preds)
        return self._predicates

    def matches(self, offer: Offer) -> bool:
        return all(p(offer) for p in self.predicates())

    def wants_provider(self, provider: str) -> bool:
        """Whether a search should ask this provider at all."""
        return self.providers is None or provider.lower() in self.providers

    def sort_keys(self) -> tuple[SortKey, ...]:
        """The full order used by `apply`: the user's, then the default tie-breakers (the offer
        ref comes last, always)."""
        keys = list(self.order)
        seen = {k.field for k in keys}
        keys.extend(k for k in DEFAULT_ORDER if k.field not in seen)
        return tuple(keys)

    def sort(self, offers: Iterable[Offer], limit: int | None = None) -> list[Offer]:
        """Offers in this query's order (ties: the offer ref); the first `limit` when given."""
        items = list(offers)
        keys = self.sort_keys()
        parts = [_sort_part(k.field, k.desc) for k in keys]
        funcs = [p for p in parts if p is not None]
        if len(funcs) == len(parts):
            # One pass with a composite key (descending numbers negated): about twice as fast
            # as one stable pass per key.
            if len(funcs) == 2:
                p0, p1 = funcs
                key: Callable[[Offer], tuple] = lambda o: (p0(o), p1(o), o.provider, o.offer_id)
            else:
                key = lambda o: (*[p(o) for p in funcs], o.provider, o.offer_id)
            if limit is not None and limit * 8 < len(items):
                return heapq.nsmallest(limit, items, key=key)   # same result as sorted()[:limit]
            items.sort(key=key)
            return items[:limit] if limit is not None else items
        # A descending text key cannot be negated: stable multi-pass sort, least significant first.
        items.sort(key=_ref_key)
        for sort_key in reversed(keys):
            items.sort(key=_sort_getter(sort_key.field), reverse=sort_key.desc)
        return items[:limit] if limit is not None else items

    def apply(self, offers: Iterable[Offer]) -> list[Offer]:
        """Filter, sort, limit."""
        items = list(offers)
        for pred in self.predicates():
            items = [o for o in items if pred(o)]
        return self.sort(items, self.limit)

    # -- display ------------------------------------------------------------------------

    def describe(self) -> str:
        """Short human summary: `gpu=4090 · dph<0.5 · verified · cheapest first`."""
        parts: list[str] = []
        if self.providers is not None:
            names = sorted(self.providers)
            parts.append(f"provider={names[0]}" if len(names) == 1 else
                         f"provider in {','.join(names)}")
        parts.extend(_describe_filter(f) for f in self.filters if not f.default)
        parts.extend(_describe_filter(f) for f in self.filters if f.default and f.field != "interruptible")  # on-demand goes without saying
        parts.extend(f"{name}=any" for name in sorted(self.dropped_defaults))
        parts.append(_describe_order(self.order))
        if self.limit is not None:
            parts.append(f"top {self.limit}")
        return " · ".join(parts)

    def __str__(self) -> str:
        return self.describe()


def _describe_value(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(_describe_value(v) for v in value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, Decimal):
        return format(value.normalize(), "f") if abs(value.adjusted()) < 30 else str(value)
    return str(value)


def _describe_filter(f: Filter) -> str:
    if f.op == "eq" and isinstance(f.value, bool):
        return f.field if f.value else f"not {f.field}"
    if f.op == "eq" and isinstance(f.value, tuple):       # several bare model words
        return f"{f.field} in {_describe_value(f.value)}"
    return f"{f.field}{_OP_SYMBOL[f.op]}{_describe_value(f.value)}"


def _describe_order(order: tuple[SortKey, ...]) -> str:
    if not order or order in (DEFAULT_ORDER, DEFAULT_ORDER[:1]):
        return "cheapest first"
    first = order[0]
    if len(order) == 1 and first.field == "dph" and first.desc:
        return "priciest first"
    if len(order) == 1 and first.field == "reliability" and first.desc:
        return "most reliable first"
    return "by " + ", ".join(f"{k.field}{' desc' if k.desc else ''}" for k in order)


# --------------------------------------------------------------------------- compiling


def _ref_key(offer: Offer) -> tuple[str, str]:
    return (offer.provider, offer.offer_id)


def _safe(getter: Callable[[Offer], Any]) -> Callable[[Offer], Any]:
    def get(offer: Offer) -> Any:
        try:
            return getter(offer)
        except (ArithmeticError, ValueError, TypeError):
            return None
    return get


_COMPUTED = frozenset({"dph_per_gpu", "gpu_total_ram"})   # properties of Offer, not stored


def _getter(field: str) -> Callable[[Offer], Any]:
    getter = operator.attrgetter(field)
    if field in _COMPUTED:     # guard the arithmetic: a failure reads as "no value"
        return _safe(getter)
    return getter


def _sort_getter(field: str) -> Callable[[Offer], Any]:
    spec = OFFER_FIELDS[field]
    getter = _getter(field)
    if spec.type is str:
        return lambda o: getter(o).casefold()
    if spec.type is Decimal:
        # None (a computed value that failed) sorts last ascending; NaN-free by Offer validation.
        return lambda o: (v if (v := getter(o)) is not None else Decimal("Infinity"))
    if spec.type is float:
        def num(o: Offer) -> float:
            v = getter(o)
            return math.inf if v is None or v != v else v
        return num
    return getter


def _sort_part(field: str, desc: bool) -> Callable[[Offer], Any] | None:
    """A key function whose ascending order is `field` in the wanted direction, or None when that
    needs a reversed sort (descending text)."""
    getter = _sort_getter(field)
    if not desc:
        return getter
    typ = OFFER_FIELDS[field].type
    if typ is str:
        return None
    if typ is bool:
        return lambda o: not getter(o)
    if typ is Decimal:
        return lambda o: getter(o).copy_negate()      # exact, never raises (no context)
    return lambda o: -getter(o)


@lru_cache(maxsize=4096)
def _name_words(name: str) -> tuple[str, ...]:
    return tuple(w for w in re.split(r"[^0-9a-z]+", name.casefold()) if w)


@lru_cache(maxsize=16384)
def gpu_model_matches(gpu_name: str, model: str) -> bool:
    """Whether `model` (e.g. "a100", "4090", "rtx 4090", "4070ti") names `gpu_name`: its words
    appear consecutively among the words of the name, or, written together, equal consecutive
    words of the name written together ("4070ti" ~ "RTX 4070 Ti")."""
    words = _name_words(gpu_name)
    want = _name_words(model)
    if not want or not words:
        return False
    n = len(want)
    for i in range(len(words) - n + 1):
        if words[i:i + n] == want:
            return True
    joined = "".join(want)
    for i in range(len(words)):
        acc = ""
        for w in words[i:]:
            acc += w
            if acc == joined:
                return True
            if len(acc) >= len(joined):
                break
    return False


@lru_cache(maxsize=4096)
def _location_parts(location: str, country: str) -> frozenset[str]:
    parts = {location.casefold().strip(), country.casefold().strip()}
    parts.update(p.strip() for p in location.casefold().split(","))
    parts.discard("")
    return frozenset(parts)


_CMP = {"eq": operator.eq, "neq": operator.ne, "gt": operator.gt, "gte": operator.ge,
        "lt": operator.lt, "lte": operator.le}


def _compile(f: Filter) -> Callable[[Offer], bool]:
    op, value = f.op, f.value
    if f.field in MARKET_FIELDS:       # applied server-side by the provider that knows the field
        return lambda o: o.provider in MARKET_PROVIDERS
    if f.field == "gpu_name" and op in ("eq", "neq", "in", "notin"):
        # gpuherd's name ("A100 80GB") or the provider's own spelling ("A100 SXM4", extra["gpu_name"])
        wanted_names = frozenset(v.casefold() for v in (value if isinstance(value, tuple) else (value,)))
        keep = op in ("eq", "in")
        named: dict[tuple[str, str], bool] = {}

        def name_pred(o: Offer) -> bool:
            key = (o.gpu_name, o.extra.get("gpu_name", ""))
            hit = named.get(key)
            if hit is None:
                hit = named[key] = (key[0].casefold() in wanted_names or key[1].casefold() in wanted_names) == keep
            return hit
        return name_pred
    if f.field == "gpu":
        models = value if isinstance(value, tuple) else (value,)
        positive = op in ("eq", "in")

        seen: dict[str, bool] = {}     # few distinct GPU names: decide each once per query

        def gpu_pred(o: Offer) -> bool:
            name = o.gpu_name
            hit = seen.get(name)
            if hit is None:
                hit = seen[name] = any(gpu_model_matches(name, m) for m in models) == positive
            return hit
        return gpu_pred

    if f.field == "location":
        wanted = frozenset(v.casefold() for v in (value if isinstance(value, tuple) else (value,)))
        positive = op in ("eq", "in")
        places: dict[tuple[str, str], bool] = {}

        def location_pred(o: Offer) -> bool:
            place = (o.location, o.country)
            hit = places.get(place)
            if hit is None:
                hit = places[place] = bool(_location_parts(*place) & wanted) == positive
            return hit
        return location_pred

    spec = OFFER_FIELDS[f.field]
    get = _getter(f.field)
    if spec.type is str:
        raw = get
        get = lambda o: raw(o).casefold()
        value = tuple(v.casefold() for v in value) if isinstance(value, tuple) else value.casefold()

    if op in ("in", "notin"):
        members = frozenset(value)
        if op == "in":
            return lambda o: get(o) in members
        return lambda o: get(o) not in members

    cmp = _CMP[op]
    if spec.type in (int, float, Decimal) and f.field in _COMPUTED:
        def num_pred(o: Offer) -> bool:
            v = get(o)
            if v is None:
                return False
            try:
                return cmp(v, value)
            except ArithmeticError:        # a Decimal NaN slipping through
                return False
        return num_pred
    return lambda o: cmp(get(o), value)


# --------------------------------------------------------------------------- vast mapping


def to_vast_filter(field: str, op: str, value: Any) -> tuple[str, str, Any] | None:
    """Map one of our filters to a vast.ai search term `(vast_field, op, value)`, converting
    units (GB → MB ×1000 for gpu_ram, gpu_total_ram, cpu_ram; prices stay USD/h). Returns None
    where vast has no equivalent field. The vast client decides which terms are safe to send:
    a server-side filter may only narrow, never drop an offer the local filter would keep."""
    spec = OFFER_FIELDS.get(field)
    if spec is None or spec.vast_name is None:
        return None

    def conv(v: Any) -> Any:
        if spec.vast_factor is not None and isinstance(v, (int, float)) and not isinstance(v, bool):
            return float(v) * spec.vast_factor
        if isinstance(v, Decimal):
            return float(v)
        return v

    converted = tuple(conv(v) for v in value) if isinstance(value, tuple) else conv(value)
    return spec.vast_name, op, list(converted) if isinstance(converted, tuple) else converted


# --------------------------------------------------------------------------- parsing

_WS = re.compile(r"\s+")
_CHUNK = re.compile(r"\S+")
_WORD = re.compile(r"[^\s=<>!\[\]\"]+")
_OPSYM = re.compile(r"[=<>!]+")
_WORDOP = re.compile(r"(not\s+eq|not\s+in|notin|noteq|neq|nin|gte|gt|lte|lt|eq|in)(?=\s|$)",
                     re.IGNORECASE)
_NUMBER = r"(?a:\d+(?:\.\d*)?|\.\d+)"   # (?a:) ASCII digits only: \d also takes "٤" and "４"
_NUM_RE = re.compile(rf"[+-]?{_NUMBER}(?:[eE][+-]?[0-9]{{1,4}})?")
_INT_RE = re.compile(r"[+-]?[0-9]{1,18}")
_PRICE_RE = re.compile(
    rf"(?:(?P<op1><=|>=|<|>)\$(?P<n1>{_NUMBER})|\$(?P<op2><=|>=|<|>)(?P<n2>{_NUMBER}))"
    r"(?:/h|/hr|/hour)?", re.IGNORECASE)
_COUNT_RE = re.compile(r"x([0-9]{1,3})|([0-9]{1,3})x", re.IGNORECASE)
_GB_RE = re.compile(rf"({_NUMBER})gb", re.IGNORECASE)
_MODEL_COUNT_RE = re.compile(r"(\d{1,3})x([a-z0-9_-]+)|([a-z0-9_-]+?)x(\d{1,3})", re.IGNORECASE)

_SYM_OPS = {"=": "eq", "==": "eq", "!=": "neq", ">": "gt", ">=": "gte", "<": "lt", "<=": "lte"}
_WORD_OPS = {"eq": "eq", "neq": "neq", "noteq": "neq", "not eq": "neq", "gt": "gt", "gte": "gte",
             "lt": "lt", "lte": "lte", "in": "in", "notin": "notin", "not in": "notin",
             "nin": "notin"}
_WILDCARDS = {"any", "?", "*"}
_TRUE = {"true", "yes", "1", "on"}
_FALSE = {"false", "no", "0", "off"}


def _did_you_mean(word: str, candidates: Iterable[str]) -> str:
    if not suggestible(word):       # difflib on a long word: slow, and nothing is close anyway
        return ""
    close = difflib.get_close_matches(word.lower(), list(candidates), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def _model_word(word: str) -> str | None:
    """The normalised model token if `word` names a known GPU model (4090, A100, rtx_4090)."""
    w = word.lower()
    core = re.sub(r"[_-]", "", w)
    for prefix in _MODEL_PREFIXES:
        if core.startswith(prefix) and len(core) > len(prefix):
            core = core[len(prefix):]
            break
    if core in GPU_MODELS:
        return w.replace("_", " ").replace("-", " ").strip()
    return None


def _gpu_count(text: str, token: str, position: int) -> int:
    n = int(text)
    if not 1 <= n <= MAX_GPUS:
        raise QueryError(f"GPU count must be 1..{MAX_GPUS}, got '{clip(token)}'", token=token,
                         position=position)
    return n


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.n = len(text)
        self.filters: list[Filter] = []
        self.order: tuple[SortKey, ...] | None = None
        self.limit: int | None = None
        self.providers: frozenset[str] | None = None
        self.dropped: set[str] = set()
        self.model_filter: Filter | None = None   # the bare-model filter, extended by more words

    # -- helpers ------------------------------------------------------------------------

    def error(self, message: str, token: str, position: int, hint: str | None = None) -> QueryError:
        return QueryError(message, token=token, position=position, hint=hint)

    def skip_ws(self, pos: int) -> int:
        m = _WS.match(self.text, pos)
        return m.end() if m else pos

    def chunk(self, pos: int) -> str:
        m = _CHUNK.match(self.text, pos)
        return m.group() if m else ""

    def scan_value(self, pos: int, clause_start: int) -> tuple[str, int]:
        """A value at `pos`: a run of non-spaces where brackets and double quotes may hold
        spaces. Returns (raw, end)."""
        text, i, depth, quoted = self.text, pos, 0, False
        while i < self.n:
            c = text[i]
            if quoted:
                if c == '"':
                    quoted = False
            elif c == '"':
                quoted = True
            elif c == "[":
                depth += 1
            elif c == "]":
                if depth == 0:
                    tok = text[clause_start:i + 1]
                    raise self.error(f"Unbalanced bracket in '{clip(tok)}'", tok, i)
                depth -= 1
            elif depth == 0 and c.isspace():
                break
            i += 1
        if quoted or depth:
            tok = text[clause_start:i]
            what = "quote" if quoted else "bracket"
            raise self.error(f"Unbalanced {what} in '{clip(tok)}'", tok, clause_start)
        return text[pos:i], i

    # -- main loop ----------------------------------------------------------------------

    def parse(self) -> OfferQuery:
        if self.n > MAX_QUERY_LENGTH:
            raise self.error(too_long(self.text, MAX_QUERY_LENGTH, "search query"), self.text[:40], 0)
        pos = self.skip_ws(0)
        while pos < self.n:
            pos = self.skip_ws(self.clause(pos))
        return self.finish()

    def clause(self, start: int) -> int:
        text = self.text
        chunk = self.chunk(start)
        if (m := _PRICE_RE.fullmatch(chunk)) is not None:
            op = _SYM_OPS[m.group("op1") or m.group("op2")]
            number = m.group("n1") or m.group("n2")
            self.filters.append(Filter(field="dph", op=op, value=Decimal(number)))
            return start + len(chunk)

        m = _WORD.match(text, start)
        if m is None:
            c = text[start]
            if c in "=<>!":
                raise self.error(f"Field missing before '{clip(chunk)}'", chunk, start,
                                 hint="write field<op>value, e.g. dph<0.5, or <$0.5 for a price")
            if c in '"[':
                raw, _ = self.scan_value(start, start)
                raise self.error(f"Value without a field: '{clip(raw)}'", raw, start)
            raise self.error(f"Unbalanced bracket in '{clip(chunk)}'", chunk, start)
        word, after = m.group(), m.end()
        lw = word.lower()

        if lw.startswith("-"):
            return self.option(word, start, after)
        if lw in _FILTER_KEYS or lw in ("limit", "order", "sort"):
            return self.field_clause(lw, word, start, after)
        next_char = text[after] if after < self.n else " "
        glued_price = not next_char.isspace() and _PRICE_RE.fullmatch(self.chunk(after))
        if next_char.isspace() or glued_price:          # `4090 <$0.5`, `4090<$0.5`
            end = self.shorthand(word, start, after)
            if end is not None:
                return end
        # Not a field, not a shorthand: an unknown field if an operator follows.
        j = self.skip_ws(after)
        if _OPSYM.match(text, j) or (j > after and _WORDOP.match(text, j)):
            clause = self.clause_text(start, after)
            raise self.error(f"Unknown field '{clip(word)}' in '{clip(clause)}'{_did_you_mean(word, _ALL_KEYS)}",
                             word, start)
        if not next_char.isspace():
            tok = self.chunk(start)
            raise self.error(f"Unexpected '{clip(tok)}'", tok, start)
        candidates = [*_ALL_KEYS, *GPU_MODELS]
        raise self.error(f"Unknown word '{clip(word)}'{_did_you_mean(word, candidates)}", word, start,
                         hint="The search help lists the fields and shorthands.")

    def clause_text(self, start: int, after: int) -> str:
        """Best-effort text of a `field op value` clause for messages."""
        j = self.skip_ws(after)
        m = _OPSYM.match(self.text, j) or (_WORDOP.match(self.text, j) if j > after else None)
        if m is None:
            return self.text[start:after]
        k = self.skip_ws(m.end())
        value = self.chunk(k) if k < self.n else ""
        end = k + len(value) if value else m.end()
        return self.text[start:end]

    # -- options ------------------------------------------------------------------------

    def option(self, word: str, start: int, after: int) -> int:
        lw = word.lower()
        if lw in ("-n", "--no-default", "--no-defaults"):
            self.dropped.update(DEFAULTS)
            self.dropped.update(MARKET_DEFAULTS)
            return after
        if lw in ("-o", "--order", "--limit"):
            j = after
            if j < self.n and self.text[j] == "=":
                j += 1
            j = self.skip_ws(j)
            if j >= self.n:
                raise self.error(f"Value missing after '{clip(word)}'", word, start)
            raw, end = self.scan_value(j, start)
            token = self.text[start:end]
            if lw == "--limit":
                self.set_limit(_strip_value(raw), token, start)
            else:
                self.set_order(_strip_value(raw), token, start)
            return end
        options = ["-o", "--order", "-n", "--no-default", "--limit"]
        raise self.error(f"Unknown option '{clip(word)}'{_did_you_mean(word, options)}", word, start)

    # -- shorthands -----------------------------------------------------------------------

    def shorthand(self, word: str, start: int, after: int) -> int | None:
        lw = word.lower()
        if (model := _model_word(word)) is not None:
            self.add_model(model)
            return after
        if (m := _COUNT_RE.fullmatch(lw)) is not None:
            n = _gpu_count(m.group(1) or m.group(2), word, start)
            self.filters.append(Filter(field="num_gpus", op="eq", value=n))
            return after
        if (m := _GB_RE.fullmatch(lw)) is not None:
            gb = float(m.group(1))
            self.filters.append(Filter(field="gpu_ram", op="gte", value=gb))
            return after
        if (m := _MODEL_COUNT_RE.fullmatch(lw)) is not None:
            count, name = (m.group(1), m.group(2)) if m.group(1) else (m.group(4), m.group(3))
            model = _model_word(name)
            if model is not None:
                self.add_model(model)
                n = _gpu_count(count, word, start)
                self.filters.append(Filter(field="num_gpus", op="eq", value=n))
                return after
        return None

    def add_model(self, model: str) -> None:
        """Bare model words: one filter, any of them (`4090 3090`)."""
        old = self.model_filter
        index = next((i for i, f in enumerate(self.filters) if f is old), None)
        if old is None or index is None:
            self.model_filter = Filter(field="gpu", op="eq", value=model)
            self.filters.append(self.model_filter)
            return
        models = old.value if isinstance(old.value, tuple) else (old.value,)
        if model not in models:
            models = (*models, model)
        self.model_filter = Filter(field="gpu", op="eq",
                                   value=models[0] if len(models) == 1 else models)
        self.filters[index] = self.model_filter

    def add_filter(self, f: Filter) -> None:
        self.filters.append(f)

    # -- field op value -------------------------------------------------------------------

    def field_clause(self, key: str, word: str, start: int, after: int) -> int:
        text = self.text
        j = self.skip_ws(after)
        op_match = _OPSYM.match(text, j)
        if op_match is not None and j > after and key in OFFER_FIELDS \
                and OFFER_FIELDS[key].type is bool and _PRICE_RE.fullmatch(self.chunk(j)):
            op_match = None          # `interruptible <$0.5`: bare flag, then a price
        word_op = None
        if op_match is None and j > after:
            word_op = _WORDOP.match(text, j)
        if op_match is None and word_op is None:
            flag = _FILTER_KEYS.get(key, "")
            if (flag in OFFER_FIELDS or flag in MARKET_FIELDS) and _field_type(flag) is bool and \
                    (after >= self.n or text[after].isspace()):
                self.add_filter(Filter(field=flag, op="eq", value=True))
                return after
            tok = text[start:after]
            raise self.error(f"Operator missing after '{clip(word)}'", tok, start,
                             hint=f"write e.g. {word}=value")
        if op_match is not None:
            op_text = op_match.group()
            op = _SYM_OPS.get(op_text)
            if op is None:
                clause = self.clause_text(start, after)
                raise self.error(f"Unknown operator '{clip(op_text)}' in '{clip(clause)}'", op_text, j,
                                 hint="operators: = == != > >= < <= in notin")
            op_end = op_match.end()
        else:
            assert word_op is not None  # neither operator form: answered above
            op_text = word_op.group()
            op = _WORD_OPS[" ".join(op_text.lower().split())]
            op_end = word_op.end()
        k = self.skip_ws(op_end)
        if k >= self.n:
            tok = text[start:op_end]
            raise self.error(f"Value missing after '{clip(tok.strip())}'", tok, start)
        raw, end = self.scan_value(k, start)
        clause = text[start:end]
        value = _strip_value(raw)
        if value == "":
            raise self.error(f"Value missing after '{clip(text[start:op_end].strip())}'", clause, start)

        if key == "limit":
            if op != "eq":
                raise self.error(f"limit only takes '=' (in '{clip(clause)}')", clause, start)
            if value.lower() in _WILDCARDS:
                self.limit = None
            else:
                self.set_limit(value, clause, start)
            return end
        if key in ("order", "sort"):
            if op != "eq":
                raise self.error(f"{key} only takes '=' (in '{clip(clause)}')", clause, start)
            self.set_order(value, clause, start)
            return end

        field = _FILTER_KEYS[key]
        if value.lower() in _WILDCARDS:
            if op != "eq":
                raise self.error(f"Wildcard '{clip(value)}' only works with '=' (in '{clip(clause)}')",
                                 clause, start)
            self.drop_field(field)
            return end

        if op in ("in", "notin"):
            items = _split_list(value)
            if not items:
                raise self.error(f"Value missing after '{clip(text[start:op_end].strip())}'",
                                 clause, start)
            converted = tuple(self.convert(field, item, clause, k) for item in items)
            if field == "provider":
                self.provider_clause(op, converted, clause, start)
            else:
                self.add_filter(Filter(field=field, op=op, value=converted))
            return end

        scalar = _unquote(value)
        if scalar == "":
            raise self.error(f"Value missing after '{clip(text[start:op_end].strip())}'", clause, start)
        if op in ("gt", "gte", "lt", "lte") and _field_type(field) in (bool, str) and field not in _ORDERED_TEXT:
            raise self.error(f"{field} cannot be compared with '{clip(op_text.strip())}' "
                             f"(in '{clip(clause)}'; use = != in notin)", clause, start)
        converted_value = self.convert(field, scalar, clause, k)
        if field == "provider":
            self.provider_clause(op, (converted_value,), clause, start)
        else:
            self.add_filter(Filter(field=field, op=op, value=converted_value))
        return end

    def drop_field(self, field: str) -> None:
        related = {field, "gpu_name", "gpu"} if field in ("gpu", "gpu_name") else {field}
        self.filters = [f for f in self.filters if f.field not in related]
        if field == "provider":
            self.providers = None
        if field in DEFAULTS or field in MARKET_DEFAULTS:
            self.dropped.add(field)

    def provider_clause(self, op: str, values: tuple[str, ...], clause: str, start: int) -> None:
        if op in ("eq", "in"):
            wanted = frozenset(v.lower() for v in values)
            if self.providers is not None:
                wanted = self.providers & wanted
                if not wanted:
                    raise self.error(f"'{clip(clause)}' leaves no provider to search", clause, start)
            self.providers = wanted
        else:
            self.add_filter(Filter(field="provider", op=op, value=values if op == "notin" else values[0]))

    def convert(self, field: str, value: str, clause: str, start: int) -> Any:
        """`value` as the field's type; `start` is where the value begins, for messages."""
        typ = _field_type(field)
        low = value.lower()
        if typ is bool:
            if low in _TRUE:
                return True
            if low in _FALSE:
                return False
            raise self.error(f"{field} expects true or false, got '{clip(value)}'", value, start)
        if typ is str:
            text = value.strip() if field in _NO_UNDERSCORE else value.replace("_", " ").strip()
            if not text:
                raise self.error(f"Value missing in '{clip(clause)}'", value, start)
            return text
        number = value
        if field in _PRICE_FIELDS:
            number = number.removeprefix("$").removesuffix("/h")
        if field in _GB_FIELDS and low.endswith("gb"):
            number = number[:-2]
        if typ is int:
            if not _INT_RE.fullmatch(number):
                raise self.error(f"{field} expects a whole number, got '{clip(value)}'", value, start)
            return int(number)
        if not _NUM_RE.fullmatch(number):
            kind = "a price in USD/hour" if typ is Decimal else "a number"
            raise self.error(f"{field} expects {kind}, got '{clip(value)}'", value, start)
        try:
            if typ is Decimal:
                result: Any = Decimal(number)
                ok = result.is_finite()
            else:
                result = float(number)
                ok = math.isfinite(result)
        except (ValueError, ArithmeticError):
            ok = False
        if not ok:
            raise self.error(f"{field} expects a finite number, got '{clip(value)}'", value, start)
        return result

    def set_limit(self, value: str, token: str, start: int) -> None:
        v = _unquote(value)
        if not _INT_RE.fullmatch(v) or not 1 <= int(v) <= MAX_LIMIT:
            raise self.error(f"limit must be a positive integer ≤ {MAX_LIMIT}, got '{clip(v)}'",
                             token, start)
        self.limit = int(v)

    def set_order(self, value: str, token: str, start: int) -> None:
        value = _unquote(value)
        if value.lower() in _WILDCARDS:
            self.order = None
            return
        keys: list[SortKey] = []
        for item in value.split(","):
            item = item.strip()
            if not item:
                continue
            lead = item[0] if item[0] in "+-" else ""
            trail = item[-1] if len(item) > 1 and item[-1] in "+-" else ""
            name = item[len(lead):len(item) - len(trail)].strip().lower()
            if lead and trail and lead != trail:
                raise self.error(f"Conflicting sort direction in '{clip(item)}'", item, start)
            resolved = _SORT_NAMES.get(name)
            if resolved is None:
                raise self.error(f"Unknown sort field '{clip(name or item)}' in '{clip(token)}'"
                                 f"{_did_you_mean(name, _SORT_NAMES)}", item, start)
            if any(k.field == resolved for k in keys):
                continue
            keys.append(SortKey(field=resolved, desc="-" in (lead, trail)))
        if not keys:
            raise self.error(f"Sort field missing in '{clip(token)}'", token, start)
        self.order = tuple(keys)

    def finish(self) -> OfferQuery:
        filters = list(self.filters)
        for field, value in DEFAULTS.items():
            if field not in self.dropped and not any(f.field == field for f in filters):
                filters.append(Filter(field=field, op="eq", value=value, default=True))
        query = OfferQuery(
            text=self.text,
            filters=tuple(filters),
            order=self.order if self.order is not None else DEFAULT_ORDER,
            limit=self.limit,
            providers=self.providers,
            dropped_defaults=frozenset(self.dropped),
        )
        query.predicates()   # compile once, now
        return query


def _field_type(field: str) -> type:
    return str if field == "gpu" else (OFFER_FIELDS.get(field) or MARKET_FIELDS[field]).type


def _strip_value(raw: str) -> str:
    """vast.ai: strip `,`, `[`, `]` from both ends (only a matching outer bracket pair here)."""
    v = raw.strip()
    if v.startswith("[") and v.endswith("]"):
        v = v[1:-1]
    return v.strip().strip(",").strip()


def _unquote(v: str) -> str:
    v = v.strip()
    if len(v) >= 2 and v[0] == '"' and v[-1] == '"':
        return v[1:-1]
    return v


def _split_list(value: str) -> list[str]:
    """Split on commas outside double quotes; trim, unquote, drop empties."""
    items, buf, quoted = [], [], False
    for c in value:
        if c == '"':
            quoted = not quoted
            buf.append(c)
        elif c == "," and not quoted:
            items.append("".join(buf))
            buf = []
        else:
            buf.append(c)
    items.append("".join(buf))
    out = []
    for item in items:
        item = _unquote(item.strip().strip("[]").strip())
        if item.strip():
            out.append(item)
    return out


def parse_query(text: str) -> OfferQuery:
    """Parse a search query (see the module docstring). Raises `QueryError` only."""
    if not isinstance(text, str):
        raise QueryError("A search query must be text", token=None, position=None)
    try:
        return _Parser(text).parse()
    except QueryError:
        raise
    except Exception as exc:   # a parser bug must still reach the user as a clear message
        raise QueryError(f"Could not understand the query '{clip(text)}'", token=text[:80],
                         position=0) from exc
