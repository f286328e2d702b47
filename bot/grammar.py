"""The `/gpu` command grammar: one registry shared by Slack, Discord, the shell and `%gpu`.
A command parses its words, calls the service and builds a Reply; help is generated from here.
Nothing here decides a business rule: it only translates text to service calls."""

from __future__ import annotations

import difflib
import inspect
import logging
import re
import shlex
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from gpuherd.core.auth import Actor
from gpuherd.core.errors import GpuherdError, InvalidInput
from gpuherd.core.models import Role
from gpuherd.core.names import check_budget_name, check_idempotency_key, check_principal, has_control
from gpuherd.core.results import BootResult, Confirmation, DestroyResult, ProgressEvent, StartResult
from gpuherd.core.service import GpuService
from gpuherd.core.text import (
    MAX_LINE,
    MAX_NAME,
    MAX_WORD,
    bounded,
    clip,
    suggestible,
    too_long,
)

from . import replies
from .replies import Reply

log = logging.getLogger(__name__)
PREFIXES = ("/gpu", "gpu")
Handler = Callable[["Context", "Args"], Awaitable[Reply]]
Progress = Callable[[ProgressEvent], Awaitable[None] | None]


@dataclass
class Context:
    """One delivery of one command. `delivery_id` is the surface's id for the message or button
    press (Slack trigger id, Discord interaction id): the same delivery retried gets the same key."""

    service: GpuService
    actor: Actor
    delivery_id: str | None = None
    progress: Progress | None = None       # shown each step of a boot or start the command waits for
    wait: bool = True                      # wait for boots/starts to become healthy

    async def follow(self, operation_id: str | None) -> None:
        """Show the operation's progress until it ends (when this surface waits for it)."""
        if not (self.wait and operation_id):
            return
        async for event in self.service.follow(self.actor, operation_id):
            if self.progress is not None:
                shown = self.progress(event)
                if inspect.isawaitable(shown):
                    await shown

    def key(self, command: str) -> str | None:
        return f"{self.actor.source}:{self.delivery_id}:{command}" if self.delivery_id else None


@dataclass
class Args:
    positional: list[str] = field(default_factory=list)
    options: dict[str, str] = field(default_factory=dict)
    raw: str = ""                          # the text after the command name, untouched

    def flag(self, name: str) -> bool:
        value = self.options.get(name)
        if value is None:
            return False
        if value.lower() in ("yes", "y", "true", "1", "on"):
            return True
        if value.lower() in ("no", "n", "false", "0", "off"):
            return False
        raise InvalidInput(f"{name}= takes yes or no, not '{clip(value, 20)}'.")


ParamKind = Literal["text", "integer", "number", "duration", "choice", "flag"]
Complete = Literal["template", "instance", "gpu", "period", "duration", "command"]


@dataclass(frozen=True)
class Param:
    """One typed argument of a command, as a form-shaped surface asks for it (Discord's options,
    a panel's inputs). The grammar still reads the line; `line_for` writes the line a form's
    values stand for, so a typed option and a typed word go through one parser.

    `option` names the `key=` of the grammar (None: a positional word, in the order of the
    params); `rest` is the free text after everything else (a search query, boot overrides);
    a `flag` is `key=yes` or `key=no` when given (a budget's hard_cap=no means something). `complete` says which suggestions fit
    (template names, the asker's instance ids, GPU models, periods)."""

    name: str
    description: str
    kind: ParamKind = "text"
    required: bool = False
    option: str | None = None
    rest: bool = False
    choices: tuple[str, ...] = ()
    complete: Complete | None = None
    min_value: int | None = None
    max_value: int | None = None


@dataclass(frozen=True)
class Command:
    name: str
    summary: str
    usage: str
    handler: Handler
    role: Role = Role.VIEWER
    details: str = ""
    examples: tuple[str, ...] = ()
    options: tuple[str, ...] = ()          # allowed key=value options; ("*",) = any (boot overrides)
    max_positional: int = 0
    free_text: bool = False                # the rest of the line is one argument (search queries)
    aliases: tuple[str, ...] = ()
    params: tuple[Param, ...] = ()         # the typed arguments a form asks for (see Param)


