r"""The `gpuherd` command: the shell, database and user administration, and every /gpu command
as a one-shot (`gpuherd status`, `gpuherd search 4090 "<\$0.5"`).

Exit codes (also in `gpuherd --help`):

    0    done
    1    the command was refused or failed (it answered with an error: no permission, unknown
         instance, a provider's refusal, a bad /gpu argument) or something broke on our side
    2    bad usage of the gpuherd command itself, bad settings, or the database cannot be used
    3    the command needs a yes that was not given (a price above the template's limit, a
         destroy): nothing was done; run the `gpuherd confirm <token>` it names, or use --yes
    130  interrupted (Ctrl-C)

`--json` (before or after the command: `gpuherd --json status`, `gpuherd status --json`) prints
one JSON object on stdout and nothing else there (progress and warnings go to stderr):

    {"command": "status", "exit_code": 0,
     "results": [{"model": "StatusResult", "data": {...}}, ...],
     "reply": {...}}

`results` are the models core returned to the command, in call order (a boot that waits: its
BootResult, then the InstanceView read once it is ready; a boot above the limit: its
Confirmation, then with --yes the BootResult). They are the façade's own result models
(core/results.py), so money is a decimal string and times are ISO 8601; `reply` is the
platform-neutral Reply the other surfaces render (the JSON `POST /api/v1/commands` answers),
for commands that return no model (`help`) and for the error's wording. `gpuherd db|users|keys
... --json` print their own models (a list for the listings).

Decisions (start-up cost: the issue measured `--help` at 1.0-1.2 s of CPU, a one-shot at
1.6-2.0 s, almost all of it imports; `bench/bench_startup.py` measures it next to `vastai --help`):

- This module imports nothing heavy at its top: argparse and core.errors only. `--help`, the
  usage errors and `--version` never load SQLAlchemy, sqlmodel, alembic, pydantic or the core
  (`tests/test_cli_startup.py` holds that). `completion` does import the grammar (a script is
  printed once, and the options come from the registry itself).
- The chat commands' names, aliases and summaries (for `--help` and for telling a one-shot
  command from a terminal one) are read from `grammar.py`'s `@REGISTRY.command(...)`
  decorators with `ast`, without running the module (~7 ms instead of ~1 s of imports): the
  grammar stays the one place commands are declared. When the source is not there or a
  decorator is not literal, the grammar is imported (slow, still right); a test checks the scan
  against `grammar.REGISTRY`.
- The chat commands are not argparse subparsers (that listed each command twice in `--help`,
  once as a subparser and once in the epilog): the epilog lists them once, and argv is split
  before argparse sees it, so `gpuherd search -o dph` reaches the query parser verbatim.
- A one-shot builds the service with `GpuService.from_settings`, which hands the database to
  alembic (its import alone ~0.15 s) only when its stored revision is not the newest
  migration's (`core.db.Database.at_head`).
- The cyclic garbage collector is off while a one-shot starts up (imports, the service):
  10-15 % of its CPU went to collections that found almost nothing. It is back on before the
  command runs; serving commands keep their own set-up (`core/collector.py`).
- A one-shot boot or start leaves a machine that only a serving process guards (idle stop,
  budget caps): when no process holds the guard lock afterwards, stderr says so and how to
  run one. `gpuherd shell` says the same on the way out (`shell.farewell`, after its Runtime
  let go of the lock; the service is closed after that, not by the Runtime).
- Exit codes are decided here, from what the command did, not from its text: the last answer
  core gave being a Confirmation is "a yes was needed" (3), else an error reply is 1.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from gpuherd.core.errors import ConfigError, GpuherdError, InvalidInput

if TYPE_CHECKING:
    from gpuherd.core.service import GpuService

from .oneshot import FAILED, INTERRUPTED, OK, USAGE, _one_shot, _print_json, starting_up

EXIT_CODES = ("exit codes: 0 done; 1 refused or failed (the command answered with an error); 2 bad usage,\n"
              "  bad settings or an unusable database; 3 a yes was needed and not given (nothing done;\n"
              "  confirm with the token shown or use --yes); 130 interrupted.")
OWN_FLAGS = ("--yes", "-y", "--no-wait", "--json")        # gpuherd's flags among a one-shot's words
TERMINAL_ONLY = ("shell", "serve", "slack", "discord", "panel", "completion")   # no --json: not one-shots


# --- the chat commands, without importing the grammar ------------------------------------------

@dataclass(frozen=True)
class ChatCommand:
    """What the CLI needs of a /gpu command before the grammar is loaded."""

    name: str
    aliases: tuple[str, ...]
    summary: str


_CHAT: list[ChatCommand] | None = None


def _scan_grammar(source: str) -> list[ChatCommand] | None:
    """The `@REGISTRY.command("name", summary=..., aliases=...)` decorators of grammar.py, in
    order; None when one of them is not plain literals or a command is registered some other
    way (then the caller imports the grammar)."""
    import ast

    found: list[ChatCommand] = []
    for node in ast.parse(source).body:
        if not isinstance(node, ast.AsyncFunctionDef | ast.FunctionDef):
            continue
        for deco in node.decorator_list:
            if not (isinstance(deco, ast.Call) and isinstance(deco.func, ast.Attribute)
                    and deco.func.attr == "command" and isinstance(deco.func.value, ast.Name)
                    and deco.func.value.id == "REGISTRY"):
                continue
            try:
                name = ast.literal_eval(deco.args[0])
                kw = {k.arg: k.value for k in deco.keywords}
                summary = ast.literal_eval(kw["summary"])
                aliases = tuple(ast.literal_eval(kw["aliases"])) if "aliases" in kw else ()
            except (ValueError, KeyError, IndexError, TypeError, SyntaxError):
                return None
            if not isinstance(name, str) or not isinstance(summary, str):
                return None
            found.append(ChatCommand(name, aliases, summary))
    if len(found) != source.count("REGISTRY.command("):     # a registration that is no decorator
        return None
    return found or None


def chat_commands() -> list[ChatCommand]:
    """Every /gpu command (see the module docstring for why this reads the source)."""
    global _CHAT
    if _CHAT is None:
        scanned = None
        try:
            scanned = _scan_grammar(Path(__file__).with_name("grammar.py").read_text(encoding="utf-8"))
        except (OSError, SyntaxError, ValueError):
            pass
        if scanned is None:
            from . import grammar

            scanned = [ChatCommand(c.name, tuple(c.aliases), c.summary) for c in grammar.REGISTRY.all()]
        _CHAT = scanned
    return _CHAT


def _epilog() -> str:
    lines = ["chat commands (run one-shot: gpuherd <command> [args]; gpuherd <command> --help explains one):"]
    for c in chat_commands():
        also = f" (also: {', '.join(c.aliases)})" if c.aliases else ""
        lines.append(f"  {c.name:<10} {c.summary}{also}")
    lines += ["", '--json prints one JSON object on stdout: {"command", "exit_code", "results": [{"model", "data"}],',
              '  "reply"}: the result models core returned, in order, and the reply as the other surfaces get it.',
              EXIT_CODES, "",
              "The guards (idle stop, lifetimes, budget caps) run in `gpuherd shell`, `gpuherd serve` or",
              "`gpuherd guards --run`; a one-shot runs none (a one-shot boot says when nothing guards it).",
              "", "Quick start: gpuherd shell   (then: /gpu search 4090, /gpu boot budget, /gpu costs)"]
    return "\n".join(lines)


def _version() -> str:
    """The installed distribution's version (a checkout not installed says so)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("gpuherd")
    except PackageNotFoundError:
        return "(not installed)"


