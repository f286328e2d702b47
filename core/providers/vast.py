"""vast.ai: a GPU marketplace, spoken to over its REST API the way the official `vastai` CLI 1.9.1
does it (facts: shared/reference/vast.md). HTTP, retries and error mapping are `ApiClient`'s; this
module builds vast's requests; vast_wire.py reads its answers (offers, instances, states).

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
  The rule (issue: vast's cap and order used to drop offers the official CLI finds): for every
  field the official `vastai search offers` would send for the same query, gpuherd sends the
  same constraint in the CLI's units, or a looser one documented here, so vast.ai narrows before
  its cap; and never one that drops an offer the local filter (`OfferQuery.matches`) keeps.
  tests/test_vast_parity.py checks both against the real vastai 1.9.1 package, field by field.
  * Same numbers on both sides: num_gpus (all operators), disk_space, inet_down/up, cuda
    (cuda_max_good) (bounds, neq, in, notin), reliability, storage_cost (bounds; != and lists on
    them stay local: reliability is clamped and storage_cost is a Decimal here), verified (`eq`),
    offer_id (`id`, all operators).
  * gpu_ram: our whole-GB rounding (`gpu_ram>=16` -> MB >= 15872, the smallest shown as 16 GB),
    never tighter than the CLI's GB x 1000 (`gpu_ram>=24` -> `gte 24000.0`, not 24064): lower
    bounds take the smaller, upper ones the larger (`lte`). `!=` stays local.
    cpu_ram: x1000 bracketed to whole MB.
    gpu_total_ram (MB, all GPUs; ours is whole GB per GPU x num_gpus): a lower bound v needs
    MB >= max(v - n/2, v/2) x 1024 with n the most GPUs the query allows; an upper bound is sent
    only when the query bounds num_gpus (v + n/2) x 1024; both never tighter than the CLI's.
  * cpu_cores is what you get (`cpu_cores_effective`, sent with the same bound); a lower bound
    also goes as vast's host `cpu_cores` (a host has at least the cores it gives). Upper bounds
    on host cores stay unsent: a 64-core host may give 8.
  * dph: on-demand only, widened (upper bounds x1.1 + $0.005, lower x0.95 - $0.005) because
    the server compares its own `dph_total`, whose disk part may differ from ours. Bid searches
    send no price: we price bids by `min_bid`, vast's `dph_total` is not that.
  * GPU model words and gpu_name -> `gpu_name` eq/in with the exact vast spellings they stand
    for (vast_names.py: `h100` -> H100 PCIE, H100 SXM, H100 NVL; `gpu_name=A100_80GB` -> A100
    PCIE, A100 SXM4, A100 SXM, A100X and the name as typed, which is what the CLI sends). A word
    no spelling in vast's list matches sends nothing. Negated filters (`!=`, notin) send only
    spellings always shown under that name. Several model words are one `in` list; repeated
    `in` terms keep their common part, repeated `notin` terms both lists.
    Locally `gpu_name` matches gpuherd's name or vast's own spelling (kept in `extra`).
  * location/country -> `geolocation` when every value is a two-letter code (vast compares the
    country code, CLI help), each code as typed and upper-cased; a place part (`Oregon`) stays
    local; for notin the codes among the values are sent.
  * The rest of the CLI's field table (query.MARKET_FIELDS: duration, datacenter, compute_cap,
    driver_version, direct_port_count, gpu_arch, ...) goes as the CLI sends it: duration days
    x 86400, a dotted driver_version as the CLI's integer (535.86.05 -> 535086005), booleans as
    JSON booleans, numbers as numbers (the CLI sends strings; vast coerces). Offers from other
    providers cannot show these, so the local filter keeps only vast's.
  * Not sent at all: dph_per_gpu, interruptible (it is `type`), provider.
  * `interruptible=true` asks for `"type": "bid"`; anything else is `"on-demand"`.
  * `external=false` and `rentable=true` as the CLI sends them, unless the query names the field
    (`external=true`, `rentable=any`) or `-n` drops the defaults, as the CLI's `-n` does;
    `verified` only as the query says (its default is `verified=true`; `verified=any` sends none).
  * `order` is the query's sort translated while fields map onto vast numbers (so the offers
    vast keeps under its cap are the ones the user wants first; the CLI's `-o` keys lead it);
    the default is cheapest first, not the CLI's `score-`. `limit` is always SEARCH_LIMIT, at
    least the CLI's `--limit`, because our order can never be reproduced exactly server-side
    (`dph` differs from `dph_total`), so the query's own limit is applied locally after
    filtering. `allocated_storage` is SEARCH_DISK_GB (the CLI's default is 5 GiB): prices are
    compared with a 50 GB disk.

Create
  `PUT /asks/{id}/` with the CLI's body. `args` (a vLLM template: the vllm/vllm-openai image's
  entrypoint is the server) -> `runtype "args"` with `args`, which keeps the image ENTRYPOINT.
  `command` (a shell line that replaces the entrypoint) -> `runtype "ssh"` with the command
  appended to `onstart`, which is what the CLI's `--entrypoint` does; neither -> `"ssh"`.
  Ports are `"-p P:P": "1"` env entries (the health port too). `cancel_unavail` is true for
  on-demand rentals so a host that cannot start the machine refuses (CapacityError, the service
  tries the next offer) instead of leaving a stopped instance that bills storage. Never
  retried (`idempotent=False`): after a timeout the service looks for the label.

States (actual_status / intended_status / cur_state -> ProviderState): see `vast_wire.vast_state`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import random
import re
from collections.abc import Awaitable, Callable, Iterable
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
from ..offers import SEARCH_DISK_GB, Offer
from ..query import DEFAULT_ORDER, MARKET_DEFAULTS, MARKET_FIELDS, FieldSpec, to_vast_filter
from .base import Capabilities, CreateRequest, Provider, ProviderInstance, ProviderState
from .http import ApiClient, NotFoundAtProvider, error_text
from .vast_names import names_for_model, names_for_name
from .vast_wire import (
    _ID,
    _MICRO,
    NAME,
    _build_offer,
    _dec,
    _endpoint,
    _gpu_name,
    _name_cache,
    _percent,
    _place_cache,
    _running_dph,
    _started,
    _storage_cache,
    _storage_dph,
    _text,
    gpu_ram_gb,
    normalise_offers,
    vast_state,
)

if TYPE_CHECKING:
    from ..config import Settings
    from ..query import Filter, OfferQuery

log = logging.getLogger(__name__)

DISPLAY = "vast.ai"
DEFAULT_URL = "https://console.vast.ai"
SEARCH_LIMIT = 1000          # offers asked for per search; the query's limit is applied locally
LIST_PAGE = 25               # v1 instances: default and maximum page size
MAX_PAGES = 400              # 10,000 instances: a pagination loop is a server bug, not an account


# --------------------------------------------------------------------------------- units


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


def _no_tighter_than_cli(terms: list[tuple[str, float]], cli: float) -> list[tuple[str, float]]:
    """Widen bounds so they also keep everything the CLI's `v x 1000` term keeps: a lower bound
    becomes `gte min(ours, cli)`, an upper one `lte max(ours, cli)`."""
    out: list[tuple[str, float]] = []
    for op, x in terms:
        if op in ("gt", "gte"):
            out.append(("gte", min(x, cli)))
        else:
            out.append(("lte", max(x, cli)))
    return out


def _mb_terms(op: str, v: float) -> list[tuple[str, float]]:
    """gpu_ram: our whole-GB rounding (see the module docstring), widened to the CLI's MB."""
    cli = v * 1000
    if op == "eq" and not float(v).is_integer():
        return [("eq", cli)]     # no card is shown with a fraction of a GB: only the CLI's term
    return _no_tighter_than_cli(_gpu_ram_terms(op, v), cli)


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


