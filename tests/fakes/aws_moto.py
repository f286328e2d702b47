"""AWS for the tests: moto's server on loopback, and a fault-injecting proxy in front of it.

* `moto_url()` starts one `ThreadedMotoServer` on 127.0.0.1 (port 0: a free one) for the whole
  test session and warms it; `reset_moto(url)` clears its state (`POST /moto-api/reset`) and
  `clean_moto()` removes just the machines (the quick way between tests).
* `MotoProxy` is a `LoopbackServer` that forwards every request to moto over real HTTP unless a
  fault is queued for the operation the request belongs to. Faults go back the way AWS sends
  them: `RequestLimitExceeded` as HTTP 503 (with `x-amz-retry-after` in milliseconds when a
  Retry-After is asked for), `InternalError` 500, `InsufficientInstanceCapacity` 500 (EC2 lists
  it among its server errors, so botocore retries it), `AuthFailure` 401, a hang past the
  client's read timeout, and a truncated XML body. It also answers what moto does not
  implement: the Pricing API (`GetProducts`, from `prices`) and, when `spot_prices` is set,
  `DescribeSpotPriceHistory` (moto's is a constant 0.00001). `pin(action, ...)` answers one
  action with a canned AWS error.
* `price_list_item()` builds one Pricing API `PriceList` entry (a JSON string), for the proxy
  and for botocore Stubber tests; `market="CapacityBlock"` builds a Capacity Block SKU. The
  proxy's GetProducts applies every TERM_MATCH filter it is sent (as AWS does) over `prices` and
  `capacity_block_prices`, and records them in `pricing_filters`.
* `fast_retries()` caps botocore's retry backoff while tests run (the retries still happen).
"""

from __future__ import annotations

import http.client
import json
import logging
import re
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlsplit
from xml.sax.saxutils import escape

from .loopback import Fault, LoopbackServer, Request, Response

ACCESS_KEY = "fake-access-key-for-tests"
SECRET_KEY = "gpuherd/test+SecretAccessKey0123456789abcd"     # what no message may contain
REGION = "us-east-1"
ACCOUNT = "123456789012"                                     # moto's default account
MOTO_AMI = "ami-dca37ea5"                                    # in moto's default AMI list (a 2017 DLAMI)
EC2_NS = "http://ec2.amazonaws.com/doc/2016-11-15/"

_server: Any = None
_server_url: str | None = None
_server_lock = threading.Lock()


# ------------------------------------------------------------------------------ moto server

def moto_url() -> str:
    """The URL of the session's moto server, started (and warmed) on first use."""
    global _server, _server_url
    with _server_lock:
        if _server_url is None:
            from moto.server import ThreadedMotoServer

            logging.getLogger("werkzeug").setLevel(logging.WARNING)   # one line per request otherwise
            server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
            server.start()
            host, port = server.get_host_and_port()
            _server, _server_url = server, f"http://{host}:{port}"
            # the first describe_instance_types loads moto's type data (about a second)
            ec2 = session().client("ec2", region_name=REGION, endpoint_url=_server_url)
            ec2.describe_instance_types(Filters=[{"Name": "instance-type", "Values": ["g4dn.*"]}])
            ec2.close()
        return _server_url


def reset_moto(url: str | None = None) -> None:
    request = urllib.request.Request((url or moto_url()) + "/moto-api/reset", method="POST", data=b"")
    with urllib.request.urlopen(request, timeout=10) as answer:
        answer.read()


_sessions: dict[tuple[str, str], Any] = {}


def clean_moto(url: str | None = None) -> None:
    """Remove every instance, volume and spot request from moto while keeping each region's
    setup (its ~1300 default AMIs, default VPC and subnets), which a full reset makes moto
    rebuild on the next call (a quarter second a test). Falls back to a full reset."""
    url = url or moto_url()
    try:
        from moto.ec2.models import ec2_backends

        for backend in list(ec2_backends[ACCOUNT].values()):
            backend.reservations.clear()
            backend.spot_instance_requests.clear()
            backend.volumes.clear()
    except (ImportError, AttributeError, KeyError):  # a moto whose internals moved
        reset_moto(url)



