"""Templates: what a boot starts (image, vLLM server or command, ports, health check, disk, env),
which offers fit it (GPU RAM, GPU count, max price, providers) and how its guards behave (idle
window, warning lead, stop or destroy, max lifetime).

Built-ins cover what teams run most; a team adds or replaces templates in a TOML file:

    [templates.mine]
    extends = "budget"              # start from another template (built-in or from this file)
    description = "Budget box with a longer context"
    max_model_len = 16384
    idle_minutes = "45m"            # durations may be written as numbers (minutes) or "45m", "2h"
    env = { HF_TOKEN = "hf_..." }   # merged over the parent's env

At boot a user may override a fixed set of settings (`max_model_len=4096 idle=2h`); the set,
with each key's type and bounds, is `OVERRIDE_SCHEMA`. `apply_overrides` checks them and returns
a new effective template; the input template is never changed.
"""

from __future__ import annotations

import difflib
import math
import re
import shlex
import tomllib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from .errors import ConfigError, InvalidInput, NotFound
from .money import to_decimal
from .offers import Offer
from .query import Filter, OfferQuery
from .text import MAX_NAME, MAX_WORD, bounded, clip, suggestible

# --------------------------------------------------------------------------------------------
# Durations
# --------------------------------------------------------------------------------------------

MAX_DURATION = timedelta(days=365)

_UNIT_SECONDS: dict[str, int] = {}
for _names, _secs in (
    (("s", "sec", "secs", "second", "seconds"), 1),
    (("m", "min", "mins", "minute", "minutes"), 60),
    (("h", "hr", "hrs", "hour", "hours"), 3600),
    (("d", "day", "days"), 86400),
    (("w", "wk", "wks", "week", "weeks"), 7 * 86400),
):
    for _n in _names:
        _UNIT_SECONDS[_n] = _secs

# Number, then (unit, number)*, then an optional unit: unambiguous, so matching is linear. The old
# `(?:\d+(?:\.\d+)?[a-z]*)+` could split a run of digits every way: 30 digits and a `!` took minutes.
_DURATION_TEXT = re.compile(r"\d+(?:\.\d+)?(?:[a-z]+\d+(?:\.\d+)?)*[a-z]*", re.ASCII)   # ASCII digits only: \d takes "١" and "５" too
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)([a-z]*)", re.ASCII)
_DURATION_EXAMPLES = "like 45m, 2h, 1h30m, 90s or 1d"


def parse_duration(text: str, *, allow_zero: bool = False,
                   maximum: timedelta = MAX_DURATION) -> timedelta:
    """'45m', '2h', '1h30m', '1h 30m', '90s', '1d', '1.5h'; a bare number is minutes ('30').

    Raises InvalidInput naming the text for anything else: words ('forever'), negative values,
    zero (unless `allow_zero`), empty text, or more than `maximum` (365 days by default)."""
    if not isinstance(text, str):
        if isinstance(text, bool) or not isinstance(text, (int, float, Decimal)):
            raise InvalidInput(f"{clip(repr(text))} is not a duration; use text {_DURATION_EXAMPLES}")
        text = str(text)
    text = bounded(text, MAX_NAME, "duration").strip()
    shown = clip(text)
    compact = re.sub(r"\s+", "", text.lower())
    if not compact:
        raise InvalidInput(f"A duration is needed ({_DURATION_EXAMPLES}); got nothing")
    if compact.startswith("-"):
        raise InvalidInput(f"'{shown}' is not a valid duration: it cannot be negative")
    if not _DURATION_TEXT.fullmatch(compact):
        extra = ""
        if compact in ("forever", "never", "inf", "infinite", "infinity", "unlimited", "none", "off"):
            extra = " (there is no unlimited setting)"
        raise InvalidInput(
            f"'{shown}' is not a duration{extra}: give a number and a unit, {_DURATION_EXAMPLES}")
    parts = _DURATION_PART.findall(compact)
    total = Decimal(0)
    seen: set[int] = set()
    for number, unit in parts:
        if not unit:
            if len(parts) > 1:
                raise InvalidInput(
                    f"'{shown}' is not a duration: '{clip(number)}' needs a unit (s, m, h or d)")
            unit = "m"
        if unit not in _UNIT_SECONDS:
            raise InvalidInput(
                f"'{shown}' is not a duration: unknown unit '{clip(unit)}' (use s, m, h, d or w)")
        secs = _UNIT_SECONDS[unit]
        if secs in seen:
            raise InvalidInput(f"'{shown}' is not a duration: a unit is given twice")
        seen.add(secs)
        total += Decimal(number) * secs
    if total > Decimal(int(maximum.total_seconds())):
        raise InvalidInput(f"'{shown}' is too long: at most {format_duration(maximum)}")
    if total == 0 and not allow_zero:
        raise InvalidInput(f"'{shown}' is too short: the duration must be more than zero")
    return timedelta(seconds=float(total))


def format_duration(td: timedelta) -> str:
    """'1h 30m', '45m', '2d 3h', '1m 30s', '0s'. Whole seconds; parse_duration reads it back."""
    seconds = round(td.total_seconds())
    if seconds < 0:
        return "-" + format_duration(timedelta(seconds=-seconds))
    if seconds == 0:
        return "0s"
    out = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        count, seconds = divmod(seconds, size)
        if count:
            out.append(f"{count}{unit}")
    return " ".join(out)


def _duration_field(value: Any, unit_seconds: int) -> Any:
    """Template fields kept as numbers (minutes, hours, days) also accept '45m'-style text."""
    if isinstance(value, str):
        try:
            return parse_duration(value, allow_zero=True).total_seconds() / unit_seconds
        except InvalidInput as exc:
            raise ValueError(exc.message) from None
    return value


