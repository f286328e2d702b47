"""What AWS EC2's catalogue, prices, ids and boot script look like, without boto3.

The pure half of the AWS provider (aws.py holds `AwsProvider` and everything that calls boto3):
the error codes EC2 answers with, the price table shipped with gpuherd and the Pricing API's
price list, GPU instance types as gpuherd sees them, regions as places, offer and instance ids,
the idempotency token, the `aws_ami` setting, whether a query wants spot, the user-data boot
script and the tags gpuherd puts on machines.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import re
import shlex
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError, ProviderError
from ..money import to_decimal
from ..offers import normalise_gpu_name
from .base import CreateRequest

if TYPE_CHECKING:
    from ..query import OfferQuery

# logs under the provider's name, as it did before this module was split out of aws.py
log = logging.getLogger(__name__.rpartition(".")[0] + ".aws")

DISPLAY = "AWS EC2"
PRICE_TABLE = Path(__file__).resolve().parent.parent / "data" / "aws_prices.json"
PRICING_REGION = "us-east-1"          # the Pricing API's endpoint (also eu-central-1, ap-south-1)
USER_DATA_LIMIT = 16 * 1024           # bytes, before base64

LABEL_TAG = "gpuherd:label"
PORT_TAG = "gpuherd:port"
DISK_TAG = "gpuherd:disk_gb"
DPH_TAG = "gpuherd:dph"
IMAGE_TAG = "gpuherd:image"
OFFER_TAG = "gpuherd:offer"

# --- error codes (https://docs.aws.amazon.com/AWSEC2/latest/APIReference/errors-overview.html)
_CAPACITY = {"InsufficientInstanceCapacity", "InsufficientCapacity", "InsufficientHostCapacity",
             "InsufficientReservedInstanceCapacity", "InsufficientCapacityOnHost",
             "MaxSpotInstanceCountExceeded", "SpotMaxPriceTooLow", "InstanceLimitExceeded",
             "VcpuLimitExceeded", "Unsupported"}
_QUOTA = {"InstanceLimitExceeded", "VcpuLimitExceeded", "MaxSpotInstanceCountExceeded"}
_AUTH = {"AuthFailure", "UnauthorizedOperation", "InvalidClientTokenId", "SignatureDoesNotMatch",
         "UnrecognizedClientException", "AccessDenied", "AccessDeniedException", "ExpiredToken",
         "ExpiredTokenException", "RequestExpired", "OptInRequired", "InvalidAccessKeyId",
         "MissingAuthenticationToken", "Blocked"}
_THROTTLE = {"RequestLimitExceeded", "Throttling", "ThrottlingException", "TooManyRequestsException",
             "RequestThrottled", "RequestThrottledException", "SlowDown"}
_NOT_FOUND = {"InvalidInstanceID.NotFound", "InvalidInstanceID.Malformed"}
_STATE = {"IncorrectInstanceState", "IncorrectState", "IncorrectSpotRequestState",
          "UnsupportedOperation", "OperationNotPermitted"}

# region -> (place, ISO country); location reads "Virginia, US, us-east-1" so a query can match
# the place, the country or the region name
_REGIONS: dict[str, tuple[str, str]] = {
    "us-east-1": ("Virginia", "US"), "us-east-2": ("Ohio", "US"), "us-west-1": ("California", "US"),
    "us-west-2": ("Oregon", "US"), "us-gov-east-1": ("GovCloud East", "US"),
    "us-gov-west-1": ("GovCloud West", "US"), "ca-central-1": ("Montreal", "CA"),
    "ca-west-1": ("Calgary", "CA"), "mx-central-1": ("Queretaro", "MX"), "sa-east-1": ("Sao Paulo", "BR"),
    "eu-west-1": ("Ireland", "IE"), "eu-west-2": ("London", "GB"), "eu-west-3": ("Paris", "FR"),
    "eu-central-1": ("Frankfurt", "DE"), "eu-central-2": ("Zurich", "CH"), "eu-north-1": ("Stockholm", "SE"),
    "eu-south-1": ("Milan", "IT"), "eu-south-2": ("Spain", "ES"), "il-central-1": ("Tel Aviv", "IL"),
    "me-south-1": ("Bahrain", "BH"), "me-central-1": ("UAE", "AE"), "af-south-1": ("Cape Town", "ZA"),
    "ap-south-1": ("Mumbai", "IN"), "ap-south-2": ("Hyderabad", "IN"), "ap-east-1": ("Hong Kong", "HK"),
    "ap-east-2": ("Taipei", "TW"), "ap-northeast-1": ("Tokyo", "JP"), "ap-northeast-2": ("Seoul", "KR"),
    "ap-northeast-3": ("Osaka", "JP"), "ap-southeast-1": ("Singapore", "SG"),
    "ap-southeast-2": ("Sydney", "AU"), "ap-southeast-3": ("Jakarta", "ID"),
    "ap-southeast-4": ("Melbourne", "AU"), "ap-southeast-5": ("Malaysia", "MY"),
    "ap-southeast-7": ("Thailand", "TH"), "cn-north-1": ("Beijing", "CN"), "cn-northwest-1": ("Ningxia", "CN"),
}
_COUNTRY_BY_PREFIX = {"us": "US", "ca": "CA", "mx": "MX", "sa": "BR", "cn": "CN", "il": "IL", "af": "ZA"}

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_CLIENT_TOKEN = re.compile(r"^[\x21-\x7e]{1,64}$")
_INSTANCE_ID = re.compile(r"^i-[0-9a-f]{8,17}$")


# ============================================================================ price table


@dataclass(frozen=True)
class PriceTable:
    """The on-demand prices shipped with gpuherd, used when the Pricing API cannot help."""

    as_of: date
    region: str
    prices: Mapping[str, Decimal]
    estimates: frozenset[str] = frozenset()
    path: str = ""

    @property
    def priced_at(self) -> datetime:
        return datetime(self.as_of.year, self.as_of.month, self.as_of.day, tzinfo=UTC)

    def source(self, instance_type: str, region: str) -> str:
        text = f"gpuherd price table of {self.as_of.isoformat()}"
        notes = []
        if region != self.region:
            notes.append(f"{self.region} list price")
        if instance_type in self.estimates:
            notes.append("estimate")
        return f"{text} ({', '.join(notes)})" if notes else text

    @classmethod
    def load(cls, path: Path | str | None = None) -> PriceTable:
        """Read and check the table; any problem is a ConfigError naming the file and the entry."""
        where = Path(path) if path is not None else PRICE_TABLE

        def bad(why: str) -> ConfigError:
            return ConfigError(f"AWS EC2 price table {where} is broken: {why}",
                               hint="reinstall gpuherd, or fix the file (see core/data/aws_prices.json)")

        try:
            raw = json.loads(where.read_text(encoding="utf-8"))
        except OSError as exc:
            raise bad(f"cannot read it ({exc.strerror or exc})") from None
        except (ValueError, UnicodeDecodeError) as exc:
            raise bad(f"not valid JSON ({exc})") from None
        if not isinstance(raw, dict):
            raise bad("the top level must be an object")
        try:
            as_of = date.fromisoformat(str(raw.get("as_of", "")))
        except ValueError:
            raise bad(f"'as_of' must be a date like 2026-11-01, not {raw.get('as_of')!r}") from None
        region = raw.get("region", PRICING_REGION)
        if not isinstance(region, str) or not region:
            raise bad("'region' must be a region name")
        prices_raw = raw.get("prices")
        if not isinstance(prices_raw, dict) or not prices_raw:
            raise bad("'prices' must be a non-empty object of instance type -> USD per hour")
        prices: dict[str, Decimal] = {}
        for itype, value in prices_raw.items():
            if not isinstance(itype, str) or "." not in itype:
                raise bad(f"{itype!r} is not an instance type")
            if isinstance(value, bool) or not isinstance(value, (str, int, float)):
                raise bad(f"price of {itype} must be a number, not {value!r}")
            try:
                price = to_decimal(value)
            except ValueError:
                raise bad(f"price of {itype} is not a number: {value!r}") from None
            if not Decimal(0) < price < Decimal(1000):
                raise bad(f"price of {itype} is {price}, outside 0..1000 USD/h")
            prices[itype] = price
        estimates = raw.get("estimates", [])
        if not isinstance(estimates, list) or not all(isinstance(e, str) for e in estimates):
            raise bad("'estimates' must be a list of instance types")
        return cls(as_of=as_of, region=region, prices=prices, estimates=frozenset(estimates), path=str(where))


# ============================================================================ pure helpers


@dataclass(frozen=True)
class GpuType:
    instance_type: str
    gpu_name: str
    num_gpus: int
    gpu_ram: float          # GB per GPU
    cpu_cores: int
    cpu_ram: float          # GB
    arch: str
    on_demand: bool
    spot: bool
    network_mbps: float = 0


def gpu_memory_gb(size_mib: int) -> float:
    """GB per GPU as the card's data sheet says it. AWS reports whole-GiB cards exactly
    (16384 MiB = T4 16 GB, 81920 = H100 80 GB, 144384 = H200 141 GB) and the others as their
    decimal-GB size converted to MiB (22888 MiB = 24.0 GB for the A10G and L4, 45776 = 48 GB L40S),
    so a 24 GB template finds the A10G instead of seeing 22.35 GiB."""
    if size_mib % 1024 == 0:
        return float(size_mib // 1024)
    return float(round(size_mib * 1_048_576 / 1e9))


def gpu_name_for(aws_name: str, manufacturer: str, per_gpu_gb: float) -> str:
    """gpuherd's name for an AWS GPU: memory decides the A100/V100 variant, p5's H100 is SXM."""
    key = re.sub(r"[^a-z0-9]", "", aws_name.lower())
    if key == "a100":
        return "A100 80GB" if per_gpu_gb >= 60 else "A100 40GB"
    if key == "v100":
        return "V100 32GB" if per_gpu_gb >= 24 else "V100"
    if key == "h100":
        return "H100 SXM"
    if key == "t4g":            # the same T4 card, on Graviton hosts
        return "T4"
    if key == "rtxproserver6000":
        return normalise_gpu_name("RTX PRO 6000")
    return normalise_gpu_name(aws_name)


def gpu_type_from(item: Mapping[str, Any], *, include_arm: bool = False) -> GpuType | None:
    """A `describe_instance_types` item as a GpuType; None for types gpuherd cannot rent (no GPU,
    GPU slices, non-NVIDIA GPUs, arm64 unless `include_arm`)."""
    gpus = (item.get("GpuInfo") or {}).get("Gpus") or []
    if not gpus:
        return None
    gpu = gpus[0]
    count = sum(int(g.get("Count") or 0) for g in gpus)
    if count < 1 or str(gpu.get("Manufacturer", "")).upper() != "NVIDIA":
        return None     # fractional GPUs (g6f) report 0; AMD (g4ad) does not run the CUDA images
    arches = (item.get("ProcessorInfo") or {}).get("SupportedArchitectures") or ["x86_64"]
    arch = "x86_64" if "x86_64" in arches else arches[0]
    if arch != "x86_64" and not include_arm:
        return None     # gpuherd's images are built for x86_64
    mib = int((gpu.get("MemoryInfo") or {}).get("SizeInMiB") or 0)
    if mib <= 0:
        return None
    per_gpu = gpu_memory_gb(mib)
    classes = item.get("SupportedUsageClasses") or ["on-demand"]
    return GpuType(
        instance_type=item["InstanceType"],
        gpu_name=gpu_name_for(str(gpu.get("Name", "")), str(gpu.get("Manufacturer", "")), per_gpu),
        num_gpus=count,
        gpu_ram=per_gpu,
        cpu_cores=int((item.get("VCpuInfo") or {}).get("DefaultVCpus") or 0),
        cpu_ram=round(int((item.get("MemoryInfo") or {}).get("SizeInMiB") or 0) / 1024, 1),
        arch=arch,
        on_demand="on-demand" in classes,
        spot="spot" in classes,
        network_mbps=_network_mbps((item.get("NetworkInfo") or {}).get("NetworkPerformance", "")),
    )


def _network_mbps(text: str) -> float:
    """'Up to 25 Gigabit' -> 25000; '100 Gigabit' -> 100000; unknown -> 0."""
    match = re.search(r"([\d.]+)\s*Gigabit", text or "")
    return float(match.group(1)) * 1000 if match else 0.0


def parse_price_list(items: Iterable[str]) -> dict[str, Decimal]:
    """Instance type -> on-demand USD/h from a `get_products` PriceList (JSON strings whose term
    and dimension keys are opaque, so values are iterated). Zero prices (unused reservations,
    BYOL placeholders) are skipped, and so is an item whose `marketoption` is not OnDemand (an
    EC2 Capacity Block SKU: the request filters them out, this is the second line); an
    unreadable item is skipped, not fatal."""
    prices: dict[str, Decimal] = {}
    for raw in items:
        try:
            item = json.loads(raw) if isinstance(raw, (str, bytes)) else raw
            attributes = item["product"]["attributes"]
            itype = attributes["instanceType"]
            market = str(attributes.get("marketoption") or "OnDemand")
            terms = (item.get("terms") or {}).get("OnDemand") or {}
        except (ValueError, KeyError, TypeError, AttributeError):
            log.debug("AWS EC2: skipped an unreadable Pricing API item")
            continue
        if market.casefold() != "ondemand":
            continue
        for term in terms.values():
            for dim in (term.get("priceDimensions") or {}).values():
                if str(dim.get("unit", "")).lower() not in ("hrs", "hours", "hour"):
                    continue
                try:
                    usd = Decimal(str((dim.get("pricePerUnit") or {}).get("USD")))
                except (InvalidOperation, ValueError):
                    continue
                if usd.is_finite() and usd > 0 and itype not in prices:
                    prices[itype] = usd.normalize() if usd == usd.to_integral() else usd
    return prices


def region_place(region: str) -> tuple[str, str]:
    """(location, country) of a region: ('Virginia, US, us-east-1', 'US')."""
    place, country = _REGIONS.get(region, ("", ""))
    if not country:
        prefix = region.split("-", 1)[0]
        country = _COUNTRY_BY_PREFIX.get(prefix, "")
    parts = [p for p in (place, country, region) if p]
    return ", ".join(parts), country


def offer_id_for(instance_type: str, region: str, spot: bool = False) -> str:
    return f"{instance_type}@{region}{'.spot' if spot else ''}"


def parse_offer_id(offer_id: str) -> tuple[str, str, bool]:
    """'g5.xlarge@us-east-1.spot' -> ('g5.xlarge', 'us-east-1', True)."""
    itype, sep, rest = offer_id.strip().partition("@")
    spot = rest.endswith(".spot")
    region = rest[: -len(".spot")] if spot else rest
    if not sep or not itype or not region or "." in region:
        raise ProviderError(DISPLAY, f"'{offer_id}' is not an AWS offer id (like g5.xlarge@us-east-1)")
    return itype, region, spot


def parse_instance_id(provider_id: str) -> tuple[str, str | None]:
    """'i-0abc@eu-west-1' -> ('i-0abc', 'eu-west-1'); a plain id has no region."""
    iid, _, region = provider_id.strip().partition("@")
    return iid, region or None


def client_token(label: str) -> str:
    """EC2's idempotency token for a label: the label itself when it fits (64 printable ASCII)."""
    if _CLIENT_TOKEN.match(label):
        return label
    return "gh-" + hashlib.sha256(label.encode()).hexdigest()[:48]


