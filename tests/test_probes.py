"""Activity probes: a real HTTP server on 127.0.0.1 plays vLLM's /metrics endpoint."""

from __future__ import annotations

import asyncio
import math
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import httpx
import pytest

from gpuherd.core.probes import (
    ActivityStatus,
    MetricsSample,
    ProbeError,
    combine,
    gpu_activity,
    metrics_url,
    parse_prometheus_text,
    probe_vllm,
)

A, Q, U = ActivityStatus.ACTIVE, ActivityStatus.QUIET, ActivityStatus.UNKNOWN
T0 = datetime(2026, 11, 10, 9, 0, tzinfo=UTC)
MODEL = "Qwen/Qwen2.5-7B-Instruct"


@dataclass
class VllmState:
    """What the fake server reports; tests change it between probes."""

    running: int = 0
    waiting: int = 0
    stop: int = 38
    length: int = 3
    abort: int = 0
    prompt_tokens: int = 5120
    generation_tokens: int = 9001
    mode: str = "ok"          # ok | 500 | html | empty | not_vllm | slow | trickle
    paths: list[str] = field(default_factory=list)

    def metrics_text(self) -> str:
        lab = f'engine="0",model_name="{MODEL}"'
        lines = [
            "# HELP python_gc_objects_collected_total Objects collected during gc",
            "# TYPE python_gc_objects_collected_total counter",
            'python_gc_objects_collected_total{generation="0"} 8123.0',
            'python_gc_objects_collected_total{generation="1"} 1402.0',
            "# HELP vllm:num_requests_running Number of requests in model execution batches.",
            "# TYPE vllm:num_requests_running gauge",
            f"vllm:num_requests_running{{{lab}}} {float(self.running)}",
            "# HELP vllm:num_requests_waiting Number of requests waiting to be processed.",
            "# TYPE vllm:num_requests_waiting gauge",
            f"vllm:num_requests_waiting{{{lab}}} {float(self.waiting)}",
            "# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.",
            "# TYPE vllm:kv_cache_usage_perc gauge",
            f"vllm:kv_cache_usage_perc{{{lab}}} 0.0125",
            "# HELP vllm:prompt_tokens_total Number of prefill tokens processed.",
            "# TYPE vllm:prompt_tokens_total counter",
            f"vllm:prompt_tokens_total{{{lab}}} {float(self.prompt_tokens)}",
            "# HELP vllm:prompt_tokens_created Number of prefill tokens processed.",
            "# TYPE vllm:prompt_tokens_created gauge",
            f"vllm:prompt_tokens_created{{{lab}}} 1.7631e+09",
            "# HELP vllm:generation_tokens_total Number of generation tokens processed.",
            "# TYPE vllm:generation_tokens_total counter",
            f"vllm:generation_tokens_total{{{lab}}} {float(self.generation_tokens)}",
            "# HELP vllm:request_success_total Count of successfully processed requests.",
            "# TYPE vllm:request_success_total counter",
            f'vllm:request_success_total{{{lab},finished_reason="stop"}} {float(self.stop)}',
            f'vllm:request_success_total{{{lab},finished_reason="length"}} {float(self.length)}',
            f'vllm:request_success_total{{{lab},finished_reason="abort"}} {float(self.abort)}',
            f'vllm:request_success_created{{{lab},finished_reason="stop"}} 1.7631e+09',
            "# HELP vllm:e2e_request_latency_seconds Histogram of e2e request latency in seconds.",
            "# TYPE vllm:e2e_request_latency_seconds histogram",
            f'vllm:e2e_request_latency_seconds_bucket{{{lab},le="0.3"}} 2.0',
            f'vllm:e2e_request_latency_seconds_bucket{{{lab},le="+Inf"}} {float(self.stop)}',
            f"vllm:e2e_request_latency_seconds_count{{{lab}}} {float(self.stop)}",
            f"vllm:e2e_request_latency_seconds_sum{{{lab}}} 51.25",
            "# HELP http_requests_total Total number of requests by method, status and handler.",
            "# TYPE http_requests_total counter",
            'http_requests_total{handler="/v1/chat/completions",method="POST",status="2xx"} 41.0',
        ]
        return "\n".join(lines) + "\n"


