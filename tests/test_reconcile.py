"""Reconcile and attach, on SQLite and PostgreSQL, with the sandbox as the provider: machines
gpuherd does not know are adopted (labelled) or reported once (unlabelled), machines gone at the
provider have their bill closed, interrupted boots are resolved, and attach puts a machine made
elsewhere under the guards and the ledger."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import select

from gpuherd.core.errors import Conflict, InvalidInput, NotFound, PermissionDenied
from gpuherd.core.ledger import COMPUTE, STORAGE
from gpuherd.core.models import BillingSegment, Instance, UnmanagedInstance
from gpuherd.core.money import from_micros
from gpuherd.core.providers.base import CreateRequest
from gpuherd.core.reconcile import BOOT_GRACE


@pytest.fixture
def notices(service):
    seen = []
    service.hub.subscribe(seen.append)
    return seen


def _rows(service, model=Instance):
    with service.db.session() as s:
        return list(s.exec(select(model)).scalars())


def _segments(service, iid):
    with service.db.session() as s:
        return list(s.exec(select(BillingSegment).where(BillingSegment.instance_id == iid)
                           .order_by(BillingSegment.id)).scalars())


async def _machine(sandbox, label: str):
    offer = min((o for o in await sandbox.search() if o.num_gpus == 1), key=lambda o: o.dph)
    return await sandbox.create(CreateRequest(offer_id=offer.offer_id, label=label, image="x/y:1", disk_gb=20))


class Crash(BaseException):
    """The process dying: nothing after it runs."""


async def _crashed_boot(service, admin, sandbox, monkeypatch, key: str):
    real = sandbox.create

    async def create_then_die(request):
        await real(request)
        raise Crash()

    monkeypatch.setattr(sandbox, "create", create_then_die)
    with pytest.raises(Crash):
        await service.boot(admin, "budget", idempotency_key=key)
    monkeypatch.setattr(sandbox, "create", real)
    [row] = [r for r in _rows(service) if r.idempotency_key == key]
    return row


# ------------------------------------------------------------------------------- reconcile

async def test_unlabelled_machine_is_reported_to_admins_once(service, admin, sandbox, notices):
    stranger = await _machine(sandbox, label="someones-notebook")
    first = await service.reconcile(admin)
    assert [(u.provider_id, u.new) for u in first.unmanaged] == [(stranger.provider_id, True)]
    [notice] = [n for n in notices if n.kind == "instance.unmanaged"]
    assert notice.to_admins and notice.owner is None and stranger.provider_id in notice.text
    assert [(a.op.value, a.args) for a in notice.actions] == [("attach", {"ref": f"sandbox:{stranger.provider_id}"})]
    assert "/gpu" not in notice.text, "core speaks sentences; each surface phrases the action"
    second = await service.reconcile(admin)
    assert [(u.provider_id, u.new) for u in second.unmanaged] == [(stranger.provider_id, False)]
    assert len([n for n in notices if n.kind == "instance.unmanaged"]) == 1, "told once, not every pass"
    assert _rows(service) == [], "an unlabelled machine is never taken over silently"
    await sandbox.destroy(stranger.provider_id)
    await service.reconcile(admin)
    [row] = _rows(service, UnmanagedInstance)
    assert row.gone_at is not None


async def test_labelled_machine_without_a_record_is_adopted_and_billed(service, admin, sandbox, notices):
    machine = await _machine(sandbox, label="gh-0123456789abcdef0123456789abcdef")
    result = await service.reconcile(admin)
    [iid] = result.adopted
    [row] = _rows(service)
    assert row.id == iid and row.provider_id == machine.provider_id and row.owner == "system:reconcile"
    assert row.template == "adopted" and row.idle_window_s == 1800 and row.next_guard_at is not None
    [seg] = _segments(service, iid)
    assert seg.kind == COMPUTE and seg.end_ts is None and seg.rate_micros == row.dph_micros > 0
    assert any(n.kind == "instance.adopted" and n.to_admins for n in notices)
    again = await service.reconcile(admin)
    assert again.adopted == [] and len(_rows(service)) == 1 and len(_segments(service, iid)) == 1


async def test_interrupted_boot_is_adopted_into_its_own_row_after_the_grace(service, admin, sandbox,
                                                                            monkeypatch, clock, notices):
    row = await _crashed_boot(service, admin, sandbox, monkeypatch, "crash-r1")
    assert row.state == "pending" and row.provider_id is None
    early = await service.reconcile(admin)
    assert early.adopted == [] and early.unmanaged == [], "a young intent may still be waiting on its create"
    clock.advance(BOOT_GRACE + timedelta(seconds=1))
    result = await service.reconcile(admin)
    assert result.adopted == [row.id]
    [adopted] = _rows(service)
    assert adopted.id == row.id and adopted.provider_id == (await sandbox.list())[0].provider_id
    assert adopted.owner == row.owner and adopted.state != "pending"
    assert [s.kind for s in _segments(service, row.id)] == [COMPUTE]
    told = [n for n in notices if n.kind == "instance.adopted"]
    assert told and told[0].owner == row.owner and "interrupted" in told[0].text
    await service.reconcile(admin)
    assert len(_segments(service, row.id)) == 1, "adopted exactly once"


async def test_late_boot_and_reconcile_record_the_machine_once(service, admin, sandbox, monkeypatch, clock):
    """The boot's own write and reconcile's adoption race for one intent: one of them wins."""
    row = await _crashed_boot(service, admin, sandbox, monkeypatch, "crash-r2")
    [machine] = await sandbox.list()
    clock.advance(BOOT_GRACE * 2)
    await service.reconcile(admin)
    from gpuherd.core.offers import Offer
    offer = Offer(provider="sandbox", offer_id=row.offer_id, gpu_name=row.gpu_name, num_gpus=1, gpu_ram=24,
                  dph=from_micros(row.dph_micros))
    with service.db.session() as s:
        inst, recorded = service.lifecycle.record_created(s, admin, row.id, offer, machine,
                                                          service.templates.get("budget"), clock.now())
    assert inst.id == row.id and not recorded, "reconcile recorded it first"
    assert len(_segments(service, row.id)) == 1


async def test_intent_whose_create_never_reached_the_provider_is_failed(service, admin, sandbox, monkeypatch, clock):
    async def die(request):
        raise Crash()

    monkeypatch.setattr(sandbox, "create", die)
    with pytest.raises(Crash):
        await service.boot(admin, "budget", idempotency_key="crash-r3")
    clock.advance(BOOT_GRACE + timedelta(seconds=1))
    result = await service.reconcile(admin)
    [row] = _rows(service)
    assert result.failed_intents == [row.id] and row.state == "failed"
    assert _segments(service, row.id) == []


async def test_machine_gone_at_the_provider_is_closed_and_its_owner_told(service, admin, sandbox, clock, notices):
    booted = await service.boot(admin, "budget", wait=False)
    iid = booted.instance.id
    clock.advance(600)
    await sandbox.destroy(booted.instance.provider_id)   # someone destroyed it in the provider's console
    result = await service.reconcile(admin)
    assert result.lost == [iid]
    [row] = _rows(service)
    assert row.state == "lost"
    assert all(seg.end_ts is not None for seg in _segments(service, iid)), "billing closed"
    [told] = [n for n in notices if n.kind == "instance.lost"]
    assert told.owner == admin.principal and iid in told.text


async def test_a_provider_that_cannot_list_changes_nothing(service, admin, sandbox):
    booted = await service.boot(admin, "budget", wait=False)
    sandbox.inject("unavailable", count=10, on="list")
    result = await service.reconcile(admin)
    assert "sandbox" in [f.provider for f in result.failed] and result.lost == [] and result.adopted == []
    [row] = _rows(service)
    assert row.id == booted.instance.id and row.state not in ("lost", "destroyed")


async def test_a_machine_missing_from_one_listing_is_asked_about_before_it_is_closed(service, admin, sandbox,
                                                                                        monkeypatch):
    booted = await service.boot(admin, "budget", wait=False)
    real_list = sandbox.list

    async def short_list():  # a page that shifted under us
        return [p for p in await real_list() if p.provider_id != booted.instance.provider_id]

    monkeypatch.setattr(sandbox, "list", short_list)
    result = await service.reconcile(admin)
    assert result.lost == []
    assert _rows(service)[0].state not in ("lost", "destroyed")


async def test_reconcile_is_for_admins(service, member):
    with pytest.raises(PermissionDenied):
        await service.reconcile(member)


# ---------------------------------------------------------------------------------- attach

async def test_attach_puts_a_machine_under_guards_and_ledger(service, admin, sandbox, clock, notices):
    machine = await _machine(sandbox, label="made-by-hand")
    await service.reconcile(admin)
    assert _rows(service, UnmanagedInstance)
    result = await service.attach(admin, f"sandbox:{machine.provider_id}", template="research", idle="45m")
    v = result.instance
    assert v.provider_id == machine.provider_id and v.owner == admin.principal and v.template == "research"
    [row] = _rows(service)
    assert row.idle_window_s == 45 * 60 and row.next_guard_at is not None
    assert [s.kind for s in _segments(service, v.id)] == [COMPUTE]
    assert _rows(service, UnmanagedInstance) == [], "no longer reported as unmanaged"
    assert any(n.kind == "instance.attached" for n in notices)
    audit = await service.audit(admin, 5, v.id)
    assert audit.events[0].event == "attach" and audit.events[0].details["provider_id"] == machine.provider_id
    with pytest.raises(Conflict) as err:
        await service.attach(admin, f"sandbox:{machine.provider_id}")
    assert v.id in err.value.message


async def test_attach_a_stopped_machine_bills_storage(service, admin, sandbox, clock):
    machine = await _machine(sandbox, label="x")
    clock.advance(600)
    await sandbox.stop(machine.provider_id)
    clock.advance(600)
    v = (await service.attach(admin, f"sandbox:{machine.provider_id}")).instance
    assert v.state == "stopped"
    assert [s.kind for s in _segments(service, v.id)] == [STORAGE]


@pytest.mark.parametrize("ref, error", [("vast12345", InvalidInput), ("sandbox:", InvalidInput),
                                        ("sandbox:sbx-999999", NotFound), ("nosuch:1", NotFound)])
async def test_attach_refuses_bad_references_and_changes_nothing(service, admin, ref, error):
    with pytest.raises(error):
        await service.attach(admin, ref)
    assert _rows(service) == []


async def test_attach_is_for_admins(service, member, sandbox):
    machine = await _machine(sandbox, label="x")
    with pytest.raises(PermissionDenied):
        await service.attach(member, f"sandbox:{machine.provider_id}")


async def test_attach_from_configuration_once_and_typos_only_logged(service, sandbox, caplog):
    machine = await _machine(sandbox, label="x")
    service.settings.attach = [f"sandbox:{machine.provider_id}", "sandbox:sbx-424242", "nosuch:1"]
    first = await service.attach_configured()
    assert len(first) == 1
    assert await service.attach_configured() == [], "already attached"
    [row] = _rows(service)
    assert row.provider_id == machine.provider_id and row.owner == "local:alice"
    assert "sbx-424242" in caplog.text and "nosuch" in caplog.text


async def test_a_recorded_machine_is_never_marked_failed(service, admin, sandbox):
    booted = await service.boot(admin, "budget", wait=False)
    from gpuherd.core.errors import GpuherdError
    with service.db.session() as s:
        assert not service.lifecycle.mark_failed(s, admin, booted.instance.id, GpuherdError("late give-up"),
                                                 service.clock.now())
    [row] = _rows(service)
    assert row.state != "failed" and row.provider_id == booted.instance.provider_id


async def test_a_labelled_machine_whose_old_intent_failed_long_ago_is_adopted_into_it(service, admin, sandbox,
                                                                                      monkeypatch, clock):
    """The create timed out, the label search failed too, the boot was marked failed; the machine
    exists after all. Reconcile finds it by the label, however long ago that was."""
    row = await _crashed_boot(service, admin, sandbox, monkeypatch, "slow-create")
    from gpuherd.core.errors import GpuherdError
    with service.db.session() as s:
        assert service.lifecycle.mark_failed(s, admin, row.id, GpuherdError("create timed out"), clock.now())
    clock.advance(timedelta(days=30))
    result = await service.reconcile(admin)
    assert result.adopted == [row.id] and len(_rows(service)) == 1