class Registry:
    def __init__(self) -> None:
        self._commands: dict[str, Command] = {}
        self._aliases: dict[str, str] = {}

    def command(self, name: str, **kw) -> Callable[[Handler], Handler]:
        def register(fn: Handler) -> Handler:
            cmd = Command(name=name, handler=fn, **kw)
            self._commands[name] = cmd
            for alias in cmd.aliases:
                self._aliases[alias] = name
            return fn
        return register

    def all(self) -> list[Command]:
        return list(self._commands.values())

    def find(self, name: str) -> Command:
        key = self._aliases.get(name.lower(), name.lower())
        if key in self._commands:
            return self._commands[key]
        close = difflib.get_close_matches(key, [*self._commands, *self._aliases], n=1) if suggestible(key) else []
        hint = f" Did you mean `/gpu {close[0]}`?" if close else ""
        raise InvalidInput(f"Unknown command '{clip(name)}'.{hint} `/gpu help` lists the commands.")


REGISTRY = Registry()


def tokenize(text: str) -> list[str]:
    bounded(text, MAX_LINE, "command line", stop="=")      # shlex reads one character at a time
    try:
        return shlex.split(text)
    except ValueError as exc:
        raise InvalidInput(f"Cannot read that command: {exc} (check your quotes).") from None


def strip_prefix(line: str) -> str:
    text = line.strip()
    for prefix in PREFIXES:
        if text.lower() == prefix:
            return ""
        if text.lower().startswith(prefix + " "):
            return text[len(prefix) + 1:].strip()
    return text


def _option_key(raw: str) -> str:
    """Option names are case-insensitive, but the NAME of a boot override `env.NAME=…` is an
    environment variable name and keeps its case (`env.HF_TOKEN`, not `env.hf_token`)."""
    key = raw.strip()
    if key.lower().startswith("env."):
        return "env." + key[4:]
    return key.lower()


def parse_args(cmd: Command, rest: str) -> Args:
    if cmd.free_text:
        return Args(raw=rest)
    args = Args(raw=rest)
    # Boot overrides carry template settings (env tokens, image refs); every other argument and
    # option value is a name, id, duration or amount. Limits and why: gpuherd.core.text.
    value_limit = MAX_WORD if "*" in cmd.options else MAX_NAME
    for word in tokenize(rest):
        if "=" in word and not word.startswith("="):
            key, _, value = word.partition("=")
            key = _option_key(bounded(key, MAX_NAME, "option name"))
            if "*" not in cmd.options and key not in cmd.options:
                allowed = ", ".join(f"{o}=" for o in cmd.options) or "none"
                close = difflib.get_close_matches(key, cmd.options, n=1) if suggestible(key) else []
                hint = f" Did you mean {close[0]}=?" if close else ""
                raise InvalidInput(f"`/gpu {cmd.name}` has no option '{clip(key)}'.{hint} Options: {allowed}.")
            if len(value) > value_limit:
                if key.startswith("env."):      # an env value may be a secret: never shown
                    raise InvalidInput(f"The value of {clip(key)}= is too long: {len(value):,} characters; "
                                       f"at most {value_limit:,} (value not shown).")
                raise InvalidInput(too_long(value, value_limit, f"the value of {clip(key)}="))
            if key in args.options:
                raise InvalidInput(f"Option '{clip(key)}' is given twice.")
            args.options[key] = value
        elif word.startswith("--"):
            flag = bounded(word, MAX_NAME, "option")[2:].lower()
            if flag in ("yes", "confirm"):
                args.options["confirm"] = "yes"
            elif flag in cmd.options:
                args.options[flag] = "yes"
            else:
                raise InvalidInput(f"`/gpu {cmd.name}` has no option '{clip(word)}'.")
        else:
            if not word:       # `/gpu status ''` is not `/gpu status`: an empty id names nothing
                raise InvalidInput(f"An empty argument ('') in `/gpu {cmd.name}` names nothing. Usage: {cmd.usage}")
            args.positional.append(bounded(word, MAX_NAME, f"argument of `/gpu {cmd.name}`"))
    if len(args.positional) > cmd.max_positional:
        extra = args.positional[cmd.max_positional]
        raise InvalidInput(f"Unexpected '{clip(extra)}' in `/gpu {cmd.name}`. Usage: {cmd.usage}")
    return args


def _word(value: str) -> str:
    return shlex.quote(value) if value == "" or any(c.isspace() or c in "\"'\\" for c in value) else value