def _total_ram_terms(op: str, v: float, n_max: float) -> list[tuple[str, float]]:
    """gpu_total_ram (MB, all GPUs) for our `round(MB/1024) x num_gpus op v`.

    Shown T = r·n with r = round(x), x = MB/1024 per GPU, so x·n ∈ (T - n/2, T + n/2]. A lower
    bound T >= v > 0 needs r >= 1 (x >= 1/2), hence x·n >= max(v - n/2, n/2) >= max(v - n_max/2,
    v/2); an upper bound T <= v gives x·n < v + n_max/2, known only when the query bounds
    num_gpus (n_max finite)."""
    cli = v * 1000
    terms: list[tuple[str, float]] = []
    if op in ("gt", "gte", "eq") and v > 0:
        terms.append(("gte", math.floor(max(v - n_max / 2, v / 2) * 1024)))
    if op in ("lt", "lte", "eq") and math.isfinite(n_max):
        terms.append(("lte", math.ceil((v + n_max / 2) * 1024)))
    return _no_tighter_than_cli([(o, float(x)) for o, x in terms], cli)


def _gpu_cap(filters: Iterable[Filter]) -> float:
    """The most GPUs an offer the query keeps can have (infinity when num_gpus is not bounded)."""
    cap = math.inf
    for f in filters:
        if f.field != "num_gpus":
            continue
        if f.op in ("eq", "lte") and isinstance(f.value, int):
            cap = min(cap, f.value)
        elif f.op == "lt" and isinstance(f.value, int):
            cap = min(cap, f.value - 1)
        elif f.op == "in" and f.value:
            cap = min(cap, max(int(x) for x in f.value))
    return cap


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


