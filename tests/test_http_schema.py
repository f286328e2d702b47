"""schemathesis against the live `/openapi.json` of the real server (uvicorn on a loopback port,
the same harness as test_http_api.py), for every operation except the event stream:

- with a valid admin key, schema-valid requests (positive) and schema-breaking ones (negative):
  no 5xx, every status, content type, header and body as the document says, and every
  negative request refused with a 4xx;
- without a key: every operation answers 401 and nothing else;
- with a viewer key: no mutating operation succeeds (403 from core, or 4xx for a request that
  names nothing that exists), and the instances, budgets, users and api_keys tables are
  unchanged afterwards.

Examples per operation are few (the whole file must stay well under a minute on both
databases); shrinking is off, and every failure of every operation is collected before the
test fails, so one run names them all."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.live_server import LiveServer as Live
from tests.live_server import start_live, stop_live

EXCLUDED = ("/api/v1/events",)          # a Server-Sent Events stream (test_http_stream.py)
MUTATING = {"POST", "PUT", "PATCH", "DELETE"}
CONFORMANCE = [not_a_server_error, status_code_conformance, content_type_conformance,
               response_headers_conformance, response_schema_conformance]
EXAMPLES = 8


@pytest.fixture
def fuzzed(tmp_path: Path, db_url: str) -> Iterator[Live]:
    live = start_live(tmp_path, db_url, api_burst=100_000, api_rate_per_minute=1_000_000)
    try:
        yield live
    finally:
        stop_live(live)


def _operations(live: Live) -> list[Any]:
    schema = schemathesis.openapi.from_url(live.url + "/openapi.json")
    ops = [result.ok() for result in schema.get_all_operations()]
    chosen = [op for op in ops if op.path not in EXCLUDED]
    assert len(chosen) >= 25, [f"{op.method} {op.path}" for op in chosen]   # the whole API is documented
    return chosen


def _describe(exc: BaseException) -> str:
    parts = exc.exceptions if isinstance(exc, BaseExceptionGroup) else (exc,)
    return " | ".join(" ".join(str(p).split())[:400] for p in parts)


def _fuzz(op: Any, mode: GenerationMode, examples: int, each: Callable[[Any], None],
          **fixed: Any) -> list[str]:
    """Run `each(case)` on `examples` generated cases of `op` (`fixed`: parts not generated,
    e.g. a real instance id); the failures, as text."""
    failures: list[str] = []

    @given(case=op.as_strategy(generation_mode=mode, **fixed))
    @settings(max_examples=examples, deadline=None, database=None, phases=[Phase.explicit, Phase.generate],
              suppress_health_check=list(HealthCheck))
    def run(case: Any) -> None:
        try:
            each(case)
        except (Exception, BaseExceptionGroup) as exc:   # collect: one run reports every failing operation
            failures.append(f"{op.method.upper()} {op.path} ({mode.value}): {_describe(exc)}")

    try:
        run()
    except Unsatisfiable:   # nothing to break: an operation without parameters has no negative cases
        assert mode is GenerationMode.NEGATIVE, f"{op.method} {op.path}: no positive case"
    return failures


def test_admin_requests_conform_to_the_schema(fuzzed: Live) -> None:
    auth = {"Authorization": f"Bearer {fuzzed.keys['admin']}"}
    failures: list[str] = []
    statuses: dict[str, set[int]] = {}
    with fuzzed.client("admin") as c:   # a real machine, so the instance operations reach it too
        booted = c.post("/instances", json={"template": "budget"})
        assert booted.status_code == 202, booted.text
        real = {"instance_id": booted.json()["instance"]["id"]}

    for op in _operations(fuzzed):
        label = f"{op.method.upper()} {op.path}"

        def positive(case: Any, label: str = label) -> None:
            response = case.call(base_url=fuzzed.url, headers=auth)
            statuses.setdefault(label, set()).add(response.status_code)
            case.validate_response(response, checks=CONFORMANCE, headers=auth)

        def negative(case: Any) -> None:
            response = case.call(base_url=fuzzed.url, headers=auth)
            case.validate_response(response, checks=[*CONFORMANCE, negative_data_rejection], headers=auth)

        failures += _fuzz(op, GenerationMode.POSITIVE, EXAMPLES, positive)
        if "{instance_id}" in op.path:
            failures += _fuzz(op, GenerationMode.POSITIVE, EXAMPLES, positive, path_parameters=real)
        failures += _fuzz(op, GenerationMode.NEGATIVE, EXAMPLES // 2, negative)
    assert not failures, "\n".join(failures)
    # the fuzzing reached core, not only the validation layer: some operations answered 2xx
    assert sum(any(200 <= s < 300 for s in seen) for seen in statuses.values()) >= 8, statuses


def test_without_a_key_every_operation_is_401(fuzzed: Live) -> None:
    before = fuzzed.counts()
    wrong: list[str] = []
    for op in _operations(fuzzed):
        if not op.path.startswith("/api/v1/"):
            continue    # /health, /ready, /metrics are open by design

        def anonymous(case: Any) -> None:
            response = case.call(base_url=fuzzed.url, headers={"Authorization": "", "X-API-Key": ""})
            if response.status_code != 401:
                wrong.append(f"{case.method} {case.formatted_path}: {response.status_code} {response.text[:200]}")

        _fuzz(op, GenerationMode.POSITIVE, 4, anonymous)
    assert not wrong, "\n".join(wrong)
    assert fuzzed.counts() == before


def test_a_viewer_changes_nothing(fuzzed: Live) -> None:
    auth = {"Authorization": f"Bearer {fuzzed.keys['viewer']}"}
    before = fuzzed.counts()
    succeeded: list[str] = []
    seen: dict[int, int] = {}
    for op in _operations(fuzzed):
        if op.method.upper() not in MUTATING or op.path == "/api/v1/commands":
            continue    # /commands answers a refusal as a 200 reply (routes_stream.py); its effect is counted below

        def as_viewer(case: Any) -> None:
            response = case.call(base_url=fuzzed.url, headers=auth)
            seen[response.status_code] = seen.get(response.status_code, 0) + 1
            if response.status_code < 400 or response.status_code >= 500:
                succeeded.append(f"{case.method} {case.formatted_path}: {response.status_code} {response.text[:200]}")

        _fuzz(op, GenerationMode.POSITIVE, EXAMPLES, as_viewer)
    assert not succeeded, "\n".join(succeeded)
    assert seen.get(403, 0) > 0, seen
    assert set(seen) <= {400, 403, 404, 409, 422}, seen
    assert fuzzed.counts() == before