# --------------------------------------------------------------------------------------------
# The template
# --------------------------------------------------------------------------------------------

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
HF_REPO_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
_IMAGE_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
IMAGE_RE = re.compile(
    r"^(?:[A-Za-z0-9.-]+(?::\d+)?/)?"                 # optional registry host[:port]
    rf"{_IMAGE_COMPONENT}(?:/{_IMAGE_COMPONENT})*"       # repository path
    r"(?::[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?"          # :tag
    r"(?:@sha256:[a-f0-9]{64})?$"                       # @digest
)
_SECRET_ENV_RE = re.compile(r"TOKEN|KEY|SECRET|PASSWORD|PASSWD|CREDENTIAL|AUTH", re.IGNORECASE)
MASK = "••••"
MAX_GPUS = 16
GPU_RAM_TOLERANCE_GB = 0.5   # offers normalised from MiB report 24 GB cards as ~23.99 GB
VLLM_LAUNCH = ("python3", "-m", "vllm.entrypoints.openai.api_server")
VLLM_DEFAULT_PORT = 8000

Dtype = Literal["auto", "half", "float16", "bfloat16", "float32"]
Quantization = Literal["awq", "gptq", "fp8"]

# vLLM flags that have their own template field; extra_args may not set them a second time.
_MANAGED_FLAGS = {
    "--model": "model", "--max-model-len": "max_model_len",
    "--tensor-parallel-size": "tensor_parallel_size", "-tp": "tensor_parallel_size",
    "--gpu-memory-utilization": "gpu_memory_utilization", "--dtype": "dtype",
    "--quantization": "quantization", "-q": "quantization", "--port": "ports",
}
# Set by gpuherd, never by a templates file.
_INTERNAL_FIELDS = ("source", "replaces_builtin")


def is_secret_env(name: str) -> bool:
    """Whether an env var name looks like it holds a secret (HF_TOKEN, AWS_SECRET_ACCESS_KEY)."""
    return bool(_SECRET_ENV_RE.search(name))


def mask_env(env: Mapping[str, str]) -> dict[str, str]:
    """Env for display: values of secret-looking names become '••••' (empty values stay empty)."""
    return {k: (MASK if v and is_secret_env(k) else v) for k, v in env.items()}


def _norm_gpu(name: str) -> str:
    return re.sub(r"[\s_-]+", " ", name).strip().lower()


