"""The search query language: vast.ai CLI syntax, chat shorthands, defaults, sorting, errors that
name their token, and (property-based) that nothing but QueryError ever escapes the parser."""

from __future__ import annotations

import time
from decimal import Decimal

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpuherd.core.errors import QueryError
from gpuherd.core.offers import Offer
from gpuherd.core.query import (
    DEFAULT_ORDER,
    FIELD_ALIASES,
    GPU_MODELS,
    OFFER_FIELDS,
    QUERY_KEYWORDS,
    Filter,
    OfferQuery,
    SortKey,
    gpu_model_matches,
    parse_query,
    to_vast_filter,
)


def offer(offer_id: str, gpu_name: str = "RTX 4090", *, provider: str = "vast", num_gpus: int = 1,
          gpu_ram: float = 24, dph: str = "0.40", **kw) -> Offer:
    return Offer(provider=provider, offer_id=offer_id, gpu_name=gpu_name, num_gpus=num_gpus,
                 gpu_ram=gpu_ram, dph=Decimal(dph), **kw)


def user_filters(q: OfferQuery) -> list[tuple[str, str, object]]:
    return [(f.field, f.op, f.value) for f in q.filters if not f.default]


def err(text: str) -> QueryError:
    with pytest.raises(QueryError) as info:
        parse_query(text)
    assert info.value.__cause__ is None, "the parser's safety net caught an internal error"
    return info.value


# ---------------------------------------------------------------------------- the vast syntax


def test_vast_example_query():
    q = parse_query("gpu_ram>=24 num_gpus=1 reliability>0.98 gpu_name=RTX_4090 dph<0.6")
    assert user_filters(q) == [
        ("gpu_ram", "gte", 24.0),
        ("num_gpus", "eq", 1),
        ("reliability", "gt", 0.98),
        ("gpu_name", "eq", "RTX 4090"),
        ("dph", "lt", Decimal("0.6")),
    ]
    assert isinstance(user_filters(q)[1][2], int)
    assert isinstance(user_filters(q)[4][2], Decimal)


@pytest.mark.parametrize("text, op", [
    ("num_gpus=2", "eq"), ("num_gpus==2", "eq"), ("num_gpus!=2", "neq"),
    ("num_gpus>2", "gt"), ("num_gpus>=2", "gte"), ("num_gpus<2", "lt"), ("num_gpus<=2", "lte"),
    ("num_gpus eq 2", "eq"), ("num_gpus neq 2", "neq"), ("num_gpus noteq 2", "neq"),
    ("num_gpus not eq 2", "neq"), ("num_gpus gt 2", "gt"), ("num_gpus gte 2", "gte"),
    ("num_gpus lt 2", "lt"), ("num_gpus lte 2", "lte"), ("num_gpus GTE 2", "gte"),
    ("num_gpus >= 2", "gte"), ("num_gpus>= 2", "gte"), ("num_gpus >=2", "gte"),
])
def test_every_scalar_operator(text, op):
    assert user_filters(parse_query(text)) == [("num_gpus", op, 2)]


@pytest.mark.parametrize("text, op", [
    ("num_gpus in 1,2", "in"), ("num_gpus in [1,2]", "in"), ("num_gpus in [1, 2]", "in"),
    ("num_gpus notin 1,2", "notin"), ("num_gpus not in 1,2", "notin"),
    ("num_gpus nin [1,2]", "notin"), ("num_gpus in [1,,2,]", "in"),
])
def test_list_operators(text, op):
    assert user_filters(parse_query(text)) == [("num_gpus", op, (1, 2))]


@pytest.mark.parametrize("clause, kept", [
    ("num_gpus=1", {"a"}), ("num_gpus!=1", {"b", "c", "d"}), ("num_gpus>2", {"c", "d"}),
    ("num_gpus>=2", {"b", "c", "d"}), ("num_gpus<2", {"a"}), ("num_gpus<=2", {"a", "b"}),
])
def test_operators_filter_offers(clause, kept):
    offers = [offer("a", num_gpus=1), offer("b", num_gpus=2), offer("c", num_gpus=4),
              offer("d", num_gpus=8)]
    assert {o.offer_id for o in parse_query(clause).apply(offers)} == kept


def test_in_and_notin_filter_offers():
    offers = [offer("a", num_gpus=1), offer("b", num_gpus=2), offer("c", num_gpus=4)]
    assert {o.offer_id for o in parse_query("num_gpus in 1,4").apply(offers)} == {"a", "c"}
    assert {o.offer_id for o in parse_query("num_gpus notin [1,4]").apply(offers)} == {"b"}


