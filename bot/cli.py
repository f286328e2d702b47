r"""The `gpuherd` command: the shell, database and user administration, and every /gpu command
as a one-shot (`gpuherd status`, `gpuherd search 4090 "<\$0.5"`)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence

from rich.console import Console
from rich.markup import escape

from gpuherd.core.errors import GpuherdError

from . import grammar

LOG = logging.getLogger("gpuherd")


def _epilog() -> str:
    lines = ["chat commands (also run one-shot: gpuherd <command> [args]):"]
    lines += [f"  {c.name:<10} {c.summary}" for c in grammar.REGISTRY.all()]
    lines += ["", "Quick start: gpuherd shell   (then: /gpu search 4090, /gpu boot budget, /gpu costs)"]
    return "\n".join(lines)


def _version() -> str:
    """The installed distribution's version (a checkout not installed says so)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("gpuherd")
    except PackageNotFoundError:
        return "(not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gpuherd", description="Rent cloud GPUs from chat and notebooks without wasting money.",
        epilog=_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"gpuherd {_version()}")
    parser.add_argument("--yes", "-y", action="store_true", help="accept confirmations (for scripts)")
    parser.add_argument("--verbose", "-v", action="store_true", help="log to stderr")
    parser.add_argument("--no-wait", action="store_true", dest="global_no_wait",
                        help="boot/start return once the provider accepted (no wait for the health check)")
    sub = parser.add_subparsers(dest="cmd", metavar="<command>")
    shell = sub.add_parser("shell", help="interactive /gpu shell (reads stdin when piped)")
    shell.add_argument("--yes", "-y", action="store_true", dest="shell_yes", help="accept confirmations")
    shell.add_argument("--no-wait", action="store_true", help="return from boot/start once the provider accepted")
    shell.add_argument("--server", metavar="URL",
                       help="run against a gpuherd server (`gpuherd serve`) with the key in GPUHERD_API_KEY")
    db = sub.add_parser("db", help="database: upgrade (migrate) or show the current revision")
    db.add_argument("action", choices=["upgrade", "current"])
    users = sub.add_parser("users", help="set a user's role or team (admin)")
    users.add_argument("action", choices=["set", "list"])
    users.add_argument("principal", nargs="?", help="e.g. local:alice, slack:U123, discord:4242")
    users.add_argument("--role", choices=["viewer", "member", "admin"])
    users.add_argument("--team")
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
    # `gpuherd guards` shows the scheduler (the /gpu guards command); `gpuherd guards --run` runs it
    for cmd in grammar.REGISTRY.all():
        p = sub.add_parser(cmd.name, help=cmd.summary, aliases=list(cmd.aliases), add_help=False)
        p.add_argument("words", nargs=argparse.REMAINDER)
    return parser


def _service():
    from gpuherd.core.service import GpuService

    return GpuService.from_settings()


async def _one_shot(line: str, yes: bool, wait: bool = True) -> int:
    from .shell import Shell

    service = _service()
    try:
        shell = Shell(service, yes=yes, interactive=False, wait=wait)
        shell.actor = service.local_actor("cli")
        await shell.run_line(line)
        return 1 if shell.errors else 0
    finally:
        await service.aclose()


async def _remote_shell(url: str, yes: bool) -> int:
    """`gpuherd shell --server URL`: the key comes from the environment, never the command line
    (where `ps` and the shell history would show it)."""
    import os

    from .shell import run_remote

    key = os.environ.get("GPUHERD_API_KEY", "").strip()
    if not key:
        raise GpuherdError("Set GPUHERD_API_KEY to your API key for that server (an admin makes one with "
                           "`gpuherd keys create --user <you>`).")
    return await run_remote(url, key, yes=yes)


async def _shell(yes: bool, wait: bool = True) -> int:
    from gpuherd.core.runtime import Runtime

    from .shell import Shell

    service = _service()
    runtime = Runtime(service, tune_collector=True)
    shell = Shell(service, yes=yes, wait=wait, runtime=runtime)  # the shell is a notice destination
    async with runtime:  # recovery, attachments, guards and notices run in the background while you type
        if runtime.adopted:
            Console(stderr=True).print(f"[yellow]Adopted {', '.join(runtime.adopted)}: booted before a crash.[/yellow]")
        if runtime.attached:
            Console(stderr=True).print(f"Attached from the configuration: {', '.join(runtime.attached)}")
        code = await shell.run()
        await runtime.deliver_now()  # what the last commands caused, before leaving
        return code