def line_for(name: str, values: dict[str, Any]) -> str:
    """The `/gpu` line a form's values stand for (Discord's options): positional params in
    their order, `key=value` options, flags as `key=yes|no`, then the free text. Values are quoted
    as the grammar reads them, so a value with spaces stays one word; unknown names are
    refused, never dropped."""
    cmd = REGISTRY.find(name)
    known = {p.name: p for p in cmd.params}
    unknown = [k for k in values if k not in known]
    if unknown:
        raise InvalidInput(f"`/gpu {cmd.name}` has no option '{clip(unknown[0])}'.")
    words: list[str] = []
    options: list[str] = []
    rest = ""
    for param in cmd.params:
        value = values.get(param.name)
        if value is None or value == "":
            continue
        if param.kind == "flag":
            options.append(f"{param.option or param.name}={'yes' if value else 'no'}")
            continue
        text = format(value, "f").rstrip("0").rstrip(".") if isinstance(value, float) else str(value)
        if param.rest:
            rest = text
        elif param.option:
            options.append(f"{param.option}={_word(text)}")
        else:
            words.append(_word(text))
    return " ".join(part for part in ("/gpu", cmd.name, *words, *options, rest) if part)


def check(line: str) -> None:
    """Parse a line without running it: raises InvalidInput for what `dispatch` would refuse
    before calling core (an unknown command or option, a bad quote, an over-long word). Pure
    and fast, so a surface can answer bad input at once instead of deferring."""
    bounded(line, MAX_LINE, "command line", stop="=")
    text = strip_prefix(line)
    if text:
        name, _, rest = text.partition(" ")
        parse_args(REGISTRY.find(name), rest.strip())


async def dispatch(ctx: Context, line: str) -> Reply:
    """Run one command line; always returns a Reply, never raises, never leaks a traceback."""
    try:
        # First of all, in O(1): an over-long line is refused before any parsing; it is quoted
        # up to its first '=' only, so no option value (an env token) is echoed.
        bounded(line, MAX_LINE, "command line", stop="=")
        text = strip_prefix(line)
        if not text:
            return help_reply()
        name, _, rest = text.partition(" ")
        cmd = REGISTRY.find(name)
        args = parse_args(cmd, rest.strip())
        return await cmd.handler(ctx, args)
    except GpuherdError as exc:
        return replies.error(_visible(exc.message), _visible(exc.hint) if exc.hint else None)
    except Exception:
        ref = uuid.uuid4().hex[:8]
        log.exception("command failed (ref %s): %r", ref, line[:200])
        return replies.error(f"Something went wrong on our side (ref {ref}). Check /gpu status before "
                             "trying again; the details are in gpuherd's log.", title="Internal error")


def _visible(message: str) -> str:
    """A refusal as it may reach a terminal: every message quotes input through `clip`, and
    this is the net under that rule: a control or invisible character that still got into a
    message (a core message quoting a word as typed) is shown as an escape, never sent."""
    if not has_control(message.replace("\n", "")):
        return message
    return "".join(c if c == "\n" or not has_control(c) else f"\\u{ord(c):04x}" for c in message)


# --- help -------------------------------------------------------------------------------------

def help_reply(name: str | None = None) -> Reply:
    if name:
        cmd = REGISTRY.find(name)
        text = cmd.summary + (f"\n\n{cmd.details}" if cmd.details else "")
        fields = [replies.ReplyField(label="usage", value=cmd.usage, inline=False),
                  replies.ReplyField(label="who", value=f"{cmd.role.value} and up", inline=False)]
        if cmd.params:
            fields.append(replies.ReplyField(label="options", inline=False, value="\n".join(
                f"{p.name}{'' if p.required else ' (optional)'}: {p.description}" for p in cmd.params)))
        if cmd.examples:
            fields.append(replies.ReplyField(label="examples", value="\n".join(cmd.examples), inline=False))
        return Reply(title=f"/gpu {cmd.name}", text=text, fields=fields, ephemeral=True)
    rows = [[c.usage, c.summary] for c in REGISTRY.all()]
    return Reply(title="gpuherd commands", tables=[replies.Table(columns=["command", "does"], rows=rows)],
                 notes=["/gpu help <command> for details and examples."], ephemeral=True)


@REGISTRY.command("help", summary="Usage of every command, or of one", usage="/gpu help [command]",
                  max_positional=1,
                  params=(Param("command", "the command to explain", complete="command"),))
async def _help(ctx: Context, args: Args) -> Reply:
    return help_reply(args.positional[0] if args.positional else None)


