"""Search parity with the official vast.ai CLI: a differential test against the real `vastai`
package from PyPI (1.9.1, installed in the test venv).

For each query in the CLI's syntax, vastai's own `search offers` code path (its argparse parser,
`parse_query`, `search__offers`, its HTTP client) runs against FakeVast on loopback, and the JSON
body it POSTs is compared, field by field, with gpuherd's `build_search_body` for the same query:

* every field the CLI sends, gpuherd sends too, with a constraint that keeps every value the CLI's
  keeps (same units, or a looser bound documented in vast.py's docstring) and still narrows
  (rejects some value the CLI rejects) -- unless the case names the field as one gpuherd leaves
  to its local filter, with the reason;
* the CLI's order is a prefix of gpuherd's (when -o is given), its type is gpuherd's type, its
  limit is no more than gpuherd's;
* over the fake's whole market (no cap), every offer the CLI's filters keep and gpuherd's query
  matches is kept by gpuherd's server-side filters: gpuherd never returns fewer.

The CLI's role detection (a GET of the account that writes a file in the user's config
directory) is switched off; nothing of gpuherd's own is mocked."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

# the official client is a test dependency (pyproject: vastai>=1.9): no skip when it is missing
import vastai.cli.commands.offers  # noqa: F401  registers `search offers` on the CLI's parser
import vastai.cli.main as vastai_cli
import vastai.cli.util as vastai_util

from gpuherd.core.providers.vast import SEARCH_LIMIT, VastProvider, build_search_body, normalise_offers
from gpuherd.core.providers.vast_names import MODEL_NAMES, VAST_GPU_NAMES, names_for_model
from gpuherd.core.query import parse_query
from tests.fakes.vast_fake import FakeVast, _compare, make_offers

KEY = "parity-key-0123456789abcdef"
CONTROL = ("order", "type", "limit", "allocated_storage")


@dataclass(frozen=True)
class Case:
    """`cli`: the argv after `vastai search offers`; `gh`: the same query in gpuherd's words
    (default: the argv joined, with -i/-b as `interruptible`); `local`: CLI fields gpuherd does
    not send, each with the reason (vast.py's docstring records it); `extra`: fields gpuherd sends
    beyond the CLI's, implied by its own meaning of the query."""

    cli: tuple[str, ...]
    gh: str | None = None
    local: dict[str, str] = field(default_factory=dict)
    extra: frozenset[str] = frozenset()

    def gpuherd_text(self) -> str:
        if self.gh is not None:
            return self.gh
        words = []
        for arg in self.cli:
            words.append({"-i": "interruptible", "-b": "interruptible", "-d": ""}.get(arg, arg))
        return " ".join(w for w in words if w)


def C(*cli: str, gh: str | None = None, local: dict[str, str] | None = None, extra: tuple[str, ...] = ()) -> Case:
    return Case(tuple(cli), gh, local or {}, frozenset(extra))


HOST_CORES = "vast's cpu_cores counts the host's cores; ours are the ones you get (cpu_cores_effective)"
TOTAL_NO_COUNT = "a total-memory upper bound needs a GPU count to hold under whole-GB rounding"
ROUNDING = "!= on whole-GB rounded memory cannot be said in MB"
PART = "gpuherd matches a part of the place; vast compares country codes only"
BID = "bid offers are priced by min_bid here; vast's dph_total for bids is not that price"

CASES: list[Case] = [
    # the CLI's own examples (vastai search offers --help) and reference §2.2
    C("reliability > 0.98 num_gpus=1 gpu_name=RTX_3090"),
    C("compute_cap > 610 total_flops > 5 datacenter=True"),
    C("reliability>0.99 num_gpus=4 geolocation in [TW,SE]"),
    C('reliability>0.99 gpu_name in ["RTX 4090", "RTX 3090"] geolocation notin [CN,VN]'),
    C("disk_space>146 duration>24 gpu_ram>10 cuda_vers>=12.1 direct_port_count>=2 driver_version >= 535.86.05"),
    C("reliability > 0.99  num_gpus>=4 verified=False", "-o", "num_gpus-"),
    C("cpu_arch=arm64"),
    C("gpu_ram>=16 num_gpus=1 reliability>0.98 gpu_name=RTX_4090"),
    C("driver_version >= 535.86.05"),
    C("verified=any rentable=any"),
    C("num_gpus=1", "-o", "+dph,-reliability"),
    C("num_gpus=1", "--limit", "10"),
    # GPU names: exact spellings, quoting, lists, case, negation
    C("gpu_name=H100_SXM"),
    C('gpu_name="H100 SXM"'),
    C("gpu_name=A100_SXM4"),
    C("gpu_name=RTX_6000Ada"),
    C("gpu_name=rtx_4090"),
    C("gpu_name in [H100_SXM,H100_PCIE,H100_NVL]"),
    C("gpu_name in RTX_4090,RTX_3090"),
    C("gpu_name!=RTX_3090"),
    C("gpu_name notin [RTX_3090,RTX_3060]"),
    C("gpu_name=Tesla_V100 num_gpus>=2"),
    # places
    C("geolocation=US"),
    C("geolocation!=CN"),
    C("geolocation in [US,CA,DE]"),
    C("geolocation nin [CN]"),
    C("geolocation in [ TW , SE ]"),
    C("geolocation=Oregon", local={"geolocation": PART}),
    # memory and units
    C("gpu_ram>=24"),
    C("gpu_ram<=24"),
    C("gpu_ram=80"),
    C("gpu_ram>40 gpu_ram<100"),
    C("gpu_ram!=24", local={"gpu_ram": ROUNDING}),
    C("gpu_total_ram>=48"),
    C("gpu_total_ram>=160 num_gpus=2"),
    C("num_gpus<=2 gpu_total_ram<=48"),
    C("gpu_total_ram<=48", local={"gpu_total_ram": TOTAL_NO_COUNT}),
    C("cpu_ram>=64"),
    C("cpu_ram<32.5"),
    C("cpu_ram=65.536"),
    C("duration>=7"),
    C("duration<2.5"),
    # other numbers
    C("cpu_cores>=16", extra=("cpu_cores_effective",)),
    C("cpu_cores<=8", local={"cpu_cores": HOST_CORES}, extra=("cpu_cores_effective",)),
    C("cpu_cores_effective>=8", extra=("cpu_cores",)),
    C("inet_down>=500 inet_up>100"),
    C("reliability>=0.99 storage_cost<0.2"),
    C("dph<0.5"),
    C("dph_total<=1.2 dph>0.3"),
    C("dlperf_usd>10 flops_usd>=1"),
    C("dlperf>=50 total_flops>=80 cpu_ghz>=3 disk_bw>=1000"),
    C("pci_gen>=4 pcie_bw>10 gpu_mem_bw>=900"),
    C("gpu_max_power<=450 gpu_max_temp>80 bw_nvlink>=0"),
    C("gpu_frac=1 min_bid<0.5"),
    C("inet_down_cost<=0.01 inet_up_cost<=0.01"),
    C("host_id=100001"),
    C("machine_id!=10001"),
    C("id=9000003"),
    C("id in [9000003,9000004,9000010]"),
    C("cluster_id=5"),
    # operators in words
    C("num_gpus gte 2"),
    C("num_gpus noteq 1"),
    C("num_gpus not in [8]"),
    C("num_gpus in [1,2]"),
    C("num_gpus notin [1]"),
    C("dph lt 1 reliability gt 0.9"),
    C("num_gpus eq 2 disk_space lte 500"),
    # booleans and text fields the Offer does not carry
    C("has_avx=true static_ip=true"),
    C("vms_enabled=false gpu_display_active=false"),
    C("display_active=false"),
    C("rented=false"),
    C("external=true"),
    C("external=any"),
    C("mobo_name=ROMED8-2T ubuntu_version=22.04"),
    C("verification=verified gpu_arch=nvidia"),
    # defaults, wildcards, flags, order
    C("verified=false"),
    C("dph<1 dph=any num_gpus=1"),
    C("-n"),
    C("num_gpus=1", "-n"),
    C("duration>3", "-i", "--limit", "10"),
    C("num_gpus=1", "-b"),
    C("num_gpus=1", "-d"),
    C("dph<0.3", "-i", local={"dph_total": BID}),
    C("gpu_ram>=24", "-o", "dph"),
    C("num_gpus>=2", "-o", "gpu_ram-,dph"),
    C("inet_down>100", "-o", "inet_down-"),
    C("reliability>0.9", "--order=-reliability,+dph"),
]


# ------------------------------------------------------------------------------ driving the CLI


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeVast]:
    server = FakeVast(api_key=KEY, offers=600, seed=11).start()
    try:
        yield server
    finally:
        server.stop()


