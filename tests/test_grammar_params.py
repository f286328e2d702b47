"""The registry's typed params (`grammar.Param`) agree with the grammar that reads the line, and
`line_for` writes lines the grammar reads back to the same values: Discord's options and typed
text cannot drift apart."""

from __future__ import annotations

import pytest

from gpuherd.bot import grammar
from gpuherd.bot.grammar import REGISTRY, line_for, parse_args
from gpuherd.core.errors import InvalidInput


@pytest.mark.parametrize("cmd", REGISTRY.all(), ids=lambda c: c.name)
def test_params_fit_the_grammar(cmd: grammar.Command) -> None:
    positional = [p for p in cmd.params if p.option is None and not p.rest]
    assert len(positional) <= cmd.max_positional, f"{cmd.name}: more positional params than the grammar takes"
    for p in cmd.params:
        if p.option is not None:
            assert "*" in cmd.options or p.option in cmd.options, f"{cmd.name}: {p.option}= is not an option"
        if p.rest:
            assert cmd.free_text or "*" in cmd.options, f"{cmd.name}: free text the grammar does not take"
        if p.kind == "choice":
            assert p.choices
        assert p.description and len(p.description) <= 100
        assert p.name.islower() and len(p.name) <= 32
    # a command that takes words offers them as params (else Discord could not pass them)
    if cmd.max_positional or cmd.free_text:
        assert cmd.params, f"{cmd.name} takes arguments but declares no params"
    names = [p.name for p in cmd.params]
    assert len(set(names)) == len(names)


def test_line_for_round_trips_through_the_parser() -> None:
    line = line_for("boot", {"template": "research", "offer": "sandbox:sb-1", "overrides": "max_model_len=4096 idle=45m"})
    assert line == "/gpu boot research offer=sandbox:sb-1 max_model_len=4096 idle=45m"
    args = parse_args(REGISTRY.find("boot"), grammar.strip_prefix(line).split(" ", 1)[1])
    assert args.positional == ["research"]
    assert args.options == {"offer": "sandbox:sb-1", "max_model_len": "4096", "idle": "45m"}


def test_values_with_spaces_stay_one_word() -> None:
    line = line_for("attach", {"machine": "vast:1", "owner": "two words"})
    args = parse_args(REGISTRY.find("attach"), grammar.strip_prefix(line).split(" ", 1)[1])
    assert args.options["owner"] == "two words"
    assert args.positional == ["vast:1"]


def test_flags_numbers_and_free_text() -> None:
    assert line_for("budget", {"action": "set", "amount": 500.0, "team": "ml", "hard_cap": False}) == \
        "/gpu budget set 500 team=ml hard_cap=no"
    assert line_for("budget", {"action": "set", "amount": 12.5, "team": "ml"}) == "/gpu budget set 12.5 team=ml"
    assert line_for("status", {"all": True}) == "/gpu status all=yes"
    assert line_for("search", {"query": "4090 <$0.5"}) == "/gpu search 4090 <$0.5"
    assert line_for("audit", {"count": 5, "instance": "g-1a2b"}) == "/gpu audit 5 g-1a2b"


def test_unknown_values_are_refused_not_dropped() -> None:
    with pytest.raises(InvalidInput, match="no option 'colour'"):
        line_for("stop", {"instance": "g-1", "colour": "red"})


def test_check_refuses_what_dispatch_would_before_any_io() -> None:
    grammar.check("/gpu status g-1a2b all=yes")
    with pytest.raises(InvalidInput, match="Unknown command"):
        grammar.check("/gpu stpo g-1")
    with pytest.raises(InvalidInput, match="no option"):
        grammar.check("/gpu stop g-1 colour=red")
    with pytest.raises(InvalidInput):
        grammar.check("/gpu stop " + "x" * 100_000)
