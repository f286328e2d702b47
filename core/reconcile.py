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

import functools
import logging
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta

from sqlalchemy import select
from sqlmodel import Session, col

from . import audit as audit_log
from .actions import Op, act
from .auth import Actor, system_actor
from .clock import Clock, as_utc
from .config import Settings
from .db import Database
from .errors import Conflict, GpuherdError, InvalidInput, NotFound
from .ids import LABEL_PREFIX, is_gpuherd_label, label_for
from .lifecycle import FINAL_STATES, Lifecycle, get_instance
from .models import Instance, InstanceState, Role, UnmanagedInstance
from .money import from_micros, rate, to_micros
from .notify import NotifierHub
from .offers import Offer
from .outbox import NoticeDraft
from .providers.base import Capabilities, ProviderInstance, ProviderState
from .providers.registry import ProviderRegistry
from .results import AttachResult, ProviderFailure, ReconcileResult, UnmanagedView
from .retry import provider_call
from .sync import InstanceSync, Refresh
from .templates import Template, TemplateCatalog, parse_duration
from .text import clip
from .views import build_views

log = logging.getLogger(__name__)

BOOT_GRACE = timedelta(minutes=2)     # an intent younger than this may still be waiting on its create
ADOPTED_TEMPLATE = "adopted"          # rows made for labelled machines gpuherd had no record of
ATTACHED_TEMPLATE = "attached"        # machines attached without naming a template
DEFAULT_IDLE = timedelta(minutes=30)
DEFAULT_WARN = timedelta(minutes=5)