def test_underscore_becomes_space_and_quotes_are_equivalent():
    a = parse_query("gpu_name=RTX_4090")
    b = parse_query('gpu_name="RTX 4090"')
    c = parse_query('gpu_name = "RTX_4090"')
    assert user_filters(a) == user_filters(b) == user_filters(c) == [("gpu_name", "eq", "RTX 4090")]


def test_quoted_list_items_and_bracket_with_spaces():
    q = parse_query('gpu_name in [RTX_4090, "A100 SXM4", H100_SXM]')
    assert user_filters(q) == [("gpu_name", "in", ("RTX 4090", "A100 SXM4", "H100 SXM"))]
    q2 = parse_query('gpu_name in "A100, 80GB",H200')
    assert user_filters(q2) == [("gpu_name", "in", ("A100, 80GB", "H200"))]


def test_gpu_name_is_exact_but_case_insensitive():
    offers = [offer("a", "RTX 4090"), offer("b", "RTX 4090 D"), offer("c", "A100 80GB")]
    assert [o.offer_id for o in parse_query("gpu_name=rtx_4090").apply(offers)] == ["a"]
    assert [o.offer_id for o in parse_query("gpu_name!=RTX_4090").apply(offers)] == ["b", "c"]


def test_values_converted_to_field_types():
    q = parse_query("cpu_cores>=8 cpu_ram>=32GB disk_space>=100 storage_cost<$0.2 cuda>=12.1 "
                    "inet_down>500 inet_up>=100.5 verified=false interruptible=TRUE "
                    "country=us offer_id=123_4 dph_per_gpu<=0.5 gpu_total_ram>=48")
    values = {f.field: f.value for f in q.filters}
    assert values["cpu_cores"] == 8.0 and isinstance(values["cpu_cores"], float)
    assert values["cpu_ram"] == 32.0
    assert values["storage_cost"] == Decimal("0.2")
    assert values["cuda"] == 12.1
    assert values["verified"] is False
    assert values["interruptible"] is True
    assert values["offer_id"] == "123_4"          # ids keep their underscores
    assert values["dph_per_gpu"] == Decimal("0.5")
    assert values["gpu_total_ram"] == 48.0
    assert not any(f.default for f in q.filters)  # verified was given: no default


def test_negative_and_exponent_numbers():
    assert user_filters(parse_query("dph>-1")) == [("dph", "gt", Decimal("-1"))]
    assert user_filters(parse_query("gpu_ram>=2.4e1")) == [("gpu_ram", "gte", 24.0)]


@pytest.mark.parametrize("alias, field", sorted(FIELD_ALIASES.items()))
def test_field_aliases(alias, field):
    value = {"dph": "1", "cuda": "12", "location": "US", "offer_id": "7"}[field]
    q = parse_query(f"{alias}={value}")
    assert [f.field for f in q.filters if not f.default] == [field]


def test_alias_also_in_sort():
    assert parse_query("-o dph_total-").order == (SortKey(field="dph", desc=True),)
    assert parse_query("order=cuda_max_good").order == (SortKey(field="cuda"),)


def test_field_names_are_case_insensitive():
    assert user_filters(parse_query("GPU_RAM>=24")) == [("gpu_ram", "gte", 24.0)]


# ---------------------------------------------------------------------------- defaults, wildcards


def test_verified_default_applied():
    q = parse_query("")
    assert [(f.field, f.op, f.value, f.default) for f in q.filters] == [
        ("verified", "eq", True, True), ("interruptible", "eq", False, True)]
    assert q.order == DEFAULT_ORDER
    assert q.limit is None and q.providers is None and q.dropped_defaults == frozenset()
    unverified = offer("u", verified=False)
    assert not q.matches(unverified)
    assert q.matches(offer("v"))
    assert not q.matches(offer("s", interruptible=True)), "spot offers only when asked for"
    assert parse_query("interruptible=any").matches(offer("s", interruptible=True))
    assert parse_query("interruptible=true").matches(offer("s", interruptible=True))


@pytest.mark.parametrize("wild", ["any", "ANY", "?", "*"])
def test_wildcard_drops_default(wild):
    q = parse_query(f"verified={wild}")
    assert [f.field for f in q.filters] == ["interruptible"]
    assert q.dropped_defaults == {"verified"}
    assert q.matches(offer("u", verified=False))


def test_explicit_verified_replaces_default():
    q = parse_query("verified=false")
    assert [(f.field, f.value, f.default) for f in q.filters] == [("verified", False, False),
                                                                   ("interruptible", False, True)]
    assert q.matches(offer("u", verified=False)) and not q.matches(offer("v"))