class Template(BaseModel):
    """One template. Frozen: overrides build a new one (`apply_overrides`)."""

    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True)

    name: str
    description: str = ""
    extends: str | None = None                 # the template this one was built from (display)

    # what runs
    image: str
    command: str | None = None                 # shell command line; excludes `model`
    model: str | None = None                   # Hugging Face repo id served by vLLM
    max_model_len: int | None = Field(default=None, ge=256, le=262144)
    tensor_parallel_size: int | None = Field(default=None, ge=1, le=MAX_GPUS)  # None: num_gpus
    gpu_memory_utilization: float | None = Field(default=None, ge=0.1, le=0.99)
    dtype: Dtype | None = None
    quantization: Quantization | None = None   # None: vLLM detects it from the model config
    extra_args: list[str] = Field(default_factory=list)   # appended to the vLLM args / command
    ports: list[int] = Field(default_factory=lambda: [VLLM_DEFAULT_PORT])
    health_path: str | None = "/health"
    health_port: int | None = None             # default: the first port
    disk_gb: int = Field(default=40, ge=10, le=2000)
    env: dict[str, str] = Field(default_factory=dict)
    onstart: str | None = None                 # setup script run when the machine starts

    # which offers fit
    min_gpu_ram: float = Field(default=0, ge=0, le=1024)   # GB per GPU
    num_gpus: int = Field(default=1, ge=1, le=MAX_GPUS)
    max_dph: Decimal | None = Field(default=None, gt=0, le=1000)   # USD/hour
    providers: list[str] | None = None         # allowed providers; None: any
    gpu_names: list[str] | None = None         # allowed GPU models; None: any

    # guard defaults
    idle_minutes: float = Field(default=30, ge=1, le=7 * 24 * 60)
    warn_minutes: float = Field(default=5, ge=0, le=24 * 60)
    idle_action: Literal["stop", "destroy"] = "stop"
    max_lifetime_hours: float | None = Field(default=None, gt=0, le=365 * 24)
    destroy_after_stopped_days: float | None = Field(default=None, gt=0, le=365)

    # provenance (set by gpuherd)
    source: str = "builtin"                    # "builtin" or the templates file
    replaces_builtin: bool = False

    # ---- field checks ------------------------------------------------------------------

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not NAME_RE.match(v):
            raise ValueError("a template name is 1-64 lowercase letters, digits, '-', '_' or '.', "
                             "starting with a letter or digit")
        return v

    @field_validator("image")
    @classmethod
    def _image(cls, v: str) -> str:
        v = v.strip()
        if len(v) > 255 or not IMAGE_RE.match(v):
            raise ValueError(f"'{clip(v)}' is not a container image reference (like vllm/vllm-openai:latest)")
        return v

    @field_validator("model")
    @classmethod
    def _model(cls, v: str | None) -> str | None:
        if v is not None and (not HF_REPO_RE.match(v) or ".." in v):
            raise ValueError(f"'{clip(v)}' is not a Hugging Face model id (like Qwen/Qwen2.5-Coder-7B-Instruct)")
        return v

    @field_validator("command", "onstart", "description", mode="before")
    @classmethod
    def _blank_is_none(cls, v: Any, info: Any) -> Any:
        if isinstance(v, str) and not v.strip() and info.field_name != "description":
            return None
        return v

    @field_validator("quantization", "dtype", mode="before")
    @classmethod
    def _none_word(cls, v: Any) -> Any:
        if isinstance(v, str):
            v = v.strip().lower()
            return None if v in ("", "none") else v
        return v

    @field_validator("ports")
    @classmethod
    def _ports(cls, v: list[int]) -> list[int]:
        for p in v:
            if not 1 <= p <= 65535:
                raise ValueError(f"port {p} is outside 1..65535")
        if len(set(v)) != len(v):
            raise ValueError("a port is listed twice")
        return v

    @field_validator("health_path")
    @classmethod
    def _health_path(cls, v: str | None) -> str | None:
        if v is not None and (not v.startswith("/") or any(c.isspace() for c in v)):
            raise ValueError(f"'{clip(v)}' is not a URL path (like /health)")
        return v

    @field_validator("env")
    @classmethod
    def _env(cls, v: dict[str, str]) -> dict[str, str]:
        for name, value in v.items():
            if not ENV_NAME_RE.match(name):
                raise ValueError(f"'{clip(name)}' is not a valid environment variable name")
            if _has_control_chars(value):
                raise ValueError(f"the value of {name} contains a line break or control character")
        return v

    @field_validator("max_dph", mode="before")
    @classmethod
    def _money(cls, v: Any) -> Any:
        if v is None or isinstance(v, Decimal):
            return v
        if isinstance(v, str) and v.strip().lower() in ("", "none", "any"):
            return None
        try:
            return to_decimal(v.strip().removesuffix("/h") if isinstance(v, str) else v)
        except ValueError:
            raise ValueError(f"'{clip(str(v))}' is not an amount in USD/hour") from None

    @field_validator("providers", "gpu_names", mode="before")
    @classmethod
    def _str_list(cls, v: Any) -> Any:
        if isinstance(v, str):
            v = [s for s in (p.strip() for p in v.split(",")) if s]
        return v

    @field_validator("providers")
    @classmethod
    def _providers(cls, v: list[str] | None) -> list[str] | None:
        if v is None:
            return None
        out = [p.strip().lower() for p in v]
        for p in out:
            if not re.fullmatch(r"[a-z0-9_-]{1,32}", p):
                raise ValueError(f"'{clip(p)}' is not a provider name")
        return out or None

    @field_validator("idle_minutes", "warn_minutes", mode="before")
    @classmethod
    def _minutes(cls, v: Any) -> Any:
        return _duration_field(v, 60)

    @field_validator("max_lifetime_hours", mode="before")
    @classmethod
    def _hours(cls, v: Any) -> Any:
        return _duration_field(v, 3600)

    @field_validator("destroy_after_stopped_days", mode="before")
    @classmethod
    def _days(cls, v: Any) -> Any:
        return _duration_field(v, 86400)

    @model_validator(mode="before")
    @classmethod
    def _default_health_port(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("health_port") is None:
            ports = data.get("ports", [VLLM_DEFAULT_PORT])
            if isinstance(ports, list) and ports and data.get("health_path", "/health") is not None:
                data = {**data, "health_port": ports[0]}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> Template:
        if self.command and self.model:
            raise ValueError("set either command or model (a vLLM server), not both")
        if self.model is None:
            for f in ("max_model_len", "tensor_parallel_size", "gpu_memory_utilization",
                      "dtype", "quantization"):
                if getattr(self, f) is not None:
                    raise ValueError(f"{f} is a vLLM setting and needs model to be set")
            if self.extra_args and not self.command:
                raise ValueError("extra_args needs a model or a command to add them to")
        else:
            if not self.ports:
                raise ValueError("a vLLM template needs at least one port (the API port)")
            for arg in self.extra_args:
                flag = arg.split("=", 1)[0]
                if flag in _MANAGED_FLAGS:
                    raise ValueError(f"extra_args: {flag} is set by the {_MANAGED_FLAGS[flag]} "
                                     "field, not in extra_args")
        if self.tensor_parallel_size is not None and self.tensor_parallel_size > self.num_gpus:
            raise ValueError(f"tensor_parallel_size {self.tensor_parallel_size} needs at least that "
                             f"many GPUs, but num_gpus is {self.num_gpus}")
        if self.health_path is not None:
            if self.health_port is None:
                raise ValueError("health_path needs a health_port (or a port in ports)")
            if self.health_port not in self.ports:
                raise ValueError(f"health_port {self.health_port} is not one of ports {self.ports}")
        if self.warn_minutes >= self.idle_minutes:
            raise ValueError(f"warn_minutes ({self.warn_minutes:g}) must be shorter than "
                             f"idle_minutes ({self.idle_minutes:g})")
        return self

    def __repr_args__(self) -> Iterator[tuple[str | None, Any]]:  # never print secrets
        for key, value in super().__repr_args__():
            yield key, (mask_env(value) if key == "env" else value)

    # ---- derived -----------------------------------------------------------------------

    @property
    def is_vllm(self) -> bool:
        return self.model is not None

    @property
    def effective_tensor_parallel_size(self) -> int:
        """The tensor-parallel size vLLM gets: the field, or else one shard per GPU."""
        return self.tensor_parallel_size or self.num_gpus

    @property
    def api_port(self) -> int | None:
        return self.ports[0] if self.ports else None

    @property
    def idle_window(self) -> timedelta:
        return timedelta(minutes=self.idle_minutes)

    @property
    def warn_lead(self) -> timedelta:
        return timedelta(minutes=self.warn_minutes)

    @property
    def max_lifetime(self) -> timedelta | None:
        return None if self.max_lifetime_hours is None else timedelta(hours=self.max_lifetime_hours)

    @property
    def destroy_after_stopped(self) -> timedelta | None:
        d = self.destroy_after_stopped_days
        return None if d is None else timedelta(days=d)

    def vllm_args(self) -> list[str]:
        """Arguments for the vLLM OpenAI server (the vllm/vllm-openai image's entrypoint);
        empty for a template that is not a vLLM server."""
        if self.model is None:
            return []
        args = ["--model", self.model]
        if self.max_model_len is not None:
            args += ["--max-model-len", str(self.max_model_len)]
        args += ["--tensor-parallel-size", str(self.effective_tensor_parallel_size)]
        if self.gpu_memory_utilization is not None:
            args += ["--gpu-memory-utilization", f"{self.gpu_memory_utilization:g}"]
        if self.dtype is not None:
            args += ["--dtype", self.dtype]
        if self.quantization is not None:
            args += ["--quantization", self.quantization]
        if self.api_port is not None and self.api_port != VLLM_DEFAULT_PORT:
            args += ["--port", str(self.api_port)]
        return args + list(self.extra_args)

    def start_command(self) -> str | None:
        """The full shell command line that starts the workload, for providers that launch a
        command rather than the image's entrypoint; None when the image's own entrypoint runs
        as is (a dev box)."""
        if self.command:
            return " ".join([self.command, *map(shlex.quote, self.extra_args)])
        if self.model:
            return shlex.join([*VLLM_LAUNCH, *self.vllm_args()])
        return None

    def to_create_fields(self) -> dict[str, Any]:
        """The template's part of a provider `CreateRequest` (everything but offer_id and label).

        Docker semantics: `command`, when set, replaces the image's entrypoint (a shell line);
        `args` go to the image's entrypoint. A vLLM template gives `args` only (the
        vllm/vllm-openai entrypoint is the server); a command template gives `command` only.
        A provider that can only run a command line uses `start_command()` instead."""
        return {
            "image": self.image,
            "command": self.start_command() if self.command else None,
            "args": self.vllm_args(),
            "env": dict(self.env),
            "ports": list(self.ports),
            "disk_gb": self.disk_gb,
            "onstart": self.onstart,
            "health_path": self.health_path,
            "health_port": self.health_port if self.health_path is not None else None,
        }

    def public_env(self) -> dict[str, str]:
        """Env fit to show: values of TOKEN/KEY/SECRET/PASSWORD-like names masked as '••••'."""
        return mask_env(self.env)

    def public_dict(self) -> dict[str, Any]:
        """All fields for display (JSON-safe, env masked)."""
        data = self.model_dump(mode="json")
        data["env"] = self.public_env()
        return data

    def offer_rejection(self, offer: Offer) -> str | None:
        """Why `offer` does not fit this template, or None when it does: the one fit rule, used
        by a boot to accept an offer (named or picked) and by search to decide which templates
        an offer's Boot buttons may name, so a button never names a boot that must fail. Price
        is not checked here: a boot above max_dph asks for confirmation (price guard) rather
        than failing. Disk: an offer whose largest disk (`disk_space`) is smaller than the
        template's `disk_gb` cannot hold it; `disk_space` 0 means the provider sets no limit in
        its offers (RunPod: the disk is chosen at create)."""
        if self.providers is not None and offer.provider not in self.providers:
            return f"provider {offer.provider} is not one of {', '.join(self.providers)}"
        if offer.num_gpus != self.num_gpus:
            return f"{offer.num_gpus} GPUs, the template needs {self.num_gpus}"
        if offer.gpu_ram + GPU_RAM_TOLERANCE_GB < self.min_gpu_ram:
            return f"{offer.gpu_ram:g} GB per GPU, the template needs {self.min_gpu_ram:g} GB"
        if 0 < offer.disk_space < self.disk_gb:
            return f"at most {offer.disk_space:g} GB of disk, the template needs {self.disk_gb} GB"
        if self.gpu_names is not None and _norm_gpu(offer.gpu_name) not in {
                _norm_gpu(g) for g in self.gpu_names}:
            return f"GPU {offer.gpu_name} is not one of {', '.join(self.gpu_names)}"
        return None

    def offer_query(self) -> OfferQuery:
        """What a provider may narrow its search by for this template: GPU count and memory only,
        never price (a pricier offer must still reach the price guard's confirmation)."""
        return OfferQuery(filters=(
            Filter(field="num_gpus", op="eq", value=self.num_gpus),
            Filter(field="gpu_ram", op="gte", value=max(0.0, self.min_gpu_ram - GPU_RAM_TOLERANCE_GB)),
            Filter(field="interruptible", op="eq", value=False),  # a spot machine only when named
        ))

    def constraint_text(self) -> str:
        """What an offer needs, in words: '1 GPU with at least 8 GB, up to $0.50/h'."""
        parts = [f"{self.num_gpus} GPU{'s' if self.num_gpus > 1 else ''} with at least {self.min_gpu_ram:g} GB"]
        if self.gpu_names:
            parts.append(f"one of {', '.join(self.gpu_names)}")
        if self.providers:
            parts.append(f"on {', '.join(self.providers)}")
        if self.max_dph is not None:
            parts.append(f"up to ${self.max_dph}/h")
        return ", ".join(parts)

    def display_fields(self) -> list[tuple[str, str]]:
        """(label, value) pairs for `/gpu templates <name>`; env secrets masked."""
        rows = [("image", self.image)]
        if self.model:
            rows.append(("model", self.model))
        if self.max_model_len:
            rows.append(("max_model_len", str(self.max_model_len)))
        rows.append(("start", self.start_command() or "image default"))
        rows.append(("offers", self.constraint_text()))
        rows.append(("ports", ", ".join(str(p) for p in self.ports) or "none"))
        if self.health_path:
            rows.append(("health", f"{self.health_path} on port {self.health_port or (self.ports or [0])[0]}"))
        rows.append(("disk", f"{self.disk_gb} GB"))
        if self.env:
            rows.append(("env", ", ".join(f"{k}={v}" for k, v in self.public_env().items())))
        if self.onstart:
            rows.append(("onstart", self.onstart if len(self.onstart) < 120 else self.onstart[:117] + "..."))
        guard = f"idle {format_duration(self.idle_window)} → {self.idle_action}, warned {self.warn_minutes:g} min before"
        if self.max_lifetime_hours:
            guard += f"; max lifetime {self.max_lifetime_hours:g} h"
        if self.destroy_after_stopped_days:
            guard += f"; destroyed after {self.destroy_after_stopped_days:g} days stopped"
        rows.append(("guards", guard))
        rows.append(("from", "built-in" if self.source == "builtin" else self.source))
        return rows

    def fits(self, offer: Offer, *, check_price: bool = True) -> bool:
        """Whether `offer` fits, including max_dph unless `check_price` is False."""
        if self.offer_rejection(offer) is not None:
            return False
        return not (check_price and self.max_dph is not None and offer.dph > self.max_dph)


def _has_control_chars(text: str) -> bool:
    return any(ord(c) < 32 or ord(c) == 127 for c in text)


# --------------------------------------------------------------------------------------------
# Built-ins (SPEC §5)
# --------------------------------------------------------------------------------------------

VLLM_IMAGE = "vllm/vllm-openai:latest"

BUILTIN_TEMPLATES: tuple[Template, ...] = (
    Template(
        name="budget",
        description="vLLM serving Qwen2.5-Coder-7B-Instruct (AWQ 4-bit, fits 8 GB); dev and tests",
        image=VLLM_IMAGE, model="Qwen/Qwen2.5-Coder-7B-Instruct-AWQ", max_model_len=8192,
        disk_gb=50, min_gpu_ram=8, num_gpus=1, max_dph=Decimal("0.50"),
    ),
    Template(
        name="research",
        description="vLLM serving Qwen2.5-Coder-14B-Instruct (AWQ 4-bit, fits 16 GB)",
        image=VLLM_IMAGE, model="Qwen/Qwen2.5-Coder-14B-Instruct-AWQ", max_model_len=16384,
        disk_gb=60, min_gpu_ram=16, num_gpus=1, max_dph=Decimal("1.00"),
    ),
    Template(
        name="high_performance",
        description="vLLM serving Qwen2.5-Coder-32B-Instruct (AWQ 4-bit) with an 8k context on 24 GB",
        image=VLLM_IMAGE, model="Qwen/Qwen2.5-Coder-32B-Instruct-AWQ", max_model_len=8192,
        disk_gb=80, min_gpu_ram=24, num_gpus=1, max_dph=Decimal("2.00"),
    ),
    Template(
        name="llava-34b",
        description="vLLM serving LLaVA-1.6 34B vision-language (bf16), tensor-parallel over 4 GPUs",
        image=VLLM_IMAGE, model="llava-hf/llava-v1.6-34b-hf", max_model_len=4096,
        disk_gb=160, min_gpu_ram=24, num_gpus=4, max_dph=None,
    ),
    Template(
        name="llama-3.1-70b",
        description="vLLM serving Llama 3.1 70B Instruct (AWQ INT4), tensor-parallel over 2 GPUs; "
                    "gated on Hugging Face: set env.HF_TOKEN if the download is refused",
        image=VLLM_IMAGE, model="hugging-quants/Meta-Llama-3.1-70B-Instruct-AWQ-INT4",
        max_model_len=8192, disk_gb=120, min_gpu_ram=24, num_gpus=2, max_dph=None,
    ),
)


def builtin_templates() -> dict[str, Template]:
    return {t.name: t for t in BUILTIN_TEMPLATES}


# --------------------------------------------------------------------------------------------
# Boot-time overrides
# --------------------------------------------------------------------------------------------


class _Bad(Exception):
    """A value that does not parse; the caller names key, value and what is expected."""


@dataclass(frozen=True)
class OverrideSpec:
    """One key a user may set at boot. `parse` turns the chat string into the typed value."""

    key: str
    expects: str                      # "a whole number between 256 and 262144"
    help: str
    example: str
    parse: Callable[[str], object] = field(repr=False)
    fields: tuple[str, ...] = ()      # template fields it sets
    needs_model: bool = False         # vLLM settings: refused on a template without a model
    aliases: tuple[str, ...] = ()

    def applies_to(self, template: Template) -> bool:
        return template.is_vllm or not self.needs_model


def _int(lo: int, hi: int, *, gb: bool = False) -> Callable[[str], int]:
    def parse(text: str) -> int:
        t = text.strip().lower().replace("_", "")
        if gb:
            t = re.sub(r"\s*(gb|g|gib)$", "", t)
        if not re.fullmatch(r"\+?[0-9]{1,12}", t):      # ASCII digits: \d takes "٤" too
            raise _Bad
        value = int(t)
        if not lo <= value <= hi:
            raise _Bad
        return value
    return parse


def _float(lo: float, hi: float) -> Callable[[str], float]:
    def parse(text: str) -> float:
        t = text.strip()
        percent = t.endswith("%")
        t = t.removesuffix("%").strip()
        if not re.fullmatch(r"\+?([0-9]+(\.[0-9]*)?|\.[0-9]+)", t):
            raise _Bad
        value = float(t) / (100 if percent else 1)
        if not (math.isfinite(value) and lo <= value <= hi):
            raise _Bad
        return value
    return parse


def _usd_per_hour(lo_exclusive: Decimal, hi: Decimal) -> Callable[[str], Decimal]:
    def parse(text: str) -> Decimal:
        t = re.sub(r"\s*/\s*(h|hr|hour)$", "", text.strip().lower()).lstrip("$").strip()
        if not re.fullmatch(r"\+?([0-9]+(\.[0-9]*)?|\.[0-9]+)", t):
            raise _Bad
        try:
            value = Decimal(t)
        except InvalidOperation:
            raise _Bad from None
        if not lo_exclusive < value <= hi:
            raise _Bad
        return value
    return parse


def _choice(*choices: str, none_word: str | None = None) -> Callable[[str], str | None]:
    def parse(text: str) -> str | None:
        t = text.strip().lower()
        if none_word is not None and t == none_word:
            return None
        if t not in choices:
            raise _Bad
        return t
    return parse


def _duration(lo: timedelta, hi: timedelta) -> Callable[[str], timedelta]:
    def parse(text: str) -> timedelta:
        try:
            value = parse_duration(text, allow_zero=lo == timedelta(0), maximum=hi)
        except InvalidInput:
            raise _Bad from None
        if value < lo:
            raise _Bad
        return value
    return parse


def _pattern(regex: re.Pattern[str], max_len: int) -> Callable[[str], str]:
    def parse(text: str) -> str:
        t = text.strip()
        if len(t) > max_len or not regex.match(t) or ".." in t:
            raise _Bad
        return t
    return parse


def _env_value(text: str) -> str:
    if len(text) > 4096 or _has_control_chars(text):
        raise _Bad
    return text


_DUR_HINT = "like 45m, 2h or 1h30m"
_QUANT = ("awq", "gptq", "fp8")
_DTYPES = ("auto", "half", "float16", "bfloat16", "float32")

ENV_PREFIX = "env."

# The one table of boot-time overrides: `/gpu templates <name>` lists it, validation uses it.
OVERRIDE_SCHEMA: dict[str, OverrideSpec] = {spec.key: spec for spec in (
    OverrideSpec("model", "a Hugging Face model id like Qwen/Qwen2.5-Coder-7B-Instruct",
                 "model vLLM serves", "model=Qwen/Qwen2.5-Coder-7B-Instruct",
                 _pattern(HF_REPO_RE, 193), ("model",), needs_model=True),
    OverrideSpec("max_model_len", "a whole number between 256 and 262144",
                 "context length in tokens", "max_model_len=4096",
                 _int(256, 262144), ("max_model_len",), needs_model=True),
    OverrideSpec("gpu_memory_utilization", "a number between 0.1 and 0.99",
                 "share of GPU memory vLLM may use", "gpu_memory_utilization=0.9",
                 _float(0.1, 0.99), ("gpu_memory_utilization",), needs_model=True),
    OverrideSpec("tensor_parallel_size", f"a whole number between 1 and {MAX_GPUS}",
                 "GPUs the model is split over (default: num_gpus)", "tensor_parallel_size=2",
                 _int(1, MAX_GPUS), ("tensor_parallel_size",), needs_model=True),
    OverrideSpec("dtype", "one of " + ", ".join(_DTYPES),
                 "weight and activation dtype", "dtype=bfloat16",
                 _choice(*_DTYPES), ("dtype",), needs_model=True),
    OverrideSpec("quantization", "one of none, " + ", ".join(_QUANT),
                 "quantization method (none: detect from the model)", "quantization=awq",
                 _choice(*_QUANT, none_word="none"), ("quantization",), needs_model=True),
    OverrideSpec("num_gpus", f"a whole number between 1 and {MAX_GPUS}",
                 "GPUs per machine", "num_gpus=2",
                 _int(1, MAX_GPUS), ("num_gpus",), aliases=("gpus",)),
    OverrideSpec("min_gpu_ram", "a whole number of GB between 1 and 1024",
                 "minimum GB of memory per GPU", "min_gpu_ram=24",
                 _int(1, 1024, gb=True), ("min_gpu_ram",)),
    OverrideSpec("max_dph", "an amount in USD/hour above 0 and at most 1000",
                 "highest price per hour to accept without confirmation", "max_dph=0.80",
                 _usd_per_hour(Decimal(0), Decimal(1000)), ("max_dph",)),
    OverrideSpec("disk_gb", "a whole number of GB between 10 and 2000",
                 "disk size in GB", "disk_gb=100",
                 _int(10, 2000, gb=True), ("disk_gb",), aliases=("disk",)),
    OverrideSpec("image", "a container image like vllm/vllm-openai:v0.6.4",
                 "container image", "image=vllm/vllm-openai:latest",
                 _pattern(IMAGE_RE, 255), ("image",)),
    OverrideSpec("idle", f"a duration between 1m and 7d ({_DUR_HINT})",
                 "stop (or destroy) after this long without activity", "idle=45m",
                 _duration(timedelta(minutes=1), timedelta(days=7)), ("idle_minutes",),
                 aliases=("idle_minutes",)),
    OverrideSpec("warn", f"a duration between 0m and 1d ({_DUR_HINT}), shorter than idle",
                 "how long before the idle action the owner is warned", "warn=10m",
                 _duration(timedelta(0), timedelta(days=1)), ("warn_minutes",),
                 aliases=("warn_minutes",)),
    OverrideSpec("idle_action", "one of stop, destroy",
                 "what happens to an idle machine", "idle_action=destroy",
                 _choice("stop", "destroy"), ("idle_action",)),
    OverrideSpec("max_lifetime", f"a duration between 1m and 365d ({_DUR_HINT})",
                 "stop the machine after this long, busy or not", "max_lifetime=12h",
                 _duration(timedelta(minutes=1), MAX_DURATION), ("max_lifetime_hours",)),
    OverrideSpec("env.NAME", "text without line breaks (NAME: letters, digits and _)",
                 "set an environment variable", "env.HF_TOKEN=hf_...",
                 _env_value, ("env",)),
)}

_ALIASES: dict[str, str] = {
    alias: spec.key for spec in OVERRIDE_SCHEMA.values() for alias in spec.aliases}


def override_schema(template: Template | None = None) -> list[OverrideSpec]:
    """The override keys, in table order; with a template, only those that apply to it."""
    specs = list(OVERRIDE_SCHEMA.values())
    return specs if template is None else [s for s in specs if s.applies_to(template)]


@dataclass(frozen=True)
class ValidatedOverrides:
    """Checked overrides: `values` maps canonical keys (`max_model_len`, `idle`, `env.HF_TOKEN`)
    to typed values (int, float, Decimal, timedelta, str, None); `template` is the effective
    template; `notes` says what was adjusted to keep the template consistent."""

    base: Template
    template: Template
    values: dict[str, object]
    notes: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.values)

    def as_json(self, *, mask_secrets: bool = True) -> dict[str, str | int | float | None]:
        """JSON-safe: Decimal as text, durations as '1h30m'; reading it back through
        `validate_overrides` gives the same result (unless secrets were masked)."""
        out: dict[str, str | int | float | None] = {}
        for key, value in self.values.items():
            if isinstance(value, timedelta):
                out[key] = format_duration(value).replace(" ", "")   # '1h30m': one chat token
            elif isinstance(value, Decimal):
                out[key] = str(value)
            elif key.startswith(ENV_PREFIX) and mask_secrets and value and is_secret_env(
                    key[len(ENV_PREFIX):]):
                out[key] = MASK
            else:
                assert value is None or isinstance(value, (str, int, float))  # the other types of `values`
                out[key] = value
        return out

    def describe(self) -> str:
        """'max_model_len=4096 idle=45m' for replies and audit details (secrets masked)."""
        return " ".join(f"{k}={'none' if v is None else v}" for k, v in self.as_json().items())