def parse_ami_setting(value: str | Mapping[str, str] | None) -> str | dict[str, str] | None:
    """`aws_ami`: one id for every region, or 'us-east-1=ami-1,eu-west-1=ami-2' (AMIs are regional)."""
    if value is None or isinstance(value, Mapping):
        return dict(value) if value is not None else None
    text = value.strip()
    if not text:
        return None
    if "=" not in text:
        return text
    mapping: dict[str, str] = {}
    for part in text.split(","):
        region, sep, ami = part.strip().partition("=")
        if not sep or not region.strip() or not ami.strip():
            raise ConfigError(f"aws_ami: '{part.strip()}' is not region=ami-id "
                              "(e.g. us-east-1=ami-0123456789abcdef0)")
        mapping[region.strip()] = ami.strip()
    return mapping


def wants_spot(query: OfferQuery | None) -> bool:
    """Whether an interruptible offer could pass the query: every `interruptible` filter holds for
    True (`interruptible`, `=true`, `!=false`, `in ...true...`, and no filter at all, as after
    `interruptible=any` drops the default). The default `interruptible=false` keeps spot out, so
    spot stays opt-in; no query is the default listing. Asking for spot when the query then drops
    it costs a call; not asking when it would keep it would hide offers, so any doubt is a yes."""
    if query is None:
        return False
    return all(_holds_for_true(f.op, f.value) for f in query.filters if f.field == "interruptible")


