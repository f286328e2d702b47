"""The one interface every provider implements. The service never knows which cloud it talks to;
what differs between clouds is declared in `Capabilities`, not discovered by isinstance checks."""

from __future__ import annotations

import abc
import enum
from datetime import datetime
from decimal import Decimal
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field

from ..offers import Offer

if TYPE_CHECKING:
    from ..query import OfferQuery

HEALTH_TIMEOUT_S = 5.0


class ProviderState(str, enum.Enum):
    """gpuherd's states; each provider maps its own onto these."""

    PROVISIONING = "provisioning"   # accepted, machine being allocated
    LOADING = "loading"             # image pulling / booting
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"
    STARTING = "starting"
    DESTROYED = "destroyed"
    ERROR = "error"
    UNKNOWN = "unknown"


class Capabilities(BaseModel):
    model_config = ConfigDict(frozen=True)

    can_search: bool = True
    can_create: bool = True
    can_stop: bool = True
    can_start: bool = True
    can_destroy: bool = True              # SURF workspaces are deleted in the portal, not by gpuherd
    can_list: bool = True
    reports_gpu_utilisation: bool = False
    storage_bills_while_stopped: bool = True
    reports_actual_billing: bool = False
    simulated: bool = False
    retries_internally: bool = False      # the client already retries as its official SDK does


class CreateRequest(BaseModel):
    """Everything needed to start a machine from an offer. `label` is our idempotency key: the
    provider stores it so reconcile can find a machine whose database write never happened."""

    offer_id: str
    label: str
    image: str
    command: str | None = None
    args: list[str] = Field(default_factory=list)
    env: dict[str, str] = Field(default_factory=dict)
    ports: list[int] = Field(default_factory=list)
    disk_gb: float = 20
    interruptible: bool = False           # spot/bid rental where the offer allows it
    bid_dph: Decimal | None = None        # max USD/h for an interruptible rental
    onstart: str | None = None
    health_path: str | None = None
    health_port: int | None = None


class ProviderInstance(BaseModel):
    provider: str
    provider_id: str
    label: str | None = None
    state: ProviderState
    gpu_name: str = ""
    num_gpus: int = 0
    dph: Decimal = Decimal(0)             # USD/hour while running: compute and its disk
    storage_dph: Decimal = Decimal(0)     # USD/hour while stopped (the disk alone)
    endpoint: str | None = None           # base URL of the model server, once known
    healthy: bool | None = None           # provider-side health when it reports one
    gpu_util: float | None = None         # 0..100 where reported
    started_at: datetime | None = None
    message: str | None = None            # provider's status text
    offer_id: str | None = None           # what it was rented from, where the provider says
    image: str | None = None
    interruptible: bool = False


class Provider(abc.ABC):
    """One cloud. Methods are async: real providers speak HTTP (httpx) or run boto3 in a thread."""

    name: str = "provider"
    display_name: str = "Provider"
    capabilities: Capabilities = Capabilities()

    @abc.abstractmethod
    async def search(self, query: OfferQuery | None = None) -> list[Offer]:
        """Current offers. Filtering happens in core.query over the normalised list; providers
        whose API can filter server-side may use `query` to narrow first, but must never drop an
        offer the query matches."""

    def search_key(self, query: OfferQuery | None) -> str:
        """What makes two searches differ at this provider, for the offer cache. A provider that
        filters server-side returns what it would send; one that always lists everything, ''."""
        return ""

    async def get_offer(self, offer_id: str) -> Offer | None:
        for offer in await self.search():
            if offer.offer_id == offer_id:
                return offer
        return None

    @abc.abstractmethod
    async def create(self, request: CreateRequest) -> ProviderInstance: ...

    @abc.abstractmethod
    async def get(self, provider_id: str) -> ProviderInstance | None:
        """None when the provider no longer knows the machine."""

    @abc.abstractmethod
    async def list(self) -> list[ProviderInstance]: ...

    @abc.abstractmethod
    async def start(self, provider_id: str) -> ProviderInstance: ...

    @abc.abstractmethod
    async def stop(self, provider_id: str) -> ProviderInstance: ...

    @abc.abstractmethod
    async def destroy(self, provider_id: str) -> None: ...

    async def health(self, instance: ProviderInstance, path: str | None, port: int | None) -> bool:
        """Whether the model server answers. A provider's "running" only means the container
        started; a vLLM server then loads its model for minutes. So where the machine has an
        endpoint and the template a health path, ask the server itself."""
        if instance.healthy is not None:
            return instance.healthy
        if instance.state is not ProviderState.RUNNING:
            return False
        if not instance.endpoint or not path:
            return True  # nothing to ask: running is all we can know
        url = instance.endpoint.rstrip("/") + "/" + path.lstrip("/")
        import httpx  # here, not at the top: a start that never probes health does not load it

        try:
            async with httpx.AsyncClient(timeout=httpx.Timeout(HEALTH_TIMEOUT_S), follow_redirects=True) as http:
                response = await http.get(url)
        except httpx.HTTPError:
            return False
        return response.status_code < 400

    async def balance(self) -> Decimal | None:
        """Account credit in USD where the provider reports one."""
        return None

    async def aclose(self) -> None:
        """Release connections."""
