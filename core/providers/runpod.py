"""RunPod: GPU pods on the Secure and Community clouds, on-demand or interruptible (spot).

Which API, and why GraphQL
--------------------------
RunPod has three APIs (shared/reference/runpod_aws_lambda_surf.md §1.1):

* REST v1 (`rest.runpod.io/v1`) was deprecated and is retired since 15 Nov 2026. Not an option.
* REST v2 (`api.runpod.io/v2`) is current, but it cannot create an interruptible pod (its create
  body has no `interruptible`), has no spot price in its catalogue, no bid, and nothing to resume a
  spot pod with a bid.
* GraphQL (`POST {base}/graphql`) is current and is the only API with spot prices
  (`secureSpotPrice`, `communitySpotPrice`, `lowestPrice.minimumBidPrice`), spot create
  (`podRentInterruptable` with `bidPerGpu`) and spot resume (`podBidResume`). It also has
  everything else gpuherd needs: GPU types with prices and stock, on-demand create
  (`podFindAndDeployOnDemand`), list (`myself { pods }`), get (`pod(input: {podId})`), `podStop`,
  `podResume`, `podTerminate`, and the `runtime` block with per-GPU `gpuUtilPercent` and the
  port mappings.

Mixing GraphQL (prices, spot) with v2 (lifecycle) would mean two error dialects, two auth checks
and two shapes of pod for no gain: one generation cannot express a spot pod, the other can
express everything. So this client speaks GraphQL only. The risk is the one the reference notes:
the spot mutations were dropped from RunPod's docs on 2026-05-06 although the API fields were kept
(runpodctl and dstack still use them). If RunPod removes them, only spot breaks, and it breaks
loudly: the server answers HTTP 400 "Cannot query field", which surfaces as a RunPod error.

Transport
---------
All calls go through the shared `ApiClient` (retries, error mapping, key scrubbing). The key is
sent as `Authorization: Bearer` only, never as `?api_key=` (that form puts the key into URLs,
proxies and logs). Values are passed as GraphQL `variables`, never pasted into the document, so
quotes and newlines in a label, an env value or a command cannot break (or inject into) a query,
unlike the official SDK's f-string templates. GraphQL reports most failures as HTTP 200 with
`{"errors": [...]}`; `_classify` maps those: "no longer any instances available" and "not enough
free GPUs on the host machine" -> CapacityError; "not found" -> NotFoundAtProvider (get -> None,
destroy -> success); "Something went wrong" -> ProviderUnavailable (retryable).

Offers (search)
---------------
One offer per GPU type x cloud (SECURE, COMMUNITY) x kind (on-demand, spot) x GPU count. Counts
come from `lowestPrice.availableGpuCounts` where RunPod gives them, else 1, 2, 4, 8 up to
`maxGpuCount`; never more than 8. Skipped: the `"unknown"` pseudo-type, and per cloud: a cloud
whose stock (`lowestPrice`) is null or whose `stockStatus` is null/"None", and a price that is
null or zero. Stock is asked per cloud, as the SDK docs do (`lowestPrice(input: {gpuCount: 1,
secureCloud: true|false})`, two aliases in one query): an unfiltered `lowestPrice` is the best over
both clouds, so a type sold out on the Secure Cloud would otherwise be offered there from the
Community Cloud's stock. `secureCloud: false` is read as the Community Cloud's stock (the docs
show the field, not what false means: an assumption). Counts and the spot floor are per cloud too.

Server-side filtering: none that depends on the query. `search` always asks for every GPU type
with both clouds' prices and stock and leaves every filter to core.query, so what RunPod is asked
can never drop an offer the local query would keep (`search_key` stays ""). The only narrowing
sent is per-cloud stock, which drops exactly the offers create would be refused for.
`tests/test_runpod.py` checks over several queries that `query.apply(search(query))` equals
`query.apply(search())`.

Offer ids encode what create needs and contain no whitespace:
`<gpu type id>.<secure|community>.x<count>[.spot]`, e.g. `NVIDIA_GeForce_RTX_4090.community.x2.spot`.
In the type id a space becomes `_`; `_`, `.`, `%` and any other character that is not an ASCII
letter, digit or `-` are percent-encoded, so the id round-trips exactly (hyphens cannot stand for
spaces: `NVIDIA A100-SXM4-80GB` is a real type id).

Prices: the reference says `securePrice`/`communityPrice`/`*SpotPrice` are USD/h per GPU, so a
count-N offer costs N x the per-GPU price (Decimal, exact). `dph` adds the running price of a
`SEARCH_DISK_GB` volume at $0.10/GB-month (`running_storage_cost`); a stopped pod's volume costs
$0.20/GB-month (`storage_cost`), per RunPod's pricing page (§1.6). The container disk
(`CONTAINER_DISK_GB`, $0.10/GB-month while running, free while stopped) is not in the quote.
A spot offer is priced at its cloud's spot price; create bids exactly that per GPU unless the
request carries `bid_dph`, so the price shown is the price bid.

Create
------
* on-demand: `podFindAndDeployOnDemand(input: PodFindAndDeployOnDemandInput!)`.
* interruptible (the offer is `.spot`, or `request.interruptible`): `podRentInterruptable(input:
  PodRentInterruptableInput!)` with `bidPerGpu` = `bid_dph / count` (rounded down to 1/10000 $,
  so the bid never exceeds the limit), else the cloud's current spot price, else that cloud's
  `lowestPrice.minimumBidPrice`. NO CURRENT OFFICIAL SOURCE: RunPod's docs dropped the spot
  mutations on 2026-05-06 (the API fields were kept), the Python SDK never had a spot create and
  runpodctl's main branch never used it; only third-party code (dstack) does. Kept because it is
  the only way to rent spot; if RunPod drops the field it answers HTTP 400 "Cannot query field",
  which is reported as a refusal naming RunPod, and on-demand creates are unaffected (tested).
* Every create asks for `supportPublicIp: true` and `startSsh: true`, as the official SDK's
  `create_pod` does by default: without a public IP a Community Cloud pod may get no public TCP
  port, so neither SSH nor a TCP endpoint.
* RunPod pods have no label or tag field: the pod `name` is the label, so list can find a machine
  whose database write never happened.
* The request's disk is the pod volume (`volumeInGb`, mounted at /workspace, kept while stopped);
  the container disk is a fixed `CONTAINER_DISK_GB`.
* Ports: the health port first, then the requested ports, each as `N/http` (reached through
  RunPod's HTTPS proxy), then `22/tcp`; sent as RunPod's comma-separated string. Env is a list of
  `{key, value}`.
* `dockerArgs` (RunPod's start command; GraphQL has no entrypoint override): `args` alone are
  passed as the image's arguments; a `command` (a shell line) runs as `bash -c`, preceded by
  `onstart` when there is one. RunPod has no start-script field, so `onstart` without a command is
  not run (logged).
* Creates are sent with `idempotent=False`: a create is retried only when the server certainly did
  not act on it.

Pods (get / list / stop / start / destroy)
------------------------------------------
State: desiredStatus RUNNING with `runtime` null -> LOADING (PROVISIONING in create's own answer,
STARTING in start's), RUNNING with `runtime` -> RUNNING, EXITED with `runtime` still present ->
STOPPING, EXITED -> STOPPED, TERMINATED -> DESTROYED. Beyond the reference (RunPod's PodStatus
enum as seen in the wild): CREATED -> PROVISIONING, RESTARTING -> STARTING, PAUSED -> STOPPED,
DEAD -> ERROR; anything else -> UNKNOWN.

* `dph` is what bills while running: the pod's `costPerHr` plus its volume at $0.10/GB-month;
  `storage_dph` is `volumeInGb` x $0.20 / 730 h (a stopped volume costs double).
* `gpu_util` is the mean `gpuUtilPercent` of `runtime.gpus`.
* `endpoint`: the model port is the first declared port other than 22 (8000 if none). A public
  mapping of it (`isIpPublic`) gives `http://ip:publicPort`; an `http` port otherwise goes
  through the RunPod proxy, `https://{podId}-{port}.proxy.runpod.net`.
* `started_at` is now minus `runtime.uptimeInSeconds`.
* `interruptible` is `podType` "INTERRUPTABLE" (RunPod's spelling) or "BID" (a pod rented by a
  bid): both are spot pods that must resume with `podBidResume`; a BID pod taken for on-demand
  would be resumed with `podResume` and refused. The reference only shows "RESERVED"
  (on-demand); anything else is on-demand.
* The pod's `env` is never requested: it holds the user's tokens.
* start: `podResume(podId, gpuCount)`, or for a spot pod `podBidResume` at its previous bid
  (`costPerHr / gpuCount`); when that is unknown, at the type's higher cloud spot price (a pod
  does not say which cloud it is on, and `minimumBidPrice` is the lower of the two floors).
* destroy: `podTerminate`; a pod that is already gone is success, and any other refusal is checked
  against `get` before it is reported.
* balance: `myself { clientBalance }`. `clientBalance` is not in the reference; it is the field
  RunPod's console reads (an assumption, documented as such).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import re
import shlex
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from decimal import ROUND_DOWN, Decimal
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

import httpx

from ..clock import Clock
from ..errors import AuthError, CapacityError, ProviderError, ProviderUnavailable, RateLimited
from ..money import to_decimal
from ..offers import SEARCH_DISK_GB, Offer, normalise_gpu_name, quote, storage_hourly
from .base import Capabilities, CreateRequest, Provider, ProviderInstance, ProviderState
from .http import ApiClient, NotFoundAtProvider

if TYPE_CHECKING:
    from ..config import Settings
    from ..query import OfferQuery

log = logging.getLogger(__name__)

NAME = "runpod"
DISPLAY = "RunPod"
DEFAULT_URL = "https://api.runpod.io"
GRAPHQL_PATH = "/graphql"

RUNNING_VOLUME_GB_MONTH = Decimal("0.10")   # volume disk while the pod runs (pricing.mdx)
STOPPED_VOLUME_GB_MONTH = Decimal("0.20")   # volume disk while the pod is stopped
CONTAINER_DISK_GB = 20                      # writable container layer; wiped on stop
VOLUME_MOUNT_PATH = "/workspace"
MAX_OFFER_GPUS = 8
DEFAULT_MODEL_PORT = 8000
SSH_PORT = 22
_BID_STEP = Decimal("0.0001")
_CLOUDS = ("SECURE", "COMMUNITY")
_NO_STOCK = {None, "", "none"}
SPOT_POD_TYPES = frozenset({"INTERRUPTABLE", "BID"})   # RunPod's spelling; BID: a pod rented by bid

CAPACITY_MARKERS = ("no longer any instances available", "not enough free gpus")
NOT_FOUND_MARKERS = ("not found", "does not exist", "no pod with")
AUTH_MARKERS = ("unauthorized", "unauthenticated", "api key", "not authorized", "permission denied")

# --- GraphQL documents. Only static field lists are spliced in; every value is a variable. ----------
POD_FIELDS = """
    id name desiredStatus podType costPerHr gpuCount imageName lastStatusChange
    volumeInGb containerDiskInGb ports
    machine { gpuDisplayName location }
    runtime {
      uptimeInSeconds
      ports { ip isIpPublic privatePort publicPort type }
      gpus { id gpuUtilPercent }
    }