def run_cli(server: FakeVast, argv: tuple[str, ...]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """vastai's `search offers` with argv (its own argparse parser and command function), against
    `server`: the body it POSTed and the offers it returned."""
    before = len(server.calls("search"))
    args = vastai_cli.parser.parse_args(["search", "offers", *argv])
    args.url, args.api_key, args.retry = server.url, KEY, 1
    args.explain, args.curl, args.raw = False, False, True
    rows = args.func(args)
    calls = server.calls("search")
    assert isinstance(rows, list) and len(calls) == before + 1, f"the CLI searched once for {argv}"
    body = calls[-1].body
    assert isinstance(body, dict)
    return body, rows


@pytest.fixture(scope="module")
def cli(fake: FakeVast) -> Iterator[Any]:
    """A function running the CLI against the module's fake, returning the body it POSTed."""
    original = vastai_util.detect_role
    vastai_util.detect_role = lambda client: None        # no account GET, no role file written
    try:
        yield lambda argv: run_cli(fake, argv)[0]
    finally:
        vastai_util.detect_role = original


# ------------------------------------------------------------------------------ comparing


def _numbers(ops: dict[str, Any]) -> list[float]:
    out: list[float] = []
    for value in ops.values():
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, bool):
                continue
            try:
                out.append(float(v))
            except (TypeError, ValueError):
                pass
    return out