def test_wildcard_drops_earlier_filters_on_that_field_only():
    q = parse_query("gpu_ram>=24 num_gpus=2 gpu_ram<80 gpu_ram=any")
    assert user_filters(q) == [("num_gpus", "eq", 2)]
    q2 = parse_query("gpu_ram=any gpu_ram>=48")       # a later filter applies again
    assert user_filters(q2) == [("gpu_ram", "gte", 48.0)]


def test_gpu_wildcard_drops_model_shorthand():
    assert user_filters(parse_query("4090 gpu_name=any")) == []
    assert user_filters(parse_query("gpu_name=RTX_4090 gpu=any")) == []


def test_no_default_flag():
    q = parse_query("-n num_gpus=1")
    assert [f.field for f in q.filters] == ["num_gpus"]
    assert "verified" in q.dropped_defaults


@pytest.mark.parametrize("text", ["dph<any", "verified!=any", "gpu_name in any", "num_gpus>=*",
                                  "verified notin ?"])
def test_wildcard_with_other_operator_is_an_error(text):
    e = err(text)
    assert "only works with '='" in e.message
    assert text in e.message


def test_repeated_clauses_are_anded():
    offers = [offer("a", dph="0.5"), offer("b", dph="1.5"), offer("c", dph="2.5")]
    assert [o.offer_id for o in parse_query("dph<2 dph>1").apply(offers)] == ["b"]


# ---------------------------------------------------------------------------- sort


@pytest.mark.parametrize("text, order", [
    ("-o dph", (("dph", False),)),
    ("-o dph-", (("dph", True),)),
    ("-o -dph", (("dph", True),)),
    ("-o +dph", (("dph", False),)),
    ("-o -reliability,+dph", (("reliability", True), ("dph", False))),
    ("-o reliability-,dph", (("reliability", True), ("dph", False))),
    ("--order num_gpus", (("num_gpus", False),)),
    ("-o=gpu_ram-", (("gpu_ram", True),)),
    ('-o "reliability-, dph"', (("reliability", True), ("dph", False))),
    ("order=dph-", (("dph", True),)),
    ("order=-dph", (("dph", True),)),
    ("sort=gpu_ram-,dph", (("gpu_ram", True), ("dph", False))),
    ("order=[dph,-reliability]", (("dph", False), ("reliability", True))),
])
def test_sort_forms(text, order):
    assert tuple((k.field, k.desc) for k in parse_query(text).order) == order


def test_order_any_restores_default():
    assert parse_query("-o reliability order=any").order == DEFAULT_ORDER


def test_default_order_cheapest_then_reliable_then_ref():
    offers = [
        offer("3", dph="0.50", reliability=0.90),
        offer("1", dph="0.50", reliability=0.99),
        offer("2", dph="0.30", reliability=0.80),
        offer("9", dph="0.50", reliability=0.90, provider="runpod"),
        offer("0", dph="0.50", reliability=0.90),
    ]
    got = [o.ref for o in parse_query("").apply(offers)]
    assert got == ["vast:2", "vast:1", "runpod:9", "vast:0", "vast:3"]


def test_user_order_with_tie_breakers():
    offers = [offer("a", reliability=0.99, dph="0.9"), offer("b", reliability=0.95, dph="0.1"),
              offer("c", reliability=0.99, dph="0.3")]
    assert [o.offer_id for o in parse_query("-o -reliability").apply(offers)] == ["c", "a", "b"]
    assert [o.offer_id for o in parse_query("-o dph-").apply(offers)] == ["a", "c", "b"]
    assert [o.offer_id for o in parse_query("order=gpu_name,-dph").apply(offers)] == ["a", "c", "b"]


def test_sort_by_text_and_bool_fields():
    offers = [offer("a", location="Texas, US"), offer("b", location="alberta, CA"),
              offer("c", location="Oregon, US", verified=False)]
    got = [o.offer_id for o in parse_query("verified=any -o location").apply(offers)]
    assert got == ["b", "c", "a"]            # case-insensitive alphabetical
    got = [o.offer_id for o in parse_query("verified=any -o verified-,location").apply(offers)]
    assert got == ["b", "a", "c"]


# ---------------------------------------------------------------------------- shorthands


@pytest.mark.parametrize("token, model", [
    ("4090", "4090"), ("3090", "3090"), ("a100", "a100"), ("A100", "a100"), ("h100", "h100"),
    ("H200", "h200"), ("l40s", "l40s"), ("a6000", "a6000"), ("rtx4090", "rtx4090"),
    ("RTX_4090", "rtx 4090"),
])
def test_bare_gpu_model(token, model):
    assert user_filters(parse_query(token)) == [("gpu", "eq", model)]