class FakeVllm:
    """A minimal HTTP/1.1 responder (one request per connection) on an ephemeral port."""

    def __init__(self) -> None:
        self.state = VllmState()
        self.server: asyncio.Server | None = None
        self.writers: set[asyncio.StreamWriter] = set()
        self.release = asyncio.Event()

    @property
    def endpoint(self) -> str:
        assert self.server is not None
        port = self.server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)

    async def stop(self) -> None:
        self.release.set()
        assert self.server is not None
        self.server.close()
        for writer in list(self.writers):
            writer.close()
        await self.server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.add(writer)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            path = head.split(b"\r\n", 1)[0].split()[1].decode()
            self.state.paths.append(path)
            await self._respond(path, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.writers.discard(writer)
            writer.close()

    async def _respond(self, path: str, writer: asyncio.StreamWriter) -> None:
        mode = self.state.mode
        if path != "/metrics" and not path.endswith("/vllm/metrics"):
            return self._send(writer, 404, "text/plain", b"Not Found")
        if mode == "500":
            return self._send(writer, 500, "text/plain", b"Internal Server Error")
        if mode == "html":
            page = b"<!DOCTYPE html>\n<html><head><title>502 Bad Gateway</title></head>\n" \
                   b"<body><h1>Bad Gateway</h1></body></html>\n"
            return self._send(writer, 200, "text/html", page)
        if mode == "empty":
            return self._send(writer, 200, "text/plain", b"")
        if mode == "not_vllm":
            body = b"# TYPE process_open_fds gauge\nprocess_open_fds 12.0\n"
            return self._send(writer, 200, "text/plain; version=0.0.4", body)
        if mode == "slow":
            await self.release.wait()      # never answers while the test runs
            return None
        if mode == "trickle":
            # Headers at once, then a byte every 50 ms for 2 s: no single read waits long enough
            # to hit httpx's per-read timeout, so only a whole-request deadline stops it early.
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                         b"Content-Length: 40\r\nConnection: close\r\n\r\n")
            for _ in range(40):
                if self.release.is_set():
                    break
                writer.write(b"#")
                await writer.drain()
                await asyncio.sleep(0.05)
            return None
        body = self.state.metrics_text().encode()
        return self._send(writer, 200, "text/plain; version=0.0.4; charset=utf-8", body)

    @staticmethod
    def _send(writer: asyncio.StreamWriter, status: int, ctype: str, body: bytes) -> None:
        reason = {200: "OK", 404: "Not Found", 500: "Internal Server Error"}[status]
        writer.write(f"HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\n"
                     f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)


@pytest.fixture
async def vllm() -> AsyncIterator[FakeVllm]:
    server = FakeVllm()
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient() as c:
        yield c