def _samples(name: str, cli_ops: dict[str, Any], gh_ops: dict[str, Any]) -> list[Any]:
    """Values of the field to try both constraints on: around every number either one names,
    every string either names (and vast's GPU spellings), both booleans."""
    values: list[Any] = [True, False, "zz-none"]
    if name == "gpu_name":
        values.extend(VAST_GPU_NAMES)
    for ops in (cli_ops, gh_ops):
        for value in ops.values():
            for v in value if isinstance(value, list) else [value]:
                if isinstance(v, str):
                    values.append(v)
    numbers = _numbers(cli_ops) + _numbers(gh_ops)
    for x in numbers:
        for d in (-1000, -1, -0.5, -0.01, -0.001, 0, 0.001, 0.01, 0.5, 1, 1000):
            values.append(x + d)
        values.extend([x * 0.25, x * 0.5, x * 2, x * 4])
    if numbers:
        values.extend([0.0, -1.0, 1e12])
    return values


def _accepts(ops: dict[str, Any], have: Any) -> bool:
    return all(_compare(have, op, want) for op, want in ops.items())


# Fields where gpuherd's bound may be looser than the CLI's, and by how much at most (relative,
# absolute), as vast.py's docstring documents: whole-GB rounding of MB per GPU, the same over all
# GPUs of an offer (at most half the bound), whole MB, and the dph_total widening for vast
# pricing the disk its own way. GPU names and countries may list more spellings (the exact vast
# spellings of a gpuherd name; a code in both cases). Everything else must be the CLI's own term.
LOOSER: dict[str, tuple[float, float]] = {"gpu_ram": (0.03, 1024.0), "gpu_total_ram": (0.5, 1024.0),
                                          "cpu_ram": (0.0, 1.0), "dph_total": (0.1, 0.005)}
LOOSER_TEXT = frozenset({"gpu_name", "geolocation"})


