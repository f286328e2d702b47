"""The built-in simulated GPU marketplace.

`SandboxProvider` behaves like a small public GPU cloud: a few hundred offers with plausible
prices, machines that take time to provision, pull an image and load a model, stop and start
again, and (on request) fail the way real clouds fail. It never touches a network and never
charges anything; it is the default provider when no real credentials are configured so the whole
product runs on a fresh machine.

Design:
- Offers are generated once per seed with a private `random.Random`; prices drift a little per
  six-hour window, deterministically (seed, offer, window), so the same seed at the same virtual
  time always yields the same catalogue.
- States are computed lazily from the clock: a record stores its last action ("create", "stop",
  "start") with the time it happened and how long each phase takes; nothing runs in the
  background and nothing sleeps (unless `latency_s` asks every call to, as a slow API would).
- Faults: per-call probabilities from a `faults` string and one-shot `inject()`ed faults. They are
  drawn on the event loop when a call begins, in call order, so a seed replays the same faults.

Storage: machines live in memory (no path) or, given `state_path` (e.g. ~/.gpuherd/sandbox.json),
in the directory next to it named `<state_path>.d/`:

    meta.json              {"version": 2, "next_id": N}: the id counter (ids are never reused)
    lock                   flock'ed (exclusive) around every change, across processes
    machines/<id>.json     one small JSON record per machine

Why one file per machine rather than one state file or a journal: the old single file was read and
rewritten (and fsynced) whole on every stop, so a change cost O(machines), and a guard pass stopping
100 of 10,000 machines spent seconds rewriting megabytes. With a file per machine a change reads
and atomically replaces (temp file + os.replace) one record of a few hundred bytes, whatever the
account holds; `get()` reads one file; another process sees a change as soon as the rename lands,
with no replay of a journal's tail and no compaction to coordinate between processes. Changes are
read-modify-write under the directory lock, so two processes stopping the same machine serialise:
one stops it, the other is told it is already stopping. Reads take no lock: a rename is atomic, so
a reader sees the old record or the new, never half of one. `list()` reads every record (it is the
listing) but keeps what it parsed, keyed by each file's (inode, mtime, size), and skips even the
directory scan while the directory's mtime is unchanged. Nothing changed within RACY_S of a scan is
trusted, as coarse file timestamps could hide a second change in the same tick (and a file edited
in place by hand, rather than replaced, goes unseen until the directory next changes). Files are
not fsynced: this is a simulation, a process crash cannot tear a record (the rename is atomic),
and losing the last simulated changes to a power cut harms nobody, while an fsync per call costs
milliseconds on a real disk.

A file in the old single-file format (version 1) at `state_path` is migrated on first use, under
both the old and the new lock: its records are written out one per file, the counter carried over,
and the old file renamed to `<state_path>.migrated`.

Damage: a state file, machine file or directory that cannot be read or holds a record the
sandbox cannot use is a ProviderError naming the file (or the state directory), raised before
anything changes, never an OSError/KeyError from deep inside: a boot then closes its intent
as failed instead of leaving it pending. A bad `faults` string is a `SandboxFaultsError`, a
ConfigError (the CLI prints one line and exits 2) that is also the ValueError it always was.

The event loop never does file I/O or waits on a lock: every async method draws its fault, awaits
its simulated latency, then runs its storage work (and, for list(), the views of every record) on
one worker thread the provider owns. One worker, first in first out, keeps concurrent calls of one
provider in call order, so ids and outcomes stay as deterministic as when everything ran inline;
each call is a few hundred microseconds of work, so one worker keeps up. A caller that gives up
waiting (a timeout around the call) does not undo a change already queued, as with a real API
whose response is lost. The synchronous test hooks (`set_gpu_util`, `fail`, `_state`) do their
small I/O in the calling thread.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import json
import logging
import math
import os
import random
import re
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar

try:  # POSIX; elsewhere an in-process lock per state directory is all there is
    import fcntl
    HAS_FLOCK = True
except ImportError:  # pragma: no cover - Windows
    HAS_FLOCK = False

from ..clock import Clock, as_utc, epoch
from ..config import CONFIG_FILE, ENV_PREFIX
from ..errors import (
    CapacityError,
    ConfigError,
    ProviderError,
    ProviderStateError,
    ProviderTimeout,
    ProviderUnavailable,
    RateLimited,
)
from ..offers import Offer, quote
from ..query import OfferQuery
from .base import Capabilities, CreateRequest, Provider, ProviderInstance, ProviderState

log = logging.getLogger(__name__)

SIMULATED_NOTE = "Simulated: sandbox provider — no real machines, no real charges."

NAME = "sandbox"
STATE_VERSION = 2        # 1: one JSON file holding every machine; 2: a directory, a file per machine
RACY_S = 2.0             # list() trusts no file (or directory) changed this recently before a scan
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,99}")  # what may name a machine file

Record = dict[str, Any]  # one machine as stored
_T = TypeVar("_T")

# Nominal phase durations in seconds, before per-instance variation and `time_scale`.
PROVISIONING_S = 10.0
LOADING_S = 40.0
MODEL_LOAD_S = 5.0
STOPPING_S = 5.0
STARTING_S = 15.0
# Each instance's durations vary by up to this fraction either way, seeded by its id.
DURATION_JITTER = 0.3

PRICE_WINDOW_S = 6 * 3600  # prices drift once per window

FAULT_KINDS = ("capacity", "timeout", "rate_limit", "unavailable", "timeout_after")
METHODS = ("search", "create", "get", "list", "start", "stop", "destroy")
# Without an explicit `on`, capacity faults only hit calls that claim GPUs.
_CAPACITY_METHODS = ("create", "start")


@dataclass(frozen=True)
class _Model:
    gpu_name: str
    gpu_ram: float
    price: tuple[float, float]       # USD/h per GPU
    count: int                       # offers of this model in a catalogue (before jitter)
    form_factor: str
    cpu_per_gpu: tuple[int, ...]
    ram_per_gpu: tuple[int, ...]     # GB of host RAM per GPU
    cuda: tuple[float, ...]
    datacenter: bool


_MODELS: tuple[_Model, ...] = (
    _Model("RTX 3090", 24, (0.15, 0.35), 50, "PCIe", (4, 6, 8, 12), (16, 32, 64), (12.2, 12.4, 12.6, 12.8), False),
    _Model("RTX 4090", 24, (0.28, 0.70), 65, "PCIe", (6, 8, 12, 16), (32, 48, 64), (12.4, 12.6, 12.8), False),
    _Model("RTX A6000", 48, (0.40, 0.80), 35, "PCIe", (8, 12, 16), (48, 64, 96), (12.2, 12.4, 12.6), True),
    _Model("L40S", 48, (0.70, 1.20), 30, "PCIe", (8, 12, 16), (64, 96, 128), (12.4, 12.6, 12.8), True),
    _Model("A100 40GB", 40, (0.70, 1.30), 25, "PCIe", (8, 12, 16), (64, 85, 128), (12.2, 12.4, 12.6), True),
    _Model("A100 80GB", 80, (1.00, 1.90), 35, "SXM4", (12, 16, 24, 30), (117, 128, 240), (12.2, 12.4, 12.6, 12.8), True),
    _Model("H100 SXM", 80, (2.20, 3.20), 25, "SXM5", (16, 24, 26, 32), (180, 225, 256), (12.4, 12.6, 12.8), True),
    _Model("H100 PCIE", 80, (1.80, 2.60), 18, "PCIe", (12, 16, 24), (128, 180, 188), (12.4, 12.6, 12.8), True),
    _Model("H200", 141, (2.80, 4.50), 17, "SXM5", (16, 24, 32), (225, 256, 320), (12.6, 12.8), True),
)

_LOCATIONS: tuple[tuple[str, str], ...] = (
    ("Oregon, US", "US"), ("Texas, US", "US"), ("Virginia, US", "US"), ("California, US", "US"),
    ("Illinois, US", "US"), ("Quebec, CA", "CA"), ("Ontario, CA", "CA"), ("Frankfurt, DE", "DE"),
    ("Helsinki, FI", "FI"), ("Amsterdam, NL", "NL"), ("Stockholm, SE", "SE"), ("London, GB", "GB"),
    ("Paris, FR", "FR"), ("Warsaw, PL", "PL"), ("Oslo, NO", "NO"), ("Tokyo, JP", "JP"),
    ("Seoul, KR", "KR"), ("Singapore, SG", "SG"), ("Sydney, AU", "AU"), ("Sao Paulo, BR", "BR"),
)

_NUM_GPUS = (1, 1, 1, 2, 4, 8)
_MILLI = Decimal("0.001")


class SandboxFaultsError(ConfigError, ValueError):
    """A `faults` string the sandbox cannot use. A ConfigError, so the CLI and servers print its
    one-line message naming the setting; a ValueError, for code that builds a sandbox by hand."""


FAULTS_SETTING = f"{ENV_PREFIX}SANDBOX_FAULTS (or `sandbox_faults` in {CONFIG_FILE})"


def parse_faults(spec: str) -> dict[str, float]:
    """'capacity=0.2, timeout=0.1' -> {'capacity': 0.2, 'timeout': 0.1}.

    Raises SandboxFaultsError (a ValueError) naming the setting and the unknown fault kinds, bad
    numbers, or probabilities outside 0..1 or summing to more than 1."""
    try:
        return _parse_faults(spec)
    except ValueError as exc:
        raise SandboxFaultsError(f"{FAULTS_SETTING}: {exc}.") from None


def _parse_faults(spec: str) -> dict[str, float]:
    rates: dict[str, float] = {}
    unknown: list[str] = []
    for part in (spec or "").split(","):
        part = part.strip()
        if not part:
            continue
        name, sep, value = part.partition("=")
        name = name.strip().lower().replace("-", "_")
        if not sep:
            raise ValueError(f"sandbox fault '{part[:40]}' needs a probability, e.g. {name[:40]}=0.1")
        if name not in FAULT_KINDS:
            unknown.append(name)
            continue
        try:
            rate = float(value)
        except ValueError:
            raise ValueError(f"sandbox fault {name}: '{value.strip()[:40]}' is not a number") from None
        if not (math.isfinite(rate) and 0.0 <= rate <= 1.0):
            raise ValueError(f"sandbox fault {name}: probability {rate} is outside 0..1")
        rates[name] = rate
    if unknown:
        raise ValueError(
            f"unknown sandbox fault(s): {', '.join(unknown)} (known: {', '.join(FAULT_KINDS)})")
    if sum(rates.values()) > 1.0 + 1e-9:
        raise ValueError("sandbox fault probabilities add up to more than 1")
    return rates


@dataclass(frozen=True)
class _BaseOffer:
    """An offer as generated; the price drifts from `per_gpu` at search time."""

    index: int
    offer: Offer
    per_gpu: float


@dataclass
class _Injected:
    kind: str
    remaining: int
    on: str | None


class SandboxProvider(Provider):
    name = NAME
    display_name = "Sandbox (simulated)"
    capabilities = Capabilities(
        can_search=True,
        can_create=True,
        can_stop=True,
        can_start=True,
        reports_gpu_utilisation=True,
        storage_bills_while_stopped=True,
        reports_actual_billing=False,
        simulated=True,
    )

    def __init__(
        self,
        state_path: Path | None = None,
        *,
        seed: int = 42,
        time_scale: float = 1.0,
        clock: Clock | None = None,
        faults: str = "",
        price_drift: float = 0.02,
        latency_s: float = 0.0,
    ) -> None:
        """`state_path`: where machines persist (see the module docstring; None: in memory).
        `latency_s`: seconds every API call (search, create, get, list, start, stop, destroy)
        awaits before it answers, as a slow cloud API would; 0 answers at once."""
        if time_scale < 0:
            raise ValueError("sandbox time_scale must be >= 0")
        if not 0 <= price_drift < 0.5:
            raise ValueError("sandbox price_drift must be in 0..0.5")
        if not (math.isfinite(latency_s) and latency_s >= 0):
            raise ValueError("sandbox latency_s must be a finite number of seconds >= 0")
        self.state_path = Path(state_path) if state_path is not None else None
        self.seed = seed
        self.time_scale = float(time_scale)
        self.clock = clock or Clock()
        self.price_drift = price_drift
        self.latency_s = float(latency_s)
        self.fault_rates = parse_faults(faults)
        self._fault_rng = random.Random(f"sandbox-faults:{seed}")
        self._injected: list[_Injected] = []
        self._memory: dict[str, Any] = _empty_state()
        self._store: _Store = (_MemoryStore(self._memory) if self.state_path is None
                               else _DirectoryStore(self.state_path))
        self._executor: ThreadPoolExecutor | None = None
        self._catalogue = self._generate(seed)
        self._by_id = {b.offer.offer_id: b for b in self._catalogue}

    # ------------------------------------------------------------------ offers

    @staticmethod
    def _generate(seed: int) -> list[_BaseOffer]:
        rng = random.Random(seed)
        plan: list[_Model] = []
        for model in _MODELS:
            plan.extend([model] * max(3, model.count + rng.randint(-4, 4)))
        rng.shuffle(plan)
        result: list[_BaseOffer] = []
        for index, model in enumerate(plan, start=1):
            num_gpus = rng.choice(_NUM_GPUS)
            per_gpu = round(rng.uniform(*model.price), 3)
            verified = rng.random() >= 0.10
            location, country = rng.choice(_LOCATIONS)
            cpu_cores = min(256, rng.choice(model.cpu_per_gpu) * num_gpus)
            cpu_ram = float(min(2048, rng.choice(model.ram_per_gpu) * num_gpus))
            disk_choices = (200, 500, 1000, 2000, 4000) if model.datacenter else (50, 100, 200, 500, 1000)
            disk_space = float(rng.choice(disk_choices))
            inet_down = float(rng.choice((200, 500, 1000, 2500, 5000, 10000)) * rng.uniform(0.6, 1.0))
            inet_up = inet_down * rng.uniform(0.3, 1.0)
            reliability = round(rng.uniform(0.90, 0.999), 4)
            storage_cost = Decimal(str(round(rng.uniform(0.10, 0.30), 3)))
            cuda = rng.choice(model.cuda)
            host_id = rng.randint(1000, 99999)
            offer = Offer(
                provider=NAME,
                offer_id=f"sb-{index:04d}",
                gpu_name=model.gpu_name,
                num_gpus=num_gpus,
                gpu_ram=model.gpu_ram,
                cpu_cores=cpu_cores,
                cpu_ram=cpu_ram,
                disk_space=disk_space,
                dph=_dph(per_gpu, num_gpus, storage_cost),
                storage_cost=storage_cost,
                reliability=reliability,
                location=location,
                country=country,
                inet_down=round(inet_down, 1),
                inet_up=round(inet_up, 1),
                cuda=cuda,
                verified=verified,
                interruptible=False,
                simulated=True,
                extra={"form_factor": model.form_factor, "host_id": str(host_id)},
            )
            result.append(_BaseOffer(index=index, offer=offer, per_gpu=per_gpu))
        return result

    def _offers_at(self, now: datetime) -> list[Offer]:
        window = epoch(now) // PRICE_WINDOW_S
        offers = []
        for base in self._catalogue:
            offers.append(self._priced(base, window, now))
        return offers

    def _priced(self, base: _BaseOffer, window: int, now: datetime) -> Offer:
        update: dict[str, Any] = {"fetched_at": now}
        if self.price_drift:
            factor = random.Random(f"sandbox-drift:{self.seed}:{base.index}:{window}").uniform(
                -self.price_drift, self.price_drift)
            update["dph"] = _dph(base.per_gpu * (1 + factor), base.offer.num_gpus, base.offer.storage_cost)
        return base.offer.model_copy(update=update)

    def _offer(self, offer_id: str, now: datetime) -> Offer | None:
        base = self._by_id.get(offer_id)
        if base is None:
            return None
        return self._priced(base, epoch(now) // PRICE_WINDOW_S, now)

    async def search(self, query: OfferQuery | None = None) -> list[Offer]:
        fault = await self._begin("search")
        offers = self._offers_at(self.clock.now())
        self._raise_after(fault)
        return offers

    # ------------------------------------------------------------------ faults

    def inject(self, kind: str, count: int = 1, on: str | None = None) -> None:
        """Make the next `count` calls (only calls of method `on` when given) fail with `kind`.

        Kinds: capacity -> CapacityError, timeout -> ProviderTimeout, rate_limit -> RateLimited,
        unavailable -> ProviderUnavailable, timeout_after -> the call takes effect and then
        raises ProviderTimeout (a lost response). Without `on`, capacity faults wait for the next
        create or start call; the others hit the next call of any method."""
        kind = kind.strip().lower().replace("-", "_")
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown sandbox fault {kind!r} (known: {', '.join(FAULT_KINDS)})")
        if on is not None and on not in METHODS:
            raise ValueError(f"unknown sandbox method {on!r} (known: {', '.join(METHODS)})")
        if count < 1:
            raise ValueError("inject count must be at least 1")
        self._injected.append(_Injected(kind, count, on))

    def clear_faults(self) -> None:
        """Drop pending injected faults and per-call probabilities."""
        self._injected.clear()
        self.fault_rates = {}

    async def _begin(self, method: str) -> str | None:
        """Start an API call: draw its fault (now, in call order, so a seed replays the same
        faults however long the latency), await the simulated latency, then raise an immediate
        fault. Returns "timeout_after" when the call must take effect and then raise."""
        kind, error = self._draw_fault(method)
        if self.latency_s:
            await asyncio.sleep(self.latency_s)
        if error is not None:
            raise error
        return kind

    def _draw_fault(self, method: str) -> tuple[str | None, ProviderError | None]:
        """The fault this call suffers, if any, with the error to raise at once (None for
        `timeout_after`, which the caller raises once the call has taken effect)."""
        kind: str | None = None
        for pending in self._injected:
            if pending.on is not None:
                applies = pending.on == method
            elif pending.kind == "capacity":
                applies = method in _CAPACITY_METHODS
            else:
                applies = True
            if applies:
                kind = pending.kind
                pending.remaining -= 1
                if pending.remaining <= 0:
                    self._injected.remove(pending)
                break
        if kind is None and self.fault_rates:
            draw = self._fault_rng.random()
            cumulative = 0.0
            for name in FAULT_KINDS:
                rate = self.fault_rates.get(name, 0.0)
                if not rate:
                    continue
                cumulative += rate
                if draw < cumulative:
                    if name != "capacity" or method in _CAPACITY_METHODS:
                        kind = name
                    break
        if kind is None or kind == "timeout_after":
            return kind, None
        return kind, self._fault_error(kind, method)

    def _fault_error(self, kind: str, method: str) -> ProviderError:
        if kind == "capacity":
            return CapacityError(NAME, f"no capacity left for {method} (simulated)")
        if kind == "timeout" or kind == "timeout_after":
            return ProviderTimeout(NAME, f"{method} timed out (simulated)")
        if kind == "rate_limit":
            retry_after = round(self._fault_rng.uniform(1.0, 5.0), 1)
            return RateLimited(NAME, f"too many requests; retry in {retry_after:g}s (simulated)",
                               retry_after=retry_after)
        return ProviderUnavailable(NAME, f"service unavailable (503) during {method} (simulated)")

    def _raise_after(self, fault: str | None, method: str = "call") -> None:
        if fault == "timeout_after":
            raise self._fault_error(fault, method)

    # ------------------------------------------------------------------ storage

    async def _io(self, work: Callable[[], _T]) -> _T:
        """Run `work` (storage I/O, locks, views) on the provider's worker thread. A file that
        cannot be read or a record missing what the sandbox needs is a ProviderError naming
        where (see "Damage" in the module docstring)."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gpuherd-sandbox")
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, work)
        except TimeoutError:
            raise
        except OSError as exc:
            where = exc.filename or self._where()
            log.warning("sandbox state %s unusable", where, exc_info=True)
            raise ProviderError(NAME, f"cannot use the sandbox state {where} ({exc.strerror or exc})",
                                hint="check its permissions, or delete it to start the sandbox afresh") from None
        except (KeyError, TypeError, ValueError) as exc:
            log.warning("sandbox state %s damaged", self._where(), exc_info=True)
            raise ProviderError(NAME, f"the sandbox state in {self._where()} holds a damaged machine record "
                                      f"({type(exc).__name__}: {str(exc)[:120]})",
                                hint="delete the damaged machine file, or the directory to start afresh") from None

    def _where(self) -> str:
        """The state directory, for messages."""
        return str(self._store.root) if isinstance(self._store, _DirectoryStore) else "in memory"

    # a simulated account credit (USD) for trying the low-balance warning; None: no balance, as most clouds
    balance_usd: Decimal | None = None

    async def balance(self) -> Decimal | None:
        return self.balance_usd

    async def aclose(self) -> None:
        """Let the worker thread go once the work already queued is done."""
        executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=False)

    @contextlib.contextmanager
    def _state(self, write: bool) -> Iterator[dict[str, Any]]:
        """Test and bench hook, synchronous: every machine as one dict in the version-1 shape
        ({"next_id": N, "instances": {id: record}}); with `write`, the records added, changed or
        removed in it (and next_id) are stored when the block ends without an exception. The
        directory lock is held throughout, so keep the block short."""
        with self._store.snapshot(write) as state:
            yield state

    # ------------------------------------------------------------------ timings

    def _durations(self, provider_id: str, action: str, salt: str = "") -> dict[str, float]:
        """Seconds for each phase of `action`, varied per instance (and per `salt`, the time of a
        stop or start) and scaled by time_scale."""
        rng = random.Random(f"sandbox-timing:{self.seed}:{provider_id}:{action}:{salt}")

        def vary(nominal: float) -> float:
            return round(nominal * rng.uniform(1 - DURATION_JITTER, 1 + DURATION_JITTER)
                         * self.time_scale, 3)

        if action == "create":
            return {"provisioning": vary(PROVISIONING_S), "loading": vary(LOADING_S),
                    "model": vary(MODEL_LOAD_S)}
        if action == "start":
            return {"starting": vary(STARTING_S), "model": vary(MODEL_LOAD_S)}
        return {"stopping": vary(STOPPING_S)}

    def _view(self, record: dict[str, Any], now: datetime) -> ProviderInstance:
        """The instance as the provider reports it at `now`."""
        action = record["action"]
        since = _parse_time(record["action_at"])
        elapsed = (now - since).total_seconds()
        d = record["durations"]
        state: ProviderState
        running_since: float | None = None   # seconds after `since` when RUNNING began
        ready_after: float | None = None     # seconds after `since` when the model answers
        if action == "error":
            state = ProviderState.ERROR
            message = record.get("error") or "the machine failed"
        elif action == "create":
            p, l = d["provisioning"], d["loading"]
            if elapsed < p:
                state = ProviderState.PROVISIONING
                message = f"allocating {record['num_gpus']}x {record['gpu_name']} in {record['location']}"
            elif elapsed < p + l:
                state = ProviderState.LOADING
                pct = int(100 * (elapsed - p) / l) if l else 100
                message = f"pulling image {record['image']} ({pct}%)"
            else:
                state = ProviderState.RUNNING
                running_since, ready_after = p + l, p + l + d["model"]
                message = "running"
        elif action == "start":
            if elapsed < d["starting"]:
                state = ProviderState.STARTING
                message = "starting from stopped; disk kept"
            else:
                state = ProviderState.RUNNING
                running_since, ready_after = d["starting"], d["starting"] + d["model"]
                message = "running"
        else:  # stop
            if elapsed < d["stopping"]:
                state = ProviderState.STOPPING
                message = "stopping"
            else:
                state = ProviderState.STOPPED
                message = "stopped; disk kept, storage still billed"

        healthy = False
        gpu_util: float | None = None
        endpoint: str | None = None
        started_at: datetime | None = None
        if state is ProviderState.RUNNING:
            assert running_since is not None and ready_after is not None
            started_at = since + timedelta(seconds=running_since)
            healthy = elapsed >= ready_after
            if not healthy:
                message = "running; loading model"
            endpoint = f"http://{record['provider_id']}.sandbox.invalid:{record['port']}"
            gpu_util = self._gpu_util(record, now, healthy)
        return ProviderInstance(
            provider=NAME,
            provider_id=record["provider_id"],
            label=record.get("label"),
            state=state,
            gpu_name=record["gpu_name"],
            num_gpus=record["num_gpus"],
            dph=Decimal(record["dph"]),
            storage_dph=Decimal(record["storage_dph"]),
            endpoint=endpoint,
            healthy=healthy,
            gpu_util=gpu_util,
            started_at=started_at,
            message=f"{message} (simulated)",
        )

    def _gpu_util(self, record: dict[str, Any], now: datetime, healthy: bool) -> float:
        override = record.get("gpu_util")
        if override is not None:
            return float(override)
        minute = epoch(now) // 60
        if not healthy:
            return float(random.Random(f"sandbox-util:{self.seed}:{record['provider_id']}:{minute}")
                         .randint(0, 5))
        # A loaded model server nobody sends work to: the forgotten machine the idle guard is for.
        # Work is simulated with set_gpu_util (or activity pings through gpuherd). crc32, not a
        # seeded Random: list() of thousands of machines must stay cheap.
        return float(zlib.crc32(f"sandbox-util:{self.seed}:{record['provider_id']}:{minute}".encode()) % 4)

    # ------------------------------------------------------------------ instances

    async def create(self, request: CreateRequest) -> ProviderInstance:
        fault = await self._begin("create")
        now = self.clock.now()
        offer = self._offer(request.offer_id, now)
        if offer is None:
            raise CapacityError(NAME, f"offer {request.offer_id} is no longer available")
        if request.disk_gb <= 0:
            raise ProviderError(NAME, f"disk of {request.disk_gb:g} GB is not possible")
        if request.disk_gb > offer.disk_space:
            raise CapacityError(
                NAME, f"offer {offer.offer_id} has {offer.disk_space:g} GB of disk; "
                      f"{request.disk_gb:g} GB requested")
        port = request.health_port or (request.ports[0] if request.ports else 8000)

        def build(provider_id: str) -> Record:
            return {
                "provider_id": provider_id,
                "label": request.label,
                "offer_id": offer.offer_id,
                "gpu_name": offer.gpu_name,
                "num_gpus": offer.num_gpus,
                "gpu_ram": offer.gpu_ram,
                "location": offer.location,
                "dph": str(offer.dph_for(request.disk_gb)),
                "storage_dph": str(offer.storage_rate(request.disk_gb)),
                "disk_gb": request.disk_gb,
                "image": request.image,
                "port": port,
                "created_at": _format_time(now),
                "action": "create",
                "action_at": _format_time(now),
                "durations": self._durations(provider_id, "create"),
                "gpu_util": None,
            }

        instance = await self._io(lambda: self._view(self._store.create(build), now))
        self._raise_after(fault, "create")
        return instance

    async def get(self, provider_id: str) -> ProviderInstance | None:
        fault = await self._begin("get")
        now = self.clock.now()

        def work() -> ProviderInstance | None:
            record = self._store.get(provider_id)
            return self._view(record, now) if record is not None else None

        instance = await self._io(work)
        self._raise_after(fault, "get")
        return instance

    async def list(self) -> list[ProviderInstance]:
        fault = await self._begin("list")
        now = self.clock.now()
        instances = await self._io(lambda: [self._view(r, now) for r in self._store.records()])
        self._raise_after(fault, "list")
        return instances

    async def start(self, provider_id: str) -> ProviderInstance:
        fault = await self._begin("start")
        now = self.clock.now()

        def change(record: Record) -> None:
            current = self._view(record, now).state
            if current not in (ProviderState.STOPPED, ProviderState.ERROR):
                raise ProviderStateError(NAME, f"cannot start {provider_id}: it is {current.value}")
            record.update(action="start", action_at=_format_time(now),
                          durations=self._durations(provider_id, "start", _format_time(now)),
                          error=None)

        instance = await self._io(
            lambda: self._view(self._store.update(provider_id, "start", change), now))
        self._raise_after(fault, "start")
        return instance

    async def stop(self, provider_id: str) -> ProviderInstance:
        fault = await self._begin("stop")
        now = self.clock.now()

        def change(record: Record) -> None:
            current = self._view(record, now).state
            if current in (ProviderState.STOPPING, ProviderState.STOPPED):
                raise ProviderStateError(NAME, f"cannot stop {provider_id}: it is already {current.value}")
            record.update(action="stop", action_at=_format_time(now),
                          durations=self._durations(provider_id, "stop", _format_time(now)))

        instance = await self._io(
            lambda: self._view(self._store.update(provider_id, "stop", change), now))
        self._raise_after(fault, "stop")
        return instance

    async def destroy(self, provider_id: str) -> None:
        fault = await self._begin("destroy")
        # destroying what is already gone succeeds: the caller wants it gone, and it is
        await self._io(lambda: self._store.delete(provider_id))
        self._raise_after(fault, "destroy")

    # ------------------------------------------------------------------ test hooks
    # Synchronous, for tests and benches: the I/O (one small file) happens in the calling thread.

    def set_gpu_util(self, provider_id: str, util: float | None) -> None:
        """Pin the reported GPU utilisation of a running instance (None: back to simulated)."""
        if util is not None and not 0 <= util <= 100:
            raise ValueError("gpu utilisation is a percentage, 0..100")

        def change(record: Record) -> None:
            record["gpu_util"] = util

        self._store.update(provider_id, "set utilisation of", change)

    def fail(self, provider_id: str, message: str = "the machine failed") -> None:
        """Put an instance into ERROR, as when a host dies. `start` recovers it."""
        now = self.clock.now()

        def change(record: Record) -> None:
            record.update(action="error", action_at=_format_time(now), error=message)

        self._store.update(provider_id, "fail", change)


