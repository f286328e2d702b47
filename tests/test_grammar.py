"""The /gpu grammar end to end: `bot.grammar.dispatch` over a real GpuService (SQLite, and
PostgreSQL when GPUHERD_TEST_POSTGRES_URL is set) and the deterministic sandbox.

Every command parses and answers with the right kind of Reply; bad input gets an error Reply
that names the problem and changes nothing; idempotency keys, the price guard and destroy's
confirmation work through the grammar; no reply ever shows a traceback."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from sqlalchemy import func, select

from gpuherd.bot import grammar
from gpuherd.bot.grammar import REGISTRY, Context, dispatch
from gpuherd.bot.render_text import to_text
from gpuherd.bot.replies import Reply
from gpuherd.core.auth import Actor
from gpuherd.core.models import AuditEvent, BillingSegment, Budget, Instance, InstanceState
from gpuherd.core.providers.base import CreateRequest
from gpuherd.core.providers.sandbox import SIMULATED_NOTE, SandboxProvider
from gpuherd.core.service import GpuService

# --- helpers ------------------------------------------------------------------------------------


def admin(service: GpuService) -> Actor:
    return service.local_actor()           # local:alice, admin (conftest settings)


async def member(service: GpuService, principal: str = "slack:U2") -> Actor:
    await service.set_user(admin(service), principal, role="member")
    return service.actor(principal, source="slack")


async def run(service: GpuService, line: str, actor: Actor | None = None, **ctx: Any) -> Reply:
    reply = await dispatch(Context(service, actor or admin(service), **ctx), line)
    text = to_text(reply)
    assert "Traceback" not in text and "Traceback" not in reply.model_dump_json(), text
    return reply


def text_of(reply: Reply) -> str:
    return to_text(reply, width=200)


def snapshot(service: GpuService) -> dict[str, Any]:
    """Everything a command could change in the database."""
    with service.db.session() as s:
        instances = sorted((i.id, i.state, i.version, str(i.keep_until), i.owner)
                           for i in s.exec(select(Instance)).scalars())  # type: ignore[call-overload]
        segments = sorted((b.id, b.instance_id, b.kind, b.rate_micros, b.start_ts, b.end_ts)
                          for b in s.exec(select(BillingSegment)).scalars())  # type: ignore[call-overload]
        budgets = sorted((b.scope, b.name, b.monthly_micros, b.hard_cap)
                         for b in s.exec(select(Budget)).scalars())  # type: ignore[call-overload]
        audits = s.exec(select(func.count()).select_from(AuditEvent)).one()[0]  # type: ignore[call-overload]
    return {"instances": instances, "segments": segments, "budgets": budgets, "audit_count": audits}


async def machines(sandbox: SandboxProvider) -> list[tuple[str, str]]:
    return sorted((p.provider_id, p.state.value) for p in await sandbox.list())


def instance_state(service: GpuService, iid: str) -> str:
    with service.db.session() as s:
        inst = s.get(Instance, iid)
        assert inst is not None
        return inst.state


async def boot_one(service: GpuService, line: str = "/gpu boot budget") -> str:
    reply = await run(service, line)
    assert reply.level == "success", text_of(reply)
    assert reply.title.startswith("Booted g-"), reply.title
    return reply.title.split()[1]


# --- every command ------------------------------------------------------------------------------


async def test_every_command_parses_and_answers_with_the_right_reply(service: GpuService,
                                                                     sandbox: SandboxProvider) -> None:
    seen: set[str] = set()

    async def ok(line: str, *, title: str, level: str = "info", simulated: bool = True) -> Reply:
        reply = await run(service, line)
        seen.add(REGISTRY.find(grammar.strip_prefix(line).split()[0]).name)
        assert reply.level == level, f"{line}: {reply.level}\n{text_of(reply)}"
        assert reply.title.startswith(title), f"{line}: {reply.title!r}"
        assert (SIMULATED_NOTE in reply.notes) is simulated, f"{line}: notes {reply.notes}"
        if simulated:
            assert SIMULATED_NOTE in text_of(reply)
        return reply

    r = await ok("/gpu help", title="gpuherd commands", simulated=False)
    r = await ok("/gpu search 4090 <$0.5 limit=3", title="")
    assert r.tables and r.tables[0].columns[0] == "offer"
    assert 1 <= len(r.tables[0].rows) <= 3 and all("4090" in row[1] for row in r.tables[0].rows)
    assert r.actions and r.actions[0].command.startswith("/gpu boot budget offer=sandbox:")
    r = await ok("/gpu templates", title="Templates", simulated=False)
    names = [row[0] for row in r.tables[0].rows]
    assert {"budget", "research", "high_performance", "llava-34b", "llama-3.1-70b"} <= set(names)
    r = await ok("/gpu templates research", title="Template research", simulated=False)
    assert any(row[0] == "max_model_len" for row in r.tables[0].rows)

    r = await ok("/gpu boot budget idle=45m", title="Booted g-", level="success")
    iid = r.title.split()[1]
    assert "is up and healthy" in r.text and any(f.value == "idle=45m" for f in r.fields)
    assert [a.command for a in r.actions] == [f"/gpu keep {iid} 1h", f"/gpu stop {iid}", f"/gpu destroy {iid}"]
    assert instance_state(service, iid) == "running"

    r = await ok("/gpu status", title="1 instance")
    assert r.tables[0].rows[0][0] == iid and r.tables[0].rows[0][3] == "running"
    r = await ok(f"/gpu list {iid}", title=f"{iid} · budget")          # alias, single instance
    assert {f.label: f.value for f in r.fields}["state"] == "running"

    r = await ok(f"/gpu keep {iid} 2h", title=f"Keeping {iid}", level="success")
    assert "will not be stopped for idleness before" in r.text
    r = await ok("/gpu guards", title="Guards")
    # kept for 2 h: the idle warning comes 5 min before the stop at the end of the keep
    assert r.tables and r.tables[0].rows[0][0] == iid and r.tables[0].rows[0][3] == "warn (stop in 5 min)"
    assert (await ok("/gpu status --guards", title="Guards")).tables[0].rows == r.tables[0].rows
    r = await ok("/gpu costs week by=template", title="Costs · ", simulated=True)
    assert "by template" in r.title and any(t.caption == "Billing now · compute" for t in r.tables)
    r = await ok(f"/gpu costs {iid}", title=f"Cost of {iid}")
    r = await ok("/gpu providers", title="Providers · 1 configured")
    assert r.tables[0].rows[0][:2] == ["Sandbox (simulated)", "✓ ok"]

    r = await ok(f"/gpu stop {iid}", title=f"Stopped {iid}", level="success")
    assert "Session:" in r.text and instance_state(service, iid) == "stopped"
    r = await ok(f"/gpu start {iid}", title=f"Started {iid}", level="success")
    assert instance_state(service, iid) == "running"

    r = await ok("/gpu budget", title="Budgets · ", simulated=False)
    r = await ok("/gpu budget set team=ml 500 hard_cap=yes", title="Budget for team ml set to $500.00/month",
                 level="success", simulated=False)
    assert any("$500.00" in f.value and "hard cap" in f.value for f in r.fields)
    r = await ok("/gpu budget clear team=ml", title="Budgets · ", simulated=False)
    assert snapshot(service)["budgets"] == []

    r = await ok(f"/gpu audit 50 {iid}", title="Audit · last ", simulated=False)
    events = [row[3] for row in r.tables[0].rows]
    assert {"boot", "keep", "stop", "start"} <= set(events)

    # a machine made outside gpuherd: reconcile reports it, attach takes it in
    offer = min(await sandbox.search(), key=lambda o: o.dph)
    stranger = await sandbox.create(CreateRequest(offer_id=offer.offer_id, label="by-hand", image="x/y:1"))
    r = await ok("/gpu reconcile", title="Reconciled providers", level="warning")
    assert [row[0] for row in r.tables[0].rows] == [f"sandbox:{stranger.provider_id}"]
    assert r.actions[0].command == f"/gpu attach sandbox:{stranger.provider_id}"
    r = await ok(r.actions[0].command + " idle=2h", title=f"Attached sandbox:{stranger.provider_id} as g-",
                 level="success")
    attached = r.title.split()[-1]
    assert instance_state(service, attached) in ("provisioning", "loading", "running")
    r = await ok(f"/gpu destroy {attached} confirm=yes", title=f"Destroyed {attached}", level="success")

    r = await ok(f"/gpu destroy {iid}", title=f"Destroy {iid}?", level="warning")
    assert r.confirmation is not None and instance_state(service, iid) == "running"
    no = next(a for a in r.actions if a.command.startswith("/gpu cancel "))
    await ok(no.command, title="Not done")
    closed = await run(service, r.confirmation.command)
    assert closed.level == "error" and "declined" in closed.text and instance_state(service, iid) == "running"
    r = await ok(f"/gpu destroy {iid}", title=f"Destroy {iid}?", level="warning")
    assert r.confirmation is not None
    r = await ok(r.confirmation.command, title=f"Destroyed {iid}", level="success")
    assert instance_state(service, iid) == "destroyed"
    assert await sandbox.list() == []

    missing = {c.name for c in REGISTRY.all()} - seen
    assert not missing, f"commands not exercised here: {missing}"


async def test_prefixes_and_empty_line(service: GpuService) -> None:
    for line in ("/gpu", "gpu", "/GPU", "   /gpu   ", "help"):
        r = await run(service, line)
        assert r.title == "gpuherd commands", line
    for line in ("gpu status", "/gpu status", "status", "/GPU STATUS"):
        r = await run(service, line)
        assert r.level == "info" and "instance" in r.title, (line, r.title)


# --- help ---------------------------------------------------------------------------------------


async def test_help_lists_every_registered_command(service: GpuService) -> None:
    r = await run(service, "/gpu help")
    assert r.ephemeral and r.level == "info"
    usages = [row[0] for row in r.tables[0].rows]
    assert usages == [c.usage for c in REGISTRY.all()]
    text = text_of(r)
    for cmd in REGISTRY.all():
        assert f"/gpu {cmd.name}" in text and cmd.summary in text
    assert {"help", "search", "templates", "boot", "start", "stop", "destroy", "status", "keep", "costs",
            "audit", "budget"} <= {c.name for c in REGISTRY.all()}


async def test_help_for_one_command_shows_usage_and_examples(service: GpuService) -> None:
    r = await run(service, "/gpu help boot")
    fields = {f.label: f.value for f in r.fields}
    assert r.title == "/gpu boot"
    assert fields["usage"] == "/gpu boot <template> [offer=<provider>:<id>] [provider=<name>] [key=value …]"
    assert fields["who"] == "member and up"
    assert "/gpu boot budget" in fields["examples"]
    r = await run(service, "/gpu help list")           # alias resolves to its command
    assert r.title == "/gpu status"
    r = await run(service, "/gpu help frobnicate")
    assert r.level == "error" and "Unknown command 'frobnicate'" in r.text


# --- bad input: a clear error, nothing changed ----------------------------------------------------

NO_SUCH = "g-00000000"

BAD: list[tuple[str, str, tuple[str, ...]]] = [
    # (who, line, fragments the message must contain); {run}/{stopped} are filled in
    ("admin", "/gpu bot budget", ("Unknown command 'bot'", "Did you mean `/gpu boot`?")),
    ("admin", "/gpu stauts", ("Unknown command 'stauts'", "Did you mean `/gpu status`?")),
    ("admin", "/gpu status bogus=1", ("`/gpu status` has no option 'bogus'", "all=")),
    ("admin", "/gpu stop {run} --force", ("`/gpu stop` has no option '--force'",)),
    ("admin", "/gpu destroy {run} confrim=yes", ("no option 'confrim'", "Did you mean confirm=?")),
    ("admin", "/gpu status {run} extra", ("Unexpected 'extra'", "Usage: /gpu status")),
    ("admin", "/gpu search gpu_ram>>24", ("'>>'", "gpu_ram>>24")),
    ("admin", "/gpu search 4090 colour=red", ("colour",)),
    ("admin", "/gpu boot", ("Which template?",)),
    ("admin", "/gpu boot nonesuch", ("Unknown template 'nonesuch'", "budget")),
    ("admin", "/gpu boot budget max_model_length=4096", ("no setting 'max_model_length'", "max_model_len")),
    ("admin", "/gpu boot budget max_model_len=lots", ("max_model_len must be a whole number", "'lots'")),
    ("admin", "/gpu boot budget idle=soon", ("idle must be a duration", "'soon'")),
    ("admin", "/gpu boot budget offer=nonsense", ("offer='nonsense' should look like <provider>:<id>",)),
    ("admin", "/gpu boot budget offer=sandbox:sb-9999", ("sandbox:sb-9999 is not available",)),
    ("admin", "/gpu boot budget provider=aws", ("Provider 'aws' is not configured",)),
    ("admin", f"/gpu stop {NO_SUCH}", (f"no instance '{NO_SUCH}'",)),
    ("admin", "/gpu start g-nothing", ("no instance 'g-nothing'",)),
    ("admin", f"/gpu costs {NO_SUCH}", (f"no instance '{NO_SUCH}'",)),
    ("member", "/gpu stop {run}", ("belongs to local:alice", "members may only change their own")),
    ("member", "/gpu destroy {run} confirm=yes", ("belongs to local:alice",)),
    ("member", "/gpu keep {run} 1h", ("belongs to local:alice",)),
    ("admin", "/gpu stop {stopped}", ("is already stopped",)),
    ("admin", "/gpu start {run}", ("is already running",)),
    ("admin", '/gpu stop "{run}', ("check your quotes",)),
    ("admin", "/gpu search gpu_name=\"RTX 4090", ("quote",)),
    ("admin", "/gpu budget set team=ml -5", ("more than $0", "-5")),
    ("admin", "/gpu budget set team=ml 0", ("more than $0",)),
    ("admin", "/gpu budget set team=ml 99999999999", ("not a plausible budget",)),
    ("admin", "/gpu budget set team=ml lots", ("'lots' is not an amount",)),
    ("admin", "/gpu budget set team=ml 10.001", ("whole cents",)),
    ("admin", "/gpu budget set 500", ("exactly one of team=<team> or user=<user>",)),
    ("admin", "/gpu budget raise team=ml 500", ("Unknown budget action 'raise'",)),
    ("admin", "/gpu budget clear team=nobody", ("no team budget for 'nobody'",)),
    ("member", "/gpu budget set team=ml 500", ("member", "setting budgets needs the admin role")),
    ("member", "/gpu audit", ("reading the audit log needs the admin role",)),
    ("viewer", "/gpu boot budget", ("viewer", "booting an instance needs the member role")),
    ("admin", "/gpu keep g-x forever", ("'forever' is not a duration",)),
    ("admin", "/gpu keep {run} forever", ("'forever' is not a duration",)),
    ("admin", "/gpu keep {run} 30d", ("at most",)),
    ("admin", "/gpu costs fortnight", ("fortnight",)),
    ("admin", "/gpu costs by=colour", ("cannot be grouped by 'colour'",)),
    ("admin", "/gpu audit many", ("'many' is neither a count nor an instance id",)),
    ("admin", "/gpu audit 100000", ("between 1 and 500",)),
    ("admin", "/gpu status all=maybe", ("all= takes yes or no",)),
]


@pytest.fixture
async def world(service: GpuService) -> dict[str, Any]:
    """Alice (admin) has one running and one stopped instance; Bob is a member, Vic a viewer."""
    run_id = await boot_one(service)
    stopped = await boot_one(service)
    r = await run(service, f"/gpu stop {stopped}")
    assert r.level == "success"
    actors = {"admin": admin(service), "member": await member(service)}
    await service.set_user(admin(service), "discord:V", role="viewer")
    actors["viewer"] = service.actor("discord:V", source="discord")
    await service.set_budget(admin(service), "team", "default", "300")
    return {"run": run_id, "stopped": stopped, "actors": actors}


async def test_bad_input_is_refused_clearly_and_changes_nothing(
        service: GpuService, sandbox: SandboxProvider, world: dict[str, Any]) -> None:
    """One world for all cases (a fresh database per case would cost seconds); every case is
    checked and all problems are reported together."""
    problems: list[str] = []
    for who, template, fragments in BAD:
        line = template.format(run=world["run"], stopped=world["stopped"])
        before, before_machines = snapshot(service), await machines(sandbox)
        reply = await run(service, line, world["actors"][who])
        where = f"{who}: {line!r}"
        if reply.level != "error" or reply.title != "Cannot do that" or not reply.ephemeral:
            problems.append(f"{where}: not an error reply: {reply.level} {reply.title!r} {reply.text!r}")
        problems += [f"{where}: {fragment!r} not in {reply.text!r}" for fragment in fragments
                     if fragment not in reply.text]
        if reply.confirmation is not None or reply.actions:
            problems.append(f"{where}: an error reply offers actions")
        if snapshot(service) != before:
            problems.append(f"{where}: the database changed")
        if await machines(sandbox) != before_machines:
            problems.append(f"{where}: the provider's machines changed")
    assert not problems, "\n".join(problems)
    assert len(BAD) >= 40


# --- idempotency, price guard, confirmation ---------------------------------------------------


async def test_boot_twice_with_the_same_key_boots_once(service: GpuService, sandbox: SandboxProvider) -> None:
    first = await run(service, "/gpu boot budget key=deploy-42")
    assert first.level == "success" and first.title.startswith("Booted g-")
    iid = first.title.split()[1]
    audits = snapshot(service)["audit_count"]
    again = await run(service, "/gpu boot budget key=deploy-42")
    assert again.level == "success"
    assert again.title == f"{iid} was already booted with this request"
    assert len(await sandbox.list()) == 1
    assert await service.instance_count() == 1
    assert snapshot(service)["audit_count"] == audits
    assert SIMULATED_NOTE in again.notes


async def test_a_retried_chat_delivery_boots_once(service: GpuService, sandbox: SandboxProvider) -> None:
    a = await run(service, "/gpu boot budget", delivery_id="Ev0123")
    b = await run(service, "/gpu boot budget", delivery_id="Ev0123")
    c = await run(service, "/gpu boot budget", delivery_id="Ev0124")
    assert a.title.split()[1] == b.title.split()[0] and "already booted" in b.title
    assert c.title.startswith("Booted g-") and c.title.split()[1] != a.title.split()[1]
    assert len(await sandbox.list()) == 2


async def test_price_guard_asks_then_the_confirmation_command_boots(service: GpuService,
                                                                   sandbox: SandboxProvider) -> None:
    before = snapshot(service)
    r = await run(service, "/gpu boot budget max_dph=0.01")
    assert r.level == "warning" and r.confirmation is not None
    assert r.title == "Price above limit" and "above the $0.010/h limit of 'budget'" in r.text
    assert {f.label for f in r.fields} == {"per hour", "per day", "per month"}
    command = r.confirmation.command
    # the yes carries an opaque token only: no override, no key, short enough for any button
    assert command.startswith("/gpu confirm c_") and len(r.confirmation.ref) <= 100
    assert "max_dph" not in command and "key=" not in command and "max_dph" not in r.confirmation.ref
    assert SIMULATED_NOTE in r.notes
    assert snapshot(service) == before and await sandbox.list() == []     # nothing booted yet

    done = await run(service, command)
    assert done.level == "success" and done.title.startswith("Booted g-"), text_of(done)
    assert any("Above the $0.010/h limit; confirmed by" in n for n in done.notes)
    assert len(await sandbox.list()) == 1
    # the confirm button pressed twice: the first yes's result, still one machine
    twice = await run(service, command)
    assert twice.title == done.title and len(await sandbox.list()) == 1


async def test_naming_an_offer_above_the_template_limit_asks_first(service: GpuService,
                                                                  sandbox: SandboxProvider) -> None:
    found = await run(service, "/gpu search num_gpus=1 gpu_ram>=8 dph>0.6 limit=1")
    assert found.tables, text_of(found)
    ref = found.tables[0].rows[0][0]
    r = await run(service, f"/gpu boot budget offer={ref}")
    assert r.level == "warning" and r.confirmation is not None
    assert r.confirmation.command.startswith("/gpu confirm c_") and "The offer you picked" in r.text
    assert await sandbox.list() == []
    done = await run(service, r.confirmation.command)
    assert done.title.startswith("Booted g-") and len(await sandbox.list()) == 1


async def test_destroy_asks_for_confirmation_first(service: GpuService, sandbox: SandboxProvider) -> None:
    iid = await boot_one(service)
    before = snapshot(service)
    r = await run(service, f"/gpu destroy {iid}")
    assert r.level == "warning" and r.confirmation is not None
    assert r.confirmation.command.startswith("/gpu confirm c_")
    assert r.confirmation.style == "danger" and r.confirmation.confirm is not None
    assert SIMULATED_NOTE in r.notes
    assert snapshot(service) == before
    assert [state for _, state in await machines(sandbox)] == ["running"]
    done = await run(service, r.confirmation.command)
    assert done.title == f"Destroyed {iid}" and "no further charges" in done.text
    assert instance_state(service, iid) == InstanceState.DESTROYED.value
    again = await run(service, r.confirmation.command)      # the same yes again: the first answer
    assert again.title == f"Destroyed {iid}" and len(await sandbox.list()) == 0
    refused = await run(service, f"/gpu destroy {iid} confirm=yes")
    assert refused.level == "error" and "already destroyed" in refused.text


async def test_member_acts_on_own_instance_but_sees_everyone_in_status(service: GpuService) -> None:
    mine = await boot_one(service)
    bob = await member(service)
    r = await run(service, "/gpu boot budget", bob)
    assert r.level == "success", text_of(r)
    bobs = r.title.split()[1]
    r = await run(service, f"/gpu stop {bobs}", bob)
    assert r.title == f"Stopped {bobs}"
    r = await run(service, "/gpu status all=yes", bob)
    assert {row[0] for row in r.tables[0].rows} == {mine, bobs}
    assert instance_state(service, mine) == "running"


async def test_env_override_keeps_the_variable_name_case(service: GpuService) -> None:
    r = await run(service, "/gpu boot budget env.HF_HOME=/data")
    assert r.level == "success", text_of(r)
    assert {f.label: f.value for f in r.fields}["overrides"] == "env.HF_HOME=/data"


# --- failures inside a surface ------------------------------------------------------------------


async def test_an_unexpected_exception_becomes_an_internal_error_reply(
        service: GpuService, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    def broken(*_: Any, **__: Any) -> None:
        raise RuntimeError("boom: secret-db-password")

    async def broken_async(*_: Any, **__: Any) -> None:
        raise RuntimeError("boom: secret-db-password")

    monkeypatch.setattr(service, "costs", broken)
    monkeypatch.setattr(service, "boot", broken_async)
    caplog.set_level(logging.ERROR, logger="gpuherd.bot.grammar")
    for line in ("/gpu costs", "/gpu boot budget"):
        before = snapshot(service)
        r = await run(service, line)
        assert r.level == "error" and r.title == "Internal error"
        assert "boom" not in text_of(r) and "RuntimeError" not in text_of(r)
        ref = r.text.split("(ref ")[1].split(")")[0]
        assert len(ref) == 8
        assert any(ref in rec.getMessage() and rec.exc_info for rec in caplog.records), "logged with its ref"
        assert snapshot(service) == before


async def test_replies_involving_the_sandbox_say_simulated(service: GpuService) -> None:
    iid = await boot_one(service)
    lines = ["/gpu search", "/gpu status", f"/gpu status {iid}", f"/gpu keep {iid}", "/gpu costs",
             f"/gpu costs {iid}", f"/gpu stop {iid}", f"/gpu start {iid}", f"/gpu destroy {iid}",
             f"/gpu destroy {iid} confirm=yes", "/gpu boot budget max_dph=0.01"]
    for line in lines:
        r = await run(service, line)
        assert r.level != "error", f"{line}: {r.text}"
        assert SIMULATED_NOTE in r.notes and SIMULATED_NOTE in text_of(r), line