def _compare_field(name: str, cli_ops: dict[str, Any], gh_ops: dict[str, Any]) -> None:
    """gpuherd's operators on `name` keep every sampled value the CLI's keep, reject at least one
    the CLI rejects, and keep more only where LOOSER / LOOSER_TEXT allow it."""
    samples = _samples(name, cli_ops, gh_ops)
    if all(isinstance(v, bool) for v in cli_ops.values()):
        kinds: list[Any] = [True, False]
    elif _is_text(cli_ops):
        kinds = [s for s in samples if isinstance(s, str)]
    else:
        kinds = [s for s in samples if isinstance(s, (int, float)) and not isinstance(s, bool)]
    bounds = _numbers(cli_ops)
    dropped_by_cli = 0
    for have in kinds:
        cli_ok, gh_ok = _accepts(cli_ops, have), _accepts(gh_ops, have)
        assert not (cli_ok and not gh_ok), f"{name}: gpuherd {gh_ops} drops {have!r}, the CLI's {cli_ops} keeps it"
        dropped_by_cli += not cli_ok and not gh_ok
        if gh_ok and not cli_ok and name not in LOOSER_TEXT:
            rel, slack = LOOSER.get(name, (0.0, 0.0))
            near = any(abs(float(have) - b) <= rel * abs(b) + slack + 1e-9 * max(1.0, abs(b)) for b in bounds)
            assert name in LOOSER and near, \
                f"{name}: gpuherd {gh_ops} keeps {have!r}, further from the CLI's {cli_ops} than documented"
    assert dropped_by_cli, f"{name}: gpuherd's {gh_ops} does not narrow like the CLI's {cli_ops}"


def _is_text(ops: dict[str, Any]) -> bool:
    for value in ops.values():
        items = value if isinstance(value, list) else [value]
        for v in items:
            if isinstance(v, str) and not _is_number(v) and v not in ("true", "false"):
                return True
    return False