def session(access_key: str = ACCESS_KEY, secret_key: str = SECRET_KEY) -> Any:
    """A boto3 session with explicit dummy credentials, shared by the tests: botocore caches the
    (large) EC2 service model per session, so a fresh provider's clients are built in
    milliseconds. Only used from the test's main thread, as boto3 sessions must be."""
    import boto3

    key = (access_key, secret_key)
    if key not in _sessions:
        _sessions[key] = boto3.Session(aws_access_key_id=access_key, aws_secret_access_key=secret_key,
                                       region_name=REGION)
    return _sessions[key]


def set_dummy_credentials(monkeypatch: Any) -> None:
    """Credentials for boto3's default chain (tests/conftest.py clears every AWS_* variable)."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)


def forget_instance(instance_id: str, region: str = REGION) -> None:
    """Remove an instance from moto entirely, as EC2 does about an hour after termination."""
    from moto.ec2.models import ec2_backends

    backend = ec2_backends[ACCOUNT][region]
    for reservation_id, reservation in list(backend.reservations.items()):
        reservation.instances = [i for i in reservation.instances if i.id != instance_id]
        if not reservation.instances:
            del backend.reservations[reservation_id]


# ------------------------------------------------------------------------------ retries

_patch_lock = threading.Lock()
_patch_users = 0
_original_delay: Callable[..., float] | None = None


def fast_retries(cap_s: float = 0.01) -> Callable[[], None]:
    """Cap botocore's standard-mode backoff at `cap_s` until the returned undo is called
    (reference-counted: overlapping users share one patch)."""
    global _patch_users, _original_delay
    from botocore.retries import standard

    with _patch_lock:
        if _patch_users == 0:
            _original_delay = standard.ExponentialBackoff.delay_amount
            original = _original_delay

            def capped(self: Any, context: Any) -> float:
                return min(original(self, context), cap_s)

            standard.ExponentialBackoff.delay_amount = capped  # type: ignore[method-assign]
        _patch_users += 1
    undone = False

    def undo() -> None:
        global _patch_users
        nonlocal undone
        with _patch_lock:
            if undone:
                return
            undone = True
            _patch_users -= 1
            if _patch_users == 0 and _original_delay is not None:
                standard.ExponentialBackoff.delay_amount = _original_delay  # type: ignore[method-assign]

    return undo


@contextmanager
def quick_retries(cap_s: float = 0.01) -> Iterator[None]:
    undo = fast_retries(cap_s)
    try:
        yield
    finally:
        undo()


# ------------------------------------------------------------------------------ Pricing API shapes

def price_list_item(instance_type: str, usd: str, region: str = REGION, *, gpus: int = 1,
                    sku: str | None = None, market: str = "OnDemand") -> str:
    """One PriceList entry as the Pricing API returns it: a JSON *string* whose term and price
    dimension keys are opaque (SKU.offerTermCode, SKU.offerTermCode.rateCode). A Reserved term
    with a lower price is included so a parser that reads it is caught. `market="CapacityBlock"`
    is an EC2 Capacity Block SKU of the type: same attributes but `marketoption`, and its price
    sits in an OnDemand term too, so only the marketoption filter tells them apart."""
    sku = sku or uuid.uuid5(uuid.NAMESPACE_DNS, f"{region}/{instance_type}/{market}").hex[:16].upper()
    usage = f"BoxUsage:{instance_type}" if market == "OnDemand" else f"CapacityBlock:{instance_type}"
    od, rate = f"{sku}.JRTCKXETXF", f"{sku}.JRTCKXETXF.6YS6EN2CT7"
    reserved = f"{sku}.4NA7Y494T4"
    item = {
        "product": {
            "productFamily": "Compute Instance",
            "attributes": {
                "instanceType": instance_type, "regionCode": region, "location": "US East (N. Virginia)",
                "instanceFamily": "GPU instance", "operatingSystem": "Linux", "tenancy": "Shared",
                "preInstalledSw": "NA", "capacitystatus": "Used", "licenseModel": "No License required",
                "gpu": str(gpus), "servicecode": "AmazonEC2", "usagetype": usage,
                "operation": "RunInstances", "marketoption": market,
            },
            "sku": sku,
        },
        "serviceCode": "AmazonEC2",
        "terms": {
            "OnDemand": {od: {
                "priceDimensions": {rate: {
                    "unit": "Hrs", "endRange": "Inf", "beginRange": "0", "appliesTo": [], "rateCode": rate,
                    "description": f"${usd} per On Demand Linux {instance_type} Instance Hour",
                    "pricePerUnit": {"USD": usd},
                }},
                "sku": sku, "effectiveDate": "2026-11-01T00:00:00Z", "offerTermCode": "JRTCKXETXF",
                "termAttributes": {},
            }},
            "Reserved": {reserved: {
                "priceDimensions": {f"{reserved}.6YS6EN2CT7": {
                    "unit": "Hrs", "pricePerUnit": {"USD": "0.0100000000"}, "description": "reserved",
                    "beginRange": "0", "endRange": "Inf", "appliesTo": [], "rateCode": f"{reserved}.6YS6EN2CT7",
                }},
                "sku": sku, "effectiveDate": "2026-11-01T00:00:00Z", "offerTermCode": "4NA7Y494T4",
                "termAttributes": {"LeaseContractLength": "1yr", "PurchaseOption": "No Upfront"},
            }},
        },
        "version": "20261101000000",
        "publicationDate": "2026-11-01T00:00:00Z",
    }
    return json.dumps(item)


# ------------------------------------------------------------------------------ the proxy

_OPS = {
    "DescribeInstanceTypes": "search", "DescribeInstanceTypeOfferings": "search",
    "DescribeSpotPriceHistory": "search", "GetProducts": "search",
    "RunInstances": "create", "StartInstances": "start", "StopInstances": "stop",
    "TerminateInstances": "destroy", "CancelSpotInstanceRequests": "destroy",
    "DescribeImages": "image", "DescribeVolumes": "volumes",
}


def op_of(action: str, params: Mapping[str, str]) -> str:
    """The gpuherd operation an AWS action belongs to (what `inject` targets). DescribeInstances
    with instance ids is a get, without is a list."""
    if action == "DescribeInstances":
        return "get" if any(k.startswith("InstanceId.") for k in params) else "list"
    return _OPS.get(action, action)


def ec2_error(code: str, message: str) -> str:
    return (f'<?xml version="1.0" encoding="UTF-8"?>\n<Response><Errors><Error><Code>{escape(code)}</Code>'
            f"<Message>{escape(message)}</Message></Error></Errors>"
            f"<RequestID>{uuid.uuid4()}</RequestID></Response>")


@dataclass
class Answer:
    status: int
    body: str | bytes
    content_type: str = "text/xml;charset=UTF-8"
    headers: dict[str, str] | None = None


class MotoProxy(LoopbackServer):
    """Forwards to moto; faults per gpuherd operation (see `op_of`)."""

    def __init__(self, upstream: str, *, latency_s: float = 0.0) -> None:
        super().__init__(latency_s=latency_s)
        parts = urlsplit(upstream)
        self.upstream_host = parts.hostname or "127.0.0.1"
        self.upstream_port = parts.port or 80
        self.prices: dict[tuple[str, str], str] = {}        # (region, type) -> USD/h string
        # (region, type) -> the Capacity Block SKU's USD/h: listed *before* the on-demand SKU, and
        # returned unless the request filters marketoption=OnDemand (as AWS does)
        self.capacity_block_prices: dict[tuple[str, str], str] = {}
        self.pricing_filters: list[dict[str, str]] = []     # the Filters of the last GetProducts
        self.spot_prices: dict[tuple[str, str], list[str]] = {}  # (region, type) -> one price per zone
        self.pricing_calls = 0
        self._pins: dict[str, list[Answer]] = {}

    def routes(self) -> None:  # every request is POST / ; the action decides (see _serve)
        return None

    def pin(self, action: str, answer: Answer, *, times: int = 1) -> None:
        """The next `times` requests of `action` get `answer` instead of moto's."""
        with self._lock:
            self._pins.setdefault(action, []).extend([answer] * times)

    def actions(self, op: str | None = None) -> list[str]:
        with self._lock:
            return [r.body.get("Action", "") for r in self.requests
                    if isinstance(r.body, dict) and (op is None or r.op == op)]

    # --- serving ---------------------------------------------------------------------
    def _serve(self, h: Any) -> None:
        split = urlsplit(h.path)
        length = int(h.headers.get("Content-Length") or 0)
        raw = h.rfile.read(length) if length else b""
        headers = {k: v for k, v in h.headers.items()}
        target = h.headers.get("X-Amz-Target") or ""
        if target:
            service, action = "pricing", target.rsplit(".", 1)[-1]
            try:
                params: dict[str, Any] = json.loads(raw or b"{}")
            except ValueError:
                params = {}
            params["Action"] = action
        else:
            service = "ec2"
            params = dict(parse_qsl(raw.decode("utf-8", "replace"), keep_blank_values=True))
            action = params.get("Action", "")
        op = op_of(action, params)
        request = Request(method=h.command, path=split.path, query=dict(parse_qsl(split.query)),
                          headers=headers, body=params, raw=raw, op=op)
        with self._lock:
            self.requests.append(request)
            queue = self._faults.get(op)
            fault = queue.popleft() if queue else None
            pins = self._pins.get(action)
            pinned = pins.pop(0) if pins else None
        if self.latency_s:
            time.sleep(self.latency_s)
        if fault is not None:
            return self._send_aws_fault(h, fault, service, action, params)
        if pinned is not None:
            return self._answer(h, pinned)
        if service == "pricing":
            return self._answer(h, self._get_products(params))
        if action == "DescribeSpotPriceHistory" and self.spot_prices:
            return self._answer(h, self._spot_history(params, _region_of(headers)))
        return self._forward(h, raw, headers)

    def _forward(self, h: Any, raw: bytes, headers: dict[str, str]) -> None:
        conn = http.client.HTTPConnection(self.upstream_host, self.upstream_port, timeout=30)
        try:
            skip = {"connection", "keep-alive", "transfer-encoding", "content-length"}
            conn.request(h.command, h.path, body=raw,
                         headers={k: v for k, v in headers.items() if k.lower() not in skip})
            upstream = conn.getresponse()
            body = upstream.read()
            keep = {k: v for k, v in upstream.getheaders()
                    if k.lower() not in skip | {"content-type", "server", "date"}}
            self._answer(h, Answer(upstream.status, body, upstream.getheader("Content-Type") or "text/xml",
                                   keep))
        finally:
            conn.close()

    def _answer(self, h: Any, answer: Answer) -> None:
        self._send(h, Response(answer.status, answer.body, dict(answer.headers or {}), answer.content_type))

    def _send_aws_fault(self, h: Any, fault: Fault, service: str, action: str, params: Mapping[str, Any]) -> None:
        kind = fault.kind
        if kind in ("timeout", "disconnect", "bad_gateway"):
            return self._send_fault(h, fault, Request("POST", "/", {}, {}, params, op=""))
        if service == "pricing":
            return self._answer(h, _pricing_fault(kind))
        if kind == "rate_limit":
            extra = ({"x-amz-retry-after": str(int(fault.retry_after * 1000))}
                     if fault.retry_after is not None else {})
            return self._answer(h, Answer(503, ec2_error("RequestLimitExceeded", "Request limit exceeded."),
                                          headers=extra))
        if kind == "server_error":
            return self._answer(h, Answer(500, ec2_error("InternalError", "An internal error has occurred")))
        if kind == "malformed":
            body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<{action}Response xmlns="{EC2_NS}">'
                    "<requestId>7a62c49f-347e-4fc4-9331-6e8eEXAMPLE</requestId><reservationSet><item>"
                    "<reservationId>r-1234</reservationId><instancesSet><item><instanceId>i-0")
            return self._answer(h, Answer(200, body))
        if kind == "capacity":
            itype = params.get("InstanceType", "g5.xlarge")
            return self._answer(h, Answer(500, ec2_error(
                "InsufficientInstanceCapacity",
                f"We currently do not have sufficient {itype} capacity in the Availability Zone you "
                f"requested (us-east-1a). Our system will be working on provisioning additional capacity. "
                f"You can currently get {itype} capacity by not specifying an Availability Zone in your "
                "request or choosing us-east-1b, us-east-1c.")))
        if kind == "auth":
            return self._answer(h, Answer(401, ec2_error(
                "AuthFailure", "AWS was not able to validate the provided access credentials")))
        raise ValueError(f"MotoProxy cannot inject {kind!r}")

    def _get_products(self, params: Mapping[str, Any]) -> Answer:
        with self._lock:
            self.pricing_calls += 1
        filters = [f for f in params.get("Filters") or [] if isinstance(f, dict)]
        with self._lock:
            self.pricing_filters = filters
        wanted = {f.get("Field"): f.get("Value") for f in filters}
        region = wanted.get("regionCode", REGION)
        candidates = [price_list_item(itype, usd, region, market="CapacityBlock")
                      for (r, itype), usd in sorted(self.capacity_block_prices.items()) if r == region]
        candidates += [price_list_item(itype, usd, region) for (r, itype), usd in sorted(self.prices.items())
                       if r == region]
        items = [raw for raw in candidates if _matches(json.loads(raw)["product"]["attributes"], filters)]
        return Answer(200, json.dumps({"FormatVersion": "aws_v1", "PriceList": items}),
                      "application/x-amz-json-1.1")

    def _spot_history(self, params: Mapping[str, str], region: str) -> Answer:
        types = [v for k, v in sorted(params.items()) if k.startswith("InstanceType.")]
        rows = []
        for itype in types:
            for zone, price in zip("abcdef", self.spot_prices.get((region, itype), []), strict=False):
                rows.append(f"<item><instanceType>{escape(itype)}</instanceType>"
                            "<productDescription>Linux/UNIX</productDescription>"
                            f"<spotPrice>{escape(price)}</spotPrice>"
                            "<timestamp>2026-11-23T05:00:00.000Z</timestamp>"
                            f"<availabilityZone>{region}{zone}</availabilityZone></item>")
        body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<DescribeSpotPriceHistoryResponse xmlns="{EC2_NS}">'
                f"<requestId>{uuid.uuid4()}</requestId><spotPriceHistorySet>{''.join(rows)}</spotPriceHistorySet>"
                "<nextToken></nextToken></DescribeSpotPriceHistoryResponse>")
        return Answer(200, body)


