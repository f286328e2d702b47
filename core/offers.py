"""The provider-neutral offer: what every provider's search is normalised to, so offers from
vast.ai, RunPod, AWS and the sandbox sort together. Memory and disk in GB, prices in USD/hour."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal

from pydantic import BaseModel, ConfigDict, Field

from .money import HOURS_PER_MONTH


class Offer(BaseModel):
    model_config = ConfigDict(frozen=True)

    provider: str
    offer_id: str
    gpu_name: str                     # normalised, e.g. "RTX 4090", "A100 80GB", "H100 SXM"
    num_gpus: int
    gpu_ram: float                    # GB per GPU
    cpu_cores: float = 0
    cpu_ram: float = 0                # GB
    disk_space: float = 0             # GB available
    dph: Decimal                      # USD/hour while running (compute + the default disk)
    storage_cost: Decimal = Decimal(0)  # USD per GB-month, billed while stopped too
    reliability: float = 1.0          # 0..1
    location: str = ""                # "Oregon, US"
    country: str = ""                 # ISO code, "US"
    inet_down: float = 0              # Mb/s
    inet_up: float = 0
    cuda: float = 0                   # max CUDA version
    verified: bool = True
    interruptible: bool = False
    simulated: bool = False
    fetched_at: datetime | None = None
    extra: dict[str, str] = Field(default_factory=dict)

    @property
    def ref(self) -> str:
        """The handle a user types: `offer=<provider>:<id>`."""
        return f"{self.provider}:{self.offer_id}"

    @property
    def gpu_total_ram(self) -> float:
        return self.gpu_ram * self.num_gpus

    @property
    def dph_per_gpu(self) -> Decimal:
        return self.dph / self.num_gpus if self.num_gpus else self.dph

    def storage_rate(self, disk_gb: float) -> Decimal:
        """USD/hour a stopped instance with `disk_gb` of disk keeps costing."""
        return (self.storage_cost * Decimal(str(disk_gb)) / HOURS_PER_MONTH).quantize(Decimal("0.000001"))