# --- commands ---------------------------------------------------------------------------------

@REGISTRY.command(
    "search", summary="Live offers from every configured provider, cheapest first",
    usage="/gpu search [query]", free_text=True,
    params=(Param("query", "e.g. 4090 <$0.5, a100 x2 reliability>0.98, gpu_ram>=48 -o dph", rest=True,
                  complete="gpu"),),
    details=("vast.ai query syntax (gpu_ram>=24 num_gpus=1 reliability>0.98 gpu_name=RTX_4090 dph<0.6; "
             "operators = == != > >= < <= in notin; field=any drops a default; -o dph / order=dph- sorts) "
             "plus shorthands: 4090, a100, h100 x2, 24gb, <$0.5, provider=sandbox, limit=10. "
             "Memory and disk in GB, prices in USD/hour."),
    examples=("/gpu search 4090 <$0.5", "/gpu search a100 x2 reliability>0.98", "/gpu search gpu_ram>=48 -o dph"))
async def _search(ctx: Context, args: Args) -> Reply:
    return replies.search_reply(await ctx.service.search(ctx.actor, args.raw))


@REGISTRY.command("templates", summary="List templates, or show one in full", usage="/gpu templates [name]",
                  max_positional=1, aliases=("template",),
                  params=(Param("name", "show this template in full", complete="template"),))
async def _templates(ctx: Context, args: Args) -> Reply:
    if args.positional:
        return replies.template_reply(await ctx.service.show_template(ctx.actor, args.positional[0]))
    return replies.templates_reply(await ctx.service.list_templates(ctx.actor))


@REGISTRY.command(
    "boot", role=Role.MEMBER, summary="Start an instance from a template (cheapest matching offer)",
    usage="/gpu boot <template> [offer=<provider>:<id>] [provider=<name>] [key=value …]",
    options=("*",), max_positional=1,
    params=(Param("template", "the template to boot", required=True, complete="template"),
            Param("offer", "a given offer (provider:id, from /gpu search)", option="offer"),
            Param("provider", "only this provider's offers", option="provider"),
            Param("overrides", "template settings, e.g. max_model_len=4096 idle=45m", rest=True)),
    details=("Overrides are checked against the template (see /gpu templates <name>). Above the template's "
             "max $/h you are asked to confirm, with the cost per hour, day and month; the yes holds for that "
             "price only."),
    examples=("/gpu boot budget", "/gpu boot research max_model_len=4096 idle=45m",
              "/gpu boot budget offer=sandbox:sb-0042"))
async def _boot(ctx: Context, args: Args) -> Reply:
    if not args.positional:
        raise InvalidInput("Which template? Usage: /gpu boot <template> — /gpu templates lists them.")
    opts = dict(args.options)
    offer = opts.pop("offer", None)
    provider = opts.pop("provider", None)
    if offer is not None:
        offer = _offer_ref(offer, provider)
    elif provider is not None and not _PROVIDER.fullmatch(provider):
        raise InvalidInput(f"provider='{clip(provider, 20)}' is not a provider name (e.g. provider=vast).")
    if "confirm" in opts:
        raise InvalidInput("A boot is confirmed by answering its question (the Boot anyway button or "
                           "/gpu confirm <token>), not with confirm=yes.")
    key = _idempotency(ctx, opts.pop("key", None), "boot")
    result = await ctx.service.boot(ctx.actor, args.positional[0], offer=offer, provider=provider, overrides=opts,
                                    idempotency_key=key)
    return await _answer(ctx, result)


async def _answer(ctx: Context, result: BootResult | DestroyResult | Confirmation) -> Reply:
    """The reply to a boot, a destroy or a yes: a question, or the result (a boot followed to
    readiness when the surface waits)."""
    if isinstance(result, Confirmation):
        return replies.confirmation_reply(result)
    if isinstance(result, DestroyResult):
        return replies.destroy_reply(result)
    if result.operation_id and ctx.wait:
        await ctx.follow(result.operation_id)
        view = await ctx.service.view(ctx.actor, result.instance.id)
        result = result.model_copy(update={"instance": view, "ready": view.ready})
    return replies.boot_reply(result)


@REGISTRY.command("confirm", role=Role.VIEWER, summary="Say yes to a question gpuherd asked (its token)",
                  usage="/gpu confirm <token>", max_positional=1,
                  params=(Param("token", "the question's token", required=True),),
                  details="The price and the budget are checked again: if the price rose, you are asked again.")