@pytest.mark.parametrize("token, names", [
    ("a100", {"A100 80GB", "A100 SXM4", "A100-SXM4-40GB"}),
    ("4090", {"RTX 4090"}),
    ("a6000", {"RTX A6000"}),
    ("h100", {"H100 SXM", "H100 PCIE", "H100 NVL"}),
    ("l40s", {"L40S"}),
    ("rtx4090", {"RTX 4090"}),
    ("rtx 4090", {"RTX 4090"}),
    ("4070ti", {"RTX 4070 Ti"}),
])
def test_model_match_by_word(token, names):
    all_names = ["A100 80GB", "A100 SXM4", "A100-SXM4-40GB", "A1000", "RTX 4090", "RTX 4090D",
                 "RTX A6000", "RTX 6000 Ada", "H100 SXM", "H100 PCIE", "H100 NVL", "GH200",
                 "L40S", "L40", "RTX 4070 Ti", "RTX 4070"]
    assert {n for n in all_names if gpu_model_matches(n, token)} == names


def test_model_shorthand_filters_offers():
    offers = [offer("a", "A100 80GB"), offer("b", "A100 SXM4"), offer("c", "RTX 4090"),
              offer("d", "H100 SXM")]
    assert {o.offer_id for o in parse_query("a100").apply(offers)} == {"a", "b"}
    assert {o.offer_id for o in parse_query("gpu=a100").apply(offers)} == {"a", "b"}
    assert {o.offer_id for o in parse_query("gpu!=a100").apply(offers)} == {"c", "d"}
    assert {o.offer_id for o in parse_query("gpu in a100,h100").apply(offers)} == {"a", "b", "d"}
    assert {o.offer_id for o in parse_query("gpu notin [a100,h100]").apply(offers)} == {"c"}


def test_several_bare_models_mean_any_of_them():
    offers = [offer("a", "RTX 3090"), offer("b", "RTX 4090"), offer("c", "A100 80GB")]
    q = parse_query("4090 3090")
    assert user_filters(q) == [("gpu", "eq", ("4090", "3090"))]
    assert {o.offer_id for o in q.apply(offers)} == {"a", "b"}


def test_bare_models_merge_across_other_clauses_and_wildcards():
    assert user_filters(parse_query("gpu_ram>=24 4090 gpu_ram=any 3090")) == [
        ("gpu", "eq", ("4090", "3090"))]
    assert user_filters(parse_query("4090 num_gpus=any a100")) == [("gpu", "eq", ("4090", "a100"))]
    assert user_filters(parse_query("4090 gpu=any a100")) == [("gpu", "eq", "a100")]
    assert user_filters(parse_query("4090 4090")) == [("gpu", "eq", "4090")]


@pytest.mark.parametrize("text, filters", [
    ("x2", [("num_gpus", "eq", 2)]),
    ("2x", [("num_gpus", "eq", 2)]),
    ("X4", [("num_gpus", "eq", 4)]),
    ("h100 x2", [("gpu", "eq", "h100"), ("num_gpus", "eq", 2)]),
    ("h100x8", [("gpu", "eq", "h100"), ("num_gpus", "eq", 8)]),
    ("2xa100", [("gpu", "eq", "a100"), ("num_gpus", "eq", 2)]),
    ("4090x2", [("gpu", "eq", "4090"), ("num_gpus", "eq", 2)]),
    ("24gb", [("gpu_ram", "gte", 24.0)]),
    ("80GB", [("gpu_ram", "gte", 80.0)]),
    ("<$0.5", [("dph", "lt", Decimal("0.5"))]),
    ("<=$1", [("dph", "lte", Decimal("1"))]),
    ("$<0.5", [("dph", "lt", Decimal("0.5"))]),
    ("$<=2.25", [("dph", "lte", Decimal("2.25"))]),
    (">$1", [("dph", "gt", Decimal("1"))]),
    ("<$0.5/h", [("dph", "lt", Decimal("0.5"))]),
    ("4090 <$0.5", [("gpu", "eq", "4090"), ("dph", "lt", Decimal("0.5"))]),
    ("4090<$0.5", [("gpu", "eq", "4090"), ("dph", "lt", Decimal("0.5"))]),
    ("dph<$0.5", [("dph", "lt", Decimal("0.5"))]),
    ("interruptible", [("interruptible", "eq", True)]),
    ("interruptible <$1", [("interruptible", "eq", True), ("dph", "lt", Decimal("1"))]),
])
def test_shorthands(text, filters):
    assert user_filters(parse_query(text)) == filters


