"""Activity probes for the idle guard (SPEC section 7).

An instance is idle when no activity signal has been seen for its idle window. This module only
answers "what does each signal say right now"; the guard owns the window and the deadlines.

Every probe answers one of three things (`ActivityStatus`):
- ACTIVE: the probe worked and saw activity;
- QUIET: the probe worked and saw none;
- UNKNOWN: the probe failed or had no data. UNKNOWN is never evidence of idleness.

Signals:
- `probe_vllm`: a model server's Prometheus `/metrics` (vLLM's OpenAI-compatible server exposes
  it on its own port). Counters are cumulative, so comparing two samples covers everything that
  happened between them, even requests that started and finished between probes.
- `gpu_activity`: the provider's GPU utilisation, where it reports one. This is an instant
  reading, weaker than the counters: it can miss short bursts between samples.

Decisions (see also `combine` and `probe_vllm`):
- First vLLM probe (no previous sample): QUIET unless requests are running or waiting; it only
  establishes the baseline.
- A counter that went DOWN means the server restarted: ACTIVE ("server restarted"), and the new
  sample is the new baseline. Someone or something restarted it, and any counts after a restart
  were made after the previous probe anyway. A crash before the metrics endpoint comes up gives
  "connection refused" (UNKNOWN), not a restart, so a crash-looping server does not look busy
  through this rule.
- A counter absent from the previous sample and present now counts from 0: Prometheus clients
  emit a labelled series only once it has been used, so its first appearance is an increase.
- After an UNKNOWN result the caller keeps its previous sample as the baseline: counters are
  cumulative, so requests served during an outage still show up on the next successful probe.
- `combine`: ACTIVE if any signal is ACTIVE; otherwise QUIET if at least one signal worked and
  said QUIET; otherwise (no working signal at all, or no signals) UNKNOWN. A failed probe
  therefore never contributes idleness; it simply does not vote.
"""

from __future__ import annotations

import asyncio
import enum
import math
import re
from collections.abc import Iterable
from datetime import datetime

import httpx
from pydantic import BaseModel, ConfigDict

from .clock import as_utc
from .errors import GpuherdError


class ProbeError(GpuherdError):
    """A probe could not produce a reading (unparsable or empty metrics). Probes turn it into an
    UNKNOWN result; it only escapes from the parsing helpers."""

    code = "probe"


class ActivityStatus(str, enum.Enum):
    ACTIVE = "active"     # the probe worked and saw activity
    QUIET = "quiet"       # the probe worked and saw none
    UNKNOWN = "unknown"   # the probe failed or had no data: never counts as idle


# --- metric names -----------------------------------------------------------------------------
# Current vLLM (V1 engine), per the vLLM docs "Production Metrics" (docs.vllm.ai, usage/metrics)
# and the metrics design page (docs/design/metrics.md in the vLLM repository), all on the
# OpenAI-compatible server's port at GET /metrics:
#   vllm:num_requests_running        gauge    requests in model execution batches
#   vllm:num_requests_waiting        gauge    requests waiting to be scheduled
#   vllm:request_success_total       counter  finished requests, labelled finished_reason
#                                             (stop, length, abort, ...)
#   vllm:prompt_tokens_total         counter  prefill tokens processed
#   vllm:generation_tokens_total     counter  generated tokens
# Every series carries a model_name label (newer releases also an engine label); we sum them.
# Alternates accepted:
# - the counter family names without `_total` (vllm:request_success, vllm:prompt_tokens,
#   vllm:generation_tokens): the names the vLLM Grafana dashboard and OpenMetrics use for the
#   family; prometheus_client adds `_total` to the exposed series.
# - vllm:num_requests_swapped (gauge, V0 engine only): listed as deprecated in the vLLM
#   metrics design page and Red Hat AI Inference Server docs; a swapped request is still in
#   flight, so it counts like a waiting one.
# Not used: vllm:avg_prompt_throughput_toks_per_s / avg_generation_throughput_toks_per_s, old
# gauges that vLLM removed (the counters above replace them and already existed alongside).
RUNNING_NAMES = ("vllm:num_requests_running",)
WAITING_NAMES = ("vllm:num_requests_waiting",)
SWAPPED_NAMES = ("vllm:num_requests_swapped",)
REQUESTS_NAMES = ("vllm:request_success_total", "vllm:request_success")
PROMPT_TOKENS_NAMES = ("vllm:prompt_tokens_total", "vllm:prompt_tokens")
GENERATION_TOKENS_NAMES = ("vllm:generation_tokens_total", "vllm:generation_tokens")

MAX_METRICS_BYTES = 16 * 1024 * 1024   # a vLLM /metrics page is tens to hundreds of KiB