async def _run_guards() -> int:
    """`gpuherd guards --run`: the guard scheduler in the foreground, printing what it does."""
    import signal

    from gpuherd.core.runtime import Runtime

    from .render_text import make_console

    service = _service()
    console = make_console()
    service.hub.subscribe(lambda n: console.print(f"{n.at:%Y-%m-%d %H:%M:%S} {escape(n.text)}", highlight=False))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with Runtime(service, tune_collector=True) as runtime:
        scheduler = runtime.scheduler
        console.print(f"guards running as {runtime.identity} ({scheduler.leadership.describe()}); Ctrl-C stops")  # type: ignore[union-attr]
        await stop.wait()
    return 0


def _db(action: str) -> int:
    from gpuherd.core.config import load_settings
    from gpuherd.core.db import Database, current_revision, head_revision

    settings = load_settings()
    db = Database(settings.resolved_database_url)
    if action == "upgrade":
        db.upgrade()
    print(f"database revision {current_revision(db.engine) or 'none'} (latest {head_revision()})")
    return 0


def _users(args: argparse.Namespace) -> int:
    async def run() -> int:
        service = _service()
        try:
            actor = service.local_actor("cli")
            if args.action == "set":
                if not args.principal:
                    raise GpuherdError("Which user? gpuherd users set <principal> --role member --team ml")
                user = await service.set_user(actor, args.principal, role=args.role, team=args.team)
                print(f"{user.principal}: {user.role}, team {user.team}")
            else:
                for user in await service.users(actor):
                    print(f"{user.principal:<32} {user.role:<7} {user.team}")
            return 0
        finally:
            await service.aclose()
    return asyncio.run(run())


def _database_unreachable(exc: BaseException) -> GpuherdError:
    """A database error as one line (its type and first line; never the URL, which may hold a password)."""
    orig = getattr(exc, "orig", None) or exc
    first = (str(orig).strip().splitlines() or [""])[0][:200]
    return GpuherdError(f"The database cannot be used ({type(orig).__name__}: {first}). "
                        "Check GPUHERD_DATABASE_URL and that the database is up (gpuherd db upgrade migrates it).")


def _serve(host: str, port: int) -> int:
    """`gpuherd serve`: blocks until SIGTERM or SIGINT, 0 after a clean shutdown."""
    from sqlalchemy.exc import SQLAlchemyError

    try:
        from .http.server import serve
    except ImportError as exc:
        raise GpuherdError(f"gpuherd serve needs the server extra ({exc.name} is missing): "
                           "pip install 'gpuherd[server]' (./run serve installs it).") from None
    try:
        return serve(host, port)
    except SQLAlchemyError as exc:
        raise _database_unreachable(exc) from None


def _slack() -> int:
    """`gpuherd slack`: the Slack surface alone, in Socket Mode, with the guards and notices."""
    try:
        from .slack.run import run_socket_mode
    except ImportError as exc:
        raise GpuherdError(f"gpuherd slack needs the slack extra ({exc.name} is missing): "
                           "pip install 'gpuherd[slack]'.") from None
    return asyncio.run(run_socket_mode())


def _discord(action: str, guild: int | None) -> int:
    """`gpuherd discord [run|sync|commands]`: the bot alone, or its command registration."""
    try:
        from .discord import commands, run
    except ImportError as exc:
        raise GpuherdError(f"gpuherd discord needs the discord extra ({exc.name} is missing): "
                           "pip install 'gpuherd[discord]'.") from None
    if action == "commands":
        import json

        print(json.dumps(commands.payload(), indent=2, ensure_ascii=False))
        return 0
    if action == "sync":
        from gpuherd.core.config import load_settings

        names = asyncio.run(run.sync(load_settings(), guild))
        where = f"server {guild}" if guild else "every server (global commands take up to an hour to appear)"
        print(f"Registered /{', /'.join(names)} in {where}.")
        return 0
    return asyncio.run(run.run_gateway())


