"""Reconcile and attach: what the providers really run, brought in line with the database.

SPEC §9 promises no orphaned spend. A boot writes its intent (with the idempotency key) before
the provider's create call and sends the key as the machine's label, so whatever happens between
the create and the database write, the machine can be found again:

- a listed machine whose label is an intent's key is adopted into that intent's row (after a
  grace period, so a boot still waiting on its create is not overtaken);
- a listed machine with a gpuherd label but no row at all (a database restored from a backup)
  is adopted as a new row, owned by the system, with default guards, and admins are told;
- a listed machine without a gpuherd label was made by hand or by another tool: admins are told
  once, and it is left alone (it may be someone's running job);
- a tracked machine that is gone at the provider has its bill closed (via `GpuService.refresh`).

`attach` puts a machine created elsewhere under gpuherd's guards and ledger on purpose.
"""

from __future__ import annotations

import logging
import uuid
from datetime import timedelta

from sqlalchemy import select
from sqlmodel import Session

from . import audit as audit_log
from .auth import Actor, system_actor
from .clock import as_utc
from .errors import Conflict, GpuherdError, InvalidInput, NotFound
from .guard_plan import replan
from .ids import LABEL_PREFIX, is_gpuherd_label, label_for, new_instance_id
from .ledger import COMPUTE, STORAGE, Ledger
from .models import Instance, InstanceState, Role, UnmanagedInstance
from .money import from_micros, rate, to_micros
from .notify import Notice
from .offers import Offer
from .providers.base import ProviderInstance, ProviderState
from .results import AttachResult, ReconcileResult, UnmanagedView
from .retry import provider_call
from .service import _STATE_MAP, BILLED_AS_COMPUTE, GpuService
from .templates import Template, parse_duration

log = logging.getLogger(__name__)

BOOT_GRACE = timedelta(minutes=2)     # an intent younger than this may still be waiting on its create
ADOPTED_TEMPLATE = "adopted"          # rows made for labelled machines gpuherd had no record of
ATTACHED_TEMPLATE = "attached"        # machines attached without naming a template
DEFAULT_IDLE = timedelta(minutes=30)
DEFAULT_WARN = timedelta(minutes=5)


