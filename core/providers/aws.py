"""AWS EC2: GPU instances rented on demand (or as spot), through boto3.

How gpuherd maps EC2 onto its provider interface:

* Offers. One offer per GPU instance type per configured region: `g5.xlarge@us-east-1`, and,
  when the query admits interruptible offers (`interruptible`, `interruptible=true`,
  `interruptible=any`), a spot twin `g5.xlarge@us-east-1.spot`. Spot is opt-in because a boot
  takes the cheapest fitting offer and a spot machine can be taken away; that is the only
  query-dependent narrowing, so `search_key` is "spot" or "". `get_offer` finds both kinds by id.
  GPU types come from `describe_instance_types` (only types with NVIDIA `GpuInfo`, whole GPUs,
  x86_64 unless asked), restricted to the types each region offers
  (`describe_instance_type_offerings`); both are cached for hours.
* Server-side filtering never drops an offer the local query would keep: spot prices are asked
  whenever some interruptible offer could pass the query's `interruptible` filters (`wants_spot`
  evaluates them on True; the default `interruptible=false` leaves spot out, `interruptible=any`
  drops that default and so brings spot in). Everything else sent to AWS (the GPU type name
  patterns, the Pricing API filter below) is the same for every query; core.query does the rest.
  A search without a query is the default listing (on-demand only), like an empty query.
  `tests/test_aws.py` checks over several queries that `query.apply(search(query))` equals
  `query.apply` over a search that fetched everything.
* Prices. On-demand prices come from the AWS Pricing API (`pricing.get_products`, endpoint in
  us-east-1), cached for a day; `priced_at` is when they were fetched. The filter names one SKU
  per type: regionCode, instanceFamily "GPU instance", Linux, Shared tenancy, no pre-installed
  software, capacitystatus Used and `marketoption=OnDemand`; without the last, EC2 Capacity
  Block SKUs of the same type come back too, and a non-zero Capacity Block price could be taken
  for the on-demand one (the parser also skips any item whose marketoption is not OnDemand).
  When the Pricing API cannot be reached, refuses us, or has no price for a type, the price
  table shipped with gpuherd (core/data/aws_prices.json) is used and the offer's `price_source`
  names it and its date; a type priced by neither is not offered. Spot prices are the lowest current price over the
  region's zones (`describe_spot_price_history`), cached for minutes. Every `dph` includes
  `SEARCH_DISK_GB` of gp3 EBS at the configured USD/GB-month, which also bills while stopped.
* Machines. `create` calls `run_instances` with `ClientToken` derived from the label (EC2's own
  idempotency: a retried create cannot launch twice) and tags `Name` and `gpuherd:label`; the
  label is what reconcile looks for. User data starts the container with docker at every boot.
  Spot machines are launched as *persistent* requests that *stop* on interruption, so gpuherd can
  stop and start them like on-demand ones; `destroy` cancels that request before terminating
  (otherwise EC2 would launch a replacement).
* Ids. `provider_id` is the plain EC2 instance id (`i-0abc...`), as users see it in the console
  and type it for `attach`. EC2 ids are region-scoped, so the provider remembers where it saw
  each id and otherwise asks every configured region; `i-0abc...@eu-west-1` is accepted too.
* Calls. One boto3 session, one EC2 client per region and one Pricing client, created up front
  (boto3 clients are thread-safe; sessions are not) and called through `asyncio.to_thread`.
  botocore retries in its "standard" mode, so `retries_internally` is set. Every failure leaves
  as a typed gpuherd error whose message names "AWS EC2" and never a credential.

What needs no boto3 (error codes, price table and price list, GPU types, regions, ids, the
boot script, tags) is in aws_catalog.py.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from ..clock import Clock, as_utc
from ..errors import (
    AuthError,
    CapacityError,
    ConfigError,
    GpuherdError,
    ProviderError,
    ProviderStateError,
    ProviderTimeout,
    ProviderUnavailable,
    RateLimited,
)
from ..money import to_decimal
from ..offers import Offer, quote, storage_hourly
from .aws_catalog import (
    _AUTH,
    _CAPACITY,
    _NOT_FOUND,
    _QUOTA,
    _STATE,
    _THROTTLE,
    DISK_TAG,
    DISPLAY,
    DPH_TAG,
    IMAGE_TAG,
    LABEL_TAG,
    OFFER_TAG,
    PORT_TAG,
    PRICING_REGION,
    GpuType,
    PriceTable,
    _int_tag,
    _tags,
    client_token,
    gpu_memory_gb,
    gpu_name_for,
    gpu_type_from,
    offer_id_for,
    parse_ami_setting,
    parse_instance_id,
    parse_offer_id,
    parse_price_list,
    region_place,
    user_data,
    wants_spot,
)
from .base import Capabilities, CreateRequest, Provider, ProviderInstance, ProviderState

if TYPE_CHECKING:
    from ..config import Settings
    from ..query import OfferQuery

try:  # boto3 is the `aws` extra: gpuherd runs without it, only this provider needs it
    import boto3
    import botocore.exceptions as boto_errors
    from botocore.config import Config as BotoConfig
except ImportError:  # pragma: no cover - exercised by from_settings when the extra is missing
    boto3 = None
    boto_errors = None
    BotoConfig = None

log = logging.getLogger(__name__)

NAME = "aws"
PRICE_SOURCE_API = "AWS Pricing API"

TYPES_TTL = timedelta(hours=6)        # instance types and regional offerings rarely change
PRICES_TTL = timedelta(hours=24)      # on-demand list prices change a few times a year
PRICES_RETRY = timedelta(minutes=15)  # after a failed Pricing API call, the table serves this long
SPOT_TTL = timedelta(minutes=10)
IMAGE_TTL = timedelta(hours=24)

GPU_TYPE_PATTERNS = ["g*", "p*"]      # EC2 has no GPU filter; every NVIDIA GPU family is g* or p*
LIVE_STATES = ["pending", "running", "stopping", "stopped", "shutting-down"]
SPOT_RELIABILITY = 0.85               # on-demand is 1.0; spot can be interrupted (then stopped)
# A spot price under this share of the on-demand price is not a real price (emulators such as
# moto answer 0.00001 for everything): such a type gets no spot offer rather than a bogus one.
SPOT_FLOOR = Decimal("0.05")
MAX_EBS_GB = 16384                    # gp3 volume limit
DEFAULT_PORT = 8000

# Deep Learning AMIs with the NVIDIA driver, docker and the NVIDIA container toolkit; newest wins.
DLAMI_NAMES = {
    "x86_64": ["Deep Learning Base OSS Nvidia Driver GPU AMI (Ubuntu *",
               "Deep Learning Base OSS Nvidia Driver GPU AMI (Amazon Linux *"],
    "arm64": ["Deep Learning ARM64 Base OSS Nvidia Driver GPU AMI (Ubuntu *"],
}

_STATES = {
    "pending": ProviderState.PROVISIONING,
    "running": ProviderState.RUNNING,
    "stopping": ProviderState.STOPPING,
    "stopped": ProviderState.STOPPED,
    "shutting-down": ProviderState.DESTROYED,
    "terminated": ProviderState.DESTROYED,
}

_warned: set[str] = set()


def _warn_once(key: str, message: str, *args: Any, level: int = logging.WARNING) -> None:
    if key not in _warned:
        _warned.add(key)
        log.log(level, message, *args)


# ============================================================================ the provider


def _typed(op: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Nothing but a GpuherdError leaves a public method: an answer of an unexpected shape (a
    missing key, a wrong type) becomes a ProviderError naming the operation, logged in full."""
    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        async def run(self: AwsProvider, *args: Any, **kwargs: Any) -> Any:
            try:
                return await fn(self, *args, **kwargs)
            except GpuherdError:
                raise
            except Exception as exc:
                log.exception("AWS EC2 %s failed unexpectedly", op)
                raise ProviderError(DISPLAY, f"{op} failed: AWS EC2 answered in an unexpected shape "
                                             f"({type(exc).__name__})") from None
        return run
    return wrap