class _VersionAction(argparse.Action):
    """`--version`, reading the installed metadata only when asked (it costs a scan of sys.path)."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS, **kw: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kw)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> NoReturn:
        print(f"gpuherd {_version()}")
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gpuherd", description="Rent cloud GPUs from chat and notebooks without wasting money.",
        epilog=_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action=_VersionAction, help="show the installed version and exit")
    parser.add_argument("--yes", "-y", action="store_true", help="accept confirmations (for scripts)")
    parser.add_argument("--verbose", "-v", action="store_true", help="log to stderr")
    parser.add_argument("--no-wait", action="store_true", dest="global_no_wait",
                        help="boot/start return once the provider accepted (no wait for the health check)")
    parser.add_argument("--json", action="store_true", dest="global_json",
                        help="print the result models as JSON on stdout (one-shot, db, users and keys commands)")
    sub = parser.add_subparsers(dest="cmd", metavar="<command>",
                                title="terminal commands (the chat commands below run one-shot too)")
    shell = sub.add_parser("shell", help="interactive /gpu shell (reads stdin when piped)")
    shell.add_argument("--yes", "-y", action="store_true", dest="shell_yes", help="accept confirmations")
    shell.add_argument("--no-wait", action="store_true", help="return from boot/start once the provider accepted")
    shell.add_argument("--server", metavar="URL",
                       help="run against a gpuherd server (`gpuherd serve`) with the key in GPUHERD_API_KEY")
    db = sub.add_parser("db", help="database: upgrade (migrate) or show the current revision")
    db.add_argument("action", choices=["upgrade", "current"])
    db.add_argument("--json", action="store_true", dest="sub_json", help="the revisions as JSON")
    users = sub.add_parser("users", help="set a user's role or team (admin)")
    users.add_argument("action", choices=["set", "list"])
    users.add_argument("principal", nargs="?", help="e.g. local:alice, slack:U123, discord:4242")
    users.add_argument("--role", choices=["viewer", "member", "admin"])
    users.add_argument("--team")
    users.add_argument("--json", action="store_true", dest="sub_json", help="the users as JSON")
    serve = sub.add_parser("serve", help="the team server: HTTP API, guards, notices (see README, Team deployment)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 in a container)")
    serve.add_argument("--port", type=int, default=8080, help="port to listen on (0 picks a free one)")
    sub.add_parser("slack", help="the Slack app alone, in Socket Mode (SLACK_APP_TOKEN, SLACK_BOT_TOKEN; README, Slack)")
    discord_p = sub.add_parser("discord", help="the Discord bot alone (DISCORD_BOT_TOKEN; README, Discord); "
                                               "`gpuherd discord sync` registers /gpu")
    discord_p.add_argument("discord_action", nargs="?", choices=["run", "sync", "commands"], default="run",
                           help="run the bot (default), sync the /gpu commands to Discord, or print their JSON")
    discord_p.add_argument("--guild", type=int, help="sync to this server only (instant; for trying it out)")
    panel = sub.add_parser("panel", help="the notebook panel as a standalone page, served by Voila (README, Jupyter)")
    panel.add_argument("--host", default="127.0.0.1",
                       help="address to listen on (the page has no login of its own: keep it on 127.0.0.1 "
                            "or behind a proxy that authenticates)")
    panel.add_argument("--port", type=int, default=8866, help="port to listen on")
    panel.add_argument("--open", action="store_true", help="open it in the default browser")
    keys = sub.add_parser("keys", help="API keys for the HTTP API (admin): create, list, revoke")
    key_actions = keys.add_subparsers(dest="keys_action", metavar="<action>", required=True)
    create = key_actions.add_parser("create", help="make a key for a user; the key is shown only once")
    create.add_argument("--user", required=True, dest="principal", help="whose key, e.g. api:alice or slack:U123")
    create.add_argument("--role", choices=["viewer", "member", "admin"],
                        help="cap the key below its user's role (e.g. viewer for a dashboard)")
    create.add_argument("--name", default="", help="what the key is for, e.g. ci or notebook")
    listing = key_actions.add_parser("list", help="keys in use (ids, users, roles; never the keys)")
    listing.add_argument("--all", action="store_true", help="include revoked keys")
    revoke = key_actions.add_parser("revoke", help="end a key at once (by its id, from gpuherd keys list)")
    revoke.add_argument("key_id")
    for p in (create, listing, revoke):
        p.add_argument("--json", action="store_true", dest="sub_json", help="the key's view(s) as JSON")
    completion = sub.add_parser("completion", help="print a completion script: source <(gpuherd completion bash)")
    completion.add_argument("shell_name", choices=["bash", "zsh"], metavar="{bash,zsh}")
    # `gpuherd guards` shows the scheduler (the /gpu guards command); `gpuherd guards --run` runs it
    return parser


# --- building the service ----------------------------------------------------------------------

def _service() -> GpuService:
    from gpuherd.core.service import GpuService

    return GpuService.from_settings()


async def _remote_shell(url: str, yes: bool) -> int:
    """`gpuherd shell --server URL`: the key comes from the environment, never the command line
    (where `ps` and the shell history would show it)."""
    import os

    from .shell import run_remote

    key = os.environ.get("GPUHERD_API_KEY", "").strip()
    if not key:
        raise ConfigError("Set GPUHERD_API_KEY to your API key for that server (an admin makes one with "
                           "`gpuherd keys create --user <you>`).")
    return await run_remote(url, key, yes=yes)


async def _shell(yes: bool, wait: bool = True) -> int:
    import asyncio

    from rich.console import Console

    from gpuherd.core.runtime import Runtime

    from .shell import Shell, farewell

    service = await asyncio.to_thread(_service)
    runtime = Runtime(service, tune_collector=True, close_service=False)
    try:
        shell = Shell(service, yes=yes, wait=wait, runtime=runtime)  # the shell is a notice destination
        async with runtime:  # recovery, attachments, guards and notices run in the background while you type
            if runtime.adopted:
                Console(stderr=True).print(f"[yellow]Adopted {', '.join(runtime.adopted)}: booted before a crash.[/yellow]")
            if runtime.attached:
                Console(stderr=True).print(f"Attached from the configuration: {', '.join(runtime.attached)}")
            code = await shell.run()
            await runtime.deliver_now()  # what the last commands caused, before leaving
        await farewell(service, shell.actor, shell.console)   # after the runtime let go of the guard lock
        return code
    finally:
        await service.aclose()             # the runtime leaves it open for the farewell


async def _run_guards() -> int:
    """`gpuherd guards --run`: the guard scheduler in the foreground, printing what it does."""
    import asyncio
    import signal

    from rich.markup import escape

    from gpuherd.core.runtime import Runtime

    from .render_text import make_console

    service = await asyncio.to_thread(_service)
    console = make_console()
    service.hub.subscribe(lambda n: console.print(f"{n.at:%Y-%m-%d %H:%M:%S} {escape(n.text)}", highlight=False))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with Runtime(service, tune_collector=True) as runtime:
        scheduler = runtime.scheduler
        assert scheduler is not None                  # guards=True (the default) makes one
        console.print(f"guards running as {runtime.identity} ({scheduler.leadership.describe()}); Ctrl-C stops")
        await stop.wait()
    return 0


def _db(action: str, as_json: bool) -> int:
    from gpuherd.core.config import load_settings
    from gpuherd.core.db import Database, current_revision, head_revision

    settings = load_settings()
    db = Database(settings.resolved_database_url)
    if action == "upgrade":
        db.upgrade()
    current, head = current_revision(db.engine), head_revision()
    if as_json:
        _print_json({"revision": current, "head": head, "current": current == head})
    else:
        print(f"database revision {current or 'none'} (latest {head})")
    return OK


def _users(args: argparse.Namespace, as_json: bool) -> int:
    import asyncio

    async def run() -> int:
        service = await asyncio.to_thread(_service)
        try:
            actor = service.local_actor("cli")
            if args.action == "set":
                if not args.principal:
                    raise InvalidInput("Which user? gpuherd users set <principal> --role member --team ml")
                user = await service.set_user(actor, args.principal, role=args.role, team=args.team)
                if as_json:
                    _print_json(user.model_dump(mode="json"))
                else:
                    print(f"{user.principal}: {user.role}, team {user.team}")
            else:
                users = await service.users(actor)
                if as_json:
                    _print_json([u.model_dump(mode="json") for u in users])
                for user in [] if as_json else users:
                    print(f"{user.principal:<32} {user.role:<7} {user.team}")
            return OK
        finally:
            await service.aclose()
    return asyncio.run(run())


def _database_unreachable(exc: BaseException) -> ConfigError:
    """A database error as one line (its type and first line; never the URL, which may hold a password)."""
    orig = getattr(exc, "orig", None) or exc
    first = (str(orig).strip().splitlines() or [""])[0][:200]
    return ConfigError(f"The database cannot be used ({type(orig).__name__}: {first}). "
                        "Check GPUHERD_DATABASE_URL and that the database is up (gpuherd db upgrade migrates it).")


def _is_database_error(exc: BaseException) -> bool:
    """Without importing SQLAlchemy: a process that never loaded it raised none of its errors."""
    errors = sys.modules.get("sqlalchemy.exc")
    return errors is not None and isinstance(exc, errors.SQLAlchemyError)


def _serve(host: str, port: int) -> int:
    """`gpuherd serve`: blocks until SIGTERM or SIGINT, 0 after a clean shutdown."""
    try:
        from .http.server import serve
    except ImportError as exc:
        raise ConfigError(f"gpuherd serve needs the server extra ({exc.name} is missing): "
                           "pip install 'gpuherd[server]' (./run serve installs it).") from None
    return serve(host, port)


def _slack() -> int:
    """`gpuherd slack`: the Slack surface alone, in Socket Mode, with the guards and notices."""
    import asyncio

    try:
        from .slack.run import run_socket_mode
    except ImportError as exc:
        raise ConfigError(f"gpuherd slack needs the slack extra ({exc.name} is missing): "
                           "pip install 'gpuherd[slack]'.") from None
    return asyncio.run(run_socket_mode())


def _discord(action: str, guild: int | None) -> int:
    """`gpuherd discord [run|sync|commands]`: the bot alone, or its command registration."""
    import asyncio

    try:
        from .discord import commands, run
    except ImportError as exc:
        raise ConfigError(f"gpuherd discord needs the discord extra ({exc.name} is missing): "
                           "pip install 'gpuherd[discord]'.") from None
    if action == "commands":
        _print_json(commands.payload())
        return OK
    if action == "sync":
        from gpuherd.core.config import load_settings

        names = asyncio.run(run.sync(load_settings(), guild))
        where = f"server {guild}" if guild else "every server (global commands take up to an hour to appear)"
        print(f"Registered /{', /'.join(names)} in {where}.")
        return OK
    return asyncio.run(run.run_gateway())


def _keys(args: argparse.Namespace, as_json: bool) -> int:
    """`gpuherd keys create|list|revoke`, as the local admin. A new key goes alone to stdout
    (`KEY=$(gpuherd keys create --user api:ci)` works); what to do with it goes to stderr.
    With --json the key is the `key` field of the one object printed."""
    import asyncio

    from rich.console import Console
    from rich.markup import escape

    async def run() -> int:
        service = await asyncio.to_thread(_service)
        try:
            actor = service.local_actor("cli")
            err = Console(stderr=True)
            if args.keys_action == "create":
                created = await service.create_key(actor, args.principal, role=args.role, name=args.name)
                view = created.view
                if as_json:
                    _print_json({"key": created.key, "view": view.model_dump(mode="json")})
                else:
                    print(created.key)
                cap = f", capped at {view.role}" if view.role else ""
                err.print(f"API key {view.id} for {escape(view.principal)}{cap}. It is shown only once: store it "
                          f"now. Send it as `Authorization: Bearer <key>`; `gpuherd keys revoke {view.id}` ends it.",
                          highlight=False)
            elif args.keys_action == "list":
                views = await service.list_keys(actor, include_revoked=args.all)
                if as_json:
                    _print_json([v.model_dump(mode="json") for v in views])
                    return OK
                if not views:
                    err.print("No API keys yet: gpuherd keys create --user api:<name>")
                for v in views:
                    used = f"{v.last_used_at:%Y-%m-%d %H:%M}" if v.last_used_at else "never"
                    state = f"revoked {v.revoked_at:%Y-%m-%d %H:%M}" if v.revoked_at else "active"
                    print(f"{v.id}  {v.principal:<28} {v.role or 'user':<7} {v.name or '-':<16} "
                          f"created {v.created_at:%Y-%m-%d %H:%M}  used {used:<16}  {state}")
            else:
                view = await service.revoke_key(actor, args.key_id)
                if as_json:
                    _print_json(view.model_dump(mode="json"))
                else:
                    print(f"Revoked API key {view.id} of {view.principal}.")
            return OK
        finally:
            await service.aclose()
    return asyncio.run(run())


def panel_command(host: str, port: int, *, open_browser: bool = False) -> list[str]:
    """The Voila command line that serves the panel page (`notebook_ext/page/panel.ipynb`)."""
    from importlib import resources

    page = resources.files("gpuherd.notebook_ext.page").joinpath("panel.ipynb")
    return [sys.executable, "-m", "voila", str(page), f"--Voila.ip={host}", f"--Voila.port={port}",
            "--Voila.port_retries=0", "--theme=light", "--VoilaConfiguration.show_tracebacks=False",
            *([] if open_browser else ["--no-browser"])]


def _panel(host: str, port: int, *, open_browser: bool) -> int:
    """`gpuherd panel`: Voila in a child process, the panel's kernel inheriting this environment
    (GPUHERD_SERVER and GPUHERD_API_KEY pick the team server, as in a notebook)."""
    import importlib.util
    import subprocess

    if importlib.util.find_spec("voila") is None or importlib.util.find_spec("ipywidgets") is None:
        raise ConfigError("The panel page needs Voila and ipywidgets: pip install 'gpuherd[panel]'.")
    if not 0 < port < 65536:
        raise InvalidInput(f"--port takes a port number between 1 and 65535, not {port}.")
    shown = f"[{host}]" if ":" in host else host
    print(f"gpuherd panel: http://{shown}:{port}/  (Ctrl-C to stop)", flush=True)
    child = subprocess.Popen(panel_command(host, port, open_browser=open_browser))
    try:
        return child.wait()
    except KeyboardInterrupt:
        child.terminate()
        try:
            child.wait(timeout=10)
        except subprocess.TimeoutExpired:
            child.kill()
        return INTERRUPTED


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    found: dict[str, argparse.ArgumentParser] = {}
    for action in parser._actions:                                  # argparse has no public walk
        if isinstance(action, argparse._SubParsersAction):
            found.update(action.choices)
    return found


# --- argv ----------------------------------------------------------------------------------------

def _split_chat_command(argv: list[str]) -> tuple[list[str], str, list[str]] | None:
    """(global options, command, its words) when argv runs a /gpu command one-shot. The words are
    taken verbatim: argparse would read `gpuherd search -o dph` as an unknown option `-o`."""
    names = {n for c in chat_commands() for n in (c.name, *c.aliases)}
    for i, word in enumerate(argv):
        if word.startswith("-"):
            continue            # a global option (--yes, --verbose, --json); none of them takes a value
        return (argv[:i], word, argv[i + 1:]) if word in names else None
    return None


def _unknown_command(parser: argparse.ArgumentParser, argv: list[str]) -> str | None:
    """The first word when it is no command at all (argparse would list only the terminal ones)."""
    import difflib

    known = set(_subparsers(parser)) | {n for c in chat_commands() for n in (c.name, *c.aliases)}
    word = next((w for w in argv if not w.startswith("-")), None)
    if word is None or word in known:
        return None
    close = difflib.get_close_matches(word, sorted(known), n=1)
    hint = f" Did you mean `gpuherd {close[0]}`?" if close else ""
    return f"gpuherd: unknown command '{word[:40]}'.{hint} `gpuherd --help` lists the commands."


def _setup_logging(verbose: bool) -> None:
    """The log goes to gpuherd.log in the data directory, so a failure's details are kept without
    a traceback landing in the user's terminal; --verbose sends it to stderr instead."""
    import logging

    fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    if verbose:
        logging.basicConfig(level=logging.INFO, stream=sys.stderr, format=fmt)
        return
    from gpuherd.core.config import home_from_env

    try:
        home = home_from_env()
        home.mkdir(parents=True, exist_ok=True)
        logging.basicConfig(level=logging.INFO, filename=home / "gpuherd.log", format=fmt)
    except OSError:
        logging.basicConfig(level=logging.ERROR, stream=sys.stderr, format=fmt)


