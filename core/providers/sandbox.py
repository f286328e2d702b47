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
- Instances live in a JSON file (or in memory when no path is given). Writes are atomic
  (temp file + os.replace) and serialised between processes with `fcntl.flock` on a lock file.
- States are computed lazily from the clock: a record stores its last action ("create", "stop",
  "start") with the time it happened and how long each phase takes; nothing runs in the
  background and nothing sleeps.
- Faults: per-call probabilities from a `faults` string and one-shot `inject()`ed faults.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import zlib
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

try:  # POSIX; on other systems only the in-process lock applies
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

from ..clock import Clock, as_utc, epoch
from ..errors import (
    CapacityError,
    ProviderError,
    ProviderStateError,
    ProviderTimeout,
    ProviderUnavailable,
    RateLimited,
)
from ..offers import Offer, quote
from ..query import OfferQuery
from .base import Capabilities, CreateRequest, Provider, ProviderInstance, ProviderState

SIMULATED_NOTE = "Simulated: sandbox provider — no real machines, no real charges."

NAME = "sandbox"
STATE_VERSION = 1

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


def parse_faults(spec: str) -> dict[str, float]:
    """'capacity=0.2, timeout=0.1' -> {'capacity': 0.2, 'timeout': 0.1}.

    Raises ValueError naming unknown fault kinds, bad numbers, or probabilities outside 0..1 or
    summing to more than 1."""
    rates: dict[str, float] = {}
    unknown: list[str] = []
    for part in (spec or "").split(","):
        part = part.strip()
        if not part:
            continue
        name, sep, value = part.partition("=")
        name = name.strip().lower().replace("-", "_")
        if not sep:
            raise ValueError(f"sandbox fault {part!r} needs a probability, e.g. {name}=0.1")
        if name not in FAULT_KINDS:
            unknown.append(name)
            continue
        try:
            rate = float(value)
        except ValueError:
            raise ValueError(f"sandbox fault {name}: {value.strip()!r} is not a number") from None
        if not 0.0 <= rate <= 1.0:
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
    ) -> None:
        if time_scale < 0:
            raise ValueError("sandbox time_scale must be >= 0")
        if not 0 <= price_drift < 0.5:
            raise ValueError("sandbox price_drift must be in 0..0.5")
        self.state_path = Path(state_path) if state_path is not None else None
        self.seed = seed
        self.time_scale = float(time_scale)
        self.clock = clock or Clock()
        self.price_drift = price_drift
        self.fault_rates = parse_faults(faults)
        self._fault_rng = random.Random(f"sandbox-faults:{seed}")
        self._injected: list[_Injected] = []
        self._thread_lock = threading.RLock()
        self._memory: dict[str, Any] = self._empty_state()
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
        fault = self._take_fault("search")
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

    def _take_fault(self, method: str) -> str | None:
        """The fault this call suffers, if any. Immediate faults raise here; `timeout_after` is
        returned so the caller raises it once the call has taken effect."""
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
            return kind
        raise self._fault_error(kind, method)

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

    # ------------------------------------------------------------------ state file

    @staticmethod
    def _empty_state() -> dict[str, Any]:
        return {"version": STATE_VERSION, "next_id": 1, "instances": {}}

    @contextlib.contextmanager
    def _state(self, write: bool) -> Iterator[dict[str, Any]]:
        """The state, locked; written back atomically when `write` and no exception escaped."""
        with self._thread_lock:
            if self.state_path is None:
                yield self._memory
                return
            path = self.state_path
            path.parent.mkdir(parents=True, exist_ok=True)
            lock_path = path.with_name(path.name + ".lock")
            with open(lock_path, "a+") as lock_file:
                if fcntl is not None:
                    fcntl.flock(lock_file.fileno(), fcntl.LOCK_EX if write else fcntl.LOCK_SH)
                try:
                    state = self._read(path)
                    yield state
                    if write:
                        self._write(path, state)
                finally:
                    if fcntl is not None:
                        fcntl.flock(lock_file.fileno(), fcntl.LOCK_UN)

    def _read(self, path: Path) -> dict[str, Any]:
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return self._empty_state()
        if not text.strip():
            return self._empty_state()
        try:
            state = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ProviderError(NAME, f"state file {path} is not valid JSON ({exc.msg})",
                                hint="delete it to start the sandbox afresh") from None
        if not isinstance(state, dict) or not isinstance(state.get("instances"), dict):
            raise ProviderError(NAME, f"state file {path} is not a sandbox state file",
                                hint="delete it to start the sandbox afresh")
        state.setdefault("next_id", 1)
        return state

    @staticmethod
    def _write(path: Path, state: dict[str, Any]) -> None:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                json.dump(state, handle, indent=1, sort_keys=True)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

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
        fault = self._take_fault("create")
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
        with self._state(write=True) as state:
            number = int(state["next_id"])
            state["next_id"] = number + 1
            provider_id = f"sbx-{number:06d}"
            record = {
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
            state["instances"][provider_id] = record
        instance = self._view(record, now)
        self._raise_after(fault, "create")
        return instance

    async def get(self, provider_id: str) -> ProviderInstance | None:
        fault = self._take_fault("get")
        now = self.clock.now()
        with self._state(write=False) as state:
            record = state["instances"].get(provider_id)
        instance = self._view(record, now) if record is not None else None
        self._raise_after(fault, "get")
        return instance

    async def list(self) -> list[ProviderInstance]:
        fault = self._take_fault("list")
        now = self.clock.now()
        with self._state(write=False) as state:
            records = [state["instances"][key] for key in sorted(state["instances"])]
        instances = [self._view(record, now) for record in records]
        self._raise_after(fault, "list")
        return instances

    async def start(self, provider_id: str) -> ProviderInstance:
        fault = self._take_fault("start")
        now = self.clock.now()
        with self._state(write=True) as state:
            record = self._record(state, provider_id, "start")
            current = self._view(record, now).state
            if current not in (ProviderState.STOPPED, ProviderState.ERROR):
                raise ProviderStateError(NAME, f"cannot start {provider_id}: it is {current.value}")
            record.update(action="start", action_at=_format_time(now),
                          durations=self._durations(provider_id, "start", _format_time(now)),
                          error=None)
        instance = self._view(record, now)
        self._raise_after(fault, "start")
        return instance

    async def stop(self, provider_id: str) -> ProviderInstance:
        fault = self._take_fault("stop")
        now = self.clock.now()
        with self._state(write=True) as state:
            record = self._record(state, provider_id, "stop")
            current = self._view(record, now).state
            if current in (ProviderState.STOPPING, ProviderState.STOPPED):
                raise ProviderStateError(NAME, f"cannot stop {provider_id}: it is already {current.value}")
            record.update(action="stop", action_at=_format_time(now),
                          durations=self._durations(provider_id, "stop", _format_time(now)))
        instance = self._view(record, now)
        self._raise_after(fault, "stop")
        return instance

    async def destroy(self, provider_id: str) -> None:
        fault = self._take_fault("destroy")
        with self._state(write=True) as state:
            # destroying what is already gone succeeds: the caller wants it gone, and it is
            state["instances"].pop(provider_id, None)
        self._raise_after(fault, "destroy")

    @staticmethod
    def _record(state: dict[str, Any], provider_id: str, action: str) -> dict[str, Any]:
        record = state["instances"].get(provider_id)
        if record is None:
            raise ProviderStateError(NAME, f"cannot {action} {provider_id}: no such instance")
        return record

    # ------------------------------------------------------------------ test hooks

    def set_gpu_util(self, provider_id: str, util: float | None) -> None:
        """Pin the reported GPU utilisation of a running instance (None: back to simulated)."""
        if util is not None and not 0 <= util <= 100:
            raise ValueError("gpu utilisation is a percentage, 0..100")
        with self._state(write=True) as state:
            self._record(state, provider_id, "set utilisation of")["gpu_util"] = util

    def fail(self, provider_id: str, message: str = "the machine failed") -> None:
        """Put an instance into ERROR, as when a host dies. `start` recovers it."""
        now = self.clock.now()
        with self._state(write=True) as state:
            record = self._record(state, provider_id, "fail")
            record.update(action="error", action_at=_format_time(now), error=message)


def _dph(per_gpu: float, num_gpus: int, storage_cost: Decimal) -> Decimal:
    """Quoted as every provider quotes: compute plus a SEARCH_DISK_GB disk while running."""
    return quote((Decimal(str(round(per_gpu, 3))) * num_gpus).quantize(_MILLI), storage_cost)


def _format_time(value: datetime) -> str:
    return as_utc(value).isoformat()


def _parse_time(value: str) -> datetime:
    return as_utc(datetime.fromisoformat(value))