async def _confirm(ctx: Context, args: Args) -> Reply:
    if not args.positional:
        raise InvalidInput("Which question? Usage: /gpu confirm <token> (the token is in the question).")
    return await _answer(ctx, await ctx.service.confirm(ctx.actor, args.positional[0]))


@REGISTRY.command("cancel", role=Role.VIEWER, summary="Say no to a question gpuherd asked (its token)",
                  usage="/gpu cancel <token>", max_positional=1,
                  params=(Param("token", "the question's token", required=True),))
async def _cancel(ctx: Context, args: Args) -> Reply:
    if not args.positional:
        raise InvalidInput("Which question? Usage: /gpu cancel <token>")
    return replies.cancelled_reply(await ctx.service.cancel(ctx.actor, args.positional[0]))


_PROVIDER = re.compile(r"[a-z][a-z0-9]{0,31}")
_OFFER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@%+=:-]{0,99}")


def _offer_ref(offer: str, provider: str | None) -> str:
    """`offer=<provider>:<id>` as `/gpu search` shows it, or InvalidInput saying what is wrong
    with it; a `provider=` that names another provider contradicts it and is refused, not
    silently overridden by either."""
    pname, colon, oid = offer.partition(":")
    if not colon or not _PROVIDER.fullmatch(pname) or not _OFFER_ID.fullmatch(oid):
        raise InvalidInput(f"offer='{clip(offer)}' should look like <provider>:<id> as /gpu search shows it, "
                           "e.g. offer=sandbox:sb-0042.")
    if provider is not None and provider != pname:
        raise InvalidInput(f"offer={clip(offer)} is a {pname} offer but provider='{clip(provider, 20)}' names "
                           "another provider: give one or the other.")
    return offer


def _idempotency(ctx: Context, given: str | None, command: str) -> str | None:
    """`key=` as typed (checked, an empty `key=` included: it is not "no key"), else the
    delivery's own key."""
    return ctx.key(command) if given is None else check_idempotency_key(given)


def _instance_arg(args: Args, cmd: str) -> str:
    if not args.positional:
        raise InvalidInput(f"Which instance? Usage: /gpu {cmd} <id> (ids look like g-7f3a; /gpu status lists them).")
    return args.positional[0]


@REGISTRY.command("start", role=Role.MEMBER, summary="Resume a stopped instance and wait for its health check",
                  usage="/gpu start <id>", max_positional=1, options=("key",),
                  params=(Param("instance", "the stopped instance", required=True, complete="instance"),))
async def _start(ctx: Context, args: Args) -> Reply:
    r: StartResult = await ctx.service.start(ctx.actor, _instance_arg(args, "start"),
                                             idempotency_key=_idempotency(ctx, args.options.get("key"), "start"))
    if r.operation_id and ctx.wait:
        began = ctx.service.clock.monotonic()
        await ctx.follow(r.operation_id)
        view = await ctx.service.view(ctx.actor, r.instance.id)
        r = r.model_copy(update={"instance": view, "ready": view.ready,
                                 "waited_s": round(ctx.service.clock.monotonic() - began, 1)})
    return replies.start_reply(r)


@REGISTRY.command("stop", role=Role.MEMBER, summary="Stop (disk kept, storage still billed); reports the session's cost",
                  usage="/gpu stop <id>", max_positional=1, options=("key",),
                  params=(Param("instance", "the running instance", required=True, complete="instance"),))
async def _stop(ctx: Context, args: Args) -> Reply:
    r = await ctx.service.stop(ctx.actor, _instance_arg(args, "stop"),
                               idempotency_key=_idempotency(ctx, args.options.get("key"), "stop"))
    return replies.stop_reply(r)


@REGISTRY.command("destroy", role=Role.MEMBER, summary="Destroy (no further charges); asks for confirmation",
                  usage="/gpu destroy <id>", max_positional=1, options=("confirm", "key"),
                  params=(Param("instance", "the instance to destroy", required=True, complete="instance"),))
async def _destroy(ctx: Context, args: Args) -> Reply:
    r = await ctx.service.destroy(ctx.actor, _instance_arg(args, "destroy"), confirmed=args.flag("confirm"),
                                  idempotency_key=_idempotency(ctx, args.options.get("key"), "destroy"))
    return await _answer(ctx, r)