def _chat_line(name: str, words: list[str]) -> tuple[str, bool, bool, bool]:
    """(the /gpu line, --yes, wait, --json) of a one-shot's words: gpuherd's own flags are
    taken out, the rest is passed as the grammar reads it."""
    import shlex

    from . import grammar

    yes = any(w in ("--yes", "-y") for w in words)
    no_wait = "--no-wait" in words
    as_json = "--json" in words
    words = [w for w in words if w not in OWN_FLAGS]
    if grammar.REGISTRY.find(name).free_text:
        # a search query is read by the query parser, not shlex: pass the words as typed
        # (`gpuherd search 4090 "<\$0.5"` must not become `search 4090 '<$0.5'`)
        line = " ".join([name, *words])
    else:
        line = " ".join([name, *(shlex.quote(w) for w in words)])
    return line, yes, not no_wait, as_json


def _run(args: argparse.Namespace, chat: tuple[list[str], str, list[str]] | None) -> int:
    import asyncio

    as_json = bool(args.global_json or getattr(args, "sub_json", False))
    if as_json and args.cmd in TERMINAL_ONLY:
        raise InvalidInput(f"--json applies to one-shot commands, db, users and keys; not to `gpuherd {args.cmd}`.")
    if args.cmd == "shell" and args.server:
        return asyncio.run(_remote_shell(args.server, args.yes or args.shell_yes))
    if args.cmd == "shell":
        return asyncio.run(_shell(args.yes or args.shell_yes, wait=not args.no_wait))
    commands: dict[str, Callable[[], int]] = {
        "db": lambda: _db(args.action, as_json),
        "users": lambda: _users(args, as_json),
        "serve": lambda: _serve(args.host, args.port),
        "keys": lambda: _keys(args, as_json),
        "slack": _slack,
        "discord": lambda: _discord(args.discord_action, args.guild),
        "panel": lambda: _panel(args.host, args.port, open_browser=args.open),
    }
    if args.cmd in commands:
        return commands[args.cmd]()
    assert chat is not None
    name, words = chat[1], chat[2]
    if name == "guards" and "--run" in words:
        if as_json:
            raise InvalidInput("--json applies to one-shot commands; `gpuherd guards --run` keeps running.")
        return asyncio.run(_run_guards())
    if [w for w in words if w not in OWN_FLAGS] in (["--help"], ["-h"]):     # `gpuherd stop --help [--json]`
        name, words = "help", [name, *(w for w in words if w in OWN_FLAGS)]
    with starting_up():   # the grammar, the core, the service and the renderer (before the loop runs)
        line, yes, wait, word_json = _chat_line(name, words)
        service = _service()
        if not (as_json or word_json):       # it prints through the shell's renderer
            importlib.import_module("gpuherd.bot.shell")
    return asyncio.run(_one_shot(service, line, args.yes or yes, wait and not args.global_no_wait,
                                 as_json=as_json or word_json))


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    chat = _split_chat_command(argv)
    if chat is None:
        unknown = _unknown_command(parser, argv)
        if unknown:
            print(f"{parser.format_usage().rstrip()}\n{unknown}", file=sys.stderr)
            return USAGE
        args = parser.parse_args(argv)
    else:
        args = parser.parse_args(chat[0])
        args.cmd = chat[1]
    if args.cmd is None:
        parser.print_help()
        return OK
    if args.cmd == "completion":
        from .completion import completion_script

        sys.stdout.write(completion_script(args.shell_name))
        return OK
    with starting_up():        # the settings' modules load here
        _setup_logging(args.verbose or args.cmd in ("serve", "slack")
                       or (args.cmd == "discord" and args.discord_action == "run"))   # a server logs to stderr (journald, containers)
    try:
        return _run(args, chat)
    except (ConfigError, InvalidInput) as exc:     # the settings, or how gpuherd was called
        _say_error(exc.message)
        return USAGE
    except GpuherdError as exc:                    # refused: not found, not allowed, a provider's no
        _say_error(exc.message)
        return FAILED
    except KeyboardInterrupt:
        return INTERRUPTED
    except Exception as exc:
        if _is_database_error(exc):
            _say_error(_database_unreachable(exc).message)
            return USAGE
        import logging
        import uuid

        ref = uuid.uuid4().hex[:8]
        logging.getLogger("gpuherd").exception("gpuherd %s failed (ref %s)", args.cmd, ref)
        _say_error(f"Something went wrong on our side (ref {ref}); the details are in gpuherd.log.")
        return FAILED


def _say_error(message: str) -> None:
    from rich.console import Console
    from rich.markup import escape

    Console(stderr=True).print(f"[red]{escape(message)}[/red]", soft_wrap=True)   # one line, never wrapped


if __name__ == "__main__":
    raise SystemExit(main())