def _driver_number(text: str) -> int | str:
    """A dotted driver version as the CLI sends it (535.86.05 -> 535086005); other text as is."""
    parts = text.split(".")
    if len(parts) == 3 and all(p.isdigit() for p in parts):
        return int("".join(p.zfill(3) for p in parts))
    return text


def _market_value(spec: FieldSpec, value: Any) -> Any:
    """A MARKET_FIELDS value in the CLI's unit (duration: days -> seconds)."""
    if isinstance(value, tuple):
        return [_market_value(spec, v) for v in value]
    if spec.name == "driver_version" and isinstance(value, str):
        return _driver_number(value)
    if spec.vast_factor is not None and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value) * spec.vast_factor
    return value


# Our field -> vast's, for numbers that are the same on both sides.
_EXACT_FIELDS = frozenset({"num_gpus", "disk_space", "inet_down", "inet_up", "cuda", "reliability",
                           "storage_cost"})
# neq/in/notin compare the very number vast sends (read with float()), so they are exact too;
# not reliability (clamped to 0..1, reliability2 when missing) nor storage_cost (a Decimal here).
_SET_OPS_OK = frozenset({"num_gpus", "disk_space", "inet_down", "inet_up", "cuda"})
_BOUNDS = frozenset({"gt", "gte", "lt", "lte", "eq"})
_NEGATED = frozenset({"neq", "notin"})
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


def _values(value: Any) -> tuple[Any, ...]:
    return value if isinstance(value, tuple) else (value,)


def _name_term(field: str, negated: bool, names: Iterable[str]) -> list[tuple[str, str, Any]]:
    """`eq`/`in` (or `neq`/`notin`) on a list of spellings; nothing for an empty list."""
    found = list(dict.fromkeys(names))
    if not found:
        return []
    if len(found) == 1:
        return [(field, "neq" if negated else "eq", found[0])]
    return [(field, "notin" if negated else "in", found)]


def _gpu_terms(f: Filter) -> list[tuple[str, str, Any]]:
    """gpu_name terms for a model word (`gpu`) or an exact name (`gpu_name`): the exact vast
    spellings it stands for (vast_names.py). A positive filter with a word no spelling matches
    sends nothing (the local filter alone decides); a negated one drops only spellings every
    offer of which we drop too."""
    negated = f.op in _NEGATED
    lookup = names_for_model if f.field == "gpu" else names_for_name
    lists = [lookup(str(v), every=negated) for v in _values(f.value)]
    if not negated and not all(lists):
        return []
    return _name_term("gpu_name", negated, [n for names in lists for n in names])


def _place_terms(f: Filter) -> list[tuple[str, str, Any]]:
    """geolocation terms for location/country: vast compares the two-letter country code (CLI
    help: "Two letter country code"), so only codes are sent; `in` only when every value is a
    code (`location=Oregon` matches a part of the place, which vast cannot do)."""
    negated = f.op in _NEGATED
    values = [str(v).strip() for v in _values(f.value)]
    codes = [v for v in values if len(v) == 2 and v.isalpha()]
    if not codes or (not negated and len(codes) < len(values)):
        return []
    return _name_term("geolocation", negated, [s for c in codes for s in (c, c.upper())])