# ---------------------------------------------------------------------------- storage


def _empty_state() -> dict[str, Any]:
    return {"version": STATE_VERSION, "next_id": 1, "instances": {}}


def _no_such(provider_id: str, action: str) -> ProviderStateError:
    return ProviderStateError(NAME, f"cannot {action} {provider_id}: no such instance")


class _Store(abc.ABC):
    """Where machine records live. Methods are synchronous and thread-safe; the provider calls
    them from its worker thread (and the test hooks from theirs)."""

    @abc.abstractmethod
    def get(self, provider_id: str) -> Record | None: ...

    @abc.abstractmethod
    def records(self) -> list[Record]:
        """Every machine, ordered by id. The caller must not change them."""

    @abc.abstractmethod
    def create(self, build: Callable[[str], Record]) -> Record:
        """Allocate the next id, store `build(id)` under it and return it."""

    @abc.abstractmethod
    def update(self, provider_id: str, action: str, change: Callable[[Record], None]) -> Record:
        """Apply `change` to the record, atomically with respect to every other change; an
        exception from `change` leaves the record as it was. Raises ProviderStateError naming
        `action` when there is no such machine."""

    @abc.abstractmethod
    def delete(self, provider_id: str) -> None: ...

    @abc.abstractmethod
    def snapshot(self, write: bool) -> contextlib.AbstractContextManager[dict[str, Any]]:
        """Every machine in the version-1 shape; see SandboxProvider._state."""