@REGISTRY.command("status", summary="Instances: owner, state, $/h, accrued, idle for, next guard action",
                  usage="/gpu status [id] [all=yes] [--guards]", max_positional=1, options=("all", "guards"),
                  params=(Param("instance", "one instance in full", complete="instance"),
                          Param("all", "include destroyed instances", kind="flag", option="all"),
                          Param("guards", "the guard scheduler instead", kind="flag", option="guards")),
                  aliases=("list", "ls"))
async def _status(ctx: Context, args: Args) -> Reply:
    if args.flag("guards"):
        return replies.guards_reply(await ctx.service.guard_overview(ctx.actor))
    iid = args.positional[0] if args.positional else None
    r = await ctx.service.status(ctx.actor, iid, include_ended=args.flag("all"))
    return replies.status_reply(r, single=iid is not None)


@REGISTRY.command("guards", summary="The guard scheduler: last pass, next wake-up, coming guard actions",
                  usage="/gpu guards", details="From a terminal, `gpuherd guards --run` runs the scheduler in the "
                  "foreground (the shell runs it in the background).")
async def _guards(ctx: Context, args: Args) -> Reply:
    return replies.guards_reply(await ctx.service.guard_overview(ctx.actor))


@REGISTRY.command("providers", summary="Each provider: credentials, last answer and error, price age, balance",
                  usage="/gpu providers",
                  details=("Asks every configured provider now (within the provider time limit): whether its "
                           "credentials work and, where it reports one, its account balance and how long that "
                           "lasts at what is billed there now. The team is warned once when a balance runs out "
                           "within a day."))
async def _providers(ctx: Context, args: Args) -> Reply:
    return replies.providers_reply(await ctx.service.provider_overview(ctx.actor))


@REGISTRY.command("keep", role=Role.MEMBER, summary="Postpone idle shutdown (default 1 h, at most 7 days)",
                  usage="/gpu keep <id> [duration]", max_positional=2, examples=("/gpu keep g-7f3a 2h",),
                  params=(Param("instance", "the instance to keep", required=True, complete="instance"),
                          Param("duration", "how long, e.g. 2h or 1d (default 1h, at most 7 days)", kind="duration",
                                complete="duration")))
async def _keep(ctx: Context, args: Args) -> Reply:
    iid = _instance_arg(args, "keep")
    return replies.keep_reply(await ctx.service.keep(ctx.actor, iid, args.positional[1] if len(args.positional) > 1 else None))


@REGISTRY.command(
    "costs", summary="Spend, budget use, run-rate and month-end projection; or one instance's cost",
    usage="/gpu costs [today|week|month|YYYY-MM|<id>] [by=user|team|template|provider]",
    max_positional=1, options=("by",), aliases=("cost",),
    params=(Param("period", "today, week, month, YYYY-MM, or an instance id", complete="period"),
            Param("by", "group by", kind="choice", option="by", choices=("user", "team", "template", "provider"))),
    examples=("/gpu costs", "/gpu costs week by=template", "/gpu costs 2026-10 by=provider", "/gpu costs g-7f3a"))
async def _costs(ctx: Context, args: Args) -> Reply:
    what = args.positional[0] if args.positional else None
    if what and (what.lower().startswith("g-")):
        return replies.instance_cost_reply(await ctx.service.instance_cost(ctx.actor, what))
    return replies.costs_reply(await ctx.service.costs(ctx.actor, what, args.options.get("by")))


@REGISTRY.command("audit", role=Role.ADMIN, summary="Recent audit events (who did what, what it cost)",
                  usage="/gpu audit [n] [id]", max_positional=2,
                  params=(Param("count", "how many events (default 20)", kind="integer", min_value=1, max_value=500),
                          Param("instance", "only this instance's events", complete="instance")))
async def _audit(ctx: Context, args: Args) -> Reply:
    n, iid = 20, None
    count: str | None = None
    for word in args.positional:
        if word.isascii() and word.isdigit():     # not '²' or '١٠': str.isdigit takes those
            if count is not None:
                raise InvalidInput(f"Two counts ('{count}' and '{clip(word, 20)}'): give one. Usage: /gpu audit [n] [id]")
            count = word
            n = int(word)                      # at most 128 digits; the service bounds it
        elif word.lower().startswith("g-"):
            if iid is not None:
                raise InvalidInput(f"Two instances ('{clip(iid, 20)}' and '{clip(word, 20)}'): give one. "
                                   "Usage: /gpu audit [n] [id]")
            iid = word
        else:
            raise InvalidInput(f"'{clip(word)}' is neither a count nor an instance id. Usage: /gpu audit [n] [id]")
    return replies.audit_reply(await ctx.service.audit(ctx.actor, n, iid))


