"""The `/gpu` application-command group, generated from the command registry.

Every command of `bot.grammar.REGISTRY` becomes a subcommand of one `/gpu` group; its typed
`Param`s become Discord options (text, integer, number, boolean, choices), so help, Discord
and the HTTP API's `/commands` read one definition and cannot drift apart. A subcommand's
values are turned back into the `/gpu` line they stand for (`grammar.line_for`) and run through
the same grammar as typed text: Discord adds no parser of its own.

Decisions:
- discord.py builds options from a callback's signature. The callbacks here are generated: each
  gets a `__signature__` naming the command's params with their annotations (and `describe`,
  `choices` metadata), and forwards the values as a dict. Required options come first, as
  Discord demands (discord.py sorts them so).
- A param with `complete` gets an autocomplete callback of that kind (templates, the asker's
  instances, GPU models, periods, durations, command names); what a kind suggests is the
  surface's to answer (`Handlers.complete`), from core.
- `manifests/discord_commands.json` is `payload()` — exactly what `gpuherd discord sync`
  uploads; a test regenerates it and checks it against Discord's limits."""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Coroutine
from typing import Any, Protocol

import discord
from discord import app_commands

from .. import grammar
from ..grammar import REGISTRY, Command, Param

GROUP = "gpu"
GROUP_DESCRIPTION = "Rent cloud GPUs without wasting money"
NAME = re.compile(r"^[-_a-z0-9]{1,32}$")
MAX_DESCRIPTION = 100
MAX_OPTIONS = 25
MAX_CHOICES = 25

Choice = app_commands.Choice


class Handlers(Protocol):
    """What the generated commands call: run a command with its values; suggest values."""

    async def run(self, interaction: discord.Interaction, command: str, values: dict[str, Any]) -> None: ...

    async def complete(self, interaction: discord.Interaction, kind: grammar.Complete,
                       current: str) -> list[Choice[str]]: ...


def _clip(text: str, limit: int = MAX_DESCRIPTION) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _annotation(param: Param) -> Any:
    if param.kind == "flag":
        return bool
    if param.kind == "integer":
        return app_commands.Range[int, param.min_value, param.max_value]
    if param.kind == "number":
        low = float(param.min_value) if param.min_value is not None else None
        high = float(param.max_value) if param.max_value is not None else None
        return app_commands.Range[float, low, high]
    return str


def _callback(cmd: Command, handlers: Handlers) -> Callable[..., Coroutine[Any, Any, None]]:
    async def callback(interaction: discord.Interaction, **values: Any) -> None:
        await handlers.run(interaction, cmd.name, {k: v for k, v in values.items() if v is not None})

    parameters = [inspect.Parameter("interaction", inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                    annotation=discord.Interaction)]
    for param in cmd.params:
        parameters.append(inspect.Parameter(
            param.name, inspect.Parameter.KEYWORD_ONLY, annotation=_annotation(param),
            default=inspect.Parameter.empty if param.required else None))
    callback.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
    callback.__qualname__ = callback.__name__ = f"gpu_{cmd.name}"
    if cmd.params:
        app_commands.describe(**{p.name: _clip(p.description) for p in cmd.params})(callback)
    choices = {p.name: [Choice(name=c, value=c) for c in p.choices[:MAX_CHOICES]]
               for p in cmd.params if p.kind == "choice" and p.choices}
    if choices:
        app_commands.choices(**choices)(callback)
    return callback


def _completer(kind: grammar.Complete,
               handlers: Handlers) -> Callable[[discord.Interaction, str], Coroutine[Any, Any, list[Choice[str]]]]:
    async def complete(interaction: discord.Interaction, current: str) -> list[Choice[str]]:
        return (await handlers.complete(interaction, kind, current))[:MAX_CHOICES]
    return complete


def build_group(handlers: Handlers) -> app_commands.Group:
    """`/gpu` with one subcommand per registered command."""
    group = app_commands.Group(name=GROUP, description=GROUP_DESCRIPTION)
    for cmd in REGISTRY.all():
        command: app_commands.Command[Any, ..., None] = app_commands.Command(
            name=cmd.name, description=_clip(cmd.summary), callback=_callback(cmd, handlers))
        for param in cmd.params:
            if param.complete is not None and param.kind in ("text", "duration"):
                command.autocomplete(param.name)(_completer(param.complete, handlers))
        group.add_command(command)
    return group


class _Inert:
    """Handlers for building the JSON only (nothing runs)."""

    async def run(self, interaction: discord.Interaction, command: str, values: dict[str, Any]) -> None:
        return None

    async def complete(self, interaction: discord.Interaction, kind: grammar.Complete,
                       current: str) -> list[Choice[str]]:
        return []


def payload() -> list[dict[str, Any]]:
    """The commands as Discord's bulk-overwrite body (what `tree.sync` sends)."""
    client = discord.Client(intents=discord.Intents.none())
    tree = app_commands.CommandTree(client)
    group = build_group(_Inert())
    tree.add_command(group)
    return [group.to_dict(tree)]


def problems(commands: list[dict[str, Any]]) -> list[str]:
    """What Discord would refuse in a command payload: names, description lengths, option and
    choice counts, required options after optional ones (documented limits; see the reference
    for application commands)."""
    out: list[str] = []

    def walk(where: str, item: dict[str, Any]) -> None:
        name = str(item.get("name", ""))
        if not NAME.match(name):
            out.append(f"{where}: name {name!r} is not 1-32 lower-case letters, digits, - or _")
        description = str(item.get("description", ""))
        if not 1 <= len(description) <= MAX_DESCRIPTION:
            out.append(f"{where}: description has {len(description)} characters (1-{MAX_DESCRIPTION})")
        options = item.get("options") or []
        if len(options) > MAX_OPTIONS:
            out.append(f"{where}: {len(options)} options (at most {MAX_OPTIONS})")
        seen_optional = False
        for option in options:
            here = f"{where} {option.get('name')}"
            if option.get("type") in (1, 2):
                walk(here, option)
                continue
            if option.get("required"):
                if seen_optional:
                    out.append(f"{here}: a required option after an optional one")
            else:
                seen_optional = True
            choices = option.get("choices") or []
            if len(choices) > MAX_CHOICES:
                out.append(f"{here}: {len(choices)} choices (at most {MAX_CHOICES})")
            if choices and option.get("autocomplete"):
                out.append(f"{here}: choices and autocomplete together")
            for choice in choices:
                if not 1 <= len(str(choice.get("name", ""))) <= 100:
                    out.append(f"{here}: choice name {choice.get('name')!r} is not 1-100 characters")
            walk(here, {"name": option.get("name"), "description": option.get("description")})

    names = [c.get("name") for c in commands]
    if len(set(names)) != len(names):
        out.append("duplicate command names")
    for command in commands:
        walk(f"/{command.get('name')}", command)
    return out


