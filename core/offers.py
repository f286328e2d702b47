"""The provider-neutral offer: what every provider's search is normalised to, so offers from
vast.ai, RunPod, AWS and the sandbox sort together. Memory and disk in GB, prices in USD/hour.

Prices are compared *including storage*: a marketplace that charges $0.30/h plus $0.20/GB-month of
disk is not cheaper than a cloud at $0.31/h with disk included. Every provider therefore quotes
`dph` as compute plus the storage of a `SEARCH_DISK_GB` disk, and says what a GB costs per month so
a boot can re-price at its template's disk size."""

from __future__ import annotations

import re
from datetime import datetime
from decimal import Decimal

from pydantic import BaseModel, ConfigDict, Field

from .money import HOURS_PER_MONTH

SEARCH_DISK_GB = 50          # the disk every search price includes (the smallest built-in template's)
_MICRO = Decimal("0.000001")


def storage_hourly(gb_month: Decimal, disk_gb: float) -> Decimal:
    """USD/hour for `disk_gb` of disk at `gb_month` USD per GB-month."""
    return (gb_month * Decimal(str(disk_gb)) / HOURS_PER_MONTH).quantize(_MICRO)


def quote(compute_dph: Decimal, running_gb_month: Decimal, disk_gb: float = SEARCH_DISK_GB) -> Decimal:
    """The comparable hourly price: compute plus the disk while running, exact to the micro-dollar."""
    return (compute_dph + storage_hourly(running_gb_month, disk_gb)).quantize(_MICRO)


class Offer(BaseModel):
    model_config = ConfigDict(frozen=True)

    provider: str
    offer_id: str
    gpu_name: str                     # normalised, e.g. "RTX 4090", "A100 80GB", "H100 SXM"
    num_gpus: int
    gpu_ram: float                    # GB per GPU
    cpu_cores: float = 0
    cpu_ram: float = 0                # GB
    disk_space: float = 0             # GB: the largest disk a machine from this offer can have; 0: not stated
    dph: Decimal                      # USD/hour while running: compute + SEARCH_DISK_GB of disk
    storage_cost: Decimal = Decimal(0)  # USD per GB-month while stopped
    running_storage_cost: Decimal | None = None  # USD per GB-month while running; None = storage_cost
    reliability: float = 1.0          # 0..1
    location: str = ""                # "Oregon, US"
    country: str = ""                 # ISO code, "US"
    inet_down: float = 0              # Mb/s
    inet_up: float = 0
    cuda: float = 0                   # max CUDA version
    verified: bool = True
    interruptible: bool = False
    simulated: bool = False
    fetched_at: datetime | None = None  # when gpuherd asked the provider
    priced_at: datetime | None = None   # when the price itself was set, if older (cached price list)
    price_source: str = ""              # where a price not read live came from ("price table of 2026-11-01")
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

    @property
    def price_time(self) -> datetime | None:
        """How old the price is: the older of the fetch and the price list it came from."""
        if self.priced_at and self.fetched_at:
            return min(self.priced_at, self.fetched_at)
        return self.priced_at or self.fetched_at

    def storage_rate(self, disk_gb: float) -> Decimal:
        """USD/hour a stopped instance with `disk_gb` of disk keeps costing."""
        return storage_hourly(self.storage_cost, disk_gb)

    def dph_for(self, disk_gb: float) -> Decimal:
        """The running price re-quoted for a disk of `disk_gb` instead of SEARCH_DISK_GB."""
        per_gb = self.storage_cost if self.running_storage_cost is None else self.running_storage_cost
        return (self.dph + storage_hourly(per_gb, disk_gb) - storage_hourly(per_gb, SEARCH_DISK_GB)).quantize(_MICRO)


# --- GPU model names -------------------------------------------------------------------------
# Providers spell one GPU many ways ("NVIDIA GeForce RTX 4090", "RTX 4090", "rtx4090", AWS's
# "A10G"); search and templates compare the normalised form.
_CANONICAL: dict[str, str] = {
    "rtx4090": "RTX 4090", "rtx3090": "RTX 3090", "rtx3090ti": "RTX 3090 Ti", "rtx4080": "RTX 4080",
    "rtx4080super": "RTX 4080 SUPER", "rtx4070ti": "RTX 4070 Ti", "rtx5090": "RTX 5090",
    "rtx5080": "RTX 5080", "rtxa6000": "RTX A6000", "rtxa5000": "RTX A5000", "rtxa4000": "RTX A4000",
    "rtxa4500": "RTX A4500", "rtx6000ada": "RTX 6000 Ada", "rtx2000ada": "RTX 2000 Ada",
    "rtx4000ada": "RTX 4000 Ada", "rtx5000ada": "RTX 5000 Ada", "a6000": "RTX A6000", "a5000": "RTX A5000",
    "a4000": "RTX A4000", "a40": "A40", "a10": "A10", "a10g": "A10G", "a16": "A16", "l4": "L4", "l40": "L40",
    "l40s": "L40S", "t4": "T4", "v100": "V100", "v10016gb": "V100", "v10032gb": "V100 32GB",
    "a100": "A100 40GB", "a10040gb": "A100 40GB", "a100pcie": "A100 40GB", "a100sxm4": "A100 40GB",
    "a10080gb": "A100 80GB", "a10080gbpcie": "A100 80GB", "a100sxm480gb": "A100 80GB", "a100sxm": "A100 80GB",
    "a10080gbsxm": "A100 80GB", "a100x": "A100 80GB", "a800": "A800",
    "h100": "H100 SXM", "h100sxm": "H100 SXM", "h100sxm5": "H100 SXM", "h10080gbhbm3": "H100 SXM",
    "h100pcie": "H100 PCIE", "h100nvl": "H100 NVL", "h200": "H200", "h200nvl": "H200 NVL", "h200sxm": "H200",
    "b200": "B200", "b300": "B300", "gh200": "GH200", "mi300x": "MI300X", "mi250x": "MI250X",
}
_VENDOR = re.compile(r"\b(nvidia|geforce|amd|instinct|tesla|radeon)\b", re.I)


def gpu_key(name: str) -> str:
    """Lower-case letters and digits only, vendor words dropped: the comparison key of a name."""
    return re.sub(r"[^a-z0-9]", "", _VENDOR.sub("", name).lower())


_BY_MEMORY = {"A100 40GB": ("A100 40GB", "A100 80GB"), "A100 80GB": ("A100 40GB", "A100 80GB"),
              "V100": ("V100", "V100 32GB"), "V100 32GB": ("V100", "V100 32GB")}


def normalise_gpu_name(name: str, gpu_ram_gb: float | None = None) -> str:
    """'NVIDIA GeForce RTX 4090' -> 'RTX 4090'; unknown names are kept, tidied. Where one name
    covers two memory sizes ("A100 SXM4" is 40 or 80 GB), the memory decides when it is known."""
    key = gpu_key(name)
    if key in _CANONICAL:
        canonical = _CANONICAL[key]
        if gpu_ram_gb and canonical in _BY_MEMORY:
            small, large = _BY_MEMORY[canonical]
            return large if gpu_ram_gb > 48 else small
        return canonical
    tidy = " ".join(_VENDOR.sub("", name).replace("_", " ").split())
    return tidy or name.strip()