def closed_port() -> int:
    """A port nothing listens on: bind an ephemeral one and release it."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- probe_vllm against the fake server ---------------------------------------------------------

async def test_first_probe_is_a_quiet_baseline(vllm: FakeVllm, client: httpx.AsyncClient) -> None:
    result = await probe_vllm(client, vllm.endpoint, None, now=T0)
    assert result.status is Q
    assert result.sample is not None
    assert result.sample.requests_total == 41          # stop 38 + length 3 + abort 0
    assert result.sample.prompt_tokens_total == 5120
    assert result.sample.generation_tokens_total == 9001
    assert result.sample.running == 0 and result.sample.waiting == 0
    assert result.sample.taken_at == T0
    assert "first probe" in result.detail and "41 requests" in result.detail
    assert vllm.state.paths == ["/metrics"]


async def test_counter_increase_is_active(vllm: FakeVllm, client: httpx.AsyncClient) -> None:
    first = await probe_vllm(client, vllm.endpoint, None, now=T0)
    vllm.state.stop += 2
    vllm.state.length += 1
    second = await probe_vllm(client, vllm.endpoint, first.sample, now=T0 + timedelta(minutes=1))
    assert second.status is A
    assert second.detail == "request count 41→44"
    assert second.sample is not None and second.sample.requests_total == 44


async def test_token_counters_alone_are_activity(vllm: FakeVllm,
                                                 client: httpx.AsyncClient) -> None:
    first = await probe_vllm(client, vllm.endpoint, None, now=T0)
    vllm.state.prompt_tokens += 700    # a long prefill finished between probes, no request yet
    second = await probe_vllm(client, vllm.endpoint, first.sample, now=T0 + timedelta(minutes=1))
    assert second.status is A
    assert second.detail == "prompt tokens 5120→5820"


async def test_running_gauge_is_active_even_on_first_probe(vllm: FakeVllm,
                                                           client: httpx.AsyncClient) -> None:
    vllm.state.running = 2
    result = await probe_vllm(client, vllm.endpoint, None, now=T0)
    assert result.status is A
    assert result.detail == "2 requests running"


async def test_waiting_gauge_is_active(vllm: FakeVllm, client: httpx.AsyncClient) -> None:
    first = await probe_vllm(client, vllm.endpoint, None, now=T0)
    vllm.state.waiting = 1
    second = await probe_vllm(client, vllm.endpoint, first.sample, now=T0 + timedelta(minutes=1))
    assert second.status is A
    assert second.detail == "1 request waiting"
    vllm.state.running = 1
    third = await probe_vllm(client, vllm.endpoint, second.sample, now=T0 + timedelta(minutes=2))
    assert third.detail == "1 request running, 1 waiting"


async def test_no_change_is_quiet(vllm: FakeVllm, client: httpx.AsyncClient) -> None:
    first = await probe_vllm(client, vllm.endpoint, None, now=T0)
    second = await probe_vllm(client, vllm.endpoint, first.sample, now=T0 + timedelta(minutes=1))
    assert second.status is Q
    assert second.detail == "no requests since last probe"
    assert second.sample is not None and second.sample.taken_at == T0 + timedelta(minutes=1)


async def test_endpoint_with_trailing_slash_or_prefix(vllm: FakeVllm,
                                                      client: httpx.AsyncClient) -> None:
    ok = await probe_vllm(client, vllm.endpoint + "/", None, now=T0)
    prefixed = await probe_vllm(client, vllm.endpoint + "/vllm/", None, now=T0)
    assert ok.status is Q and prefixed.status is Q
    assert vllm.state.paths == ["/metrics", "/vllm/metrics"]
    assert metrics_url("http://h:8000//") == "http://h:8000/metrics"


async def test_server_down_is_unknown(client: httpx.AsyncClient) -> None:
    result = await probe_vllm(client, f"http://127.0.0.1:{closed_port()}", None, now=T0)
    assert result.status is U
    assert result.sample is None
    assert result.detail == "metrics unreachable: connection refused"


@pytest.mark.parametrize("mode, expected", [
    ("500", "metrics returned HTTP 500"),
    ("html", "metrics unparsable: line 1: not a metric sample"),
    ("empty", "metrics unparsable: empty response"),
    ("not_vllm", "no vLLM metrics in response"),
])
async def test_bad_answers_are_unknown(vllm: FakeVllm, client: httpx.AsyncClient,
                                       mode: str, expected: str) -> None:
    first = await probe_vllm(client, vllm.endpoint, None, now=T0)
    vllm.state.mode = mode
    result = await probe_vllm(client, vllm.endpoint, first.sample, now=T0 + timedelta(minutes=1))
    assert result.status is U
    assert result.sample is None
    assert result.detail == expected


async def test_wrong_path_404_is_unknown(vllm: FakeVllm, client: httpx.AsyncClient) -> None:
    result = await probe_vllm(client, vllm.endpoint + "/elsewhere", None, now=T0)
    assert result.status is U and result.detail == "metrics returned HTTP 404"


@pytest.mark.parametrize("mode", ["slow", "trickle"])
async def test_slow_server_times_out_as_unknown(vllm: FakeVllm, client: httpx.AsyncClient,
                                                mode: str) -> None:
    vllm.state.mode = mode
    started = time.monotonic()
    result = await probe_vllm(client, vllm.endpoint, None, timeout=0.2, now=T0)
    elapsed = time.monotonic() - started
    assert result.status is U
    assert result.detail == "metrics timed out after 0.2 s"
    assert elapsed < 1.0


async def test_bad_endpoint_is_unknown_not_an_exception(client: httpx.AsyncClient) -> None:
    result = await probe_vllm(client, "not a url", None, now=T0)
    assert result.status is U
    assert result.detail.startswith("metrics unreachable")


async def test_counter_reset_means_restart_and_new_baseline(vllm: FakeVllm,
                                                            client: httpx.AsyncClient) -> None:
    first = await probe_vllm(client, vllm.endpoint, None, now=T0)
    vllm.state.stop, vllm.state.length = 0, 0          # server restarted: counters from zero
    vllm.state.prompt_tokens, vllm.state.generation_tokens = 0, 0
    second = await probe_vllm(client, vllm.endpoint, first.sample, now=T0 + timedelta(minutes=1))
    assert second.status is A
    assert second.detail == "server restarted (request count 41→0)"
    third = await probe_vllm(client, vllm.endpoint, second.sample, now=T0 + timedelta(minutes=2))
    assert third.status is Q                             # the restart sample is the new baseline


async def test_outage_keeps_baseline_and_counts_requests_made_meanwhile(
        vllm: FakeVllm, client: httpx.AsyncClient) -> None:
    first = await probe_vllm(client, vllm.endpoint, None, now=T0)
    vllm.state.mode = "500"
    down = await probe_vllm(client, vllm.endpoint, first.sample, now=T0 + timedelta(minutes=1))
    assert down.status is U
    vllm.state.mode = "ok"
    vllm.state.stop += 1
    back = await probe_vllm(client, vllm.endpoint, first.sample, now=T0 + timedelta(minutes=2))
    assert back.status is A and back.detail == "request count 41→42"


# --- MetricsSample ------------------------------------------------------------------------------

def test_sample_accepts_family_names_without_total_and_legacy_swapped() -> None:
    metrics = {"vllm:request_success": 7.0, "vllm:prompt_tokens": 10.0,
               "vllm:generation_tokens": 20.0, "vllm:num_requests_swapped": 1.0}
    sample = MetricsSample.from_metrics(metrics, taken_at=T0)
    assert (sample.requests_total, sample.prompt_tokens_total,
            sample.generation_tokens_total, sample.swapped) == (7, 10, 20, 1)
    assert sample.running is None


def test_sample_prefers_current_name_and_ignores_nan() -> None:
    sample = MetricsSample.from_metrics(
        {"vllm:request_success_total": 5.0, "vllm:request_success": 99.0,
         "vllm:num_requests_running": math.nan}, taken_at=T0)
    assert sample.requests_total == 5
    assert sample.running is None


def test_sample_without_vllm_metrics_raises() -> None:
    with pytest.raises(ProbeError, match="no vLLM metrics"):
        MetricsSample.from_metrics({"process_open_fds": 3.0}, taken_at=T0)


# --- parse_prometheus_text ------------------------------------------------------------------------

def test_parse_sums_label_sets_and_skips_comments() -> None:
    text = (
        "# HELP vllm:request_success_total Count of successfully processed requests.\n"
        "# TYPE vllm:request_success_total counter\n"
        f'vllm:request_success_total{{finished_reason="stop",model_name="{MODEL}"}} 40.0\n'
        f'vllm:request_success_total{{finished_reason="length",model_name="{MODEL}"}} 2.0\n'
        "\n"
        "# a free comment with { braces } and 12.5\n"
        "plain_metric 3\n"
        "empty_labels{} 4\n"
    )
    parsed = parse_prometheus_text(text)
    assert parsed == {"vllm:request_success_total": 42.0, "plain_metric": 3.0,
                      "empty_labels": 4.0}


def test_parse_created_series_stay_separate() -> None:
    parsed = parse_prometheus_text(
        'vllm:prompt_tokens_total{model_name="m"} 10\n'
        'vllm:prompt_tokens_created{model_name="m"} 1.7631e+09\n')
    assert parsed["vllm:prompt_tokens_total"] == 10
    assert parsed["vllm:prompt_tokens_created"] == pytest.approx(1.7631e9)


def test_parse_escaped_label_values() -> None:
    text = ('m{model_name="a \\"quoted\\" name, with } and {",path="C:\\\\dir",'
            'note="line\\nbreak",} 2.5\n'
            'm{model_name="x y"} 0.5\n')
    assert parse_prometheus_text(text) == {"m": 3.0}


def test_parse_timestamps_exemplars_eof_and_crlf() -> None:
    text = ("a_total 3 1700000000000\r\n"
            "a_total 4 1.7e12\r\n"
            'b_total{x="1"} 17.0 1520879607.789 # {trace_id="KOO5S4vxi0o"} 0.67\r\n'
            "# EOF\r\n")
    assert parse_prometheus_text(text) == {"a_total": 7.0, "b_total": 17.0}


def test_parse_special_values() -> None:
    parsed = parse_prometheus_text(
        'g{a="1"} NaN\ng{a="2"} 5\n'
        "only_nan NaN\n"
        "up +Inf\ndown -Inf\n"
        "sci 1.5e3\n")
    assert parsed["g"] == 5.0                  # NaN samples are left out of a sum
    assert math.isnan(parsed["only_nan"])
    assert parsed["up"] == math.inf and parsed["down"] == -math.inf
    assert parsed["sci"] == 1500.0


def test_parse_utf8_quoted_metric_name() -> None:
    assert parse_prometheus_text('{"my.metric", a="b"} 4\n') == {"my.metric": 4.0}


@pytest.mark.parametrize("body, message", [
    ("", "empty response"),
    ("  \n\n", "empty response"),
    ("# HELP x y\n# TYPE x counter\n", "no samples"),
    ("<!DOCTYPE html>\n<html><body>502</body></html>\n", "line 1"),
    ('{"detail":"Not Found"}', "line 1"),
    ("Internal Server Error", "bad value"),
    ("metric_without_value\n", "expected a value"),
    ('m{a="unterminated} 1\n', "unterminated"),
    ('m{a=unquoted} 1\n', "not quoted"),
    ("m 1 2 3\n", "expected a value"),
    ("m 1_000\n", "bad value"),
    ("ok 1\n<p>oops</p>\n", "line 2"),
])
def test_parse_rejects_garbage(body: str, message: str) -> None:
    with pytest.raises(ProbeError, match=message):
        parse_prometheus_text(body)


# --- gpu_activity and combine ---------------------------------------------------------------------

@pytest.mark.parametrize("util, threshold, expected", [
    (None, 10.0, U),
    (math.nan, 10.0, U),
    (-1.0, 10.0, U),
    (0.0, 10.0, Q),
    (9.99, 10.0, Q),
    (10.0, 10.0, A),
    (100.0, 10.0, A),
    (30.0, 50.0, Q),
    (50.0, 50.0, A),
])
def test_gpu_activity(util: float | None, threshold: float, expected: ActivityStatus) -> None:
    assert gpu_activity(util, threshold) is expected


@pytest.mark.parametrize("statuses, expected", [
    ((), U),                  # no signal at all
    ((U,), U),                # a failing probe never makes an instance idle
    ((U, U), U),
    ((Q,), Q),
    ((Q, Q), Q),
    ((Q, U), Q),              # vLLM quiet, GPU utilisation not reported: the working one decides
    ((U, Q), Q),
    ((A,), A),
    ((A, U), A),
    ((Q, A), A),
    ((U, Q, A), A),
])
def test_combine(statuses: tuple[ActivityStatus, ...], expected: ActivityStatus) -> None:
    assert combine(*statuses) is expected