def _matches(attributes: Mapping[str, str], filters: list[dict[str, str]]) -> bool:
    """The Pricing API's TERM_MATCH: every filtered attribute equals the value (case-insensitive);
    an attribute the product does not have does not match."""
    for f in filters:
        if f.get("Type", "TERM_MATCH") != "TERM_MATCH":
            continue
        have = attributes.get(str(f.get("Field")))
        if have is None or str(have).casefold() != str(f.get("Value")).casefold():
            return False
    return True


def _pricing_fault(kind: str) -> Answer:
    json_type = "application/x-amz-json-1.1"
    if kind == "rate_limit":
        return Answer(400, json.dumps({"__type": "ThrottlingException", "message": "Rate exceeded"}), json_type)
    if kind == "auth":
        return Answer(403, json.dumps({"__type": "UnrecognizedClientException",
                                       "message": "The security token included in the request is invalid."}),
                      json_type)
    if kind == "malformed":
        return Answer(200, b'{"FormatVersion": "aws_v1", "PriceList": ["{\\"prod', json_type)
    return Answer(500, json.dumps({"__type": "InternalErrorException", "message": "internal error"}), json_type)


def _region_of(headers: Mapping[str, str]) -> str:
    auth = next((v for k, v in headers.items() if k.lower() == "authorization"), "")
    match = re.search(r"Credential=[^/]+/\d+/([^/]+)/", auth)
    return match.group(1) if match else REGION