class MetricsSample(BaseModel):
    """The vLLM metrics that matter for activity, each summed over its label sets. None means the
    server did not expose that metric."""

    model_config = ConfigDict(frozen=True)

    taken_at: datetime
    running: float | None = None
    waiting: float | None = None
    swapped: float | None = None
    requests_total: float | None = None
    prompt_tokens_total: float | None = None
    generation_tokens_total: float | None = None

    @classmethod
    def from_metrics(cls, metrics: dict[str, float], *, taken_at: datetime) -> MetricsSample:
        """Pick the vLLM metrics out of `parse_prometheus_text` output. Raises ProbeError when
        none of them is there (another server on that port, or metrics disabled)."""
        values = {
            "running": _first(metrics, RUNNING_NAMES),
            "waiting": _first(metrics, WAITING_NAMES),
            "swapped": _first(metrics, SWAPPED_NAMES),
            "requests_total": _first(metrics, REQUESTS_NAMES),
            "prompt_tokens_total": _first(metrics, PROMPT_TOKENS_NAMES),
            "generation_tokens_total": _first(metrics, GENERATION_TOKENS_NAMES),
        }
        if all(v is None for v in values.values()):
            raise ProbeError("no vLLM metrics in response")
        return cls(taken_at=as_utc(taken_at), **values)

    def counters(self) -> dict[str, float | None]:
        """Cumulative counters by display name, in the order they are reported."""
        return {
            "request count": self.requests_total,
            "generation tokens": self.generation_tokens_total,
            "prompt tokens": self.prompt_tokens_total,
        }


class ProbeResult(BaseModel):
    """What one probe saw. `sample` is None when the probe failed; `detail` is short text fit for
    chat and `/gpu status` ("2 requests running", "metrics unreachable: connection refused")."""

    model_config = ConfigDict(frozen=True)

    status: ActivityStatus
    sample: MetricsSample | None = None
    detail: str


def _first(metrics: dict[str, float], names: Iterable[str]) -> float | None:
    for name in names:
        value = metrics.get(name)
        if value is not None and not math.isnan(value):
            return value
    return None


# --- Prometheus text format ---------------------------------------------------------------------

_NAME = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
_LABEL_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_NUMBER = re.compile(
    r"[+-]?(?:(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?|nan|inf|infinity)", re.IGNORECASE)


def _read_quoted(line: str, pos: int, lineno: int) -> tuple[str, int]:
    """A double-quoted string starting at line[pos] == '"'; returns (text, position after)."""
    out: list[str] = []
    i = pos + 1
    while i < len(line):
        ch = line[i]
        if ch == "\\":
            if i + 1 >= len(line):
                break
            nxt = line[i + 1]
            out.append("\n" if nxt == "n" else nxt)
            i += 2
        elif ch == '"':
            return "".join(out), i + 1
        else:
            out.append(ch)
            i += 1
    raise ProbeError(f"metrics unparsable: line {lineno}: unterminated quoted string")


def _skip_ws(line: str, pos: int) -> int:
    while pos < len(line) and line[pos] in " \t":
        pos += 1
    return pos


def _parse_labels(line: str, pos: int, lineno: int, name: str | None) -> tuple[str | None, int]:
    """Labels from line[pos] == '{' to the matching '}'. Label values are not needed, only
    skipped correctly (they may hold spaces, commas, braces and escaped quotes). A bare quoted
    string is a metric name (the UTF-8 form `{"my.metric", a="b"}`). Returns (name, pos after)."""
    i = pos + 1
    while True:
        i = _skip_ws(line, i)
        if i >= len(line):
            raise ProbeError(f"metrics unparsable: line {lineno}: unterminated label set")
        if line[i] == "}":
            return name, i + 1
        if line[i] == '"':
            key, i = _read_quoted(line, i, lineno)
            i = _skip_ws(line, i)
            if i < len(line) and line[i] in ",}":
                if name is not None:
                    raise ProbeError(f"metrics unparsable: line {lineno}: two metric names")
                name = key
                if line[i] == ",":
                    i += 1
                continue
        else:
            m = _LABEL_NAME.match(line, i)
            if not m:
                raise ProbeError(f"metrics unparsable: line {lineno}: bad label name")
            i = _skip_ws(line, m.end())
        if i >= len(line) or line[i] != "=":
            raise ProbeError(f"metrics unparsable: line {lineno}: expected '=' in labels")
        i = _skip_ws(line, i + 1)
        if i >= len(line) or line[i] != '"':
            raise ProbeError(f"metrics unparsable: line {lineno}: label value not quoted")
        _, i = _read_quoted(line, i, lineno)
        i = _skip_ws(line, i)
        if i < len(line) and line[i] == ",":
            i += 1
        elif i >= len(line) or line[i] != "}":
            raise ProbeError(f"metrics unparsable: line {lineno}: expected ',' or '}}'")