def _as_bool(value: Any) -> bool | None:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    return True if text in ("true", "1", "yes") else False if text in ("false", "0", "no") else None


def _holds_for_true(op: str, value: Any) -> bool:
    values = value if isinstance(value, (tuple, list, set, frozenset)) else (value,)
    flags = [_as_bool(v) for v in values]
    if op in ("eq", "in"):
        return True in flags
    if op in ("neq", "notin"):
        return True not in flags
    return True     # an operator the grammar does not allow on booleans: do not narrow


def user_data(request: CreateRequest, port: int) -> str:
    """The boot script: writes the container's environment and a boot script, links that into
    cloud-init's per-boot directory (so a stopped and started machine starts its container
    again), and runs it now. The boot script runs `onstart` on the host, then starts the
    container (`docker start` after the first boot). Logs go to /var/log/gpuherd.log.

    Environment values travel base64-encoded, not encrypted: user data is readable by anyone
    allowed ec2:DescribeInstanceAttribute on the account and from inside the machine."""
    for name in request.env:
        if not _ENV_NAME.match(name):
            raise ProviderError(DISPLAY, f"environment variable name {name!r} is not valid for docker")
    env_file = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in sorted(request.env.items()))
    docker = ["docker", "run", "-d", "--name", "gpuherd", "--gpus", "all", "--ipc=host"]
    for name in sorted(request.env):
        docker += ["-e", name]
    for p in dict.fromkeys([*request.ports, *([request.health_port] if request.health_port else [])]):
        docker += ["-p", f"{int(p)}:{int(p)}"]
    if request.command:
        docker += ["--entrypoint", "/bin/sh", request.image, "-c", request.command]
        if request.args:
            docker += ["sh", *request.args]
    else:
        docker += [request.image, *request.args]
    boot = "\n".join([
        "#!/bin/bash",
        f"# gpuherd {_comment(request.label)}: start the container (port {port}) at every boot",
        "exec >>/var/log/gpuherd.log 2>&1",
        'echo "gpuherd: boot at $(date -u +%Y-%m-%dT%H:%M:%SZ)"',
        "set -a; . /opt/gpuherd/env.sh; set +a",
        "if [ -f /opt/gpuherd/onstart.sh ]; then",
        '  bash /opt/gpuherd/onstart.sh || echo "gpuherd: onstart exited with $?"',
        "fi",
        "if docker container inspect gpuherd >/dev/null 2>&1; then",
        "  docker start gpuherd",
        "else",
        "  " + shlex.join(docker),
        "fi",
        "",
    ])
    lines = [
        "#!/bin/bash",
        f"# gpuherd {_comment(request.label)}: {_comment(request.image)}",
        "set -u",
        "umask 077",
        "mkdir -p /opt/gpuherd /var/lib/cloud/scripts/per-boot",
        f"echo {_b64(env_file)} | base64 -d > /opt/gpuherd/env.sh",
        _heredoc("/opt/gpuherd/boot.sh", boot),
    ]
    if request.onstart:
        lines.append(_heredoc("/opt/gpuherd/onstart.sh", request.onstart.rstrip("\n") + "\n"))
    lines += [
        "chmod 700 /opt/gpuherd/boot.sh",
        "ln -sf /opt/gpuherd/boot.sh /var/lib/cloud/scripts/per-boot/gpuherd.sh",
        "/opt/gpuherd/boot.sh",
        "",
    ]
    script = "\n".join(lines)
    if len(script.encode()) > USER_DATA_LIMIT:
        raise ProviderError(DISPLAY, f"the start script is {len(script.encode())} bytes; EC2 user data "
                                     f"holds at most {USER_DATA_LIMIT} (shorten onstart or env)")
    return script


def _comment(text: str) -> str:
    """Text safe inside a shell comment: one line, printable characters only."""
    return re.sub(r"[^\x20-\x7e]", "?", text)[:120]


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode() or "''"


def _heredoc(path: str, content: str) -> str:
    delimiter = "GPUHERD_EOF"
    while delimiter in content:
        delimiter += "_X"
    return f"cat > {path} <<'{delimiter}'\n{content}{delimiter}"


def _tags(instance: Mapping[str, Any]) -> dict[str, str]:
    return {t.get("Key", ""): t.get("Value", "") for t in instance.get("Tags") or []}


def _int_tag(tags: Mapping[str, str], key: str) -> int | None:
    try:
        value = int(float(tags[key]))
    except (KeyError, ValueError):
        return None
    return value if value > 0 else None