def _shown(value: str) -> str:
    return f"'{clip(value)}'"


def _parsed_duration(value: object) -> timedelta:
    assert isinstance(value, timedelta)  # what the idle, warn and max_lifetime parsers return
    return value


def _canonical_key(raw_key: str) -> tuple[str, str | None]:
    """('max_model_len', None) or ('env.', 'HF_TOKEN') for env keys."""
    key = raw_key.strip()
    if key.lower().startswith(ENV_PREFIX):
        return ENV_PREFIX, key[len(ENV_PREFIX):]
    key = key.lstrip("-").lower().replace("-", "_")
    return _ALIASES.get(key, key), None


def _suggest(word: str, options: Iterable[str]) -> str | None:
    if not suggestible(word):        # never difflib on a long word
        return None
    match = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return match[0] if match else None


def validate_overrides(template: Template, raw: Mapping[str, object]) -> ValidatedOverrides:
    """Check `key=value` overrides (values as typed in chat) against the schema and build the
    effective template. Raises InvalidInput naming every bad key or value; never changes
    `template`."""
    errors: list[str] = []
    values: dict[str, object] = {}
    given_by: dict[str, str] = {}
    for raw_key, raw_value in raw.items():
        raw_key = str(raw_key)
        if raw_value is None:
            text = ""
        elif isinstance(raw_value, bool):
            text = str(raw_value).lower()
        elif isinstance(raw_value, float):
            text = repr(raw_value)
        else:
            text = str(raw_value)
        if len(raw_key) > MAX_NAME:
            errors.append(f"Setting name '{clip(raw_key.strip())}' is too long: at most {MAX_NAME} characters")
            continue
        key, env_name = _canonical_key(raw_key)
        if env_name is not None:
            if not ENV_NAME_RE.match(env_name):
                errors.append(f"{clip(raw_key.strip())}: '{clip(env_name)}' is not a valid environment variable "
                              "name (letters, digits and _, not starting with a digit)")
                continue
            try:
                value = _env_value(text)
            except _Bad:  # never echo an env value: it may be a secret
                errors.append(f"env.{env_name} must be {OVERRIDE_SCHEMA['env.NAME'].expects} "
                              "(value not shown)")
                continue
            values[f"{ENV_PREFIX}{env_name}"] = value
            continue
        spec = OVERRIDE_SCHEMA.get(key) if key != "env.NAME" else None
        if spec is None:
            suggestion = _suggest(key, [*OVERRIDE_SCHEMA, *_ALIASES])
            suggestion = _ALIASES.get(suggestion, suggestion) if suggestion else None
            msg = f"Template '{template.name}' has no setting '{clip(raw_key.strip())}'"
            if suggestion:
                msg += f" (did you mean {suggestion}?)"
            else:
                msg += f"; settings: {', '.join(s.key for s in override_schema(template))}"
            errors.append(msg)
            continue
        if not spec.applies_to(template):
            errors.append(f"{spec.key} is a vLLM setting; template '{template.name}' does not "
                          "run a vLLM model server")
            continue
        if spec.key in given_by:
            errors.append(f"{clip(given_by[spec.key])} and {clip(raw_key.strip())} both set {spec.key}; "
                          "give it once")
            continue
        given_by[spec.key] = raw_key.strip()
        if len(text) > MAX_WORD:     # no pattern runs over an over-long value
            errors.append(f"{spec.key} must be {spec.expects}, got {_shown(text)}")
            continue
        try:
            values[spec.key] = spec.parse(text)
        except _Bad:
            errors.append(f"{spec.key} must be {spec.expects}, got {_shown(text)}")
    if errors:
        raise _invalid(errors)

    # effective template
    data = template.model_dump()
    data["env"] = dict(data["env"])
    notes: list[str] = []
    for key, parsed in values.items():
        if key.startswith(ENV_PREFIX):
            data["env"][key[len(ENV_PREFIX):]] = parsed
        elif key == "idle":
            data["idle_minutes"] = _parsed_duration(parsed).total_seconds() / 60
        elif key == "warn":
            data["warn_minutes"] = _parsed_duration(parsed).total_seconds() / 60
        elif key == "max_lifetime":
            data["max_lifetime_hours"] = _parsed_duration(parsed).total_seconds() / 3600
        else:
            data[key] = parsed

    if data["warn_minutes"] >= data["idle_minutes"]:
        if "warn" in values:
            errors.append(f"warn ({format_duration(_parsed_duration(values['warn']))}) must be shorter than idle "
                          f"({format_duration(timedelta(minutes=data['idle_minutes']))})")
        else:
            data["warn_minutes"] = data["idle_minutes"] / 2
            notes.append(f"warning lead shortened to "
                         f"{format_duration(timedelta(minutes=data['warn_minutes']))} "
                         f"because idle is {format_duration(timedelta(minutes=data['idle_minutes']))}")
    tp = data.get("tensor_parallel_size")
    if tp is not None and tp > data["num_gpus"]:
        if "tensor_parallel_size" in values:
            errors.append(f"tensor_parallel_size={tp} needs {tp} GPUs, but this boot has "
                          f"num_gpus={data['num_gpus']}; add num_gpus={tp}")
        else:
            errors.append(f"num_gpus={data['num_gpus']} is fewer than template "
                          f"'{template.name}' needs for tensor_parallel_size={tp}")
    if errors:
        raise _invalid(errors)
    try:
        effective = Template.model_validate(data)
    except ValidationError as exc:
        raise _invalid([_pydantic_problem(e) for e in exc.errors()]) from None
    return ValidatedOverrides(base=template, template=effective, values=values, notes=tuple(notes))