def _parse_number(token: str, lineno: int) -> float:
    if not _NUMBER.fullmatch(token):
        raise ProbeError(f"metrics unparsable: line {lineno}: bad value {token[:20]!r}")
    return float(token)


def parse_prometheus_text(text: str) -> dict[str, float]:
    """Sum of sample values per series name over all label sets, from the Prometheus text
    exposition format (also accepts OpenMetrics text).

    Comments (`# HELP`, `# TYPE`, `# EOF`, anything after '#') and blank lines are skipped. Each
    series name stands alone: `x_total`, `x_created`, `x_bucket` are separate keys. Values may be
    NaN, +Inf or -Inf; NaN samples are left out of a sum (a name whose samples are all NaN maps
    to NaN). A timestamp after the value and an OpenMetrics exemplar (`# {...} 1.0`) are
    ignored.

    Raises ProbeError for a body that is not metrics at all: empty, only comments, or any line
    that is not a valid sample (an HTML error page fails on its first tag)."""
    sums: dict[str, float] = {}
    seen = 0
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("{"):
            name, pos = _parse_labels(line, 0, lineno, None)
            if name is None:
                raise ProbeError(f"metrics unparsable: line {lineno}: sample without a name")
        else:
            m = _NAME.match(line)
            if not m:
                raise ProbeError(f"metrics unparsable: line {lineno}: not a metric sample")
            name, pos = m.group(), m.end()
            if pos < len(line) and line[pos] == "{":
                name, pos = _parse_labels(line, pos, lineno, name)
                assert name is not None
        if pos < len(line) and line[pos] not in " \t":
            raise ProbeError(f"metrics unparsable: line {lineno}: not a metric sample")
        rest = line[pos:].split("#", 1)[0].split()   # drop an OpenMetrics exemplar
        if not rest or len(rest) > 2:
            raise ProbeError(f"metrics unparsable: line {lineno}: expected a value")
        value = _parse_number(rest[0], lineno)
        if len(rest) == 2:
            _parse_number(rest[1], lineno)       # timestamp: validated, not used
        seen += 1
        if math.isnan(value):
            sums.setdefault(name, math.nan)
        elif name in sums and not math.isnan(sums[name]):
            sums[name] += value
        else:
            sums[name] = value
    if not text.strip():
        raise ProbeError("metrics unparsable: empty response")
    if seen == 0:
        raise ProbeError("metrics unparsable: no samples in response")
    return sums


# --- the vLLM probe ---------------------------------------------------------------------------

def _fmt(value: float) -> str:
    if math.isfinite(value) and value == int(value):
        return str(int(value))
    return f"{value:g}"


def _plural(count: float, word: str) -> str:
    return f"{_fmt(count)} {word}" + ("" if count == 1 else "s")


def metrics_url(endpoint: str) -> str:
    """`{endpoint}/metrics` for a base URL with or without a trailing slash or a path prefix."""
    return endpoint.rstrip("/") + "/metrics"


def _transport_detail(exc: Exception) -> str:
    # httpx wraps the OS error ("All connection attempts failed"); the cause chain has the
    # ConnectionRefusedError that says what actually happened.
    cause: BaseException | None = exc
    for _ in range(8):
        if cause is None:
            break
        if isinstance(cause, ConnectionRefusedError) or "refused" in str(cause).lower():
            return "connection refused"
        cause = cause.__cause__ or cause.__context__
    text = str(exc)
    text = re.sub(r"^\[Errno -?\d+\]\s*", "", text).strip()
    if not text:
        return type(exc).__name__
    return text if len(text) <= 80 else text[:77] + "..."


def _judge(sample: MetricsSample, previous: MetricsSample | None) -> ProbeResult:
    running = sample.running or 0.0
    waiting = (sample.waiting or 0.0) + (sample.swapped or 0.0)
    if running > 0 or waiting > 0:
        parts = []
        if running > 0:
            parts.append(_plural(running, "request") + " running")
        if waiting > 0:
            parts.append(f"{_fmt(waiting)} waiting" if parts
                         else _plural(waiting, "request") + " waiting")
        detail = ", ".join(parts)
        if previous is not None and _restarted(sample, previous):
            detail = "server restarted; " + detail
        return ProbeResult(status=ActivityStatus.ACTIVE, sample=sample, detail=detail)

    if previous is None:
        served = sample.requests_total
        detail = ("first probe: nothing running" if served is None
                  else f"first probe: nothing running, {_plural(served, 'request')} served so far")
        return ProbeResult(status=ActivityStatus.QUIET, sample=sample, detail=detail)

    restarted = _restarted(sample, previous)
    if restarted:
        label, before, now = restarted
        return ProbeResult(status=ActivityStatus.ACTIVE, sample=sample,
                           detail=f"server restarted ({label} {_fmt(before)}→{_fmt(now)})")

    before_counters = previous.counters()
    for label, now_value in sample.counters().items():
        if now_value is None:
            continue
        earlier = before_counters[label]
        base = 0.0 if earlier is None else earlier
        if now_value > base:
            return ProbeResult(status=ActivityStatus.ACTIVE, sample=sample,
                               detail=f"{label} {_fmt(base)}→{_fmt(now_value)}")
    return ProbeResult(status=ActivityStatus.QUIET, sample=sample,
                       detail="no requests since last probe")