"""

STOCK_FIELDS = "{ minimumBidPrice uninterruptablePrice stockStatus availableGpuCounts }"
# stock (and the spot floor) asked per cloud, as the SDK docs' `lowestPrice(input: {gpuCount,
# secureCloud})` does: one unfiltered `lowestPrice` is the best of both clouds, so a type sold out
# on one cloud would still be listed there
GPU_TYPE_FIELDS = """
    id displayName memoryInGb maxGpuCount secureCloud communityCloud
    securePrice communityPrice secureSpotPrice communitySpotPrice
    secureStock: lowestPrice(input: {gpuCount: 1, secureCloud: true}) """ + STOCK_FIELDS + """
    communityStock: lowestPrice(input: {gpuCount: 1, secureCloud: false}) """ + STOCK_FIELDS + """
"""

Q_GPU_TYPES = "query GpuTypes { gpuTypes {" + GPU_TYPE_FIELDS + "} }"
Q_GPU_TYPE = "query GpuType($id: String!) { gpuTypes(input: {id: $id}) {" + GPU_TYPE_FIELDS + "} }"
Q_PODS = "query Pods { myself { pods {" + POD_FIELDS + "} } }"
Q_POD = "query Pod($podId: String!) { pod(input: {podId: $podId}) {" + POD_FIELDS + "} }"
Q_BALANCE = "query Balance { myself { clientBalance } }"
M_DEPLOY = ("mutation Deploy($input: PodFindAndDeployOnDemandInput!) { "
            "podFindAndDeployOnDemand(input: $input) {" + POD_FIELDS + "} }")
# No current official source (see the module docstring): kept for spot, tested for the 400 RunPod
# answers if it drops the field.
M_RENT_SPOT = ("mutation RentSpot($input: PodRentInterruptableInput!) { "
               "podRentInterruptable(input: $input) {" + POD_FIELDS + "} }")
M_STOP = "mutation Stop($podId: String!) { podStop(input: {podId: $podId}) {" + POD_FIELDS + "} }"
M_RESUME = ("mutation Resume($podId: String!, $gpuCount: Int!) { "
            "podResume(input: {podId: $podId, gpuCount: $gpuCount}) {" + POD_FIELDS + "} }")
M_BID_RESUME = ("mutation BidResume($podId: String!, $bidPerGpu: Float!, $gpuCount: Int!) { "
                "podBidResume(input: {podId: $podId, bidPerGpu: $bidPerGpu, gpuCount: $gpuCount}) {"
                + POD_FIELDS + "} }")
M_TERMINATE = "mutation Terminate($podId: String!) { podTerminate(input: {podId: $podId}) }"

_STATUS = {
    "EXITED": ProviderState.STOPPED,
    "TERMINATED": ProviderState.DESTROYED,
    "CREATED": ProviderState.PROVISIONING,
    "RESTARTING": ProviderState.STARTING,
    "PAUSED": ProviderState.STOPPED,
    "DEAD": ProviderState.ERROR,
}


# --- offer ids ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class OfferKey:
    """What an offer id says: everything create needs."""

    gpu_type_id: str
    cloud: str          # SECURE | COMMUNITY
    count: int
    spot: bool

    @property
    def offer_id(self) -> str:
        suffix = ".spot" if self.spot else ""
        return f"{encode_type_id(self.gpu_type_id)}.{self.cloud.lower()}.x{self.count}{suffix}"

    def describe(self) -> str:
        kind = "spot" if self.spot else "on-demand"
        return f"{self.count}x {self.gpu_type_id} ({self.cloud.lower()} cloud, {kind})"


def encode_type_id(type_id: str) -> str:
    out = []
    for ch in type_id:
        if ch == " ":
            out.append("_")
        elif ch.isascii() and (ch.isalnum() or ch == "-"):
            out.append(ch)
        else:
            out.extend(f"%{b:02X}" for b in ch.encode("utf-8"))
    return "".join(out)


def decode_type_id(encoded: str) -> str | None:
    decoded = unquote(encoded.replace("_", " "), errors="strict") if encoded else ""
    # only the canonical spelling is accepted, so one pod type has exactly one offer id
    return decoded if decoded and encode_type_id(decoded) == encoded else None


_COUNT = re.compile(r"x([1-9][0-9]?)")


def parse_offer_id(offer_id: str) -> OfferKey | None:
    parts = offer_id.split(".")
    spot = len(parts) == 4 and parts[3] == "spot"
    if spot:
        parts = parts[:3]
    if len(parts) != 3:
        return None
    encoded, cloud, count = parts
    match = _COUNT.fullmatch(count)
    if cloud.upper() not in _CLOUDS or cloud != cloud.lower() or match is None:
        return None
    try:
        type_id = decode_type_id(encoded)
    except UnicodeDecodeError:
        return None
    if type_id is None:
        return None
    return OfferKey(type_id, cloud.upper(), int(match.group(1)), spot)


# --- the provider --------------------------------------------------------------------------------
class RunPodProvider(Provider):
    name = NAME
    display_name = DISPLAY
    capabilities = Capabilities(
        reports_gpu_utilisation=True,
        storage_bills_while_stopped=True,
        retries_internally=True,
    )

    def __init__(self, api_key: str, *, base_url: str = DEFAULT_URL, timeout_s: float = 30.0,
                 attempts: int = 3, backoff_s: float = 0.15,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep, clock: Clock | None = None,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        if not api_key or not api_key.strip():
            raise ValueError("RunPod needs an API key")
        self.clock = clock or Clock()
        self.base_url = base_url.rstrip("/")
        self._api = ApiClient(provider=NAME, display=DISPLAY, base_url=self.base_url,
                              headers={"Authorization": f"Bearer {api_key.strip()}",
                                       "Accept": "application/json", "User-Agent": "gpuherd"},
                              secrets=[api_key, api_key.strip()], timeout_s=timeout_s,
                              attempts=attempts, backoff_s=backoff_s, sleep=sleep, transport=transport)

    @classmethod
    def from_settings(cls, settings: Settings, **kwargs: Any) -> RunPodProvider | None:
        """None when no RUNPOD_API_KEY is configured; RUNPOD_API_BASE_URL moves the endpoint."""
        key = settings.runpod_api_key.get_secret_value() if settings.runpod_api_key else ""
        if not key.strip():
            return None
        return cls(key, base_url=settings.runpod_url, **kwargs)

    async def aclose(self) -> None:
        await self._api.aclose()

    # --- GraphQL -----------------------------------------------------------------------------
    async def _gql(self, document: str, variables: dict[str, Any] | None = None, *, what: str,
                   idempotent: bool = True) -> dict[str, Any]:
        body: dict[str, Any] = {"query": document}
        if variables:
            body["variables"] = variables
        answer = await self._api.request("POST", GRAPHQL_PATH, json_body=body, idempotent=idempotent,
                                         what=what, classify=functools.partial(self._classify, what))
        data = answer.get("data") if isinstance(answer, dict) else None
        if not isinstance(data, dict):
            raise ProviderError(DISPLAY, f"{what}: {DISPLAY} answered with malformed JSON (no GraphQL data)")
        return data

    def _classify(self, what: str, response: httpx.Response, body: Any) -> ProviderError | None:
        """GraphQL errors arrive as HTTP 200 with an `errors` list; other statuses keep the
        shared mapping (401/403 auth, 429, 5xx, 400 validation)."""
        if response.status_code != 200 or not isinstance(body, dict):
            return None
        errors = body.get("errors")
        if not errors:
            return None
        first = errors[0] if isinstance(errors, list) and errors else {}
        raw = first.get("message") if isinstance(first, dict) else None
        text = self._api.scrub(str(raw or "unspecified GraphQL error")).strip()[:300]
        low = text.lower()
        if any(marker in low for marker in CAPACITY_MARKERS):
            hint = ("A stopped pod can only resume on its own host. Wait and try again, or destroy it "
                    "and boot a new one (the volume is lost)." if "free gpus" in low else
                    "Pick another offer or try again later.")
            return CapacityError(DISPLAY, f"{what}: no capacity: {text}", hint=hint)
        if any(marker in low for marker in AUTH_MARKERS):   # before "not found": "API key not found"
            return AuthError(DISPLAY, f"the API key was refused ({what}: {text}). Check the key gpuherd "
                                      "is configured with.")
        if any(marker in low for marker in NOT_FOUND_MARKERS):
            return NotFoundAtProvider(DISPLAY, f"{what}: not found: {text}")
        if "rate limit" in low or "too many requests" in low:
            return RateLimited(DISPLAY, f"{what}: too many requests: {text}")
        if "something went wrong" in low:
            return ProviderUnavailable(DISPLAY, f"{what} failed: {text}")
        return ProviderError(DISPLAY, f"{what} refused: {text}")

    # --- offers ------------------------------------------------------------------------------
    async def search(self, query: OfferQuery | None = None) -> list[Offer]:
        data = await self._gql(Q_GPU_TYPES, what="search GPU types")
        return self._offers(data.get("gpuTypes"))

    async def get_offer(self, offer_id: str) -> Offer | None:
        key = parse_offer_id(offer_id)
        if key is None:
            return None
        data = await self._gql(Q_GPU_TYPE, {"id": key.gpu_type_id}, what=f"look up GPU type {key.gpu_type_id}")
        return next((o for o in self._offers(data.get("gpuTypes")) if o.offer_id == offer_id), None)

    def _offers(self, gpu_types: Any) -> list[Offer]:
        if not isinstance(gpu_types, list):
            raise ProviderError(DISPLAY, f"{DISPLAY} answered with malformed JSON (gpuTypes is not a list)")
        now = self.clock.now()
        offers: list[Offer] = []
        for gpu in gpu_types:
            if not isinstance(gpu, dict):
                continue
            type_id = str(gpu.get("id") or "").strip()
            if not type_id or type_id.lower() == "unknown":
                continue
            memory = _number(gpu.get("memoryInGb"))
            if not memory:
                continue
            gpu_name = normalise_gpu_name(str(gpu.get("displayName") or type_id), memory)
            for cloud in _CLOUDS:
                prefix = cloud.lower()
                if gpu.get(f"{prefix}Cloud") is False:
                    continue
                lowest = gpu.get(f"{prefix}Stock")
                if not isinstance(lowest, dict):
                    continue          # null: nothing on this cloud
                stock = lowest.get("stockStatus")
                if (str(stock).strip().lower() if stock is not None else None) in _NO_STOCK:
                    continue
                minimum_bid = _price(lowest.get("minimumBidPrice"))
                kinds = ((False, _price(gpu.get(f"{prefix}Price"))),
                         (True, _price(gpu.get(f"{prefix}SpotPrice"))))
                for spot, per_gpu in kinds:
                    if per_gpu is None:
                        continue
                    for count in _gpu_counts(gpu, lowest):
                        key = OfferKey(type_id, cloud, count, spot)
                        extra = {"gpu_type_id": type_id, "cloud": cloud, "stock": str(stock),
                                 "price_per_gpu": str(per_gpu)}
                        if spot and minimum_bid is not None:
                            extra["minimum_bid"] = str(minimum_bid)
                        offers.append(Offer(
                            provider=NAME, offer_id=key.offer_id, gpu_name=gpu_name, num_gpus=count,
                            gpu_ram=memory,
                            dph=quote(per_gpu * count, RUNNING_VOLUME_GB_MONTH, SEARCH_DISK_GB),
                            storage_cost=STOPPED_VOLUME_GB_MONTH,
                            running_storage_cost=RUNNING_VOLUME_GB_MONTH,
                            verified=True, interruptible=spot, fetched_at=now, extra=extra))
        return offers

    # --- create ------------------------------------------------------------------------------
    async def create(self, request: CreateRequest) -> ProviderInstance:
        key = parse_offer_id(request.offer_id)
        if key is None:
            raise ProviderError(DISPLAY, f"'{request.offer_id}' is not a RunPod offer id "
                                         "(expected e.g. NVIDIA_GeForce_RTX_4090.secure.x1)")
        if request.disk_gb <= 0:
            raise ProviderError(DISPLAY, f"a disk of {request.disk_gb:g} GB is not possible")
        spot = key.spot or request.interruptible
        fields: dict[str, Any] = {
            "cloudType": key.cloud,
            "gpuTypeId": key.gpu_type_id,
            "gpuCount": key.count,
            "name": request.label,
            "imageName": request.image,
            "volumeInGb": math.ceil(request.disk_gb),
            "containerDiskInGb": CONTAINER_DISK_GB,
            "volumeMountPath": VOLUME_MOUNT_PATH,
            "ports": ",".join(_port_specs(request)),
            "env": [{"key": k, "value": v} for k, v in request.env.items()],
            # as the official SDK's create_pod always asks: without a public IP a Community Cloud
            # pod may get no public TCP port (no SSH), and sshd is started by RunPod's image hook
            "supportPublicIp": True,
            "startSsh": True,
        }
        docker_args = _docker_args(request)
        if docker_args:
            fields["dockerArgs"] = docker_args
        elif request.onstart:
            log.info("RunPod: %s has an onstart script but no command; RunPod has no start-script field, "
                     "so it is not run", request.label)
        spot_key = OfferKey(key.gpu_type_id, key.cloud, key.count, True)
        what = f"create {spot_key.describe() if spot else key.describe()}"
        if spot:
            fields["bidPerGpu"] = float(await self._bid_per_gpu(key, request.bid_dph))
            document, root = M_RENT_SPOT, "podRentInterruptable"
        else:
            document, root = M_DEPLOY, "podFindAndDeployOnDemand"
        data = await self._gql(document, {"input": fields}, what=what, idempotent=False)
        pod = data.get(root)
        if not isinstance(pod, dict) or not pod.get("id"):
            raise CapacityError(DISPLAY, f"{what}: RunPod returned no pod", hint="Pick another offer.")
        instance = self._instance(pod, fresh=ProviderState.PROVISIONING)
        return instance.model_copy(update={"offer_id": request.offer_id,
                                           "label": instance.label or request.label})

    async def _bid_per_gpu(self, key: OfferKey, bid_dph: Decimal | None) -> Decimal:
        if bid_dph is not None:
            bid = (Decimal(bid_dph) / key.count).quantize(_BID_STEP, rounding=ROUND_DOWN)
            if bid <= 0:
                raise ProviderError(DISPLAY, f"a bid of ${bid_dph}/h is too low for {key.count} GPU(s)")
            return bid
        data = await self._gql(Q_GPU_TYPE, {"id": key.gpu_type_id},
                               what=f"look up the spot price of {key.gpu_type_id}")
        for gpu in data.get("gpuTypes") or []:
            if isinstance(gpu, dict) and gpu.get("id") == key.gpu_type_id:
                price = _price(gpu.get(f"{key.cloud.lower()}SpotPrice"))
                lowest = _dict(gpu.get(f"{key.cloud.lower()}Stock"))
                price = price or _price(lowest.get("minimumBidPrice"))
                if price is not None:
                    return price
        raise CapacityError(DISPLAY, f"no spot price for {key.gpu_type_id} on the {key.cloud.lower()} cloud",
                            hint="Pick an on-demand offer or give a bid.")

    # --- pods --------------------------------------------------------------------------------
    async def get(self, provider_id: str) -> ProviderInstance | None:
        try:
            data = await self._gql(Q_POD, {"podId": provider_id}, what=f"get pod {provider_id}")
        except NotFoundAtProvider:
            return None
        pod = data.get("pod")
        return self._instance(pod) if isinstance(pod, dict) and pod.get("id") else None

    async def list(self) -> list[ProviderInstance]:
        data = await self._gql(Q_PODS, what="list pods")
        myself = data.get("myself")
        pods = myself.get("pods") if isinstance(myself, dict) else None
        if pods is None:
            return []
        if not isinstance(pods, list):
            raise ProviderError(DISPLAY, f"list pods: {DISPLAY} answered with malformed JSON (pods is not a list)")
        return [self._instance(p) for p in pods if isinstance(p, dict) and p.get("id")]

    async def stop(self, provider_id: str) -> ProviderInstance:
        data = await self._gql(M_STOP, {"podId": provider_id}, what=f"stop pod {provider_id}")
        pod = data.get("podStop")
        if not isinstance(pod, dict) or not pod.get("id"):
            raise NotFoundAtProvider(DISPLAY, f"stop pod {provider_id}: no such pod")
        return self._instance(pod)

    async def start(self, provider_id: str) -> ProviderInstance:
        current = await self.get(provider_id)
        if current is None:
            raise NotFoundAtProvider(DISPLAY, f"start pod {provider_id}: no such pod")
        count = max(1, current.num_gpus)
        what = f"start pod {provider_id}"
        if current.interruptible:
            bid = await self._resume_bid(current, count)
            data = await self._gql(M_BID_RESUME, {"podId": provider_id, "bidPerGpu": float(bid),
                                                  "gpuCount": count}, what=what, idempotent=False)
            pod = data.get("podBidResume")
        else:
            data = await self._gql(M_RESUME, {"podId": provider_id, "gpuCount": count}, what=what,
                                   idempotent=False)
            pod = data.get("podResume")
        if not isinstance(pod, dict) or not pod.get("id"):
            raise NotFoundAtProvider(DISPLAY, f"{what}: no such pod")
        return self._instance(pod, fresh=ProviderState.STARTING)

    async def _resume_bid(self, pod: ProviderInstance, count: int) -> Decimal:
        """A spot pod resumes at its previous bid. When RunPod no longer shows it (cost 0 while
        stopped), at its GPU type's current spot price: the higher of the two clouds', because a
        GraphQL pod does not say which cloud it is on and `minimumBidPrice` is the lowest floor of
        both (bidding it could fall below a Secure Cloud floor)."""
        if pod.dph > 0:
            return (pod.dph / count).quantize(_BID_STEP, rounding=ROUND_DOWN)
        data = await self._gql(Q_GPU_TYPES, what=f"look up the spot price for pod {pod.provider_id}")
        for gpu in data.get("gpuTypes") or []:
            if not isinstance(gpu, dict):
                continue
            names = {normalise_gpu_name(str(gpu.get(k) or "")) for k in ("displayName", "id")}
            if pod.gpu_name not in names:
                continue
            floors = [_price(_dict(gpu.get(f"{c.lower()}Stock")).get("minimumBidPrice")) for c in _CLOUDS]
            prices = [p for p in (_price(gpu.get("secureSpotPrice")), _price(gpu.get("communitySpotPrice")),
                                  *floors) if p is not None]
            if prices:
                return max(prices)
        raise CapacityError(DISPLAY, f"start pod {pod.provider_id}: no spot price for {pod.gpu_name}")

    async def destroy(self, provider_id: str) -> None:
        try:
            await self._gql(M_TERMINATE, {"podId": provider_id}, what=f"destroy pod {provider_id}")
        except NotFoundAtProvider:
            return
        except ProviderError as refused:
            if refused.retryable:
                raise
            # some refusals only mean the pod is gone already; believe it only when get agrees
            try:
                gone = await self.get(provider_id)
            except ProviderError:
                raise refused from None
            if gone is None or gone.state is ProviderState.DESTROYED:
                return
            raise

    async def balance(self) -> Decimal | None:
        data = await self._gql(Q_BALANCE, what="read the balance")
        myself = data.get("myself")
        value = myself.get("clientBalance") if isinstance(myself, dict) else None
        return to_decimal(value) if value is not None else None

    # --- normalising a pod -------------------------------------------------------------------
    def _instance(self, pod: dict[str, Any], fresh: ProviderState | None = None) -> ProviderInstance:
        status = str(pod.get("desiredStatus") or "").upper()
        runtime = pod.get("runtime") if isinstance(pod.get("runtime"), dict) else None
        if status == "RUNNING":
            state = ProviderState.RUNNING if runtime else (fresh or ProviderState.LOADING)
        elif status == "EXITED" and runtime:
            state = ProviderState.STOPPING
        else:
            state = _STATUS.get(status, ProviderState.UNKNOWN)
        machine = _dict(pod.get("machine"))
        gpu_label = str(machine.get("gpuDisplayName") or "")
        volume = _number(pod.get("volumeInGb")) or 0.0
        started_at = None
        endpoint = None
        gpu_util = None
        if runtime is not None:
            uptime = _number(runtime.get("uptimeInSeconds"))
            if uptime is not None:
                started_at = self.clock.now() - timedelta(seconds=uptime)
            if state is ProviderState.RUNNING:
                endpoint = _endpoint(str(pod["id"]), pod.get("ports"), runtime.get("ports"))
            utils = [_number(g.get("gpuUtilPercent")) for g in runtime.get("gpus") or [] if isinstance(g, dict)]
            known = [u for u in utils if u is not None]
            gpu_util = sum(known) / len(known) if known else None
        message = pod.get("lastStatusChange") or None
        return ProviderInstance(
            provider=NAME,
            provider_id=str(pod["id"]),
            label=pod.get("name") or None,
            state=state,
            gpu_name=normalise_gpu_name(gpu_label) if gpu_label else "",
            num_gpus=int(_number(pod.get("gpuCount")) or 0),
            # what bills while running: the pod's rate plus its volume (billed separately by RunPod)
            dph=((_price(pod.get("costPerHr")) or Decimal(0)) + storage_hourly(RUNNING_VOLUME_GB_MONTH, volume)
                 if state is not ProviderState.STOPPED else (_price(pod.get("costPerHr")) or Decimal(0))),
            storage_dph=storage_hourly(STOPPED_VOLUME_GB_MONTH, volume),
            endpoint=endpoint,
            gpu_util=gpu_util,
            started_at=started_at,
            message=self._api.scrub(str(message)) if message else None,
            image=pod.get("imageName") or None,
            interruptible=str(pod.get("podType") or "").upper() in SPOT_POD_TYPES,
        )


# --- helpers -------------------------------------------------------------------------------------
def _dict(value: Any) -> dict[str, Any]:
    """`value` when the API sent an object there, else an empty one."""
    return value if isinstance(value, dict) else {}


def _number(value: Any) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _price(value: Any) -> Decimal | None:
    """A positive USD amount from RunPod's float (or string), exact as written; else None."""
    if value is None or isinstance(value, bool):
        return None
    try:
        amount = to_decimal(value)
    except ValueError:
        return None
    return amount if amount > 0 else None