class _MemoryStore(_Store):
    def __init__(self, state: dict[str, Any]) -> None:
        self._state = state
        self._lock = threading.RLock()

    def get(self, provider_id: str) -> Record | None:
        with self._lock:
            return self._state["instances"].get(provider_id)

    def records(self) -> list[Record]:
        with self._lock:
            instances = self._state["instances"]
            return [instances[key] for key in sorted(instances)]

    def create(self, build: Callable[[str], Record]) -> Record:
        with self._lock:
            number = int(self._state["next_id"])
            self._state["next_id"] = number + 1
            record = build(_provider_id(number))
            self._state["instances"][record["provider_id"]] = record
            return record

    def update(self, provider_id: str, action: str, change: Callable[[Record], None]) -> Record:
        with self._lock:
            record = self._state["instances"].get(provider_id)
            if record is None:
                raise _no_such(provider_id, action)
            changed = dict(record)  # changes set top-level keys; a failed one leaves no trace
            change(changed)
            self._state["instances"][provider_id] = changed
            return changed

    def delete(self, provider_id: str) -> None:
        with self._lock:
            self._state["instances"].pop(provider_id, None)

    @contextlib.contextmanager
    def snapshot(self, write: bool) -> Iterator[dict[str, Any]]:
        with self._lock:
            yield self._state