def _terms_for(f: Filter, bid: bool, n_max: float) -> list[tuple[str, str, Any]]:
    """The vast terms (field, op, value) for one of our filters; [] when it stays local."""
    field, op, value = f.field, f.op, f.value
    if field in MARKET_FIELDS:
        spec = MARKET_FIELDS[field]
        return [(spec.vast_name or field, op, _market_value(spec, value))]
    if field in ("gpu", "gpu_name"):
        return _gpu_terms(f)
    if field in ("location", "country"):
        return _place_terms(f)
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
    if field == "cpu_cores" and value_ok and op in _BOUNDS:
        # ours is what you get (cpu_cores_effective); vast's cpu_cores is the host's, never less
        terms: list[tuple[str, str, Any]] = [("cpu_cores_effective", op, float(value))]
        if op in ("gt", "gte", "eq"):
            terms.append(("cpu_cores", "gt" if op == "gt" else "gte", float(value)))
        return terms
    if field == "gpu_ram" and value_ok and op in _BOUNDS:
        return [("gpu_ram", o, x) for o, x in _mb_terms(op, float(value))]
    if field == "gpu_total_ram" and value_ok and op in _BOUNDS:
        return [("gpu_total_ram", o, x) for o, x in _total_ram_terms(op, float(value), n_max)]
    if field == "cpu_ram" and value_ok and op in _BOUNDS:
        return [("cpu_ram", o, x) for o, x in _decimal_mb_terms(op, float(value))]
    if field == "dph" and value_ok and not bid and op in _BOUNDS:
        return [("dph_total", o, x) for o, x in _dph_terms(op, float(value))]
    if field == "verified" and isinstance(value, bool) and op in ("eq", "neq"):
        return [("verified", "eq", value if op == "eq" else not value)]
    if field == "offer_id":
        ids = [int(v) for v in _values(value) if isinstance(v, str) and _ID.fullmatch(v)]
        if op in ("eq", "in") and len(ids) == len(_values(value)) and ids:
            return [("id", "eq", ids[0])] if op == "eq" else [("id", "in", ids)]
        if op in _NEGATED and ids:
            return [("id", "neq", ids[0])] if op == "neq" else [("id", "notin", ids)]
    return []


def _merge(terms: dict[str, dict[str, Any]], field: str, op: str, value: Any) -> None:
    """Add a term; a repeated term keeps what both allow (the local filter ANDs them): the
    tighter bound, the common part of two `in` lists, both `notin` lists."""
    ops = terms.setdefault(field, {})
    if op not in ops:
        ops[op] = value
    elif op in ("gt", "gte"):
        ops[op] = max(ops[op], value)
    elif op in ("lt", "lte"):
        ops[op] = min(ops[op], value)
    elif op == "in" and isinstance(value, list) and isinstance(ops[op], list):
        ops[op] = [v for v in ops[op] if v in value]
    elif op == "notin" and isinstance(value, list) and isinstance(ops[op], list):
        ops[op] = list(dict.fromkeys([*ops[op], *value]))
    # eq/neq: the first one stays (a second can only narrow further locally)


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
    dropped = query.dropped_defaults if query is not None else frozenset()
    bid = _wants_bid(filters)
    n_max = _gpu_cap(filters)
    terms: dict[str, dict[str, Any]] = {}
    for f in filters:
        for field, op, value in _terms_for(f, bid, n_max):
            _merge(terms, field, op, value)
    body: dict[str, Any] = {}
    if "verified" in terms:
        body["verified"] = terms.pop("verified")
    for name, default in MARKET_DEFAULTS.items():      # external=false, rentable=true
        if name in terms:
            body[name] = terms.pop(name)
        elif name not in dropped:
            body[name] = {"eq": default}
    body.update(terms)
    body["order"] = _order(query)
    body["type"] = "bid" if bid else "on-demand"
    body["limit"] = limit
    body["allocated_storage"] = float(SEARCH_DISK_GB)
    return body


# --------------------------------------------------------------------------------- provider


def _api_root(base_url: str) -> str:
    """VAST_URL as the CLI takes it (https://console.vast.ai); a copied `.../api/v0` is fine too."""
    url = (base_url or DEFAULT_URL).strip().rstrip("/")
    return re.sub(r"/api/v\d+$", "", url)


def _reset_time(response: httpx.Response) -> str:
    raw = response.headers.get("X-RateLimit-Reset")
    try:
        when = datetime.fromtimestamp(float(raw), UTC)  # no header: float(None) raises TypeError
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
    """A balance, which may be negative (credit owed)."""
    found = _dec(value, -1e12, 1e12)
    return found.quantize(_MICRO) if found is not None else None


# the private names are re-exported from vast_wire for bench/bench_vast_normalise.py (it clears the caches)
__all__ = ["DEFAULT_URL", "DISPLAY", "NAME", "SEARCH_LIMIT", "VastProvider", "_build_offer", "_name_cache",
           "_place_cache", "_storage_cache", "build_search_body", "gpu_ram_gb", "normalise_offers", "vast_state"]
