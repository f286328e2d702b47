"""One /gpu command run once from the terminal (`gpuherd status`, `gpuherd boot budget --json`):
the exit code decided from what core returned, the `--json` output, and the warning when no
process guards a machine a one-shot booted. See bot/cli.py's docstring for the exit codes and the
JSON shape. Like cli.py this module imports nothing heavy at its top: the core loads inside the
functions, once a command is known to need it."""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gpuherd.bot.replies import Reply
    from gpuherd.core.config import Settings
    from gpuherd.core.results import ProgressEvent
    from gpuherd.core.service import GpuService

OK, FAILED, USAGE, UNCONFIRMED, INTERRUPTED = 0, 1, 2, 3, 130
GUARDS_HINT = ("No gpuherd process is guarding this machine: its idle stop and the budget caps will not act "
               "until one runs. Start one with `gpuherd guards --run` (or `gpuherd serve`, or keep "
               "`gpuherd shell` open).")


class _Recorder:
    """The service as a command sees it, keeping what each awaited call returned (or raised), in
    order: the result models `--json` prints, and what tells a declined question (the last
    answer is a Confirmation) from a done or failed command. Everything else passes through."""

    def __init__(self, service: GpuService) -> None:
        self._service = service
        self.outcomes: list[object] = []

    def __getattr__(self, name: str) -> Any:
        import inspect

        attr = getattr(self._service, name)
        if not inspect.iscoroutinefunction(attr):
            return attr

        async def recorded(*args: Any, **kwargs: Any) -> Any:
            try:
                result = await attr(*args, **kwargs)
            except BaseException as exc:
                self.outcomes.append(exc)
                raise
            self.outcomes.append(result)
            return result
        return recorded

    def models(self) -> list[Any]:
        from pydantic import BaseModel

        found: list[BaseModel] = []
        for outcome in self.outcomes:
            items = outcome if isinstance(outcome, list | tuple) else [outcome]
            found += [m for m in items if isinstance(m, BaseModel)]
        return found

    def unanswered_question(self) -> bool:
        from gpuherd.core.results import Confirmation

        return bool(self.outcomes) and isinstance(self.outcomes[-1], Confirmation)

    def machine_running(self) -> bool:
        """A boot or start went through: a machine now needs the guards."""
        from gpuherd.core.results import BootResult, StartResult

        return any(isinstance(o, BootResult | StartResult) for o in self.outcomes)


def _as_json(models: Sequence[Any]) -> list[dict[str, Any]]:
    return [{"model": type(m).__name__, "data": m.model_dump(mode="json")} for m in models]


def _print_json(payload: object) -> None:
    import json

    sys.stdout.write(json.dumps(payload, indent=2, ensure_ascii=False) + "\n")
    sys.stdout.flush()


@contextmanager
def starting_up() -> Iterator[None]:
    """No cyclic garbage collection while a command starts up: imports and the service's
    construction allocate hundreds of thousands of objects and almost no garbage, and CPython's
    collector would walk them again and again (10-15 % of a one-shot's CPU; one full collection
    alone was 20 ms). On the way out what start-up built is frozen (`gc.freeze`: it lives until
    the process exits, so later collections skip it) and the collector is back on."""
    import gc

    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if was:
            gc.enable()


async def _one_shot(service: GpuService, line: str, yes: bool, wait: bool = True, *,
                    as_json: bool = False) -> int:
    """One /gpu line through the shell's path (or the grammar's, for --json) and its exit code."""
    from typing import cast

    recorder = _Recorder(service)
    try:
        if as_json:
            code = await _run_json(cast("GpuService", recorder), recorder, line, yes, wait)
        else:
            from .shell import Shell  # imported by the caller already, during start-up

            shell = Shell(cast("GpuService", recorder), yes=yes, interactive=False, wait=wait)
            shell.actor = service.local_actor("cli")
            await shell.run_line(line)
            code = (UNCONFIRMED if recorder.unanswered_question()
                    else FAILED if shell.errors else OK)
        if recorder.machine_running():
            await _warn_if_unguarded(service.settings)
        return code
    finally:
        await service.aclose()


async def _run_json(service: GpuService, recorder: _Recorder, line: str, yes: bool, wait: bool) -> int:
    """The command through the grammar, as the shell runs it, its models printed as JSON."""
    from . import grammar

    def progress(event: ProgressEvent) -> None:
        print(f"… {event.text}", file=sys.stderr, flush=True)

    ctx = grammar.Context(service=service, actor=service.local_actor("cli"), progress=progress, wait=wait)
    reply: Reply = await grammar.dispatch(ctx, line)
    asked = 0
    while yes and reply.confirmation is not None and reply.level != "error" and asked < 3:
        asked += 1          # a yes re-checks the price: a price that rose again asks again (bounded)
        reply = await grammar.dispatch(ctx, reply.confirmation.command)
    code = (FAILED if reply.level == "error" else UNCONFIRMED if recorder.unanswered_question() else OK)
    if code == UNCONFIRMED and reply.confirmation is not None:
        print(f"Needs a yes: run `{reply.confirmation.command}`, or add --yes.", file=sys.stderr)
    _print_json({"command": line, "exit_code": code, "results": _as_json(recorder.models()),
                 "reply": reply.model_dump(mode="json")})
    return code


async def _warn_if_unguarded(settings: Settings) -> None:
    """After a one-shot boot or start: say so when no process runs the guards (see the module
    docstring). The lock probe is blocking (a file lock or a PostgreSQL session): off the loop."""
    import asyncio
    import logging

    from gpuherd.core.leader import guards_held_elsewhere

    try:
        held = await asyncio.to_thread(guards_held_elsewhere, settings.resolved_database_url, settings.home)
    except Exception:              # the probe is advice: a failure to probe must not fail the boot
        logging.getLogger("gpuherd").warning("could not check for a guard process", exc_info=True)
        return
    if not held:
        print(GUARDS_HINT, file=sys.stderr, flush=True)