def _keys(args: argparse.Namespace) -> int:
    """`gpuherd keys create|list|revoke`, as the local admin. A new key goes alone to stdout
    (`KEY=$(gpuherd keys create --user api:ci)` works); what to do with it goes to stderr."""
    from sqlalchemy.exc import SQLAlchemyError

    async def run() -> int:
        service = _service()
        try:
            actor = service.local_actor("cli")
            err = Console(stderr=True)
            if args.keys_action == "create":
                created = await service.create_key(actor, args.principal, role=args.role, name=args.name)
                view = created.view
                print(created.key)
                cap = f", capped at {view.role}" if view.role else ""
                err.print(f"API key {view.id} for {escape(view.principal)}{cap}. It is shown only once: store it "
                          f"now. Send it as `Authorization: Bearer <key>`; `gpuherd keys revoke {view.id}` ends it.",
                          highlight=False)
            elif args.keys_action == "list":
                views = await service.list_keys(actor, include_revoked=args.all)
                if not views:
                    err.print("No API keys yet: gpuherd keys create --user api:<name>")
                for v in views:
                    used = f"{v.last_used_at:%Y-%m-%d %H:%M}" if v.last_used_at else "never"
                    state = f"revoked {v.revoked_at:%Y-%m-%d %H:%M}" if v.revoked_at else "active"
                    print(f"{v.id}  {v.principal:<28} {v.role or 'user':<7} {v.name or '-':<16} "
                          f"created {v.created_at:%Y-%m-%d %H:%M}  used {used:<16}  {state}")
            else:
                view = await service.revoke_key(actor, args.key_id)
                print(f"Revoked API key {view.id} of {view.principal}.")
            return 0
        finally:
            await service.aclose()
    try:
        return asyncio.run(run())
    except SQLAlchemyError as exc:
        raise _database_unreachable(exc) from None


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
        raise GpuherdError("The panel page needs Voila and ipywidgets: pip install 'gpuherd[panel]'.")
    if not 0 < port < 65536:
        raise GpuherdError(f"--port takes a port number between 1 and 65535, not {port}.")
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
        return 130


def _split_chat_command(argv: list[str]) -> tuple[list[str], str, list[str]] | None:
    """(global options, command, its words) when argv runs a /gpu command one-shot. The words are
    taken verbatim: argparse would read `gpuherd search -o dph` as an unknown option `-o`."""
    names = {n for c in grammar.REGISTRY.all() for n in (c.name, *c.aliases)}
    for i, word in enumerate(argv):
        if word.startswith("-"):
            continue            # a global option (--yes, --verbose); none of them takes a value
        return (argv[:i], word, argv[i + 1:]) if word in names else None
    return None


def _setup_logging(verbose: bool) -> None:
    """The log goes to gpuherd.log in the data directory, so a failure's details are kept without
    a traceback landing in the user's terminal; --verbose sends it to stderr instead."""
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


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    chat = _split_chat_command(argv)
    args = parser.parse_args(chat[0] + [chat[1]] if chat else argv)
    _setup_logging(args.verbose or args.cmd in ("serve", "slack")
                   or (args.cmd == "discord" and args.discord_action == "run"))   # a server logs to stderr (journald, containers)
    console = Console(stderr=True)
    try:
        if args.cmd is None:
            parser.print_help()
            return 0
        if args.cmd == "shell" and args.server:
            return asyncio.run(_remote_shell(args.server, args.yes or args.shell_yes))
        if args.cmd == "shell":
            return asyncio.run(_shell(args.yes or args.shell_yes, wait=not args.no_wait))
        if args.cmd == "db":
            return _db(args.action)
        if args.cmd == "guards" and chat is not None and "--run" in chat[2]:
            return asyncio.run(_run_guards())
        if args.cmd == "users":
            return _users(args)
        if args.cmd == "serve":
            return _serve(args.host, args.port)
        if args.cmd == "keys":
            return _keys(args)
        if args.cmd == "slack":
            return _slack()
        if args.cmd == "discord":
            return _discord(args.discord_action, args.guild)
        if args.cmd == "panel":
            return _panel(args.host, args.port, open_browser=args.open)
        assert chat is not None
        words = chat[2]
        if words in (["--help"], ["-h"]):
            words = [args.cmd]
            args.cmd = "help"
        yes = args.yes or any(w in ("--yes", "-y") for w in words)
        wait = not (args.global_no_wait or "--no-wait" in words)
        words = [w for w in words if w not in ("--yes", "-y", "--no-wait")]
        import shlex

        if grammar.REGISTRY.find(args.cmd).free_text:
            # a search query is read by the query parser, not shlex: pass the words as typed
            # (`gpuherd search 4090 "<\$0.5"` must not become `search 4090 '<$0.5'`)
            line = " ".join([args.cmd, *words])
        else:
            line = " ".join([args.cmd, *(shlex.quote(w) for w in words)])
        return asyncio.run(_one_shot(line, yes, wait))
    except GpuherdError as exc:
        console.print(f"[red]{escape(exc.message)}[/red]")
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