def test_price_shorthand_filters_offers():
    offers = [offer("a", dph="0.49"), offer("b", dph="0.50"), offer("c", dph="0.51")]
    assert [o.offer_id for o in parse_query("<$0.5").apply(offers)] == ["a"]
    assert [o.offer_id for o in parse_query("<=$0.5").apply(offers)] == ["a", "b"]
    assert [o.offer_id for o in parse_query("$<0.51").apply(offers)] == ["a", "b"]


def test_24gb_means_at_least():
    offers = [offer("a", gpu_ram=16), offer("b", gpu_ram=24), offer("c", gpu_ram=80)]
    assert [o.offer_id for o in parse_query("24gb").apply(offers)] == ["b", "c"]


def test_provider_restricts():
    q = parse_query("provider=runpod")
    assert q.providers == {"runpod"}
    assert q.wants_provider("runpod") and not q.wants_provider("vast")
    q2 = parse_query("provider in vast,RunPod")
    assert q2.providers == {"vast", "runpod"}
    offers = [offer("a", provider="vast"), offer("b", provider="runpod"), offer("c", provider="aws")]
    assert {o.offer_id for o in q2.apply(offers)} == {"a", "b"}
    assert {o.offer_id for o in q.apply(offers)} == {"b"}


def test_provider_exclusion_is_a_filter():
    q = parse_query("provider!=vast")
    assert q.providers is None
    offers = [offer("a", provider="vast"), offer("b", provider="runpod")]
    assert [o.offer_id for o in q.apply(offers)] == ["b"]
    assert [o.offer_id for o in parse_query("provider notin vast,aws").apply(offers)] == ["b"]


def test_provider_any_and_intersection():
    assert parse_query("provider=vast provider=any").providers is None
    assert parse_query("provider in vast,runpod provider=runpod").providers == {"runpod"}
    e = err("provider=vast provider=runpod")
    assert "provider=runpod" in e.message and e.token == "provider=runpod"


def test_limit():
    assert parse_query("limit=10").limit == 10
    assert parse_query("--limit 5").limit == 5
    assert parse_query("limit=3 limit=any").limit is None
    offers = [offer(str(i), dph=f"0.{i}") for i in range(1, 9)]
    assert [o.offer_id for o in parse_query("limit=3").apply(offers)] == ["1", "2", "3"]


def test_location_matches_whole_or_part():
    offers = [offer("a", location="Oregon, US", country="US"),
              offer("b", location="Quebec, CA", country="CA"),
              offer("c", location="Bavaria, DE", country="DE")]
    assert {o.offer_id for o in parse_query("location=US").apply(offers)} == {"a"}
    assert {o.offer_id for o in parse_query("geolocation=oregon").apply(offers)} == {"a"}
    assert {o.offer_id for o in parse_query('location="Quebec, CA"').apply(offers)} == {"b"}
    assert {o.offer_id for o in parse_query("location in [US,CA]").apply(offers)} == {"a", "b"}
    assert {o.offer_id for o in parse_query("location notin US,CA").apply(offers)} == {"c"}
    assert {o.offer_id for o in parse_query("country=de").apply(offers)} == {"c"}


def test_derived_fields_filter():
    offers = [offer("a", num_gpus=2, gpu_ram=24, dph="1.0"), offer("b", num_gpus=1, gpu_ram=48,
                                                                    dph="0.8")]
    assert [o.offer_id for o in parse_query("gpu_total_ram>=48").apply(offers)] == ["b", "a"]
    assert [o.offer_id for o in parse_query("dph_per_gpu<0.6").apply(offers)] == ["a"]


# ---------------------------------------------------------------------------- describe


@pytest.mark.parametrize("text, expected", [
    ("4090 <$0.5", "gpu=4090 · dph<0.5 · verified · cheapest first"),
    ("", "verified · cheapest first"),
    ("a100 x2 order=-reliability limit=10",
     "gpu=a100 · num_gpus=2 · verified · most reliable first · top 10"),
    ("provider=runpod verified=any gpu_ram>=24", "provider=runpod · gpu_ram>=24 · verified=any · cheapest first"),
    ("verified=false -o dph-", "not verified · priciest first"),
    ("4090 3090 -o gpu_ram-,dph", "gpu in 4090,3090 · verified · by gpu_ram desc, dph"),
    ("num_gpus in 1,2", "num_gpus in 1,2 · verified · cheapest first"),
    ("-o dph", "verified · cheapest first"),
    ("-o dph,gpu_ram-", "verified · by dph, gpu_ram desc"),
])
def test_describe(text, expected):
    assert parse_query(text).describe() == expected


