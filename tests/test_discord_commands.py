"""The `/gpu` application commands are generated from the registry: the checked-in
`manifests/discord_commands.json` is what `gpuherd discord sync` uploads today (a snapshot), and
it passes Discord's documented limits."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from gpuherd.bot.discord.commands import payload, problems
from gpuherd.bot.grammar import REGISTRY

MANIFEST = Path(__file__).resolve().parents[1] / "manifests" / "discord_commands.json"
TYPES = {"text": 3, "duration": 3, "choice": 3, "integer": 4, "flag": 5, "number": 10}


def test_the_manifest_is_what_the_registry_generates() -> None:
    on_disk = json.loads(MANIFEST.read_text())
    assert on_disk == payload(), "regenerate it: gpuherd discord commands > manifests/discord_commands.json"


def test_one_subcommand_per_command_with_the_registry_params() -> None:
    (group,) = payload()
    assert group["name"] == "gpu" and group["type"] == 1
    subs = {o["name"]: o for o in group["options"]}
    assert set(subs) == {c.name for c in REGISTRY.all()}
    for cmd in REGISTRY.all():
        sub = subs[cmd.name]
        assert sub["type"] == 1
        options = {o["name"]: o for o in sub.get("options", [])}
        assert set(options) == {p.name for p in cmd.params}
        for p in cmd.params:
            o = options[p.name]
            assert o["type"] == TYPES[p.kind], (cmd.name, p.name)
            assert o["required"] is p.required
            assert o["description"] == p.description
            if p.choices:
                assert [c["value"] for c in o["choices"]] == list(p.choices)
            if p.complete and p.kind in ("text", "duration"):
                assert o.get("autocomplete") is True
            if p.min_value is not None:
                assert o["min_value"] == p.min_value


def test_the_generated_commands_pass_discords_limits() -> None:
    assert problems(payload()) == []


def test_the_limit_checker_catches_each_limit() -> None:
    good = payload()

    def broken(change: Any) -> list[str]:
        bad = copy.deepcopy(good)
        change(bad[0])
        return problems(bad)

    assert broken(lambda g: g.update(name="GPU"))
    assert broken(lambda g: g.update(description="x" * 101))
    assert broken(lambda g: g["options"][0].update(name="a" * 33))
    assert broken(lambda g: g.update(options=g["options"] * 2))        # 42 subcommands, duplicates
    boot = next(o for o in good[0]["options"] if o["name"] == "boot")
    i = good[0]["options"].index(boot)
    assert broken(lambda g: g["options"][i]["options"].reverse())      # required after optional
    assert broken(lambda g: g["options"][i]["options"][0].update(
        choices=[{"name": str(n), "value": str(n)} for n in range(26)]))
    assert broken(lambda g: g["options"][i]["options"][0].update(description=""))