def apply_overrides(template: Template, raw: Mapping[str, object]) -> tuple[Template, dict[str, object]]:
    """(effective template, cleaned overrides); see `validate_overrides`."""
    checked = validate_overrides(template, raw)
    return checked.template, dict(checked.values)


_MAX_PROBLEMS = 5   # listed in one message; the rest are counted


def _invalid(errors: list[str]) -> InvalidInput:
    if len(errors) == 1:
        return InvalidInput(errors[0])
    shown = errors[:_MAX_PROBLEMS]
    more = f"; and {len(errors) - len(shown)} more" if len(errors) > len(shown) else ""
    return InvalidInput(f"{len(errors)} problems with the overrides: " + "; ".join(shown) + more)


def _pydantic_problem(err: Mapping[str, Any]) -> str:
    loc = ".".join(str(p) for p in err.get("loc", ()))
    msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
    return f"{loc}: {msg}" if loc else msg


# --------------------------------------------------------------------------------------------
# The catalog: built-ins plus a team's TOML file
# --------------------------------------------------------------------------------------------


class TemplateCatalog:
    """Built-in templates plus a team's `templates.toml`; a file template with a built-in's name
    replaces it (noted in `notes`)."""

    def __init__(self, templates: Iterable[Template] = BUILTIN_TEMPLATES, *,
                 path: Path | None = None, notes: Iterable[str] = ()) -> None:
        self._templates: dict[str, Template] = {}
        for t in templates:
            self._templates[t.name] = t
        self.path = path
        self.notes: list[str] = list(notes)

    # -- loading ------------------------------------------------------------------------

    @classmethod
    def builtins(cls) -> TemplateCatalog:
        return cls()

    @classmethod
    def load(cls, path: Path | None = None) -> TemplateCatalog:
        """Built-ins plus the templates in `path`; a missing file (or None) means built-ins only.
        A bad file raises ConfigError naming the file, the template and the field."""
        if path is None:
            return cls()
        path = Path(path).expanduser()
        if not path.exists():
            return cls(path=path)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: cannot read the templates file: {exc}") from None
        return cls.from_toml(text, source=str(path), path=path)

    @classmethod
    def from_toml(cls, text: str, *, source: str = "templates.toml",
                  path: Path | None = None) -> TemplateCatalog:
        try:
            doc = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{source}: not valid TOML: {exc}") from None
        unknown = [k for k in doc if k != "templates"]
        if unknown:
            raise ConfigError(f"{source}: unknown top-level key '{unknown[0]}'; templates go in "
                              "[templates.NAME] tables")
        tables = doc.get("templates", {})
        if not isinstance(tables, dict):
            raise ConfigError(f"{source}: 'templates' must be a table of [templates.NAME] tables")
        builtins = builtin_templates()
        resolved: dict[str, Template] = {}
        notes: list[str] = []

        def fail(name: str, problem: str) -> ConfigError:
            return ConfigError(f"{source}: template '{name}': {problem}")

        def resolve(name: str, chain: tuple[str, ...]) -> Template:
            if name in resolved:
                return resolved[name]
            body = tables[name]
            if not isinstance(body, dict):
                raise fail(name, "must be a table ([templates.NAME])")
            if not NAME_RE.match(name):
                raise fail(name, "a template name is 1-64 lowercase letters, digits, '-', '_' or "
                                 "'.', starting with a letter or digit")
            for key in body:
                if key in _INTERNAL_FIELDS:
                    raise fail(name, f"{key}: set by gpuherd, not in a templates file")
                if key not in Template.model_fields:
                    suggestion = _suggest(key, [f for f in Template.model_fields
                                                if f not in _INTERNAL_FIELDS])
                    hint = f" (did you mean {suggestion}?)" if suggestion else ""
                    raise fail(name, f"{key}: unknown field{hint}")
            if "name" in body and body["name"] != name:
                raise fail(name, f"name: '{body['name']}' differs from the table name")
            data: dict[str, Any] = {}
            parent_name = body.get("extends")
            if parent_name is not None:
                if not isinstance(parent_name, str):
                    raise fail(name, "extends: must be the name of a template")
                if parent_name in tables and parent_name != name:
                    # a file template extending its own name means the built-in it replaces
                    if parent_name in chain:
                        raise fail(name, "extends: a cycle: " + " -> ".join([*chain, parent_name]))
                    parent = resolve(parent_name, (*chain, parent_name))
                elif parent_name in builtins:
                    parent = builtins[parent_name]
                elif parent_name == name:
                    raise fail(name, f"extends: a template cannot extend itself ('{name}' is not a built-in "
                                     "template it could replace)")
                else:
                    options = sorted({*tables, *builtins} - {name})
                    suggestion = _suggest(parent_name, options)
                    hint = f" (did you mean {suggestion}?)" if suggestion else ""
                    raise fail(name, f"extends: unknown template '{parent_name}'{hint}")
                data = parent.model_dump(exclude={"name", "source", "replaces_builtin", "extends"})
                if "ports" in body and "health_port" not in body:
                    data.pop("health_port", None)   # follow the new ports
                if isinstance(body.get("env"), dict):
                    body = {**body, "env": {**data.get("env", {}), **body["env"]}}
            data.update(body)
            data["name"] = name
            data["source"] = source
            data["replaces_builtin"] = name in builtins
            try:
                template = Template.model_validate(data)
            except ValidationError as exc:
                raise fail(name, _pydantic_problem(exc.errors()[0])) from None
            resolved[name] = template
            return template

        for name in tables:
            resolve(name, (name,))
        templates = dict(builtins)
        for name in tables:
            if name in builtins:
                notes.append(f"{source}: template '{name}' replaces the built-in one")
            templates[name] = resolved[name]
        return cls(templates.values(), path=path, notes=notes)

    # -- lookup -------------------------------------------------------------------------

    def names(self) -> list[str]:
        return list(self._templates)

    def all(self) -> list[Template]:
        return list(self._templates.values())

    def get(self, name: str) -> Template:
        """The template called `name` (case, '-' and '_' forgiven), or NotFound listing them."""
        key = bounded(name, MAX_NAME, "template name").strip().lower()
        if key in self._templates:
            return self._templates[key]
        loose = [n for n in self._templates if _loose(n) == _loose(key)]
        if len(loose) == 1:
            return self._templates[loose[0]]
        suggestion = _suggest(key, self._templates)
        did = f" (did you mean {suggestion}?)" if suggestion else ""
        raise NotFound(f"Unknown template '{clip(name.strip())}'{did}. Templates: {', '.join(self.names())}",
                       hint=f"did you mean {suggestion}?" if suggestion else None)

    def find(self, name: str) -> Template | None:
        """Like get(), but None for an unknown name (an instance whose template was removed)."""
        try:
            return self.get(name)
        except (NotFound, InvalidInput):    # InvalidInput: a name too long to be one
            return None

    @staticmethod
    def override_help(template: Template | None = None) -> list[tuple[str, str]]:
        """(key, what it takes) for every override that applies to `template`."""
        return [(spec.key, spec.expects) for spec in override_schema(template)]

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        try:
            self.get(name)
        except (NotFound, InvalidInput):
            return False
        return True

    def __iter__(self) -> Iterator[Template]:
        return iter(self.all())

    def __len__(self) -> int:
        return len(self._templates)


def _loose(name: str) -> str:
    return name.replace("-", "_")


__all__ = [
    "BUILTIN_TEMPLATES", "MAX_DURATION", "OVERRIDE_SCHEMA", "OverrideSpec", "Template",
    "TemplateCatalog", "ValidatedOverrides", "apply_overrides", "builtin_templates",
    "format_duration", "is_secret_env", "mask_env", "override_schema", "parse_duration",
    "validate_overrides",
]