# ---------------------------------------------------------------------------- errors


@pytest.mark.parametrize("text, message, token", [
    ("gpu_rm>=24", "Unknown field 'gpu_rm' in 'gpu_rm>=24' (did you mean gpu_ram?)", "gpu_rm"),
    ("gpu_rm >= 24", "Unknown field 'gpu_rm' in 'gpu_rm >= 24' (did you mean gpu_ram?)", "gpu_rm"),
    ("foo", "Unknown word 'foo'", "foo"),
    ("4090 foo", "Unknown word 'foo'", "foo"),
    ("dph=>1", "Unknown operator '=>' in 'dph=>1'", "=>"),
    ("dph<>1", "Unknown operator '<>' in 'dph<>1'", "<>"),
    ("dph<", "Value missing after 'dph<'", "dph<"),
    ("dph <  ", "Value missing after 'dph <'", "dph <"),
    ("num_gpus gte", "Value missing after 'num_gpus gte'", "num_gpus gte"),
    ("gpu_name in [,]", "Value missing after 'gpu_name in'", "gpu_name in [,]"),
    ('gpu_name="RTX 4090', "Unbalanced quote in 'gpu_name=\"RTX 4090'", 'gpu_name="RTX 4090'),
    ("gpu_name in [a,b", "Unbalanced bracket in 'gpu_name in [a,b'", "gpu_name in [a,b"),
    ("num_gpus=1]", "Unbalanced bracket in 'num_gpus=1]'", "num_gpus=1]"),
    ("gpu_ram>=lots", "gpu_ram expects a number, got 'lots'", "lots"),
    ("num_gpus=1.5", "num_gpus expects a whole number, got '1.5'", "1.5"),
    ("num_gpus=1,2", "num_gpus expects a whole number, got '1,2'", "1,2"),
    ("dph<cheap", "dph expects a price in USD/hour, got 'cheap'", "cheap"),
    ("dph<nan", "dph expects a price in USD/hour, got 'nan'", "nan"),
    ("gpu_ram>inf", "gpu_ram expects a number, got 'inf'", "inf"),
    ("gpu_ram>1e999", "gpu_ram expects a finite number, got '1e999'", "1e999"),
    ("verified=maybe", "verified expects true or false, got 'maybe'", "maybe"),
    ("limit=0", "limit must be a positive integer ≤ 1000, got '0'", "limit=0"),
    ("limit=1001", "limit must be a positive integer ≤ 1000, got '1001'", "limit=1001"),
    ("limit=ten", "limit must be a positive integer ≤ 1000, got 'ten'", "limit=ten"),
    ("limit>5", "limit only takes '=' (in 'limit>5')", "limit>5"),
    ("order=fast", "Unknown sort field 'fast' in 'order=fast'", "fast"),
    ("-o dhp", "Unknown sort field 'dhp' in '-o dhp' (did you mean dph?)", "dhp"),
    ("-o +dph-", "Conflicting sort direction in '+dph-'", "+dph-"),
    ("-o", "Value missing after '-o'", "-o"),
    ("-x", "Unknown option '-x'", "-x"),
    ("gpu_name>RTX", "gpu_name cannot be compared with '>'", "gpu_name>RTX"),
    ("verified>=true", "verified cannot be compared with '>='", "verified>=true"),
    ("num_gpus 2", "Operator missing after 'num_gpus'", "num_gpus"),
    ("verified>=maybe", "verified cannot be compared with '>='", "verified>=maybe"),
    ('gpu_name=" "', "Value missing in 'gpu_name=\" \"'", " "),
    (">=24", "Field missing before '>=24'", ">=24"),
    ('"RTX 4090"', "Value without a field: '\"RTX 4090\"'", '"RTX 4090"'),
    ("x0", "GPU count must be 1..64, got 'x0'", "x0"),
    ("h100x99", "GPU count must be 1..64, got 'h100x99'", "h100x99"),
    ("a10O", "Unknown word 'a10O'", "a10O"),
    ("$0.5", "Unknown word '$0.5'", "$0.5"),
])
def test_errors_name_their_token(text, message, token):
    e = err(text)
    assert message in e.message
    assert e.token == token
    assert e.position is not None and 0 <= e.position < len(text)
    assert token in text


def test_error_positions_point_into_the_query():
    e = err("num_gpus=1 gpu_rm>=24")
    assert e.position == 11
    e = err("4090 dph=>1")
    assert e.position == 8 and e.token == "=>"
    e = err("4090   frob")
    assert e.position == 7 and e.token == "frob"
    e = err("num_gpus=1 gpu_ram>=lots")
    assert e.position == 20