@REGISTRY.command(
    "budget", summary="Show budgets; admins set or clear them",
    usage="/gpu budget [set team=<team>|user=<user> <USD> [hard_cap=yes]] [clear team=<team>|user=<user>]",
    max_positional=2, options=("team", "user", "hard_cap"),
    params=(Param("action", "change a budget (admins)", kind="choice", choices=("set", "clear")),
            Param("amount", "USD per month (set)", kind="number", min_value=0),
            Param("team", "the team's budget", option="team"),
            Param("user", "a user's budget (their principal)", option="user"),
            Param("hard_cap", "stop machines when it is reached (set)", kind="flag", option="hard_cap")),
    examples=("/gpu budget", "/gpu budget set team=ml 500", "/gpu budget set user=local:alice 100 hard_cap=yes",
              "/gpu budget clear team=ml"))
async def _budget(ctx: Context, args: Args) -> Reply:
    if not args.positional:
        if args.options:
            raise InvalidInput("To change a budget: /gpu budget set team=<team> <USD>.")
        return replies.budget_reply(await ctx.service.budgets(ctx.actor))
    verb = args.positional[0].lower()
    scopes = [(s, args.options[s]) for s in ("team", "user") if s in args.options]
    if verb not in ("set", "clear"):
        raise InvalidInput(f"Unknown budget action '{clip(args.positional[0])}': use set or clear.")
    if len(scopes) != 1:
        raise InvalidInput(f"Name exactly one of team=<team> or user=<user>: /gpu budget {verb} team=ml"
                           + (" 500" if verb == "set" else ""))
    scope, name = scopes[0]
    check_budget_name(scope, name)            # before anything else is said about it
    if verb == "clear":
        return replies.budget_reply(await ctx.service.clear_budget(ctx.actor, scope, name))
    if len(args.positional) < 2:
        raise InvalidInput(f"How much per month? /gpu budget set {scope}={name} 500")
    hard = args.flag("hard_cap") if "hard_cap" in args.options else None
    return replies.budget_reply(await ctx.service.set_budget(ctx.actor, scope, name, args.positional[1], hard))


@REGISTRY.command(
    "attach", role=Role.ADMIN, summary="Put a machine created elsewhere under gpuherd's guards and ledger",
    usage="/gpu attach <provider>:<id> [template=<name>] [idle=<duration>] [owner=<principal>]",
    max_positional=1, options=("template", "idle", "owner"),
    params=(Param("machine", "provider:id of the machine", required=True),
            Param("template", "guard settings of this template", option="template", complete="template"),
            Param("idle", "idle timeout, e.g. 2h", kind="duration", option="idle", complete="duration"),
            Param("owner", "whose machine it is (a principal)", option="owner")),
    details=("The machine keeps running; from now on the idle guard watches it and the ledger bills it. "
             "A template gives it that template's guard settings. SURF Research Cloud workspaces are "
             "attached this way (gpuherd cannot create them)."),
    examples=("/gpu attach vast:12345", "/gpu attach surf:3f1c… idle=2h", "/gpu attach aws:i-0abc… template=research"))
async def _attach(ctx: Context, args: Args) -> Reply:
    if not args.positional:
        raise InvalidInput("Which machine? Usage: /gpu attach <provider>:<id>, e.g. /gpu attach vast:12345")
    if "owner" in args.options:
        check_principal(args.options["owner"], "owner")       # before the provider is asked
    r = await ctx.service.attach(ctx.actor, args.positional[0], template=args.options.get("template"),
                                 idle=args.options.get("idle"), owner=args.options.get("owner"))
    return replies.attach_reply(r)


@REGISTRY.command(
    "reconcile", role=Role.ADMIN, summary="Compare every provider's machines with gpuherd's records now",
    usage="/gpu reconcile",
    details=("Adopts machines carrying a gpuherd label, closes the bill of machines gone at the provider, and "
             "lists machines gpuherd does not manage. It also runs on its own every few minutes."))
async def _reconcile(ctx: Context, args: Args) -> Reply:
    return replies.reconcile_reply(await ctx.service.reconcile(ctx.actor))