def _restarted(sample: MetricsSample, previous: MetricsSample) -> tuple[str, float, float] | None:
    """The first counter that went down since `previous`: (label, before, now)."""
    before_counters = previous.counters()
    for label, now_value in sample.counters().items():
        before = before_counters[label]
        if now_value is not None and before is not None and now_value < before:
            return label, before, now_value
    return None


async def _fetch(client: httpx.AsyncClient, url: str, timeout: float) -> tuple[int, bytes]:
    async with client.stream("GET", url, timeout=timeout,
                             headers={"Accept": "text/plain"}) as response:
        if response.status_code != 200:
            return response.status_code, b""
        body = bytearray()
        async for chunk in response.aiter_bytes():
            body += chunk
            if len(body) > MAX_METRICS_BYTES:
                raise ProbeError("metrics response too large")
        return 200, bytes(body)


async def probe_vllm(client: httpx.AsyncClient, endpoint: str, previous: MetricsSample | None,
                     *, timeout: float = 5.0, now: datetime) -> ProbeResult:
    """GET `{endpoint}/metrics` and judge activity against `previous` (the last successful
    sample; None for the first probe).

    ACTIVE: requests running or waiting, or any counter increased since `previous`, or a counter
    went down (server restarted). QUIET: the probe worked and nothing changed (first probe:
    nothing running or waiting). UNKNOWN: connection error, timeout (`timeout` bounds the whole
    request, body included), non-200 status, a body that is not vLLM metrics.

    Never raises for anything the network or the server does. On UNKNOWN keep `previous` as the
    baseline for the next probe; otherwise use the returned sample."""
    url = metrics_url(endpoint)
    try:
        async with asyncio.timeout(timeout):
            status, body = await _fetch(client, url, timeout)
    except (TimeoutError, httpx.TimeoutException):
        return ProbeResult(status=ActivityStatus.UNKNOWN,
                           detail=f"metrics timed out after {_fmt(timeout)} s")
    except ProbeError as exc:
        return ProbeResult(status=ActivityStatus.UNKNOWN, detail=exc.message)
    except httpx.InvalidURL:
        return ProbeResult(status=ActivityStatus.UNKNOWN,
                           detail=f"metrics unreachable: bad URL {url[:80]!r}")
    except (httpx.HTTPError, OSError) as exc:
        return ProbeResult(status=ActivityStatus.UNKNOWN,
                           detail=f"metrics unreachable: {_transport_detail(exc)}")
    if status != 200:
        return ProbeResult(status=ActivityStatus.UNKNOWN, detail=f"metrics returned HTTP {status}")
    try:
        metrics = parse_prometheus_text(body.decode("utf-8", errors="replace"))
        sample = MetricsSample.from_metrics(metrics, taken_at=now)
    except ProbeError as exc:
        return ProbeResult(status=ActivityStatus.UNKNOWN, detail=exc.message)
    return _judge(sample, previous)


# --- other signals and combining ---------------------------------------------------------------

def gpu_activity(util: float | None, threshold: float = 10.0) -> ActivityStatus:
    """GPU utilisation (0..100) as reported by the provider. None, NaN or a negative value (some
    APIs report -1 for "not available") is UNKNOWN; at or above `threshold` is ACTIVE."""
    if util is None or math.isnan(util) or util < 0:
        return ActivityStatus.UNKNOWN
    return ActivityStatus.ACTIVE if util >= threshold else ActivityStatus.QUIET


def combine(*statuses: ActivityStatus) -> ActivityStatus:
    """One verdict from several signals.

    ACTIVE if any signal is ACTIVE. Otherwise QUIET if at least one signal worked and said QUIET:
    a signal that failed (UNKNOWN) does not vote, so it can never make an instance idle, but it
    cannot veto a working signal either (a provider that never reports GPU utilisation must not
    keep every vLLM instance alive forever). With no working signal, or none at all: UNKNOWN.

    Callers should pass only the signals that apply to the instance (no vLLM status for an
    instance without a model server)."""
    if ActivityStatus.ACTIVE in statuses:
        return ActivityStatus.ACTIVE
    if ActivityStatus.QUIET in statuses:
        return ActivityStatus.QUIET
    return ActivityStatus.UNKNOWN
