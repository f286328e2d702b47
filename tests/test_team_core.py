"""The contracts every surface builds on, tested on the real service (SQLite and PostgreSQL) with
the sandbox: a stored yes is bound to its price, its user and its time; secrets never leave
core in plain text; an idempotency key belongs to one actor and one request; each actor is
offered only what they may do, and core refuses the rest when it is asked anyway."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from decimal import Decimal

import pytest
from sqlalchemy import MetaData, select

from gpuherd.bot import grammar, replies
from gpuherd.core.actions import Action, Op
from gpuherd.core.auth import Actor
from gpuherd.core.errors import Conflict, GpuherdError, InvalidInput, PermissionDenied
from gpuherd.core.models import Instance
from gpuherd.core.offers import Offer
from gpuherd.core.providers.registry import ProviderRegistry
from gpuherd.core.providers.sandbox import SandboxProvider
from gpuherd.core.providers.surf import SurfProvider
from gpuherd.core.results import BootResult, Confirmation, DestroyResult
from gpuherd.core.service import GpuService
from tests.fakes.surf_fake import TOKEN, FakeSurf

HF = "hf_" + "Zq8" * 10          # an obviously fake token, long enough to look real to a scanner


def _instances(service: GpuService) -> list[Instance]:
    with service.db.session() as s:
        return list(s.execute(select(Instance)).scalars())


def _every_row_as_text(service: GpuService) -> str:
    """Every value in every table of the database, as one string."""
    meta = MetaData()
    meta.reflect(bind=service.db.engine)
    parts = []
    with service.db.engine.connect() as conn:
        for table in meta.sorted_tables:
            for row in conn.execute(table.select()):
                parts.append(" ".join(str(v) for v in row))
    return "\n".join(parts)


async def _pricey(sandbox: SandboxProvider, above: Decimal) -> Offer:
    return min((o for o in await sandbox.search() if o.num_gpus == 1 and o.dph > above and o.gpu_ram >= 8),
               key=lambda o: o.dph)


# --- confirmations ----------------------------------------------------------------------------

async def test_a_yes_is_bound_to_the_price_it_was_given_for(service, admin, sandbox, clock):
    """Prices drift per six-hour window: asked just before a window ends, accepted just after."""
    clock.set(clock.now().replace(hour=11, minute=55))
    before = {o.ref: o.dph for o in await sandbox.search() if o.num_gpus == 1 and o.gpu_ram >= 8}
    clock.set(clock.now().replace(hour=12, minute=5))
    after = {o.ref: o.dph for o in await sandbox.search() if o.ref in before}
    rising = sorted((ref for ref in after if after[ref] > before[ref] and before[ref] > Decimal("0.5")),
                    key=lambda r: before[r])
    assert rising, "the seeded market has offers whose price rises at noon"
    ref = rising[0]
    clock.set(clock.now().replace(hour=11, minute=55))
    asked = await service.boot(admin, "budget", offer=ref)
    assert isinstance(asked, Confirmation) and asked.cost is not None
    first_price = asked.cost.per_hour
    clock.set(clock.now().replace(hour=12, minute=5))            # within the 15 min a yes lasts
    again = await service.confirm(admin, asked.token)
    assert isinstance(again, Confirmation), "a yes for the old price must not boot at the new one"
    assert again.title == "Price went up" and again.cost is not None and again.cost.per_hour > first_price
    assert "rose" in again.prompt and again.token != asked.token
    assert _instances(service) == [] and await sandbox.list() == []
    with pytest.raises(Conflict, match="replaced"):
        await service.confirm(admin, asked.token)            # the old question is closed
    done = await service.confirm(admin, again.token)
    assert isinstance(done, BootResult) and done.offer is not None and done.offer.dph == again.cost.per_hour


async def test_an_expired_yes_is_refused_and_boots_nothing(service, admin, sandbox, clock):
    asked = await service.boot(admin, "budget", offer=(await _pricey(sandbox, Decimal("0.5"))).ref)
    assert isinstance(asked, Confirmation)
    clock.advance(timedelta(minutes=16))
    with pytest.raises(Conflict, match="expired"):
        await service.confirm(admin, asked.token)
    assert _instances(service) == [] and await sandbox.list() == []


async def test_another_users_yes_is_refused_revealing_nothing(service, admin, member, sandbox):
    await service.set_user(admin, "slack:U3", role="member", team="ml")
    other = service.actor("slack:U3", source="slack")
    offer = await _pricey(sandbox, Decimal("0.5"))
    asked = await service.boot(member, "budget", offer=offer.ref)
    assert isinstance(asked, Confirmation)
    for stranger in (other, admin):              # an admin too: a yes is the asker's own
        with pytest.raises(PermissionDenied) as err:
            await service.confirm(stranger, asked.token)
        assert offer.ref not in err.value.message and "budget" not in err.value.message
    assert _instances(service) == []
    done = await service.confirm(member, asked.token)
    assert isinstance(done, BootResult) and done.instance.owner == member.principal


async def test_the_same_yes_twice_boots_once(service, admin, sandbox):
    asked = await service.boot(admin, "budget", offer=(await _pricey(sandbox, Decimal("0.5"))).ref)
    assert isinstance(asked, Confirmation)
    results = await asyncio.gather(service.confirm(admin, asked.token), service.confirm(admin, asked.token),
                                   return_exceptions=True)
    booted = [r for r in results if isinstance(r, BootResult)]
    assert booted, results
    assert all(isinstance(r, BootResult) or (isinstance(r, Conflict) and "being carried out" in r.message)
               for r in results), results
    later = await service.confirm(admin, asked.token)      # a retried delivery after both finished
    assert isinstance(later, BootResult) and later.instance.id == booted[0].instance.id
    assert len(_instances(service)) == 1 and len(await sandbox.list()) == 1


async def test_destroy_yes_and_bad_tokens(service, admin):
    booted = await service.boot(admin, "budget", wait=True)
    assert isinstance(booted, BootResult)
    asked = await service.destroy(admin, booted.instance.id)
    assert isinstance(asked, Confirmation) and asked.instance_id == booted.instance.id
    assert [a.op for a in asked.actions] == [Op.CONFIRM, Op.CANCEL]
    assert all(len(a.ref) <= 100 and asked.token in a.ref for a in asked.actions)
    with pytest.raises(InvalidInput):
        await service.confirm(admin, "x" * 10_000)
    done = await service.confirm(admin, asked.token)
    assert isinstance(done, DestroyResult) and done.instance.state.value == "destroyed"


# --- secrets ------------------------------------------------------------------------------------

async def test_a_secret_override_appears_nowhere_in_plain_text(service, admin, sandbox, caplog):
    caplog.set_level(logging.DEBUG)
    seen = []
    service.hub.subscribe(seen.append)
    offer = await _pricey(sandbox, Decimal("1.0"))
    line = f"/gpu boot research offer={offer.ref} env.HF_TOKEN={HF}"
    ctx = grammar.Context(service=service, actor=admin, wait=False)
    asked = await grammar.dispatch(ctx, line)
    assert asked.confirmation is not None, replies.Reply.model_dump_json(asked)
    assert HF not in _every_row_as_text(service), "the pending yes keeps the token sealed, not in clear"
    done = await grammar.dispatch(ctx, asked.confirmation.command)
    assert done.title.startswith("Booted g-"), done
    [row] = _instances(service)
    assert json.loads(row.overrides) == {"env.HF_TOKEN": "••••"}
    blobs = {
        "replies": asked.model_dump_json() + done.model_dump_json(),
        "actions": " ".join(a.ref + a.command for a in [*asked.actions, *done.actions]),
        "database": _every_row_as_text(service),
        "notices": " ".join(repr(n) for n in seen),
        "log": "\n".join(f"{r.getMessage()} {r.args!r}" for r in caplog.records),
    }
    for where, blob in blobs.items():
        assert HF not in blob, f"the token leaked into {where}"
    assert seen, "the boot wrote notices (checked above)"


# --- idempotency keys ---------------------------------------------------------------------------

async def test_an_idempotency_key_belongs_to_one_request(service, admin, member):
    a = await service.boot(admin, "budget", idempotency_key="K-boot", wait=True)
    b = await service.boot(admin, "budget", wait=True)
    assert isinstance(a, BootResult) and isinstance(b, BootResult)
    count = len(_instances(service))

    again = await service.boot(admin, "budget", idempotency_key="K-boot")        # the legitimate retry
    assert isinstance(again, BootResult) and again.replayed and again.instance.id == a.instance.id
    with pytest.raises(Conflict, match=f"already used to boot {a.instance.id}"):
        await service.boot(admin, "research", idempotency_key="K-boot")
    with pytest.raises(Conflict, match="other settings"):
        await service.boot(admin, "budget", idempotency_key="K-boot", overrides={"max_model_len": "4096"})
    with pytest.raises(PermissionDenied) as err:
        await service.boot(member, "budget", idempotency_key="K-boot")
    assert a.instance.id not in err.value.message and "sandbox.invalid" not in err.value.message
    assert len(_instances(service)) == count

    stop_a = await service.stop(admin, a.instance.id, idempotency_key="K-stop")
    assert (await service.stop(admin, a.instance.id, idempotency_key="K-stop")) == stop_a   # retry
    with pytest.raises(Conflict, match=f"already used to stop {a.instance.id}"):
        await service.stop(admin, b.instance.id, idempotency_key="K-stop")
    with pytest.raises(Conflict, match="already used to stop"):
        await service.start(admin, a.instance.id, idempotency_key="K-stop")
    with pytest.raises(Conflict, match="already used to boot"):
        await service.stop(admin, b.instance.id, idempotency_key="K-boot")
    assert (await service.view(admin, b.instance.id)).state.value == "running", "B still runs (and bills)"


async def test_a_double_click_stops_once(service, admin, sandbox):
    booted = await service.boot(admin, "budget", wait=True)
    assert isinstance(booted, BootResult)
    first, second = await asyncio.gather(service.stop(admin, booted.instance.id, idempotency_key="click"),
                                         service.stop(admin, booted.instance.id, idempotency_key="click"))
    assert first == second and first.instance.state.value == "stopped"
    with service.db.session() as s:
        from gpuherd.core.models import AuditEvent
        stops = [e for e in s.execute(select(AuditEvent).where(AuditEvent.event == "stop")).scalars()]
    assert len(stops) == 1


# --- actions ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def _surf_server() -> Iterator[FakeSurf]:
    with FakeSurf() as server:
        yield server


@pytest.fixture
async def with_surf(service, sandbox, _surf_server) -> AsyncIterator[tuple[GpuService, FakeSurf]]:
    _surf_server.reset()

    async def no_sleep(_: float) -> None:
        return None
    surf = SurfProvider(TOKEN, base_url=_surf_server.url + _surf_server.prefix, timeout_s=2.0, sleep=no_sleep,
                        backoff_s=0.01)
    service.providers = ProviderRegistry({"sandbox": sandbox, "surf": surf})
    yield service, _surf_server
    await surf.aclose()


async def test_each_actor_is_offered_only_what_they_may_do(service, admin, member, with_surf):
    _, fake = with_surf
    await service.set_user(admin, "slack:V1", role="viewer")
    viewer = service.actor("slack:V1", source="slack")
    mine = await service.boot(admin, "budget", wait=True)
    theirs = await service.boot(member, "budget", wait=True)
    assert isinstance(mine, BootResult) and isinstance(theirs, BootResult)

    offered: dict[tuple[str, str], list[Action]] = {}
    for actor in (admin, member, viewer):
        for iid in (mine.instance.id, theirs.instance.id):
            offered[(actor.principal, iid)] = (await service.view(actor, iid)).actions

    def ops(actor: Actor, iid: str) -> list[Op]:
        return [a.op for a in offered[(actor.principal, iid)]]
    assert ops(admin, mine.instance.id) == [Op.KEEP, Op.STOP, Op.DESTROY]
    assert ops(admin, theirs.instance.id) == [Op.KEEP, Op.STOP, Op.DESTROY], "admins act on anyone's"
    assert ops(member, theirs.instance.id) == [Op.KEEP, Op.STOP, Op.DESTROY]
    assert ops(member, mine.instance.id) == [], "a member is offered nothing on someone else's machine"
    assert ops(viewer, mine.instance.id) == [] and ops(viewer, theirs.instance.id) == []
    status = await service.status(viewer)
    assert all(v.actions == [] for v in status.instances)

    for refused in (lambda: service.stop(viewer, mine.instance.id), lambda: service.stop(member, mine.instance.id),
                    lambda: service.destroy(member, mine.instance.id, confirmed=True),
                    lambda: service.keep(viewer, theirs.instance.id)):
        with pytest.raises(PermissionDenied):
            await refused()
    assert (await service.view(admin, mine.instance.id)).state.value == "running"

    ws = fake.add("team-workspace")
    attached = await service.attach(admin, f"surf:{ws}")
    surf_ops = [a.op for a in attached.instance.actions]
    assert Op.DESTROY not in surf_ops and Op.STOP in surf_ops, "SURF pauses but never destroys"
    before = len(fake.requests)
    with pytest.raises(GpuherdError, match="cannot be destroyed"):
        await service.destroy(admin, attached.instance.id, confirmed=True)
    assert len(fake.requests) == before, "refused by core before any provider call"
    assert (await service.view(admin, attached.instance.id)).state.value == "running"


async def test_a_button_ref_round_trips_and_grants_nothing_by_itself(service, admin, member):
    booted = await service.boot(admin, "budget", wait=True)
    assert isinstance(booted, BootResult)
    stop = next(a for a in booted.instance.actions if a.op is Op.STOP)
    pressed = Action.from_ref(stop.ref)
    assert pressed.op is Op.STOP and pressed.instance_id == booted.instance.id
    with pytest.raises(PermissionDenied):          # the member pressed the admin's button
        await service.stop(member, pressed.instance_id or "")
    for bad in ("", "nope", "stop|" + "x" * 200, "frobnicate|g-1234"):
        with pytest.raises(InvalidInput):
            Action.from_ref(bad)


# --- operations ---------------------------------------------------------------------------------

@pytest.fixture
def slow_market(service, clock, tmp_path) -> SandboxProvider:
    """A sandbox with real-length boots (about a minute to a healthy model server)."""
    slow = SandboxProvider(tmp_path / "slow.json", seed=7, time_scale=1, clock=clock)
    service.providers = ProviderRegistry({"sandbox": slow})
    return slow


async def _step(service: GpuService, clock, operation_id: str, seconds: float) -> None:
    clock.advance(timedelta(seconds=seconds))
    await service.operations.check(operation_id)


async def test_a_boot_returns_when_accepted_and_readiness_is_announced(service, admin, member, clock, slow_market):
    seen = []
    service.hub.subscribe(seen.append)
    service.settings.boot_timeout_s = 900
    booted = await service.boot(member, "budget")
    assert isinstance(booted, BootResult) and booted.operation_id and not booted.ready
    assert booted.instance.state.value in ("provisioning", "loading") and booted.instance.operation_id
    for _ in range(20):
        await _step(service, clock, booted.operation_id, 10)
    events = await service.operations.events(booted.operation_id)
    phases = [e.phase.value for e in events]
    assert phases[0] == "accepted" and phases[-1] == "healthy" and "loading" in phases
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert all(e.instance_id == booted.instance.id for e in events)
    assert events[-1].elapsed_s > events[0].elapsed_s
    view = await service.view(member, booted.instance.id)
    assert view.ready and view.operation_id is None
    [ready] = [n for n in seen if n.kind == "instance.ready"]
    assert ready.owner == member.principal and ready.actor == member.principal   # the booter follows it itself
    assert booted.instance.id in ready.text and "healthy" in ready.text
    # following a finished operation replays its events and ends
    replay = [e async for e in service.follow(member, booted.operation_id)]
    assert [e.seq for e in replay] == [e.seq for e in events]
    await service.set_user(admin, "slack:U9", role="member")
    with pytest.raises(PermissionDenied):            # someone else's boot is not theirs to follow
        [e async for e in service.follow(service.actor("slack:U9", source="slack"), booted.operation_id)]


async def test_a_machine_that_never_gets_healthy_is_stopped_and_its_owner_told(service, admin, clock, slow_market):
    seen = []
    service.hub.subscribe(seen.append)
    booted = await service.boot(admin, "budget")            # boot_timeout_s is 30 s in these tests
    assert isinstance(booted, BootResult) and booted.operation_id
    await _step(service, clock, booted.operation_id, 10)
    assert (await service.view(admin, booted.instance.id)).state.value != "stopped"
    await _step(service, clock, booted.operation_id, 25)     # past the deadline, still loading
    events = await service.operations.events(booted.operation_id)
    assert events[-1].phase.value == "failed" and "did not pass its health check" in events[-1].text
    view = await service.view(admin, booted.instance.id)
    assert view.state.value == "stopped", "a server that never came up must not bill compute"
    [failed] = [n for n in seen if n.kind == "boot.failed"]
    assert failed.owner == admin.principal and failed.actor is None, "the owner is told, even if they booted it"
    assert "stopped" in failed.text and [a.op for a in failed.actions] == [Op.START, Op.DESTROY]
    assert await service.operations.check(booted.operation_id), "an ended operation stays ended"
    assert len([n for n in seen if n.kind == "boot.failed"]) == 1