def _gpu_counts(gpu: dict[str, Any], lowest: dict[str, Any]) -> list[int]:
    available = lowest.get("availableGpuCounts")
    if isinstance(available, list) and available:
        counts = {int(c) for c in available if isinstance(c, int) and not isinstance(c, bool)}
    else:
        most = int(_number(gpu.get("maxGpuCount")) or 1)
        counts = {c for c in (1, 2, 4, 8) if c <= most} or {1}
    return sorted(c for c in counts if 1 <= c <= MAX_OFFER_GPUS)


def _port_specs(request: CreateRequest) -> list[str]:
    ports: list[int] = []
    for port in ([request.health_port] if request.health_port else []) + list(request.ports):
        if port and port != SSH_PORT and port not in ports:
            ports.append(port)
    return [f"{p}/http" for p in ports] + [f"{SSH_PORT}/tcp"]


def _docker_args(request: CreateRequest) -> str:
    if request.command:
        script = f"{request.onstart}\n{request.command}" if request.onstart else request.command
        return shlex.join(["bash", "-c", script])
    return shlex.join(request.args) if request.args else ""


def _declared_ports(ports: Any) -> list[tuple[int, str]]:
    items = ports.split(",") if isinstance(ports, str) else ports if isinstance(ports, list) else []
    declared = []
    for item in items:
        number, _, kind = str(item).strip().partition("/")
        if number.strip().isdigit():
            declared.append((int(number), kind.strip().lower() or "http"))
    return declared


def _endpoint(pod_id: str, declared: Any, runtime_ports: Any) -> str | None:
    """Where the model server answers: a public mapping of the model port, or RunPod's HTTPS
    proxy for an http port (`https://{podId}-{port}.proxy.runpod.net`)."""
    ports = [p for p, _ in _declared_ports(declared) if p != SSH_PORT]
    model_port = ports[0] if ports else DEFAULT_MODEL_PORT
    mappings = [m for m in runtime_ports or [] if isinstance(m, dict) and m.get("privatePort") == model_port]
    for mapping in mappings:
        if mapping.get("isIpPublic") and mapping.get("ip") and mapping.get("publicPort"):
            return f"http://{mapping['ip']}:{mapping['publicPort']}"
    if any(str(m.get("type") or "").lower() == "http" for m in mappings):
        return f"https://{pod_id}-{model_port}.proxy.runpod.net"
    return None