@dataclass(frozen=True)
class _Cached:
    stamp: tuple[int, int, int]   # (inode, mtime_ns, size) of the file when it was read
    record: Record


# Without fcntl, the lock of a state directory is a threading lock shared in the process.
_LOCAL_LOCKS: dict[str, threading.Lock] = {}
_LOCAL_LOCKS_GUARD = threading.Lock()


class _DirectoryStore(_Store):
    """A directory holding one JSON file per machine; see the module docstring."""

    def __init__(self, state_path: Path) -> None:
        self.legacy = state_path
        self.root = state_path.with_name(state_path.name + ".d")
        self.machines = self.root / "machines"
        self.meta = self.root / "meta.json"
        self.lock_path = self.root / "lock"
        self._ready = False
        self._cache_lock = threading.Lock()
        self._cache: dict[str, _Cached] = {}
        self._quiet_dir: tuple[int, int] | None = None   # (inode, mtime_ns) of an unchanged directory
        self._cached_list: list[Record] = []

    # -------------------------------------------------------------- files

    def _path(self, provider_id: str) -> Path | None:
        """The machine's file; None for an id no machine can have (so no path escapes)."""
        if not _ID.fullmatch(provider_id):
            return None
        return self.machines / f"{provider_id}.json"

    def _load(self, path: Path) -> Record | None:
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            record = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ProviderError(NAME, f"sandbox machine file {path} is not valid JSON ({exc})",
                                hint="delete it to forget that machine") from None
        if not isinstance(record, dict) or not isinstance(record.get("provider_id"), str):
            raise ProviderError(NAME, f"sandbox machine file {path} is not a machine record",
                                hint="delete it to forget that machine")
        return record

    @contextlib.contextmanager
    def _locked(self, path: Path | None = None) -> Iterator[None]:
        """The exclusive lock of the state directory (or of `path`), across processes."""
        lock_path = path or self.lock_path
        if not HAS_FLOCK:  # pragma: no cover - Windows
            with _LOCAL_LOCKS_GUARD:
                local = _LOCAL_LOCKS.setdefault(str(lock_path.resolve()), threading.Lock())
            with local:
                yield
            return
        # A descriptor of our own per acquisition: flock then excludes other threads too.
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _prepare(self) -> None:
        """Create the directory and migrate a version-1 state file, once per store."""
        if self._ready:
            return
        self.machines.mkdir(parents=True, exist_ok=True)
        if self.legacy.is_file():
            with self._locked(self.legacy.with_name(self.legacy.name + ".lock")), self._locked():
                if self.legacy.is_file():  # another process may have migrated it meanwhile
                    self._migrate()
        self._ready = True

    def _migrate(self) -> None:
        path = self.legacy
        try:
            text = path.read_text(encoding="utf-8")
            state: Any = json.loads(text) if text.strip() else _empty_state()
        except json.JSONDecodeError as exc:
            raise ProviderError(NAME, f"state file {path} is not valid JSON ({exc.msg})",
                                hint="delete it to start the sandbox afresh") from None
        except UnicodeDecodeError:
            raise ProviderError(NAME, f"state file {path} is not text (not valid UTF-8)",
                                hint="delete it to start the sandbox afresh") from None
        instances = state.get("instances") if isinstance(state, dict) else None
        if not isinstance(instances, dict):
            raise ProviderError(NAME, f"state file {path} is not a sandbox state file",
                                hint="delete it to start the sandbox afresh")
        for provider_id, record in instances.items():
            target = self._path(provider_id)
            if target is None or not isinstance(record, dict):
                raise ProviderError(NAME, f"state file {path} holds a bad machine {provider_id!r}",
                                    hint="delete it to start the sandbox afresh")
            _write_json(target, {**record, "provider_id": provider_id})
        try:
            carried = int(state.get("next_id", 1))
        except (TypeError, ValueError):
            carried = 1  # _read_next_id counts past the machines written above anyway
        self._write_next_id(max(carried, self._read_next_id()))
        os.replace(path, path.with_name(path.name + ".migrated"))

    def _read_next_id(self) -> int:
        try:
            return int(json.loads(self.meta.read_bytes())["next_id"])
        except FileNotFoundError:
            pass
        except (ValueError, KeyError, TypeError):
            pass  # a damaged counter: recount from the machines there are
        numbers = [int(name[4:-5]) for name in os.listdir(self.machines)
                   if re.fullmatch(r"sbx-\d+\.json", name)]
        return max(numbers, default=0) + 1

    def _write_next_id(self, number: int) -> None:
        _write_json(self.meta, {"version": STATE_VERSION, "next_id": number})

    # -------------------------------------------------------------- the store

    def get(self, provider_id: str) -> Record | None:
        self._prepare()
        path = self._path(provider_id)
        return self._load(path) if path is not None else None

    def records(self) -> list[Record]:
        self._prepare()
        with self._cache_lock:
            scan_ns = time.time_ns()
            racy_ns = int(RACY_S * 1e9)
            st = os.stat(self.machines)
            directory = (st.st_ino, st.st_mtime_ns)
            if directory == self._quiet_dir:
                return list(self._cached_list)
            fresh: dict[str, _Cached] = {}
            with os.scandir(self.machines) as entries:
                for entry in entries:
                    name = entry.name
                    if name.startswith(".") or not name.endswith(".json"):
                        continue
                    try:
                        est = entry.stat()
                    except FileNotFoundError:
                        continue  # destroyed meanwhile
                    stamp = (est.st_ino, est.st_mtime_ns, est.st_size)
                    cached = self._cache.get(name)
                    if cached is not None and cached.stamp == stamp:
                        fresh[name] = cached
                        continue
                    # Read after the stat: a file replaced in between is cached under the old
                    # stamp, which the next scan sees differ.
                    record = self._load(self.machines / name)
                    if record is not None:
                        fresh[name] = _Cached(stamp, record)
            result = sorted((c.record for c in fresh.values()), key=lambda r: r["provider_id"])
            self._cache = {n: c for n, c in fresh.items() if scan_ns - c.stamp[1] > racy_ns}
            quiet = scan_ns - directory[1] > racy_ns and len(self._cache) == len(fresh)
            self._quiet_dir = directory if quiet else None
            self._cached_list = result if quiet else []
            return list(result)

    def create(self, build: Callable[[str], Record]) -> Record:
        self._prepare()
        with self._locked():
            number = self._read_next_id()
            while (self.machines / f"{_provider_id(number)}.json").exists():
                number += 1  # a counter behind the machines (restored or hand-edited)
            self._write_next_id(number + 1)
            record = build(_provider_id(number))
            _write_json(self.machines / f"{record['provider_id']}.json", record)
        return record

    def update(self, provider_id: str, action: str, change: Callable[[Record], None]) -> Record:
        self._prepare()
        path = self._path(provider_id)
        if path is None:
            raise _no_such(provider_id, action)
        with self._locked():
            record = self._load(path)
            if record is None:
                raise _no_such(provider_id, action)
            change(record)
            _write_json(path, record)
        return record

    def delete(self, provider_id: str) -> None:
        self._prepare()
        path = self._path(provider_id)
        if path is None:
            return
        # under the lock: not in the middle of someone's read-modify-write of it
        with self._locked(), contextlib.suppress(FileNotFoundError):
            path.unlink()

    @contextlib.contextmanager
    def snapshot(self, write: bool) -> Iterator[dict[str, Any]]:
        self._prepare()
        with self._locked():
            instances: dict[str, Record] = {}
            for name in sorted(os.listdir(self.machines)):
                if name.startswith(".") or not name.endswith(".json"):
                    continue
                record = self._load(self.machines / name)
                if record is not None:
                    instances[record["provider_id"]] = record
            next_id = self._read_next_id()
            before = {key: _dumps(record) for key, record in instances.items()}
            state: dict[str, Any] = {"version": STATE_VERSION, "next_id": next_id,
                                     "instances": instances}
            yield state
            if not write:
                return
            for key, record in state["instances"].items():
                path = self._path(key)
                if path is None:
                    raise ValueError(f"{key!r} cannot name a sandbox machine")
                if before.get(key) != _dumps(record):
                    _write_json(path, {**record, "provider_id": key})
            for key in before.keys() - state["instances"].keys():
                with contextlib.suppress(FileNotFoundError):
                    self.machines.joinpath(f"{key}.json").unlink()
            if int(state["next_id"]) != next_id:
                self._write_next_id(int(state["next_id"]))


def _provider_id(number: int) -> str:
    return f"sbx-{number:06d}"


def _dumps(value: Any) -> bytes:
    return json.dumps(value, indent=1, sort_keys=True).encode("utf-8")


def _write_json(path: Path, value: Any) -> None:
    """Replace `path` atomically. Callers hold the directory lock, so the temporary name only
    has to differ between the threads and processes that could be writing."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        tmp.write_bytes(_dumps(value))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def _dph(per_gpu: float, num_gpus: int, storage_cost: Decimal) -> Decimal:
    """Quoted as every provider quotes: compute plus a SEARCH_DISK_GB disk while running."""
    return quote((Decimal(str(round(per_gpu, 3))) * num_gpus).quantize(_MILLI), storage_cost)


def _format_time(value: datetime) -> str:
    return as_utc(value).isoformat()


def _parse_time(value: str) -> datetime:
    return as_utc(datetime.fromisoformat(value))