def test_did_you_mean_for_typos():
    assert "did you mean reliability?" in err("relability>0.9").message
    assert "did you mean a100?" in err("a1000").message
    assert "did you mean" not in err("qqqqqqqq").message


def test_query_too_long_and_non_text():
    assert "too long" in err("x2 " * 1000).message
    with pytest.raises(QueryError):
        parse_query(None)  # type: ignore[arg-type]


def test_query_error_is_an_invalid_input_with_code():
    e = err("foo")
    assert e.code == "bad_query"
    assert str(e) == e.message


# ---------------------------------------------------------------------------- catalogue, vast


def test_offer_fields_cover_offer_attributes():
    for name, spec in OFFER_FIELDS.items():
        assert spec.name == name
        assert hasattr(offer("a"), name), name
        assert spec.description
    assert OFFER_FIELDS["gpu_ram"].unit == "GB"
    assert OFFER_FIELDS["dph"].type is Decimal and OFFER_FIELDS["dph"].unit == "USD/h"
    assert {"gpu", "limit", "order"} <= set(QUERY_KEYWORDS)
    assert {"4090", "a100", "h100", "h200", "l40s", "a6000", "3090"} <= GPU_MODELS


def test_to_vast_filter_converts_units():
    assert to_vast_filter("gpu_ram", "gte", 24.0) == ("gpu_ram", "gte", 24000.0)
    assert to_vast_filter("cpu_ram", "in", (16.0, 32.0)) == ("cpu_ram", "in", [16000.0, 32000.0])
    assert to_vast_filter("dph", "lt", Decimal("0.5")) == ("dph_total", "lt", 0.5)
    assert to_vast_filter("cuda", "gte", 12.1) == ("cuda_max_good", "gte", 12.1)
    assert to_vast_filter("num_gpus", "eq", 2) == ("num_gpus", "eq", 2)
    assert to_vast_filter("verified", "eq", True) == ("verified", "eq", True)
    assert to_vast_filter("provider", "eq", "vast") is None
    assert to_vast_filter("gpu", "eq", "4090") is None


# ---------------------------------------------------------------------------- speed


def _many_offers(n: int) -> list[Offer]:
    names = ["RTX 3090", "RTX 4090", "RTX A6000", "L40S", "A100 80GB", "A100 SXM4", "H100 SXM",
             "H200", "RTX 4070 Ti", "A10"]
    return [Offer(provider=("vast", "runpod", "aws")[i % 3], offer_id=str(i),
                  gpu_name=names[i % len(names)], num_gpus=1 + i % 4, gpu_ram=(16, 24, 48, 80, 141)[i % 5],
                  dph=Decimal(i % 397) / 100 + Decimal("0.05"), reliability=0.9 + (i % 100) / 1000,
                  verified=i % 7 != 0) for i in range(n)]


def test_ten_thousand_offers_well_under_50ms():
    offers = _many_offers(10_000)
    q = parse_query("gpu_ram>=24 num_gpus=1 reliability>0.95")
    parse_query("-o -reliability,dph").apply(offers)      # warm caches
    best = min(_timed(lambda: parse_query("-o -reliability,dph").apply(offers)) for _ in range(5))
    # a loose bound that catches a regression to seconds; the figure is bench/bench_search.py's
    assert best < 0.25, f"{best * 1000:.1f} ms"
    result = q.apply(offers)
    assert result and all(o.gpu_ram >= 24 and o.num_gpus == 1 and o.reliability > 0.95
                          and o.verified for o in result)
    assert [o.dph for o in result] == sorted(o.dph for o in result)


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


# ---------------------------------------------------------------------------- properties

FIELD_WORDS = [*OFFER_FIELDS, *FIELD_ALIASES, "gpu", "limit", "order", "sort", "provider"]
OPS = ["=", "==", "!=", ">", ">=", "<", "<=", "=>", "<>", "!", " in ", " notin ", " not in ",
       " nin ", " gte ", " lt ", " eq ", " noteq ", " not eq ", " ", "", " = "]
VALUES = st.one_of(
    st.sampled_from(["1", "0", "-1", "24", "0.5", "$0.5", "1e3", "1e999", "nan", "inf", "true",
                     "False", "any", "?", "*", "RTX_4090", '"RTX 4090"', "[1,2]", "[a, b]", "[",
                     "]", '"', '"a', "a,b", ",", "", "24gb", "dph-", "-dph", "-reliability,+dph",
                     "vast,runpod", "1001", "lots", "[1,[2]]", '["x","y"]', "\\", "é", "0x10"]),
    st.text(max_size=6),
    st.decimals(allow_nan=True, allow_infinity=True).map(str),
    st.floats().map(repr),
    st.integers().map(str),
)
JUNK = st.sampled_from(["4090", "a100", "H100", "x2", "2x", "24gb", "<$0.5", "$<=1", "-o", "-n",
                        "--order", "--limit", "foo", "[", "]", '"', ">=", "=", ",", "h100x8",
                        "8xh100", "interruptible", "-o -dph", "limit=10", "x0", "rtx_4090",
                        "\t", "\n", "\u00a0", "\x00", "ß", "İ"])