class Reconciler:
    def __init__(self, service: GpuService) -> None:
        self.service = service

    # --- reconcile -------------------------------------------------------------------------
    async def run(self, actor: Actor | None = None) -> ReconcileResult:
        """One pass over every provider that can list its machines."""
        svc = self.service
        if actor is not None:
            actor.require(Role.ADMIN, "reconciling providers")
        names = [n for n in svc.providers.names() if svc.providers.get(n).capabilities.can_list]
        final = [st.value for st in InstanceState if st.is_final]
        with svc.db.session() as s:
            live = list(s.exec(select(Instance).where(Instance.state.not_in(final))).scalars())  # type: ignore[attr-defined]
        synced = await svc.refresh(live, list_providers=names)
        result = ReconcileResult(providers=names, failed=dict(synced.failed), lost=list(synced.lost),
                                 checked={n: len(v) for n, v in synced.listed.items()})
        now = svc.clock.now()
        for name, machines in synced.listed.items():
            await self._reconcile_provider(name, machines, result)
        for iid in synced.lost:
            row = synced.rows.get(iid)
            if row is not None:
                await svc.hub.publish(Notice(
                    kind="instance.lost", at=now, owner=row.owner, team=row.team, instance_id=iid,
                    level="warning", actor="system:reconcile", simulated=row.simulated,
                    text=f"{iid} is gone at {row.provider}: it was not destroyed by gpuherd. Its billing is closed."))
        if actor is not None:
            with svc.db.session() as s:
                audit_log.record(s, actor, "reconcile", now=now, adopted=result.adopted,
                                 unmanaged=len(result.unmanaged), lost=result.lost, failed=list(result.failed))
                s.commit()
        return result

    async def _reconcile_provider(self, name: str, machines: list[ProviderInstance],
                                  result: ReconcileResult) -> None:
        svc = self.service
        now = svc.clock.now()
        alive = [m for m in machines if m.state is not ProviderState.DESTROYED]
        with svc.db.session() as s:
            known = set(s.exec(select(Instance.provider_id).where(  # type: ignore[call-overload]
                Instance.provider == name, Instance.provider_id.in_([m.provider_id for m in alive]))).scalars())  # type: ignore[union-attr]
        unknown = [m for m in alive if m.provider_id not in known]
        labelled = [m for m in unknown if m.label]
        intents: dict[str, Instance] = {}
        if labelled:
            # the keys these labels could stand for: the label itself, or a surface's key we marked
            keys = {k for m in labelled for k in (m.label or "", (m.label or "").removeprefix(LABEL_PREFIX))}
            with svc.db.session() as s:
                for row in s.exec(select(Instance).where(  # type: ignore[call-overload]
                        Instance.idempotency_key.in_(sorted(keys)),  # type: ignore[attr-defined]
                        Instance.provider_id.is_(None))).scalars():  # type: ignore[union-attr]
                    intents[label_for(row.idempotency_key)] = row
        strangers: list[ProviderInstance] = []
        for machine in unknown:
            intent = intents.get(machine.label or "")
            if intent is not None:
                if (intent.state == InstanceState.PENDING.value
                        and now - as_utc(intent.created_at) < BOOT_GRACE):
                    continue  # its boot is still waiting on the create call
                view = self._adopt_intent(intent, name, machine)
                if view is not None:
                    result.adopted.append(view)
                    await svc.hub.publish(Notice(
                        kind="instance.adopted", at=now, owner=intent.owner, team=intent.team, instance_id=view,
                        actor="system:reconcile", level="warning", simulated=intent.simulated,
                        text=f"{view} was found running at {name} after its boot was interrupted; "
                             f"gpuherd now tracks and bills it ({rate(machine.dph)})."))
            elif is_gpuherd_label(machine.label):
                view = self._adopt_orphan(name, machine)
                result.adopted.append(view)
                await svc.hub.publish(Notice(
                    kind="instance.adopted", at=now, to_admins=True, instance_id=view, level="warning",
                    actor="system:reconcile",
                    text=f"{name} runs {machine.provider_id} with a gpuherd label but gpuherd had no record "
                         f"of it; it is now tracked as {view} with default guards ({rate(machine.dph)})."))
            else:
                strangers.append(machine)
        await self._report_unmanaged(name, strangers, result)
        # intents whose machine never appeared: the create never reached the provider
        labels = {m.label for m in machines if m.label}
        for intent in self._stale_intents(name):
            if (intent.provider == name and intent.state == InstanceState.PENDING.value
                    and now - as_utc(intent.created_at) >= BOOT_GRACE
                    and label_for(intent.idempotency_key) not in labels):
                svc._mark_failed(system_actor("reconcile"), intent.id,  # noqa: SLF001
                                 GpuherdError("boot interrupted before the provider created the machine"))
                result.failed_intents.append(intent.id)

    def _stale_intents(self, provider: str) -> list[Instance]:
        with self.service.db.session() as s:
            return list(s.exec(select(Instance).where(  # type: ignore[call-overload]
                Instance.provider == provider, Instance.state == InstanceState.PENDING.value)).scalars())

    def _adopt_intent(self, intent: Instance, provider: str, machine: ProviderInstance) -> str | None:
        svc = self.service
        offer = Offer(provider=provider, offer_id=intent.offer_id or machine.offer_id or "", gpu_name=intent.gpu_name,
                      num_gpus=intent.num_gpus, gpu_ram=0, dph=from_micros(intent.dph_micros),
                      simulated=intent.simulated)
        template = svc.templates.find(intent.template) or _fallback_template(svc)
        view = svc._record_created(system_actor("reconcile"), intent.id, offer, machine, template)  # noqa: SLF001
        return view.id if view.provider_id == machine.provider_id else None

    def _adopt_orphan(self, provider: str, machine: ProviderInstance) -> str:
        """A labelled machine with no row: tracked from now on, billed from now on."""
        svc = self.service
        return self._insert(system_actor("reconcile"), provider, machine, owner="system:reconcile",
                            team=svc.settings.default_team, template=ADOPTED_TEMPLATE,
                            key=f"adopt:{provider}:{machine.provider_id}:{uuid.uuid4().hex[:8]}",
                            idle=DEFAULT_IDLE, event="reconcile.adopt")

    async def _report_unmanaged(self, provider: str, machines: list[ProviderInstance],
                                result: ReconcileResult) -> None:
        svc = self.service
        now = svc.clock.now()
        to_report: list[UnmanagedInstance] = []
        with svc.db.session() as s:
            rows = {r.provider_id: r for r in s.exec(select(UnmanagedInstance).where(  # type: ignore[call-overload]
                UnmanagedInstance.provider == provider)).scalars()}
            seen = set()
            for m in machines:
                seen.add(m.provider_id)
                row = rows.get(m.provider_id)
                if row is None:
                    row = UnmanagedInstance(provider=provider, provider_id=m.provider_id, state=m.state.value,
                                            first_seen_at=now, last_seen_at=now)
                row.label = (m.label or None) and m.label[:256]
                row.state = m.state.value
                row.gpu_name = m.gpu_name[:64]
                row.num_gpus = m.num_gpus
                row.dph_micros = to_micros(m.dph)
                row.last_seen_at = now
                row.gone_at = None
                if row.reported_at is None:
                    row.reported_at = now
                    to_report.append(row)
                s.add(row)
            for pid, row in rows.items():
                if pid not in seen and row.gone_at is None:
                    row.gone_at = now
                    s.add(row)
            s.commit()
            for row in to_report:
                s.refresh(row)
        for m in machines:
            result.unmanaged.append(UnmanagedView(provider=provider, provider_id=m.provider_id, label=m.label,
                                                  state=m.state.value, gpu_name=m.gpu_name, num_gpus=m.num_gpus,
                                                  dph=m.dph, new=any(r.provider_id == m.provider_id for r in to_report)))
        for row in to_report:
            cost = f", {rate(from_micros(row.dph_micros))}" if row.dph_micros else ""
            await svc.hub.publish(Notice(
                kind="instance.unmanaged", at=now, to_admins=True, level="warning", actor="system:reconcile",
                text=(f"{provider} runs {row.provider_id} ({row.gpu_name or 'GPU'} x{row.num_gpus}, {row.state}{cost}), "
                      f"which gpuherd does not manage. If nobody needs it, stop it at {provider}; to put it under "
                      f"gpuherd's guards: /gpu attach {provider}:{row.provider_id}")))

    # --- attach ----------------------------------------------------------------------------
    async def attach(self, actor: Actor, ref: str, *, template: str | None = None, idle: str | None = None,
                     owner: str | None = None) -> AttachResult:
        """Put a machine created elsewhere under gpuherd: guards, ledger, audit. Admins only: it
        puts the machine's cost on the team's books and lets the idle guard stop it."""
        svc = self.service
        actor.require(Role.ADMIN, "attaching machines")
        if ":" not in ref or not ref.split(":", 1)[1].strip():
            raise InvalidInput(f"'{ref}' should look like <provider>:<id>, e.g. vast:12345 or surf:<workspace id>.")
        name, pid = (part.strip() for part in ref.split(":", 1))
        provider = svc.providers.get(name)
        tmpl = svc.templates.get(template) if template else None
        idle_window = parse_duration(idle) if idle else (tmpl.idle_window if tmpl else DEFAULT_IDLE)
        if idle_window <= timedelta(0):
            raise InvalidInput(f"idle={idle} is not a positive duration (try 30m, 2h).")
        with svc.db.session() as s:
            existing = _tracked(s, name, pid)
            if existing is not None:
                raise Conflict(f"{name}:{pid} is already managed as {existing.id}.")
        machine = await provider_call(provider, lambda: provider.get(pid), what=f"{name} get {pid}")
        if machine is None or machine.state is ProviderState.DESTROYED:
            raise NotFound(f"{provider.display_name} has no machine '{pid}' (or it was destroyed).")
        iid = self._insert(actor, name, machine, owner=owner or actor.principal,
                           team=actor.team if actor.team != "*" else svc.settings.default_team,
                           template=tmpl.name if tmpl else ATTACHED_TEMPLATE,
                           key=f"attach:{name}:{pid}:{uuid.uuid4().hex[:8]}", idle=idle_window, event="attach",
                           tmpl=tmpl)
        with svc.db.session() as s:
            for row in s.exec(select(UnmanagedInstance).where(  # type: ignore[call-overload]
                    UnmanagedInstance.provider == name, UnmanagedInstance.provider_id == pid)).scalars():
                s.delete(row)
            s.commit()
            view = svc._view(s, svc._get(s, iid))  # noqa: SLF001
        await svc.hub.publish(Notice(kind="instance.attached", at=svc.clock.now(), owner=view.owner, team=view.team,
                                     actor=actor.principal, instance_id=iid, simulated=view.simulated,
                                     text=f"{actor.name} attached {name}:{pid} as {iid} ({rate(view.dph)}); "
                                          f"idle after {int(idle_window.total_seconds() // 60)} min."))
        return AttachResult(instance=view, simulated=view.simulated)

    async def attach_configured(self) -> list[str]:
        """The machines listed under `attach` in the configuration, attached once each. Returns
        what was attached; problems are logged, never raised (a typo must not stop the bot)."""
        svc = self.service
        owner = svc.settings.admins[0] if svc.settings.admins else f"local:{svc.settings.local_user}"
        done: list[str] = []
        for ref in svc.settings.attach:
            name, _, pid = ref.partition(":")
            with svc.db.session() as s:
                if _tracked(s, name.strip(), pid.strip()) is not None:
                    continue
            try:
                result = await self.attach(system_actor("config"), ref, owner=owner)
            except GpuherdError as exc:
                log.warning("could not attach %s from the configuration: %s", ref, exc.message)
                continue
            done.append(result.instance.id)
        return done

    # --- shared ----------------------------------------------------------------------------
    def _insert(self, actor: Actor, provider: str, machine: ProviderInstance, *, owner: str, team: str,
                template: str, key: str, idle: timedelta, event: str, tmpl: Template | None = None) -> str:
        svc = self.service
        now = svc.clock.now()
        state = _STATE_MAP.get(machine.state) or InstanceState.RUNNING
        simulated = svc.providers.get(provider).capabilities.simulated
        with svc.db.session() as s:
            taken = set(s.exec(select(Instance.id)).scalars())  # type: ignore[call-overload]
            inst = Instance(
                id=new_instance_id(taken), idempotency_key=key[:200], provider=provider,
                provider_id=machine.provider_id, offer_id=machine.offer_id, owner=owner, team=team,
                template=template, state=state.value, gpu_name=machine.gpu_name[:64], num_gpus=machine.num_gpus,
                dph_micros=to_micros(machine.dph), storage_dph_micros=to_micros(machine.storage_dph),
                endpoint=machine.endpoint, simulated=simulated, status_message=machine.message,
                idle_window_s=int(idle.total_seconds()),
                warn_lead_s=int((tmpl.warn_lead if tmpl else DEFAULT_WARN).total_seconds()),
                idle_action=tmpl.idle_action if tmpl else "stop",
                max_lifetime_s=int(tmpl.max_lifetime.total_seconds()) if tmpl and tmpl.max_lifetime else None,
                destroy_after_stopped_s=(int(tmpl.destroy_after_stopped.total_seconds())
                                         if tmpl and tmpl.destroy_after_stopped else None),
                created_at=now, updated_at=now, started_at=now, last_activity_at=now,
                stopped_at=now if state is InstanceState.STOPPED else None)
            replan(inst)
            s.add(inst)
            s.flush()
            if state in BILLED_AS_COMPUTE:
                Ledger.open(s, inst, COMPUTE, inst.dph_micros, now)
            elif state is InstanceState.STOPPED and inst.storage_dph_micros:
                Ledger.open(s, inst, STORAGE, inst.storage_dph_micros, now)
            audit_log.record(s, actor, event, now=now, instance_id=inst.id, provider=provider,
                             provider_id=machine.provider_id, label=machine.label, owner=owner,
                             dph=str(machine.dph), state=state.value)
            s.commit()
            return inst.id


def _tracked(s: Session, provider: str, provider_id: str) -> Instance | None:
    final = [st.value for st in InstanceState if st.is_final]
    return s.exec(select(Instance).where(  # type: ignore[call-overload]
        Instance.provider == provider, Instance.provider_id == provider_id,
        Instance.state.not_in(final))).scalars().first()  # type: ignore[attr-defined]


def _fallback_template(svc: GpuService) -> Template:
    return svc.templates.all()[0]