class Reconciler:
    def __init__(self, settings: Settings, db: Database, clock: Clock, providers: ProviderRegistry,
                 templates: TemplateCatalog, lifecycle: Lifecycle, sync: InstanceSync, hub: NotifierHub,
                 caps: Callable[[], dict[str, Capabilities]]) -> None:
        self.settings = settings
        self.db = db
        self.clock = clock
        self.providers = providers
        self.templates = templates
        self.lifecycle = lifecycle
        self.sync = sync
        self.hub = hub
        self._caps = caps

    async def _tell(self, drafts: list[NoticeDraft], now: datetime) -> None:
        await self.hub.published(drafts, now)

    # --- reconcile -------------------------------------------------------------------------
    async def run(self, actor: Actor | None = None) -> ReconcileResult:
        """One pass over every provider that can list its machines."""
        if actor is not None:
            actor.require(Role.ADMIN, "reconciling providers")
        names = [n for n in self.providers.names() if self.providers.get(n).capabilities.can_list]
        live = await self.db.run(lambda s: list(s.execute(select(Instance).where(
            col(Instance.state).not_in(FINAL_STATES))).scalars()))
        try:
            return await self._run(actor, names, live)
        finally:
            await self.db.release(live)       # every tracked row, freed off the loop

    async def _run(self, actor: Actor | None, names: list[str], live: list[Instance]) -> ReconcileResult:
        synced = await self.sync.refresh(live, list_providers=names, fresh=True, keep_rows=False)
        try:
            return await self._settle(actor, names, synced)
        finally:
            await self.db.release(synced.rows, synced.views, synced.listed)

    async def _settle(self, actor: Actor | None, names: list[str], synced: Refresh) -> ReconcileResult:
        result = ReconcileResult(providers=names,
                                 failed=[ProviderFailure(provider=p, message=m) for p, m in synced.failed.items()],
                                 lost=list(synced.lost), checked={n: len(v) for n, v in synced.listed.items()})
        now = self.clock.now()
        for name, machines in synced.listed.items():
            await self._reconcile_provider(name, machines, result)
        lost = [synced.rows[i] for i in synced.lost if i in synced.rows]
        if lost or actor is not None:
            def write(s: Session) -> list[NoticeDraft]:
                drafts = [NoticeDraft(kind="instance.lost", owner=row.owner, team=row.team, instance_id=row.id,
                                      level="warning", actor="system:reconcile", simulated=row.simulated,
                                      text=f"{row.id} is gone at {row.provider}: it was not destroyed by gpuherd. "
                                           "Its billing is closed.") for row in lost]
                for d in drafts:
                    self.lifecycle.notify(s, now, d)
                if actor is not None:
                    audit_log.record(s, actor, "reconcile", now=now, adopted=result.adopted,
                                     unmanaged=len(result.unmanaged), lost=result.lost,
                                     failed=[f.provider for f in result.failed])
                s.commit()
                return drafts
            await self._tell(await self.db.run(write), now)
        return result

    async def _reconcile_provider(self, name: str, machines: list[ProviderInstance],
                                  result: ReconcileResult) -> None:
        now = self.clock.now()
        alive = [m for m in machines if m.state is not ProviderState.DESTROYED]
        labelled_keys = {k for m in alive if m.label
                         for k in (m.label or "", (m.label or "").removeprefix(LABEL_PREFIX))}

        def read(s: Session) -> tuple[set[str], dict[str, Instance], list[Instance]]:
            known = set(s.execute(select(col(Instance.provider_id)).where(
                col(Instance.provider) == name, col(Instance.provider_id).in_([m.provider_id for m in alive]))).scalars())
            intents: dict[str, Instance] = {}
            if labelled_keys:
                # the keys these labels could stand for: the label itself, or a surface's key we marked
                for row in s.execute(select(Instance).where(
                        col(Instance.idempotency_key).in_(sorted(labelled_keys)),
                        col(Instance.provider_id).is_(None))).scalars():
                    intents[label_for(row.idempotency_key)] = row
            stale = list(s.execute(select(Instance).where(
                col(Instance.provider) == name, col(Instance.state) == InstanceState.PENDING.value)).scalars())
            return {k for k in known if k}, intents, stale
        known, intents, stale = await self.db.run(read)
        unknown = [m for m in alive if m.provider_id not in known]
        strangers: list[ProviderInstance] = []
        for machine in unknown:
            intent = intents.get(machine.label or "")
            if intent is not None:
                if (intent.state == InstanceState.PENDING.value
                        and now - as_utc(intent.created_at) < BOOT_GRACE):
                    continue  # its boot is still waiting on the create call
                view = await self._adopt_intent(intent, name, machine)
                if view is not None:
                    result.adopted.append(view)
            elif is_gpuherd_label(machine.label):
                result.adopted.append(await self._adopt_orphan(name, machine))
            else:
                strangers.append(machine)
        await self._report_unmanaged(name, strangers, result)
        # intents whose machine never appeared: the create never reached the provider
        labels = {m.label for m in machines if m.label}
        for intent in stale:
            if (now - as_utc(intent.created_at) >= BOOT_GRACE
                    and label_for(intent.idempotency_key) not in labels):
                def fail(s: Session, i: Instance = intent) -> bool:
                    return self.lifecycle.mark_failed(
                        s, system_actor("reconcile"), i.id,
                        GpuherdError("boot interrupted before the provider created the machine"), self.clock.now())
                failed = await self.db.run(fail)
                if failed:
                    result.failed_intents.append(intent.id)

    async def _adopt_intent(self, intent: Instance, provider: str, machine: ProviderInstance) -> str | None:
        offer = Offer(provider=provider, offer_id=intent.offer_id or machine.offer_id or "", gpu_name=intent.gpu_name,
                      num_gpus=intent.num_gpus, gpu_ram=0, dph=from_micros(intent.dph_micros),
                      simulated=intent.simulated)
        template = self.templates.find(intent.template) or self.templates.all()[0]
        now = self.clock.now()

        def work(s: Session) -> tuple[str | None, list[NoticeDraft]]:
            row, mine = self.lifecycle.record_created(s, system_actor("reconcile"), intent.id, offer, machine,
                                                      template, now)
            if not mine:
                return None, []
            draft = NoticeDraft(kind="instance.adopted", owner=row.owner, team=row.team, instance_id=row.id,
                                actor="system:reconcile", level="warning", simulated=row.simulated,
                                text=f"{row.id} was found running at {provider} after its boot was interrupted; "
                                     f"gpuherd now tracks and bills it ({rate(machine.dph)}).")
            self.lifecycle.notify(s, now, draft)
            s.commit()
            return row.id, [draft]
        iid, drafts = await self.db.run(work)
        await self._tell(drafts, now)
        return iid

    async def _adopt_orphan(self, provider: str, machine: ProviderInstance) -> str:
        """A labelled machine with no row: tracked from now on, billed from now on."""
        return await self._insert(system_actor("reconcile"), provider, machine, owner="system:reconcile",
                                  team=self.settings.default_team, template=ADOPTED_TEMPLATE,
                                  key=f"adopt:{provider}:{machine.provider_id}:{uuid.uuid4().hex[:8]}",
                                  idle=DEFAULT_IDLE, event="reconcile.adopt",
                                  notice=lambda iid: NoticeDraft(
                                      kind="instance.adopted", to_admins=True, instance_id=iid, level="warning",
                                      actor="system:reconcile",
                                      text=f"{provider} runs {machine.provider_id} with a gpuherd label but gpuherd "
                                           f"had no record of it; it is now tracked as {iid} with default guards "
                                           f"({rate(machine.dph)})."))

    async def _report_unmanaged(self, provider: str, machines: list[ProviderInstance],
                                result: ReconcileResult) -> None:
        now = self.clock.now()

        def work(s: Session) -> tuple[set[str], list[NoticeDraft]]:
            rows = {r.provider_id: r for r in s.execute(select(UnmanagedInstance).where(
                col(UnmanagedInstance.provider) == provider)).scalars()}
            seen = set()
            new: set[str] = set()
            drafts: list[NoticeDraft] = []
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
                    new.add(m.provider_id)
                    cost = f", {rate(m.dph)}" if m.dph else ""
                    drafts.append(NoticeDraft(
                        kind="instance.unmanaged", to_admins=True, level="warning", actor="system:reconcile",
                        text=(f"{provider} runs {m.provider_id} ({m.gpu_name or 'GPU'} x{m.num_gpus}, "
                              f"{m.state.value}{cost}), which gpuherd does not manage. If nobody needs it, stop "
                              f"it at {provider}; attaching it puts it under gpuherd's guards."),
                        actions=[act(Op.ATTACH, None, ref=f"{provider}:{m.provider_id}")]))
                s.add(row)
            for pid, row in rows.items():
                if pid not in seen and row.gone_at is None:
                    row.gone_at = now
                    s.add(row)
            for d in drafts:
                self.lifecycle.notify(s, now, d)
            s.commit()
            return new, drafts
        new, drafts = await self.db.run(work)
        for m in machines:
            result.unmanaged.append(UnmanagedView(
                provider=provider, provider_id=m.provider_id, label=m.label, state=m.state.value,
                gpu_name=m.gpu_name, num_gpus=m.num_gpus, dph=m.dph, new=m.provider_id in new,
                actions=[act(Op.ATTACH, None, ref=f"{provider}:{m.provider_id}")]))
        await self._tell(drafts, now)

    # --- attach ----------------------------------------------------------------------------
    async def attach(self, actor: Actor, ref: str, *, template: str | None = None, idle: str | None = None,
                     owner: str | None = None) -> AttachResult:
        """Put a machine created elsewhere under gpuherd: guards, ledger, audit. Admins only: it
        puts the machine's cost on the team's books and lets the idle guard stop it."""
        actor.require(Role.ADMIN, "attaching machines")
        if ":" not in ref or not ref.split(":", 1)[1].strip():
            raise InvalidInput(f"'{clip(ref, 40)}' should look like <provider>:<id>, e.g. vast:12345 or "
                               "surf:<workspace id>.")
        name, pid = (part.strip() for part in ref.split(":", 1))
        provider = self.providers.get(name)
        tmpl = self.templates.get(template) if template else None
        idle_window = parse_duration(idle) if idle else (tmpl.idle_window if tmpl else DEFAULT_IDLE)
        if idle_window <= timedelta(0):
            raise InvalidInput(f"idle={clip(idle or '', 20)} is not a positive duration (try 30m, 2h).")
        existing = await self.db.run(lambda s: _tracked(s, name, pid))
        if existing is not None:
            raise Conflict(f"{name}:{clip(pid, 40)} is already managed as {existing.id}.")
        machine = await provider_call(provider, lambda: provider.get(pid), what=f"{name} get {pid}")
        if machine is None or machine.state is ProviderState.DESTROYED:
            raise NotFound(f"{provider.display_name} has no machine '{clip(pid, 40)}' (or it was destroyed).")
        iid = await self._insert(
            actor, name, machine, owner=owner or actor.principal,
            team=actor.team if actor.team != "*" else self.settings.default_team,
            template=tmpl.name if tmpl else ATTACHED_TEMPLATE,
            key=f"attach:{name}:{pid}:{uuid.uuid4().hex[:8]}", idle=idle_window, event="attach", tmpl=tmpl,
            notice=lambda i: NoticeDraft(
                kind="instance.attached", owner=owner or actor.principal,
                team=actor.team if actor.team != "*" else self.settings.default_team, actor=actor.principal,
                instance_id=i, simulated=provider.capabilities.simulated,
                text=f"{actor.name} attached {name}:{pid} as {i} ({rate(machine.dph)}); "
                     f"idle after {int(idle_window.total_seconds() // 60)} min."),
            forget_unmanaged=pid)
        now = self.clock.now()
        view = await self.db.run(lambda s: build_views(s, [get_instance(s, iid)], now, actor, self._caps())[0])
        return AttachResult(instance=view, simulated=view.simulated)

    async def attach_configured(self) -> list[str]:
        """The machines listed under `attach` in the configuration, attached once each. Returns
        what was attached; problems are logged, never raised (a typo must not stop the bot)."""
        owner = self.settings.admins[0] if self.settings.admins else f"local:{self.settings.local_user}"
        done: list[str] = []
        for ref in self.settings.attach:
            name, _, pid = ref.partition(":")
            if await self.db.run(functools.partial(_tracked, provider=name.strip(), provider_id=pid.strip())) is not None:
                continue
            try:
                result = await self.attach(system_actor("config"), ref, owner=owner)
            except GpuherdError as exc:
                log.warning("could not attach %s from the configuration: %s", ref, exc.message)
                continue
            done.append(result.instance.id)
        return done

    # --- shared ----------------------------------------------------------------------------
    async def _insert(self, actor: Actor, provider: str, machine: ProviderInstance, *, owner: str, team: str,
                      template: str, key: str, idle: timedelta, event: str,
                      notice: Callable[[str], NoticeDraft], tmpl: Template | None = None,
                      forget_unmanaged: str | None = None) -> str:
        now = self.clock.now()
        simulated = self.providers.get(provider).capabilities.simulated

        def work(s: Session) -> tuple[str, NoticeDraft]:
            inst = self.lifecycle.insert_found(
                s, actor, provider, machine, owner=owner, team=team, template=template, key=key, idle=idle,
                warn=tmpl.warn_lead if tmpl else DEFAULT_WARN, simulated=simulated, event=event, now=now, tmpl=tmpl)
            if forget_unmanaged is not None:
                for row in s.execute(select(UnmanagedInstance).where(
                        col(UnmanagedInstance.provider) == provider,
                        col(UnmanagedInstance.provider_id) == forget_unmanaged)).scalars():
                    s.delete(row)
            draft = notice(inst.id)
            self.lifecycle.notify(s, now, draft)
            s.commit()
            return inst.id, draft
        iid, draft = await self.db.run(work)
        await self._tell([draft], now)
        return iid


def _tracked(s: Session, provider: str, provider_id: str) -> Instance | None:
    return s.execute(select(Instance).where(
        col(Instance.provider) == provider, col(Instance.provider_id) == provider_id,
        col(Instance.state).not_in(FINAL_STATES))).scalars().first()