CLAUSE = st.one_of(
    st.builds(lambda f, o, v: f"{f}{o}{v}", st.sampled_from(FIELD_WORDS), st.sampled_from(OPS),
              VALUES),
    JUNK,
    st.text(max_size=8),
)
QUERIES = st.lists(CLAUSE, max_size=8).flatmap(
    lambda parts: st.sampled_from([" ", "  ", ""]).map(lambda sep: sep.join(parts)))

OFFERS = st.lists(st.builds(
    Offer,
    provider=st.sampled_from(["vast", "runpod", "aws", "sandbox", "VAST"]),
    offer_id=st.text(max_size=5),
    gpu_name=st.one_of(st.sampled_from(["RTX 4090", "A100 80GB", "H100 SXM", "RTX A6000", ""]),
                       st.text(max_size=12)),
    num_gpus=st.integers(min_value=0, max_value=16),
    gpu_ram=st.floats(allow_nan=True, allow_infinity=True),
    cpu_cores=st.floats(min_value=0, max_value=256),
    dph=st.decimals(min_value=0, max_value=1000, places=4, allow_nan=False),
    storage_cost=st.decimals(min_value=0, max_value=10, places=4, allow_nan=False),
    reliability=st.floats(allow_nan=True),
    location=st.text(max_size=12),
    country=st.text(max_size=3),
    cuda=st.floats(allow_nan=True),
    verified=st.booleans(),
    interruptible=st.booleans(),
), max_size=12)


def _parse_or_error(text: str) -> OfferQuery | None:
    try:
        q = parse_query(text)
    except QueryError as e:
        assert e.__cause__ is None, f"internal error behind {e.message!r}: {e.__cause__!r}"
        assert e.message and isinstance(e.message, str)
        return None
    assert isinstance(q, OfferQuery)
    return q


@settings(max_examples=600, deadline=None)
@given(st.text())
def test_arbitrary_text_parses_or_raises_query_error(text):
    _parse_or_error(text)


@settings(max_examples=600, deadline=None)
@given(QUERIES)
def test_grammar_shaped_text_parses_or_raises_query_error(text):
    q = _parse_or_error(text)
    if q is not None:
        assert all(isinstance(f, Filter) for f in q.filters)
        assert isinstance(q.describe(), str)
        assert q.limit is None or 1 <= q.limit <= 1000


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(QUERIES, OFFERS)
def test_parsed_queries_apply_to_any_offers(text, offers):
    q = _parse_or_error(text)
    if q is None:
        return
    result = q.apply(offers)
    assert len(result) <= len(offers)
    assert all(q.matches(o) for o in result)
    assert {id(o) for o in result} <= {id(o) for o in offers}
    if q.limit is None:
        assert len(result) == sum(1 for o in offers if q.matches(o))


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(list(OFFER_FIELDS)), st.sampled_from(["=", "!=", ">", ">=", "<", "<="]),
       st.one_of(st.integers(-5, 100).map(str), st.sampled_from(["0.5", "true", "RTX_4090", "US"])),
       OFFERS)
def test_valid_filters_agree_with_matches(field, op, value, offers):
    q = _parse_or_error(f"verified=any {field}{op}{value}")
    if q is None:
        return
    kept = q.apply(offers)
    assert sorted(map(id, kept)) == sorted(id(o) for o in offers if q.matches(o))


@pytest.mark.parametrize("order", ["", "-o -reliability", "-o gpu_name-,dph", "-o verified,-dph"])
def test_limit_gives_the_head_of_the_full_order(order):
    offers = [offer(str(i), ("RTX 4090", "A100 80GB", "H100 SXM")[i % 3], dph=f"0.{i % 5}",
                    reliability=(0.9, 0.99)[i % 2], verified=i % 4 != 0, provider=("vast", "aws")[i % 2])
              for i in range(100)]
    full = parse_query(f"verified=any {order}").apply(offers)
    top = parse_query(f"verified=any {order} limit=7").apply(offers)
    assert [o.ref for o in top] == [o.ref for o in full[:7]]
    assert len(full) == 100