def _is_number(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def _ids(fake: FakeVast, body: dict[str, Any], query: Any, *, local: bool) -> set[str]:
    bid = body.get("type") == "bid"
    raws = fake.select({**body, "allocated_storage": 50.0})
    offers = normalise_offers(raws, fetched_at=None, interruptible=bid)
    return {o.offer_id for o in offers if not local or query.matches(o)}


@pytest.mark.parametrize("case", CASES, ids=[" ".join(c.cli) for c in CASES])
def test_gpuherd_narrows_like_the_official_cli(case: Case, cli: Any, fake: FakeVast):
    cli_body = cli(case.cli)
    query = parse_query(case.gpuherd_text())
    gh_body = build_search_body(query)

    for name, cli_ops in cli_body.items():
        if name in CONTROL:
            continue
        if name in case.local:
            assert name not in gh_body, f"{name} is documented as local-only here ({case.local[name]})"
            continue
        assert name in gh_body, f"the CLI sends {name} {cli_ops}; gpuherd sends nothing: {json.dumps(gh_body)}"
        _compare_field(name, cli_ops, gh_body[name])
    extra = {k for k in gh_body if k not in cli_body and k not in CONTROL}
    assert extra <= case.extra, f"gpuherd narrows by {extra} the CLI does not send"

    assert gh_body["type"] == cli_body["type"]
    assert gh_body["limit"] >= cli_body.get("limit", 0) and gh_body["limit"] == SEARCH_LIMIT
    cli_order = cli_body["order"]
    if cli_order != [["score", "desc"]]:        # -o given: the CLI's keys lead ours
        assert gh_body["order"][:len(cli_order)] == cli_order
    else:                                       # ours: cheapest first (vast.py docstring)
        assert gh_body["order"][0] == ["dph_total", "asc"]

    # over the whole market, without the cap: nothing the CLI keeps and we match is lost
    wanted = _ids(fake, cli_body, query, local=True)
    kept = _ids(fake, gh_body, query, local=False)
    assert wanted <= kept, f"gpuherd's filters drop {sorted(wanted - kept)[:5]}"


def test_the_differential_covers_enough(cli: Any):
    """At least 60 queries, over operators, lists, quoting, units, defaults, any, order, flags;
    and most of them produce exactly the CLI's fields with no local-only exception."""
    assert len(CASES) >= 60
    texts = " ".join(" ".join(c.cli) for c in CASES)
    for needle in (" in ", "notin", " nin ", "not in", "noteq", " gte ", "!=", "<=", ">=", '"', "[", "=any",
                   "-o", "-n", "-i", "--limit", "duration", "geolocation", "gpu_total_ram", "gpu_name"):
        assert needle in texts, needle
    exact = sum(1 for c in CASES if not c.local and not c.extra)
    assert exact >= 0.85 * len(CASES), exact


# ------------------------------------------------------------------------------ model words


@pytest.mark.parametrize(("word", "names"), [
    ("4090", ["RTX 4090", "RTX 4090 Ti"]),
    ("h100", ["H100 PCIE", "H100 SXM", "H100 NVL"]),
    ("a100", ["A100 PCIE", "A100 SXM4", "A100 SXM", "A100X"]),
    ("rtx 6000 ada", ["RTX 6000Ada"]),
    ("a6000", ["RTX A6000"]),
    ("l40s", ["L40S"]),
    ("v100", ["Tesla V100"]),
    ("h200", ["H200", "H200 NVL"]),
    ("3090", ["RTX 3090", "RTX 3090 Ti"]),
])
def test_a_model_word_is_the_exact_list_of_vast_spellings(word: str, names: list[str]):
    assert list(names_for_model(word)) == names
    term = build_search_body(parse_query(f"gpu={word.replace(' ', '_')}"))["gpu_name"]
    assert term == ({"in": names} if len(names) > 1 else {"eq": names[0]})


def test_every_bare_model_word_has_its_table_entry():
    body = build_search_body(parse_query("h100"))
    assert body["gpu_name"] == {"in": list(MODEL_NAMES["h100"])}
    assert set(MODEL_NAMES) >= {"4090", "h100", "a100", "l40s", "a6000"}
    for word, names in MODEL_NAMES.items():
        assert set(names) <= set(VAST_GPU_NAMES), word


# ------------------------------------------------------------------------------ the real market's shape


def _market() -> list[dict[str, Any]]:
    """2000 cheap consumer offers and 8 H100s that cost more than any of them."""
    offers = make_offers(2008, seed=21)
    for i, offer in enumerate(offers):
        consumer = i < 2000
        name = ("RTX 3060", "RTX 3090", "RTX 4090")[i % 3] if consumer else ("H100 SXM" if i % 2 else "H100 PCIE")
        price = 0.05 + (i % 200) / 1000 if consumer else 2.0 + i / 1000
        offer.update(gpu_name=name, gpu_ram=81559 if not consumer else 24576, num_gpus=1, dph_base=price,
                     min_bid=price / 2, verification="verified", rentable=True, external=None)
    return offers


@pytest.fixture
def market() -> Iterator[FakeVast]:
    server = FakeVast(api_key=KEY, catalogue=_market()).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.mark.parametrize(("text", "count"), [("h100", 8), ("gpu_name=H100_SXM", 4), ("gpu=h100 num_gpus=1", 8)])
async def test_h100s_are_found_behind_thousands_of_cheaper_cards(market: FakeVast, text: str, count: int):
    """The issue: with the cheapest thousand offers all consumer cards, `/gpu search h100` came back
    empty. vast.ai's cap now applies after the GPU filter, so every H100 comes back."""
    provider = VastProvider(KEY, base_url=market.url, transport=httpx.AsyncHTTPTransport(verify=False))
    try:
        query = parse_query(text)
        found = query.apply(await provider.search(query))
        assert len(found) == count and all("H100" in o.gpu_name for o in found)
        body = dict(market.calls("search")[-1].body)
        assert body["limit"] == SEARCH_LIMIT and "gpu_name" in body
        del body["gpu_name"]                      # what main sent: the cap fills with cheap cards
        assert query.apply(await provider._search(body)) == []
    finally:
        await provider.aclose()


def test_the_cli_and_gpuherd_find_the_same_h100s(market: FakeVast, cli: Any):
    """The official CLI against the same market (its own default limit) and gpuherd find the same."""
    _, rows = run_cli(market, ("gpu_name=H100_SXM",))      # `cli`: role detection is off
    theirs = {str(r["id"]) for r in rows}
    query = parse_query("gpu_name=H100_SXM")
    ours = {o.offer_id for o in normalise_offers(market.select(build_search_body(query)), fetched_at=None)
            if query.matches(o)}
    assert theirs == ours and len(ours) == 4