@dataclass
class _Cached:
    value: Any
    at: datetime


@dataclass
class _RegionCache:
    types: _Cached | None = None                  # {instance_type: GpuType}
    prices: _Cached | None = None                 # {instance_type: Decimal} from the Pricing API
    prices_failed_at: datetime | None = None
    spot: _Cached | None = None                   # {instance_type: (Decimal, az)}
    images: dict[str, _Cached] = field(default_factory=dict)  # arch or ami id -> image facts


class _Gone(Exception):
    """The instance id is unknown in a region (InvalidInstanceID.NotFound/Malformed)."""


class AwsProvider(Provider):
    name = NAME
    display_name = DISPLAY
    capabilities = Capabilities(
        can_search=True, can_create=True, can_stop=True, can_start=True, can_destroy=True, can_list=True,
        reports_gpu_utilisation=False,       # EC2 reports GPU use only through the CloudWatch agent
        storage_bills_while_stopped=True,    # EBS
        reports_actual_billing=False,
        retries_internally=True,             # botocore's standard retry mode
    )

    def __init__(
        self,
        *,
        regions: Sequence[str] = ("us-east-1",),
        ami: str | Mapping[str, str] | None = None,
        subnet_id: str | None = None,
        security_group_ids: Sequence[str] = (),
        key_name: str | None = None,
        ebs_gb_month: Decimal | str = Decimal("0.08"),
        endpoint_url: str | None = None,
        pricing_endpoint_url: str | None = None,
        session: Any = None,
        timeout_s: float = 30.0,
        connect_timeout_s: float = 10.0,
        max_attempts: int = 3,
        clock: Clock | None = None,
        price_table: Path | str | PriceTable | None = None,
        include_arm: bool = False,
        health_timeout_s: float = 5.0,
    ) -> None:
        if boto3 is None:
            raise ConfigError("AWS EC2 needs boto3: pip install 'gpuherd[aws]'")
        if not regions:
            raise ConfigError("AWS EC2 needs at least one region (aws_regions)")
        self.regions = list(dict.fromkeys(regions))
        self.ami = parse_ami_setting(ami)
        self.subnet_id = subnet_id or None
        self.security_group_ids = list(security_group_ids)
        self.key_name = key_name or None
        try:
            self.ebs_gb_month = to_decimal(ebs_gb_month)
        except ValueError:
            raise ConfigError(f"aws_ebs_gb_month: {ebs_gb_month!r} is not an amount in USD") from None
        if self.ebs_gb_month < 0:
            raise ConfigError("aws_ebs_gb_month cannot be negative")
        self.clock = clock or Clock()
        self.include_arm = include_arm
        self.health_timeout_s = health_timeout_s
        self.timeout_s = timeout_s
        self.table = price_table if isinstance(price_table, PriceTable) else PriceTable.load(price_table)
        self.session = session if session is not None else boto3.Session()
        self._secrets = self._credential_secrets()
        # endpoint_url None: boto3 itself honours AWS_ENDPOINT_URL / AWS_ENDPOINT_URL_EC2 and the
        # config file's endpoint_url, which is how users point gpuherd at another endpoint
        config = BotoConfig(
            retries={"mode": "standard", "total_max_attempts": max(1, int(max_attempts))},
            connect_timeout=connect_timeout_s, read_timeout=timeout_s,
            user_agent_extra="gpuherd", max_pool_connections=20,
        )
        self._ec2 = {r: self.session.client("ec2", region_name=r, endpoint_url=endpoint_url, config=config)
                     for r in self.regions}
        self._pricing = self.session.client("pricing", region_name=PRICING_REGION,
                                            endpoint_url=pricing_endpoint_url or endpoint_url, config=config)
        self._cache = {r: _RegionCache() for r in self.regions}
        self._where: dict[str, str] = {}          # instance id -> region it was seen in
        self._http: Any = None

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_settings(cls, settings: Settings, *, clock: Clock | None = None,
                      price_table: Path | str | None = None) -> AwsProvider | None:
        """The provider as configured, or None: `aws=off`, boto3 missing (the `aws` extra), or
        `aws=auto` and the AWS credential chain finds nothing."""
        if settings.aws == "off":
            return None
        if boto3 is None:
            _warn_once("no-boto3", "AWS EC2 is not available: boto3 is not installed. "
                                   "Install it with: pip install 'gpuherd[aws]'",
                       level=logging.ERROR if settings.aws == "on" else logging.INFO)
            return None
        session = boto3.Session()
        try:
            credentials = session.get_credentials()
        except Exception as exc:  # a broken ~/.aws/config: name it, do not crash the start
            _warn_once("bad-chain", "AWS EC2: reading AWS credentials failed (%s)", type(exc).__name__)
            credentials = None
        if credentials is None:
            if settings.aws == "auto":
                log.info("AWS EC2 not configured: no AWS credentials found (environment, ~/.aws, SSO or "
                         "instance role); set aws=on to use it anyway")
                return None
            _warn_once("on-no-creds", "AWS EC2 is on but no AWS credentials were found; calls will be refused")
        return cls(regions=settings.aws_regions, ami=settings.aws_ami, subnet_id=settings.aws_subnet_id,
                   security_group_ids=settings.aws_security_group_ids, key_name=settings.aws_key_name,
                   ebs_gb_month=settings.aws_ebs_gb_month, session=session, clock=clock,
                   price_table=price_table)

    def _credential_secrets(self) -> list[str]:
        try:
            creds = self.session.get_credentials()
            frozen = creds.get_frozen_credentials() if creds is not None else None
        except Exception:
            return []
        if frozen is None:
            return []
        return [s for s in (frozen.secret_key, frozen.token) if s]

    @property
    def pricing_client(self) -> Any:
        """The Pricing API client (tests put a botocore Stubber on it)."""
        return self._pricing

    def ec2_client(self, region: str | None = None) -> Any:
        return self._ec2[region or self.regions[0]]

    # ------------------------------------------------------------------ calls and errors

    async def _call(self, client: Any, op: str, what: str, **kwargs: Any) -> dict[str, Any]:
        method = getattr(client, op)
        try:
            return await asyncio.to_thread(method, **kwargs)
        except Exception as exc:
            raise self._error(exc, what) from None

    async def _paged(self, client: Any, op: str, key: str | Callable[[dict[str, Any]], list[Any]],
                     what: str, **kwargs: Any) -> list[Any]:
        def run() -> list[Any]:
            out: list[Any] = []
            for page in client.get_paginator(op).paginate(**kwargs):
                out.extend(key(page) if callable(key) else page.get(key) or [])
            return out

        try:
            return await asyncio.to_thread(run)
        except Exception as exc:
            raise self._error(exc, what) from None

    def scrub(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    def _error(self, exc: BaseException, what: str) -> Exception:
        """A typed gpuherd error for anything boto3 raised. `what` says which call, in words."""
        if isinstance(exc, (ProviderError, _Gone)):
            return exc
        err = self._map(exc, what)
        if not isinstance(err, _NotFoundError):
            log.warning("%s", err.message)
        return err

    def _map(self, exc: BaseException, what: str) -> ProviderError:
        e = boto_errors
        if isinstance(exc, e.ClientError):
            error = exc.response.get("Error") or {}
            code = str(error.get("Code") or "Unknown")
            message = self.scrub(str(error.get("Message") or "")).strip()
            meta = exc.response.get("ResponseMetadata") or {}
            status = int(meta.get("HTTPStatusCode") or 0)
            if code in _NOT_FOUND:
                return _NotFoundError(DISPLAY, f"{what}: {code}")
            if code in _AUTH or (status in (401, 403) and code not in _CAPACITY | _STATE):
                if code == "UnauthorizedOperation":
                    message = message.split(" Encoded authorization failure message")[0]
                return AuthError(DISPLAY, f"the credentials were refused ({code}) for {what}: "
                                          f"{message[:200]}".rstrip(": "),
                                 hint="check the AWS credentials and the IAM policy gpuherd runs with")
            if code in _THROTTLE or status == 429:
                wait = _retry_after(meta)
                more = f"; it asks to wait {wait:g}s" if wait is not None else ""
                return RateLimited(DISPLAY, f"too many requests ({code}) during {what}{more}",
                                   retry_after=wait)
            if code in _QUOTA:
                return CapacityError(DISPLAY, f"{what}: the account's quota is used up ({code}): {message[:300]} "
                                              "Ask AWS for a higher quota or pick a smaller instance.")
            if code in _CAPACITY:
                return CapacityError(DISPLAY, f"{what}: no capacity right now ({code}): {message[:300]}")
            if code in _STATE:
                return ProviderStateError(DISPLAY, f"{what} refused in the machine's current state "
                                                   f"({code}): {message[:300]}")
            if status >= 500 or code in ("InternalError", "InternalFailure", "ServiceUnavailable",
                                         "Unavailable", "InternalErrorException"):
                return ProviderUnavailable(DISPLAY, f"{what}: server error ({code}, HTTP {status})")
            return ProviderError(DISPLAY, f"{what} refused ({code}): {message[:300]}".rstrip(": "))
        if isinstance(exc, (e.ReadTimeoutError, e.ConnectTimeoutError)):
            return ProviderTimeout(DISPLAY, f"{what} timed out: AWS EC2 did not answer in time")
        if isinstance(exc, e.EndpointConnectionError):
            return ProviderUnavailable(DISPLAY, f"cannot connect to AWS EC2 for {what} "
                                                f"({self.scrub(str(getattr(exc, 'kwargs', {}).get('endpoint_url', '')))})")
        if isinstance(exc, (e.ConnectionError, e.HTTPClientError)):
            return ProviderUnavailable(DISPLAY, f"{what} failed: connection error ({type(exc).__name__})")
        if isinstance(exc, (e.NoCredentialsError, e.PartialCredentialsError)):
            return AuthError(DISPLAY, f"{what} refused: no usable AWS credentials were found "
                                      "(environment, ~/.aws, SSO or instance role)")
        if type(exc).__name__ == "ResponseParserError":
            return ProviderError(DISPLAY, f"{what}: AWS EC2 answered with a malformed response")
        if isinstance(exc, e.ParamValidationError):
            # botocore's text quotes parameter values (user data holds env secrets): names only
            log.debug("AWS EC2 %s: %s", what, self.scrub(str(exc)))
            fields = sorted(set(re.findall(r"parameter ([\w.\[\]]+)", str(exc))))[:5]
            return ProviderError(DISPLAY, f"{what}: invalid request parameters ({', '.join(fields) or 'see the log'})")
        if isinstance(exc, e.BotoCoreError):
            return ProviderError(DISPLAY, f"{what} failed: {self.scrub(str(exc))[:300]}")
        return ProviderError(DISPLAY, f"{what} failed unexpectedly ({type(exc).__name__})")

    # ------------------------------------------------------------------ catalogue and prices

    async def _gpu_types(self, region: str) -> dict[str, GpuType]:
        cache = self._cache[region]
        now = self.clock.now()
        if cache.types is not None and now - cache.types.at < TYPES_TTL:
            return cache.types.value
        client = self._ec2[region]
        items = await self._paged(client, "describe_instance_types", "InstanceTypes",
                                  f"describe_instance_types in {region}",
                                  Filters=[{"Name": "instance-type", "Values": GPU_TYPE_PATTERNS}])
        names = sorted({str(i.get("InstanceType")) for i in items if isinstance(i, dict) and i.get("GpuInfo")})
        offered_types: set[str] = set()
        for start in range(0, len(names), 100):     # which of them this region offers
            offered = await self._paged(
                client, "describe_instance_type_offerings", "InstanceTypeOfferings",
                f"describe_instance_type_offerings in {region}", LocationType="region",
                Filters=[{"Name": "location", "Values": [region]},
                         {"Name": "instance-type", "Values": names[start:start + 100]}])
            offered_types.update(o.get("InstanceType") for o in offered if o.get("Location", region) == region)
        types: dict[str, GpuType] = {}
        for item in items:
            if not isinstance(item, dict) or "InstanceType" not in item:
                raise ProviderError(DISPLAY, f"describe_instance_types in {region}: AWS EC2 answered "
                                             "with a malformed response")
            gpu = gpu_type_from(item, include_arm=self.include_arm)
            if gpu is not None and gpu.instance_type in offered_types:
                types[gpu.instance_type] = gpu
        cache.types = _Cached(types, now)
        return types

    async def _on_demand_prices(self, region: str) -> tuple[dict[str, Decimal], datetime | None]:
        """Pricing API prices for the region and when they were fetched; ({}, None) when the API
        cannot help (then the table prices everything)."""
        cache = self._cache[region]
        now = self.clock.now()
        if cache.prices is not None and now - cache.prices.at < PRICES_TTL:
            return cache.prices.value, cache.prices.at
        if cache.prices_failed_at is not None and now - cache.prices_failed_at < PRICES_RETRY:
            return ({}, None) if cache.prices is None else (cache.prices.value, cache.prices.at)
        filters = [{"Type": "TERM_MATCH", "Field": name, "Value": value} for name, value in (
            ("regionCode", region), ("instanceFamily", "GPU instance"), ("operatingSystem", "Linux"),
            ("tenancy", "Shared"), ("preInstalledSw", "NA"), ("capacitystatus", "Used"),
            ("marketoption", "OnDemand"),     # else Capacity Block SKUs of the same type come too
        )]
        try:
            items = await self._paged(self._pricing, "get_products", "PriceList",
                                      f"Pricing API get_products for {region}", ServiceCode="AmazonEC2",
                                      Filters=filters, FormatVersion="aws_v1")
            prices = parse_price_list(items)
        except ProviderError as exc:
            cache.prices_failed_at = now
            _warn_once(f"pricing-failed:{region}:{type(exc).__name__}",
                       "AWS EC2: the Pricing API could not be used (%s); prices come from %s until it can",
                       exc.message, self.table.source("", region))
            if cache.prices is not None:      # an older fetch beats the table
                return cache.prices.value, cache.prices.at
            return {}, None
        cache.prices = _Cached(prices, now)
        cache.prices_failed_at = None
        return prices, now

    async def _spot_prices(self, region: str, types: Mapping[str, GpuType]) -> dict[str, tuple[Decimal, str]]:
        """Lowest current spot price per type over the region's zones, with its zone. A failure
        leaves spot out of this search (logged), never the on-demand offers."""
        cache = self._cache[region]
        now = self.clock.now()
        if cache.spot is not None and now - cache.spot.at < SPOT_TTL:
            return cache.spot.value
        wanted = sorted(t for t, g in types.items() if g.spot)
        best: dict[str, tuple[Decimal, str]] = {}
        try:
            for start in range(0, len(wanted), 50):
                rows = await self._paged(
                    self._ec2[region], "describe_spot_price_history", "SpotPriceHistory",
                    f"describe_spot_price_history in {region}", InstanceTypes=wanted[start:start + 50],
                    ProductDescriptions=["Linux/UNIX", "Linux/UNIX (Amazon VPC)"], StartTime=now)
                for row in rows:
                    try:
                        price = Decimal(str(row["SpotPrice"]))
                    except (KeyError, InvalidOperation):
                        continue
                    itype = row.get("InstanceType", "")
                    if price > 0 and (itype not in best or price < best[itype][0]):
                        best[itype] = (price, str(row.get("AvailabilityZone", "")))
        except ProviderError as exc:
            _warn_once(f"spot-failed:{region}:{type(exc).__name__}",
                       "AWS EC2: no spot prices for %s (%s); spot offers are left out", region, exc.message)
            return {}
        cache.spot = _Cached(best, now)
        return best

    def _list_price(self, region: str, instance_type: str) -> tuple[Decimal, datetime, str] | None:
        """On-demand price without calling anything: the cached Pricing API price, else the table."""
        cached = self._cache[region].prices if region in self._cache else None
        if cached is not None and instance_type in cached.value:
            return cached.value[instance_type], cached.at, PRICE_SOURCE_API
        if instance_type in self.table.prices:
            return (self.table.prices[instance_type], self.table.priced_at,
                    self.table.source(instance_type, region))
        return None

    async def _region_offers(self, region: str, spot: bool, now: datetime) -> list[Offer]:
        types = await self._gpu_types(region)
        api_prices, api_at = await self._on_demand_prices(region)
        spot_prices = await self._spot_prices(region, types) if spot else {}
        location, country = region_place(region)
        offers: list[Offer] = []
        unpriced: list[str] = []
        for itype in sorted(types):
            gpu = types[itype]
            if itype in api_prices and api_at is not None:
                price, priced_at, source = api_prices[itype], api_at, PRICE_SOURCE_API
            elif itype in self.table.prices:
                price, priced_at = self.table.prices[itype], self.table.priced_at
                source = self.table.source(itype, region)
            else:
                unpriced.append(itype)
                continue
            base = dict(
                provider=NAME, gpu_name=gpu.gpu_name, num_gpus=gpu.num_gpus, gpu_ram=gpu.gpu_ram,
                cpu_cores=gpu.cpu_cores, cpu_ram=gpu.cpu_ram, disk_space=float(MAX_EBS_GB),
                storage_cost=self.ebs_gb_month, location=location, country=country,
                inet_down=gpu.network_mbps, inet_up=gpu.network_mbps, verified=True, fetched_at=now,
            )
            extra = {"instance_type": itype, "region": region, "arch": gpu.arch}
            if gpu.on_demand:
                offers.append(Offer(
                    offer_id=offer_id_for(itype, region), dph=quote(price, self.ebs_gb_month),
                    reliability=1.0, interruptible=False, priced_at=priced_at, price_source=source,
                    extra={**extra, "market": "on-demand"}, **base))
            if itype in spot_prices and (spot_cache := self._cache[region].spot) is not None:
                spot_price, zone = spot_prices[itype]
                if spot_price < price * SPOT_FLOOR:
                    _warn_once(f"spot-floor:{region}:{itype}", "AWS EC2: ignoring spot price %s for %s in %s: "
                               "below %s%% of on-demand, not a real price", spot_price, itype, region,
                               int(SPOT_FLOOR * 100), level=logging.INFO)
                    continue
                offers.append(Offer(
                    offer_id=offer_id_for(itype, region, spot=True), dph=quote(spot_price, self.ebs_gb_month),
                    reliability=SPOT_RELIABILITY, interruptible=True,
                    priced_at=spot_cache.at, price_source="AWS spot price history",
                    extra={**extra, "market": "spot", "spot_zone": zone, "on_demand_dph": str(price)}, **base))
        if unpriced:
            _warn_once(f"unpriced:{region}:{','.join(unpriced)}", "AWS EC2: no price for %s in %s (neither the "
                       "Pricing API nor the price table has one); not offered", ", ".join(unpriced), region,
                       level=logging.INFO)
        return offers

    @_typed("search")
    async def search(self, query: OfferQuery | None = None) -> list[Offer]:
        spot = wants_spot(query)
        now = self.clock.now()
        results = await asyncio.gather(*(self._region_offers(r, spot, now) for r in self.regions),
                                       return_exceptions=True)
        offers: list[Offer] = []
        failures: list[BaseException] = []
        for region, result in zip(self.regions, results, strict=True):
            if isinstance(result, BaseException):
                if not isinstance(result, ProviderError):
                    result = self._map(result, f"search in {region}")
                failures.append(result)
                continue
            offers.extend(result)
        if failures and len(failures) == len(self.regions):
            raise failures[0]
        for failure in failures:   # some regions answered: show theirs, name the others in the log
            log.warning("AWS EC2 search: a region is left out: %s", getattr(failure, "message", failure))
        return offers

    def search_key(self, query: OfferQuery | None) -> str:
        return "spot" if wants_spot(query) else ""

    @_typed("get_offer")
    async def get_offer(self, offer_id: str) -> Offer | None:
        try:
            _itype, region, spot = parse_offer_id(offer_id)
        except ProviderError:
            return None
        if region not in self._ec2:
            return None
        for offer in await self._region_offers(region, spot, self.clock.now()):
            if offer.offer_id == offer_id:
                return offer
        return None

    # ------------------------------------------------------------------ images

    async def _image(self, region: str, arch: str) -> tuple[str, str, int]:
        """(AMI id, root device name, the AMI's root snapshot size in GB) for a launch."""
        cache = self._cache[region]
        configured = self.ami.get(region) if isinstance(self.ami, dict) else self.ami
        key = configured or f"dlami:{arch}"
        now = self.clock.now()
        hit = cache.images.get(key)
        if hit is not None and now - hit.at < IMAGE_TTL:
            return hit.value
        client = self._ec2[region]
        if configured:
            found = await self._call(client, "describe_images", f"describe_images {configured} in {region}",
                                     ImageIds=[configured])
            images = found.get("Images") or []
            if not images:
                raise ProviderError(DISPLAY, f"AMI {configured} does not exist in {region} (AMIs are regional; "
                                             "set aws_ami as region=ami-id pairs)")
            image = images[0]
        else:
            image = None
            for pattern in DLAMI_NAMES.get(arch, DLAMI_NAMES["x86_64"]):
                found = await self._call(
                    client, "describe_images", f"describe_images (Deep Learning AMI) in {region}",
                    Owners=["amazon"], Filters=[{"Name": "name", "Values": [pattern]},
                                                {"Name": "state", "Values": ["available"]},
                                                {"Name": "architecture", "Values": [arch]}])
                images = found.get("Images") or []
                if images:
                    image = max(images, key=lambda i: (str(i.get("CreationDate", "")), str(i.get("ImageId"))))
                    break
            if image is None:
                raise ProviderError(DISPLAY, f"no Deep Learning GPU AMI found in {region} for {arch}; "
                                             "set aws_ami to the AMI to boot")
        root = str(image.get("RootDeviceName") or "/dev/sda1")
        size = 0
        for mapping in image.get("BlockDeviceMappings") or []:
            if mapping.get("DeviceName") == root:
                size = int((mapping.get("Ebs") or {}).get("VolumeSize") or 0)
        facts = (str(image["ImageId"]), root, size)
        cache.images[key] = _Cached(facts, now)
        return facts

    # ------------------------------------------------------------------ machines

    @_typed("create")
    async def create(self, request: CreateRequest) -> ProviderInstance:
        itype, region, spot = parse_offer_id(request.offer_id)
        spot = spot or request.interruptible
        if region not in self._ec2:
            raise CapacityError(DISPLAY, f"offer {request.offer_id} is in {region}, which is not one of the "
                                         f"configured regions ({', '.join(self.regions)})")
        if request.disk_gb <= 0 or request.disk_gb > MAX_EBS_GB:
            raise ProviderError(DISPLAY, f"a disk of {request.disk_gb:g} GB is not possible (1..{MAX_EBS_GB})")
        cached_types = self._cache[region].types
        types = cached_types.value if cached_types else await self._gpu_types(region)
        gpu = types.get(itype)
        arch = gpu.arch if gpu else "x86_64"
        ami, root_device, ami_gb = await self._image(region, arch)
        disk_gb = max(int(-(-request.disk_gb // 1)), ami_gb)   # the root volume cannot be smaller than the AMI
        port = request.health_port or (request.ports[0] if request.ports else DEFAULT_PORT)
        compute = self._compute_price(region, itype, spot, bid=request.bid_dph)
        tags = {"Name": request.label, LABEL_TAG: request.label, PORT_TAG: str(port), DISK_TAG: str(disk_gb),
                OFFER_TAG: offer_id_for(itype, region, spot)}
        if compute is not None:
            tags[DPH_TAG] = str(compute)
        if len(request.image) <= 256:
            tags[IMAGE_TAG] = request.image
        tag_list = [{"Key": k, "Value": v[:256]} for k, v in tags.items()]
        kwargs: dict[str, Any] = dict(
            ImageId=ami, InstanceType=itype, MinCount=1, MaxCount=1,
            ClientToken=client_token(request.label),
            UserData=user_data(request, port),
            BlockDeviceMappings=[{"DeviceName": root_device, "Ebs": {
                "VolumeSize": disk_gb, "VolumeType": "gp3", "DeleteOnTermination": True}}],
            TagSpecifications=[{"ResourceType": "instance", "Tags": tag_list},
                               {"ResourceType": "volume", "Tags": [{"Key": LABEL_TAG, "Value": request.label[:256]},
                                                                   {"Key": "Name", "Value": request.label[:256]}]}],
        )
        if self.subnet_id:
            kwargs["SubnetId"] = self.subnet_id
        if self.security_group_ids:
            kwargs["SecurityGroupIds"] = list(self.security_group_ids)
        if self.key_name:
            kwargs["KeyName"] = self.key_name
        if spot:
            # persistent + stop: an interrupted machine is stopped (disk kept), not lost, and
            # gpuherd can stop/start it like an on-demand one; one-time spot can only terminate
            options: dict[str, Any] = {"SpotInstanceType": "persistent", "InstanceInterruptionBehavior": "stop"}
            if request.bid_dph is not None:
                options["MaxPrice"] = str(request.bid_dph)
            kwargs["InstanceMarketOptions"] = {"MarketType": "spot", "SpotOptions": options}
        result = await self._call(self._ec2[region], "run_instances",
                                  f"run_instances ({itype} in {region}{', spot' if spot else ''})", **kwargs)
        try:
            instance = result["Instances"][0]
        except (KeyError, IndexError, TypeError):
            raise ProviderError(DISPLAY, "run_instances: AWS EC2 answered with a malformed response") from None
        self._where[instance["InstanceId"]] = region
        return await self._view(region, instance)

    async def _find(self, provider_id: str, what: str) -> tuple[str, dict[str, Any]]:
        """(region, instance) for an id, asking the region it is known in, else all regions."""
        iid, region = parse_instance_id(provider_id)
        if region is not None and region not in self._ec2:
            raise ProviderError(DISPLAY, f"{provider_id} is in {region}, which is not a configured region")
        candidates = [region] if region else ([self._where[iid]] if iid in self._where else list(self.regions))
        outcomes = await asyncio.gather(*(self._describe_one(r, iid, what) for r in candidates),
                                        return_exceptions=True)
        failure: BaseException | None = None
        for r, outcome in zip(candidates, outcomes, strict=True):
            if isinstance(outcome, _Gone):
                continue
            if isinstance(outcome, BaseException):
                failure = failure or outcome
                continue
            self._where[iid] = r
            return r, outcome
        if failure is not None:
            raise failure if isinstance(failure, ProviderError) else self._map(failure, what)
        if region is None and iid in self._where and len(self.regions) > 1:
            self._where.pop(iid, None)      # maybe it was somewhere else after all: ask everywhere
            return await self._find(provider_id, what)
        raise _Gone(iid)

    async def _describe_one(self, region: str, iid: str, what: str) -> dict[str, Any]:
        try:
            result = await self._call(self._ec2[region], "describe_instances", f"{what} in {region}",
                                      InstanceIds=[iid])
        except _NotFoundError:
            raise _Gone(iid) from None
        for reservation in result.get("Reservations") or []:
            for instance in reservation.get("Instances") or []:
                if instance.get("InstanceId") == iid:
                    return instance
        raise _Gone(iid)

    @_typed("get")
    async def get(self, provider_id: str) -> ProviderInstance | None:
        try:
            region, instance = await self._find(provider_id, f"describe_instances {provider_id}")
        except _Gone:
            return None
        return await self._view(region, instance)

    @_typed("list")
    async def list(self) -> list[ProviderInstance]:
        """Every live machine of a GPU type, and every machine carrying our label tag, in the
        configured regions, whoever started it (reconcile must see machines gpuherd lost track
        of). Any region failing fails the list: a partial list would look like machines gone."""
        async def region_list(region: str) -> list[tuple[str, dict[str, Any]]]:
            instances = await self._paged(
                self._ec2[region], "describe_instances",
                lambda page: [i for r in page.get("Reservations") or [] for i in r.get("Instances") or []],
                f"describe_instances in {region}",
                Filters=[{"Name": "instance-state-name", "Values": LIVE_STATES}])
            return [(region, i) for i in instances if _is_ours_or_gpu(i)]

        per_region = await asyncio.gather(*(region_list(r) for r in self.regions))
        found = [pair for pairs in per_region for pair in pairs]
        sizes = await self._volume_sizes(found)
        views = []
        for region, instance in found:
            self._where[instance["InstanceId"]] = region
            views.append(await self._view(region, instance, volume_gb=sizes.get(instance["InstanceId"])))
        return views

    @_typed("start")
    async def start(self, provider_id: str) -> ProviderInstance:
        region, instance = await self._known(provider_id, "start")
        state = (instance.get("State") or {}).get("Name")
        if state in ("shutting-down", "terminated"):
            raise ProviderStateError(DISPLAY, f"cannot start {instance['InstanceId']}: it is {state}")
        result = await self._call(self._ec2[region], "start_instances", f"start_instances {instance['InstanceId']}",
                                  InstanceIds=[instance["InstanceId"]])
        return await self._view(region, _with_state(instance, result.get("StartingInstances")))

    @_typed("stop")
    async def stop(self, provider_id: str) -> ProviderInstance:
        region, instance = await self._known(provider_id, "stop")
        iid = instance["InstanceId"]
        state = (instance.get("State") or {}).get("Name")
        if state in ("shutting-down", "terminated"):
            raise ProviderStateError(DISPLAY, f"cannot stop {iid}: it is {state}")
        try:
            result = await self._call(self._ec2[region], "stop_instances", f"stop_instances {iid}",
                                      InstanceIds=[iid])
        except ProviderStateError as exc:
            if instance.get("InstanceLifecycle") == "spot":
                raise ProviderStateError(
                    DISPLAY, f"cannot stop {iid}: AWS EC2 stops only spot instances of a persistent request "
                             "that stop on interruption; this one can only be destroyed "
                             f"({exc.message.split(': ', 1)[-1][:200]})") from None
            raise
        return await self._view(region, _with_state(instance, result.get("StoppingInstances")))

    @_typed("destroy")
    async def destroy(self, provider_id: str) -> None:
        try:
            region, instance = await self._find(provider_id, f"describe_instances {provider_id}")
        except _Gone:
            return   # already gone: the caller wants it gone, and it is
        iid = instance["InstanceId"]
        if (instance.get("State") or {}).get("Name") == "terminated":
            return
        request_id = instance.get("SpotInstanceRequestId")
        if request_id:
            # a persistent spot request would launch a replacement for the terminated machine
            try:
                await self._call(self._ec2[region], "cancel_spot_instance_requests",
                                 f"cancel_spot_instance_requests {request_id}", SpotInstanceRequestIds=[request_id])
            except ProviderError as exc:
                if "NotFound" not in exc.message:
                    raise
        try:
            await self._call(self._ec2[region], "terminate_instances", f"terminate_instances {iid}",
                             InstanceIds=[iid])
        except _NotFoundError:
            return

    async def _known(self, provider_id: str, action: str) -> tuple[str, dict[str, Any]]:
        try:
            return await self._find(provider_id, f"describe_instances {provider_id}")
        except _Gone:
            raise ProviderStateError(DISPLAY, f"cannot {action} {provider_id}: AWS EC2 has no such instance") from None

    # ------------------------------------------------------------------ views

    def _compute_price(self, region: str, instance_type: str, spot: bool, *,
                       bid: Decimal | None = None) -> Decimal | None:
        """USD/h of compute from what is cached (no call): spot price, else on-demand."""
        if spot:
            cached = self._cache[region].spot if region in self._cache else None
            if cached is not None and instance_type in cached.value:
                price = cached.value[instance_type][0]
                listed = self._list_price(region, instance_type)
                if listed is None or price >= listed[0] * SPOT_FLOOR:
                    return min(price, bid) if bid is not None else price
        listed = self._list_price(region, instance_type)
        if listed is None:
            return bid if spot else None
        return min(listed[0], bid) if (spot and bid is not None) else listed[0]

    async def _volume_sizes(self, found: Sequence[tuple[str, dict[str, Any]]]) -> dict[str, int]:
        """Root volume GB of machines without our disk tag (attached or foreign ones), one call per
        region; unknown sizes are simply left out (best effort, never fails the caller)."""
        wanted: dict[str, dict[str, str]] = {}
        for region, instance in found:
            if _int_tag(_tags(instance), DISK_TAG) is not None:
                continue
            for mapping in instance.get("BlockDeviceMappings") or []:
                volume = (mapping.get("Ebs") or {}).get("VolumeId")
                if volume and mapping.get("DeviceName") == instance.get("RootDeviceName", mapping.get("DeviceName")):
                    wanted.setdefault(region, {})[volume] = instance["InstanceId"]
        sizes: dict[str, int] = {}
        for region, volumes in wanted.items():
            try:
                result = await self._call(self._ec2[region], "describe_volumes", f"describe_volumes in {region}",
                                          VolumeIds=sorted(volumes))
            except ProviderError:
                continue
            for volume in result.get("Volumes") or []:
                owner = volumes.get(volume.get("VolumeId", ""))
                if owner and volume.get("Size"):
                    sizes[owner] = int(volume["Size"])
        return sizes

    async def _view(self, region: str, instance: Mapping[str, Any], *, volume_gb: int | None = None) -> ProviderInstance:
        tags = _tags(instance)
        iid = str(instance["InstanceId"])
        itype = str(instance.get("InstanceType", ""))
        state_name = str((instance.get("State") or {}).get("Name", ""))
        state = _STATES.get(state_name, ProviderState.UNKNOWN)
        spot = instance.get("InstanceLifecycle") == "spot"
        cache = self._cache[region]
        if cache.types is None:
            try:
                await self._gpu_types(region)
            except ProviderError:
                pass     # the machine is still reported, without its GPU facts
        gpu = cache.types.value.get(itype) if cache.types is not None else None
        disk_gb = _int_tag(tags, DISK_TAG) or volume_gb
        if disk_gb is None and state_name not in ("shutting-down", "terminated"):
            disk_gb = (await self._volume_sizes([(region, dict(instance))])).get(iid)
        storage = storage_hourly(self.ebs_gb_month, disk_gb) if disk_gb else Decimal(0)
        try:
            compute: Decimal | None = to_decimal(tags[DPH_TAG])
        except (KeyError, ValueError):
            compute = self._compute_price(region, itype, spot)
        port = _int_tag(tags, PORT_TAG) or DEFAULT_PORT
        ip = instance.get("PublicIpAddress")
        endpoint = f"http://{ip}:{port}" if state is ProviderState.RUNNING and ip else None
        launched = instance.get("LaunchTime")
        reason = (instance.get("StateReason") or {}).get("Message") or instance.get("StateTransitionReason") or ""
        message = f"{state_name}{' (spot)' if spot else ''}" + (f": {reason}" if reason else "")
        if state is ProviderState.STOPPED and storage:
            message += f"; EBS disk of {disk_gb} GB still billed"
        return ProviderInstance(
            provider=NAME, provider_id=iid, label=tags.get(LABEL_TAG) or None, state=state,
            gpu_name=gpu.gpu_name if gpu else "", num_gpus=gpu.num_gpus if gpu else 0,
            # the running rate includes the EBS disk, as offers' dph does: EBS bills all the time
            dph=(compute + storage).quantize(Decimal("0.000001")) if compute is not None else Decimal(0),
            storage_dph=storage, endpoint=endpoint, healthy=None, gpu_util=None,
            started_at=as_utc(launched) if isinstance(launched, datetime) else None,
            message=message[:300], offer_id=offer_id_for(itype, region, spot) if itype else None,
            image=tags.get(IMAGE_TAG) or None, interruptible=spot,
        )

    # ------------------------------------------------------------------ health and cleanup

    async def health(self, instance: ProviderInstance, path: str | None, port: int | None) -> bool:
        """EC2 'running' only means the OS booted: ask the model server itself over HTTP."""
        if instance.state is not ProviderState.RUNNING or not instance.endpoint:
            return False
        base = instance.endpoint
        if port is not None:
            base = re.sub(r":\d+$", f":{int(port)}", base)
        url = base + "/" + (path or "").lstrip("/")
        if self._http is None:
            self._http = httpx.AsyncClient(timeout=httpx.Timeout(self.health_timeout_s), follow_redirects=False)
        try:
            response = await self._http.get(url)
        except httpx.HTTPError:
            return False
        return response.status_code < 400

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.aclose()
            self._http = None
        for client in [*self._ec2.values(), self._pricing]:
            close = getattr(client, "close", None)
            if close is not None:
                close()


class _NotFoundError(ProviderError):
    """InvalidInstanceID.NotFound: callers turn it into None (get) or success (destroy)."""

    code = "provider_not_found"


def _retry_after(meta: Mapping[str, Any]) -> float | None:
    headers = meta.get("HTTPHeaders") or {}
    raw = headers.get("x-amz-retry-after")
    if raw is not None:
        try:
            return max(0.0, int(raw) / 1000.0)
        except ValueError:
            return None
    raw = headers.get("retry-after")
    try:
        return max(0.0, float(raw)) if raw is not None else None
    except ValueError:
        return None


def _with_state(instance: Mapping[str, Any], changes: Any) -> dict[str, Any]:
    """The instance as described before an action, with the state the action reported."""
    updated = dict(instance)
    for change in changes or []:
        if change.get("InstanceId") == instance.get("InstanceId") and change.get("CurrentState"):
            updated["State"] = change["CurrentState"]
    return updated


def _is_ours_or_gpu(instance: Mapping[str, Any]) -> bool:
    if LABEL_TAG in _tags(instance):
        return True
    family = str(instance.get("InstanceType", "")).split(".", 1)[0]
    return family[:1] in ("g", "p")


__all__ = [
    "AwsProvider",
    "GpuType",
    "PriceTable",
    "client_token",
    "gpu_memory_gb",
    "gpu_name_for",
    "gpu_type_from",
    "offer_id_for",
    "parse_ami_setting",
    "parse_instance_id",
    "parse_offer_id",
    "parse_price_list",
    "region_place",
    "user_data",
    "wants_spot",
]
