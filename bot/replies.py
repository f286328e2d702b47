"""Platform-neutral replies. Every command answers with a `Reply`; the shell renders it as text,
Slack as Block Kit, Discord as an embed with buttons. Builders here turn core result objects into
replies, so every surface shows the same figures with the same words."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Literal

from pydantic import BaseModel, Field

from gpuherd.core.actions import Action as CoreAction
from gpuherd.core.actions import Op
from gpuherd.core.money import rate, usd
from gpuherd.core.provider_health import ProvidersResult
from gpuherd.core.providers.sandbox import SIMULATED_NOTE
from gpuherd.core.results import (
    AttachResult,
    AuditResult,
    BootResult,
    BudgetResult,
    BudgetUse,
    Cancelled,
    Confirmation,
    CostReport,
    DestroyResult,
    GuardOverview,
    InstanceCost,
    InstanceView,
    KeepResult,
    Phase,
    ProgressEvent,
    ReconcileResult,
    SearchResult,
    StartResult,
    StatusResult,
    StopResult,
    TemplateDetail,
    TemplateList,
)

Level = Literal["info", "success", "warning", "error"]


class ReplyField(BaseModel):
    label: str
    value: str
    inline: bool = True


class Table(BaseModel):
    columns: list[str]
    rows: list[list[str]]
    align: list[Literal["left", "right"]] | None = None
    caption: str | None = None


class Confirm(BaseModel):
    """What a confirm dialog says; the action carrying it runs only after a yes."""

    title: str
    text: str
    yes: str = "Confirm"
    no: str = "Cancel"


class Action(BaseModel):
    """A next step as a surface shows it: the words (`label`), the line that does it in the
    shell and chat (`command`), and the core action's `ref` a button carries (never a command
    line or a secret; core checks the presser again when it comes back)."""

    label: str
    command: str                        # /gpu command line that does it
    ref: str = ""                       # core.actions.Action.ref, for buttons
    style: Literal["default", "primary", "danger"] = "default"
    confirm: Confirm | None = None


def _span(duration: str) -> str:
    """'1h' -> '1 h', '7d' -> '7 days' (button words)."""
    if duration.endswith("d") and duration[:-1].isdigit():
        n = int(duration[:-1])
        return f"{n} day{'s' if n != 1 else ''}"
    return f"{duration[:-1]} {duration[-1]}" if duration[:-1].isdigit() else duration


def phrase(a: CoreAction, *, notice: bool = False, label: str | None = None) -> Action:
    """How the shell and chat say a core action: the button's words and the /gpu line."""
    iid = a.instance_id or ""
    now = " now" if notice else ""
    words: dict[Op, tuple[str, str]] = {
        Op.KEEP: (f"Keep {_span(a.args.get('duration', '1h'))}", f"/gpu keep {iid} {a.args.get('duration', '1h')}"),
        Op.STOP: (f"Stop{now}", f"/gpu stop {iid}"),
        Op.START: ("Start", f"/gpu start {iid}"),
        Op.DESTROY: (f"Destroy{now}", f"/gpu destroy {iid}"),
        Op.STATUS: ("Status", f"/gpu status {iid}".strip()),
        Op.COSTS: ("Costs", f"/gpu costs {a.args.get('period', '')}".strip()),
        Op.BOOT: (f"Boot {a.args.get('template', '')}".strip(),
                  " ".join(p for p in ("/gpu boot", a.args.get("template", ""),
                                       f"offer={a.args['offer']}" if a.args.get("offer") else "") if p)),
        Op.ATTACH: (f"Attach {a.args.get('ref', '')}", f"/gpu attach {a.args.get('ref', '')}"),
        Op.CONFIRM: ("Yes", f"/gpu confirm {a.args.get('token', '')}"),
        Op.CANCEL: ("Cancel", f"/gpu cancel {a.args.get('token', '')}"),
        Op.SEARCH: ("Search", f"/gpu search {a.args.get('query', '')}".strip()),
        Op.TEMPLATES: ("Templates", f"/gpu templates {a.args.get('name', '')}".strip()),
        Op.BUDGET: ("Budgets", "/gpu budget"),
    }
    text, command = words[a.op]
    confirm = (Confirm(title=f"{text}?", text=f"{text} {iid}: this cannot be undone.", yes=text, no="Cancel")
               if a.confirm else None)
    return Action(label=label or text, command=command, ref=a.ref, style=a.style.value, confirm=confirm)


class Reply(BaseModel):
    title: str
    text: str = ""
    level: Level = "info"
    fields: list[ReplyField] = Field(default_factory=list)
    tables: list[Table] = Field(default_factory=list)
    actions: list[Action] = Field(default_factory=list)
    notes: list[str] = Field(default_factory=list)      # footer lines (simulated label, price age)
    ephemeral: bool = False                              # only the asker sees it (errors, help)
    confirmation: Action | None = None                   # set when the command waits for a yes
    instance_id: str | None = None                       # the machine this reply is about (boot, start)
    operation_id: str | None = None                      # its boot or start still in progress: follow it

    def with_note(self, note: str) -> Reply:
        return self.model_copy(update={"notes": [*self.notes, note]})


# --- formatting helpers -------------------------------------------------------------------------

def duration(seconds: int | float | None) -> str:
    if seconds is None:
        return "—"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    m, s = divmod(s, 60)
    if m < 60:
        return f"{m}m"
    h, m = divmod(m, 60)
    if h < 48:
        return f"{h}h {m:02d}m"
    d, h = divmod(h, 24)
    return f"{d}d {h}h"


def when(ts: datetime | None) -> str:
    return ts.strftime("%Y-%m-%d %H:%M UTC") if ts else "—"


def bar(fraction: Decimal, width: int = 20) -> str:
    f = max(Decimal(0), fraction)
    filled = min(width, int((f * width).to_integral_value()))
    return "█" * filled + "░" * (width - filled) + f" {int((f * 100).to_integral_value())}%"


def who(principal: str) -> str:
    """`local:alice` -> `alice`; chat ids stay as they are for the surface to turn into mentions."""
    return principal.split(":", 1)[1] if principal.startswith("local:") else principal


def _simulated(reply: Reply, simulated: bool) -> Reply:
    return reply.with_note(SIMULATED_NOTE) if simulated else reply


def error(message: str, hint: str | None = None, title: str = "Cannot do that") -> Reply:
    return Reply(title=title, text=message + (f"\n{hint}" if hint else ""), level="error", ephemeral=True)


# --- builders -----------------------------------------------------------------------------------

def search_reply(r: SearchResult) -> Reply:
    offers = [v.offer for v in r.offers]
    rows = [[o.ref, o.gpu_name, str(o.num_gpus), f"{o.gpu_ram:g}", rate(o.dph), f"{o.reliability:.3f}",
             o.location or "—"] for o in offers]
    failed = [f.provider for f in r.failures]
    heard = [p for p in r.providers if p not in failed]
    if r.offers:
        text = ""
    elif failed:
        # some providers answered with nothing that matches, the others were not heard from:
        # the missing offers may be theirs, so the query is not necessarily too narrow
        text = (f"No offer from {', '.join(heard) or 'the providers that answered'} matches; "
                f"{', '.join(failed)} {'was' if len(failed) == 1 else 'were'} not heard from, so "
                f"{'its' if len(failed) == 1 else 'their'} offers are missing. Search again in a moment.")
    else:
        text = "No offer matches. Loosen the query (e.g. drop a price limit) or try another GPU."
    reply = Reply(
        title=f"{r.total_matches} offer{'s' if r.total_matches != 1 else ''} · {r.description}",
        text=text, level="warning" if failed and not r.offers else "info",
        tables=[Table(columns=["offer", "gpu", "n", "GB", "$/h", "rel.", "where"], rows=rows,
                      align=["left", "left", "right", "right", "right", "right", "left"])] if rows else [],
        actions=[phrase(a, label=f"Boot {v.offer.gpu_name} {rate(v.offer.dph)}")
                 for v in r.offers if v.actions for a in v.actions[:1]][:3],
    )
    if r.total_matches > len(r.offers):
        reply = reply.with_note(f"Showing the first {len(r.offers)} of {r.total_matches} in that order; add limit=N for more.")
    for failure in r.failures:
        reply = reply.with_note(f"⚠ Not heard from {failure.provider} (its offers are missing): {failure.message}")
    unfit: dict[str, list[str]] = {}
    for v in r.offers:
        if v.unfit and not v.actions:
            unfit.setdefault(v.unfit, []).append(v.offer.ref)
    for why, refs in unfit.items():
        shown = ", ".join(refs[:3]) + (f" and {len(refs) - 3} more" if len(refs) > 3 else "")
        reply = reply.with_note(f"No Boot button for {shown}: {why}.")
    ages = ", ".join(f"{name} {duration(r.provider_ages[name])} ago" for name in r.providers
                     if name in r.provider_ages)
    if ages:
        reply = reply.with_note(f"Prices asked: {ages}. $/h includes a {r.search_disk_gb} GB disk.")
    for src in r.price_sources:
        # a cached price list says how old it is; a table's date is in its name
        age = f", {duration(src.age_s)} old" if src.age_s is not None and src.age_s < 2 * 86400 else ""
        reply = reply.with_note(f"{src.provider} prices from {src.source}{age}.")
    return _simulated(reply, r.simulated)


def templates_reply(r: TemplateList) -> Reply:
    rows = [[t.name, t.model or "—", f"{t.min_gpu_ram:g} GB", str(t.num_gpus),
             rate(t.max_dph) if t.max_dph is not None else "—", f"{t.idle_minutes:g}m",
             t.source] for t in r.templates]
    return Reply(title="Templates", tables=[Table(columns=["name", "model", "GPU RAM", "GPUs", "max $/h", "idle",
                                                            "from"], rows=rows)],
                 notes=["/gpu templates <name> for details; /gpu boot <name> key=value to override."])


def template_reply(r: TemplateDetail) -> Reply:
    s = r.summary
    return Reply(
        title=f"Template {s.name}", text=s.description,
        fields=[ReplyField(label=f.label, value=f.value) for f in r.fields],
        tables=[Table(columns=["override", "takes"], rows=[[o.key, o.takes] for o in r.overrides],
                      caption="Overrides at boot: /gpu boot " + s.name + " key=value")],
        actions=[phrase(a) for a in r.actions])


def instance_fields(v: InstanceView) -> list[ReplyField]:
    fields = [ReplyField(label="state", value=v.state.value), ReplyField(label="owner", value=who(v.owner)),
              ReplyField(label="template", value=v.template),
              ReplyField(label="machine", value=f"{v.gpu_name} x{v.num_gpus} on {v.provider}"),
              ReplyField(label="rate", value=rate(v.current_dph)), ReplyField(label="accrued", value=usd(v.accrued))]
    if v.uptime_s is not None:
        fields.append(ReplyField(label="uptime", value=duration(v.uptime_s)))
    if v.idle_for_s is not None:
        fields.append(ReplyField(label="idle for", value=duration(v.idle_for_s)))
    if v.keep_until:
        fields.append(ReplyField(label="kept until", value=when(v.keep_until)))
    if v.next_action and v.next_action_at:
        fields.append(ReplyField(label="next guard action", value=f"{v.next_action} at {when(v.next_action_at)}"))
    if v.guards:
        fields.append(ReplyField(label="guards", inline=False, value=" · ".join(
            f"{g.name} {'armed' if g.armed else 'off'} ({g.detail})" for g in v.guards)))
    if v.activity:
        fields.append(ReplyField(label="activity", value=f"{v.activity}: {v.activity_detail or ''}".strip(": "),
                                 inline=False))
    if v.guard_error:
        fields.append(ReplyField(label="⚠ guard", value=v.guard_error, inline=False))
    if v.endpoint:
        fields.append(ReplyField(label="endpoint", value=v.endpoint, inline=False))
    if v.message:
        fields.append(ReplyField(label="provider says", value=v.message, inline=False))
    return fields


def instance_actions(v: InstanceView) -> list[Action]:
    """What core offers the asker on this instance (a viewer gets none)."""
    return [phrase(a) for a in v.actions]


def boot_reply(r: BootResult) -> Reply:
    v = r.instance
    if r.replayed:
        title, text = f"{v.id} was already booted with this request", "Same request, same machine: nothing new was started."
    else:
        status = "is up and healthy" if r.ready else f"is {v.state.value}; its health check follows"
        title, text = f"Booted {v.id} ({v.template})", f"{v.id} {status}; billing {rate(v.dph)} from now."
    reply = Reply(title=title, text=text, level="success", fields=instance_fields(v), actions=instance_actions(v),
                  instance_id=v.id, operation_id=None if r.ready else r.operation_id)
    if r.overrides:
        reply.fields.append(ReplyField(label="overrides", value=", ".join(f"{k}={x}" for k, x in r.overrides.items()),
                                       inline=False))
    if r.price_note:
        reply = reply.with_note(r.price_note)
    return _simulated(reply, r.simulated)


def confirmation_reply(c: Confirmation) -> Reply:
    yes_words = "Boot anyway" if c.operation == "boot" else c.operation.capitalize()
    actions = []
    for a in c.actions:
        phrased = phrase(a, label=yes_words if a.op is Op.CONFIRM else None)
        if a.op is Op.CONFIRM:
            phrased = phrased.model_copy(update={"confirm": Confirm(title=c.title, text=c.prompt, yes="Yes",
                                                                     no="Cancel")})
        actions.append(phrased)
    yes = next(a for a in actions if a.command.startswith("/gpu confirm"))
    fields = []
    if c.cost is not None:
        fields = [ReplyField(label="per hour", value=usd(c.cost.per_hour, 3)),
                  ReplyField(label="per day", value=usd(c.cost.per_day)),
                  ReplyField(label="per month", value=usd(c.cost.per_month))]
    return _simulated(Reply(title=c.title, text=c.prompt, level="warning", fields=fields, actions=actions,
                            confirmation=yes, ephemeral=True), c.simulated)


def cancelled_reply(r: Cancelled) -> Reply:
    return _simulated(Reply(title="Not done", text="The question is closed; nothing was changed.", ephemeral=True),
                      r.simulated)


def progress_reply(event: ProgressEvent, view: InstanceView | None, *, verb: str = "Booting") -> Reply:
    """A long operation while it moves (one message a chat surface edits in place): where it is,
    how long it has taken, what it costs an hour."""
    fields = [ReplyField(label="phase", value=event.phase.value),
              ReplyField(label="elapsed", value=duration(event.elapsed_s))]
    title = f"{verb} {event.instance_id}"
    if view is not None:
        title += f" ({view.template})"
        fields += [ReplyField(label="machine", value=f"{view.gpu_name} x{view.num_gpus} on {view.provider}"),
                   ReplyField(label="rate", value=rate(view.dph))]
    level: Level = "error" if event.phase is Phase.FAILED else "success" if event.final else "info"
    return _simulated(Reply(title=title, text=event.text, level=level, fields=fields),
                      bool(view and view.simulated))


def start_reply(r: StartResult) -> Reply:
    v = r.instance
    text = (f"{v.id} is running and healthy after {duration(r.waited_s)}; billing {rate(v.dph)}." if r.ready
            else f"{v.id} is {v.state.value}; billing {rate(v.dph)}. /gpu status {v.id} to follow it.")
    return _simulated(Reply(title=f"Started {v.id}", text=text, level="success" if r.ready else "warning",
                            fields=instance_fields(v), actions=instance_actions(v), instance_id=v.id,
                            operation_id=None if r.ready else r.operation_id), r.simulated)


def stop_reply(r: StopResult) -> Reply:
    v = r.instance
    storage = (f" Its disk is kept and billed at {rate(r.storage.per_hour)} ({usd(r.storage.per_day)}/day) "
               f"until you destroy it." if r.storage.per_hour > 0 else " Nothing is billed while stopped.")
    return _simulated(Reply(
        title=f"Stopped {v.id}", level="success",
        text=f"Session: {duration(r.session_s)} for {usd(r.session_cost)}.{storage}",
        fields=[ReplyField(label="session cost", value=usd(r.session_cost)),
                ReplyField(label="total so far", value=usd(v.accrued)),
                ReplyField(label="while stopped", value=rate(r.storage.per_hour))],
        actions=instance_actions(v)), r.simulated)


def destroy_reply(r: DestroyResult) -> Reply:
    v = r.instance
    return _simulated(Reply(title=f"Destroyed {v.id}", level="success",
                            text=f"{v.id} ({v.template}) is gone; no further charges. Total cost {usd(r.total_cost)}.",
                            fields=[ReplyField(label="total cost", value=usd(r.total_cost))]), r.simulated)


def keep_reply(r: KeepResult) -> Reply:
    v = r.instance
    return _simulated(Reply(title=f"Keeping {v.id}", level="success",
                            text=f"{v.id} will not be destroyed for being stopped before {when(r.until)}."
                            if v.state.value == "stopped" else
                            f"{v.id} will not be stopped for idleness before {when(r.until)}.",
                            fields=instance_fields(v)), r.simulated)


def status_reply(r: StatusResult, single: bool = False) -> Reply:
    if single and r.instances:
        v = r.instances[0]
        return _simulated(Reply(title=f"{v.id} · {v.template}", fields=instance_fields(v),
                                actions=instance_actions(v)), v.simulated)
    rows = [[v.id, who(v.owner), v.template, v.state.value, f"{v.gpu_name} x{v.num_gpus}", rate(v.current_dph),
             usd(v.accrued), duration(v.uptime_s), duration(v.idle_for_s), _next(v)] for v in r.instances]
    reply = Reply(
        title=f"{r.total} instance{'s' if r.total != 1 else ''} · spending {rate(r.run_rate.per_hour)}",
        text="" if rows else "Nothing is running. /gpu search to find a machine, /gpu boot budget to start one.",
        tables=[Table(columns=["id", "owner", "template", "state", "gpu", "$/h", "accrued", "uptime", "idle", "next"],
                      rows=rows, align=["left", "left", "left", "left", "left", "right", "right", "right", "right",
                                        "left"])]
        if rows else [])
    for v in r.instances:
        if v.guard_error:
            reply = reply.with_note(f"⚠ {v.id}: {v.guard_error}")
    if r.next_cursor:
        reply = reply.with_note(f"Showing the newest {len(r.instances)} of {r.total}.")
    for failure in r.stale:
        reply = reply.with_note(f"⚠ states may be out of date: {failure.message}")
    return _simulated(reply, r.simulated)


def machines_reply(r: StatusResult, *, per_machine: int = 8) -> Reply:
    """A person's own machines with a row of buttons for each (an App Home, a panel): the status
    table, and each machine's actions named with its id ("Stop g-7f3a")."""
    reply = status_reply(r).model_copy(update={"title": f"Your machines · {r.total} · spending "
                                                        f"{rate(r.run_rate.per_hour)}"})
    actions = [a.model_copy(update={"label": f"{a.label} {v.id}"})
               for v in r.instances[:per_machine] for a in instance_actions(v)]
    if len(r.instances) > per_machine:
        reply = reply.with_note(f"Buttons for the newest {per_machine}; /gpu status <id> for the others.")
    return reply.model_copy(update={"actions": actions})


def _next(v: InstanceView) -> str:
    """'stop (idle) in 12m', or '⚠' when a guard cannot check."""
    if v.guard_error:
        return "⚠ cannot check"
    if not (v.next_action and v.next_action_at):
        return "—"
    return f"{v.next_action} {v.next_action_at:%m-%d %H:%M}"


def guards_reply(r: GuardOverview) -> Reply:
    fields = [ReplyField(label="scheduler", value=f"running in {r.leader}" if r.leader else "not running yet"),
              ReplyField(label="last pass", value=(f"{when(r.last_run_at)} · {r.last_pass_ms or 0:.1f} ms · "
                                                   f"{r.last_checked} checked · {r.last_acted} acted")
                         if r.last_run_at else "never"),
              ReplyField(label="next wake-up", value=when(r.next_wake_at)),
              ReplyField(label="budgets checked", value=when(r.budgets_checked_at))]
    if r.last_error:
        fields.append(ReplyField(label="⚠ last error", value=r.last_error, inline=False))
    rows = [[v.id, who(v.owner), v.state.value, v.next_action or "", when(v.next_action_at)] for v in r.upcoming]
    reply = Reply(title="Guards", fields=fields,
                  tables=[Table(columns=["id", "owner", "state", "next action", "at"], rows=rows,
                                caption="Coming up")] if rows else [])
    for v in r.blind:
        reply = reply.with_note(f"⚠ {v.id}: {v.guard_error}")
    return _simulated(reply, r.simulated)


def budget_line(b: BudgetUse) -> ReplyField:
    cap = " · hard cap" if b.hard_cap else ""
    return ReplyField(label=f"{b.scope.value} {who(b.name)}",
                      value=f"{bar(b.fraction)}  {usd(b.spent)} of {usd(b.limit)}{cap}", inline=False)


def costs_reply(r: CostReport) -> Reply:
    """Spend by group, what bills now, run-rate and projection. Rows are rounded to the cent each,
    so when their rounded sum is not the rounded total a note says so (rather than nudging a row
    off its own value). Machines billing compute and stopped machines billing storage are two
    tables: a stopped machine is not "running". Run-rate and month-end projection describe now,
    so a period that does not include now (a past month) leaves them out."""
    rows = [[who(g.key) if r.group_by.value == "user" else g.key, usd(g.amount)] for g in r.groups]
    tables = [Table(columns=[r.group_by.value, "spend"], rows=rows, align=["left", "right"])] if rows else []
    for label, caption, views in (
            ("running", "Billing now · compute", [v for v in r.running if v.state.value != "stopped"]),
            ("stopped", "Billing now · storage while stopped", [v for v in r.running if v.state.value == "stopped"])):
        if views:
            tables.append(Table(columns=[label, "owner", "state", "$/h", "accrued"],
                                rows=[[v.id, who(v.owner), v.state.value, rate(v.current_dph), usd(v.accrued)]
                                      for v in views],
                                align=["left", "left", "left", "right", "right"], caption=caption))
    fields = [ReplyField(label="spend", value=usd(r.total))]
    if r.current:
        fields += [ReplyField(label="run-rate", value=f"{rate(r.run_rate.per_hour)} · {usd(r.run_rate.per_day)}/day"),
                   ReplyField(label="month to date", value=usd(r.month_to_date)),
                   ReplyField(label="month-end projection", value=usd(r.projected_month_end))]
    fields += [budget_line(b) for b in r.budgets]
    fields += [ReplyField(label=f"{b.provider} balance", value=balance_text(b.balance, b.hours_left, b.run_rate)) for b in r.balances]
    reply = Reply(title=f"Costs · {r.period} · by {r.group_by.value}", fields=fields, tables=tables,
                  text="" if rows else "Nothing billed in this period.")
    cent = Decimal("0.01")
    shown = sum((g.amount.quantize(cent, rounding="ROUND_HALF_UP") for g in r.groups), Decimal(0))
    if rows and shown != r.total.quantize(cent, rounding="ROUND_HALF_UP"):
        reply = reply.with_note(f"Each row is rounded to the cent, so the rows add up to {usd(shown)}; "
                                f"the spend, summed before rounding, is {usd(r.total)}.")
    if not r.current:
        reply = reply.with_note(f"No run-rate or month-end projection: {r.period} is not the current period.")
    if r.running_count > len(r.running):
        reply = reply.with_note(f"Billing now: the costliest {len(r.running)} of {r.running_count} instances.")
    return _simulated(reply, r.simulated)


def balance_text(balance: Decimal, hours_left: Decimal | None, per_hour: Decimal) -> str:
    """'$25.00 · lasts 31h 15m at $0.800/h' (a provider's account balance, at what bills there)."""
    if hours_left is None:
        return usd(balance)
    if hours_left <= 0:
        return f"⚠ {usd(balance)} · used up ({rate(per_hour)} billed there)"
    lasts = duration(int(hours_left * 3600))
    return f"{'⚠ ' if hours_left <= 24 else ''}{usd(balance)} · lasts {lasts} at {rate(per_hour)}"


def _ago(now: datetime, ts: datetime | None) -> str:
    return f"{duration(max(0, int((now - ts).total_seconds())))} ago" if ts else "never"


CREDENTIALS = {"ok": "✓ ok", "failed": "✗ refused", "unknown": "? unknown"}


def providers_reply(r: ProvidersResult) -> Reply:
    rows, notes = [], []
    for p in r.providers:
        prices = f"{duration(p.price_age_s)} old" if p.price_age_s is not None else "not fetched yet"
        balance = balance_text(p.balance.balance, p.balance.hours_left, p.balance.run_rate) if p.balance else "not reported"
        rows.append([p.display_name, CREDENTIALS[p.credentials], _ago(r.checked_at, p.last_answered_at), prices,
                     balance])
        if p.last_error is not None:
            notes.append(f"⚠ {p.display_name} · last error {_ago(r.checked_at, p.last_error.at)} "
                         f"({p.last_error.kind}): {p.last_error.message}")
    trouble = any(p.credentials != "ok" for p in r.providers) or any(
        p.balance is not None and p.balance.hours_left is not None and p.balance.hours_left <= 24 for p in r.providers)
    reply = Reply(title=f"Providers · {len(rows)} configured", level="warning" if trouble else "info",
                  tables=[Table(columns=["provider", "credentials", "answered", "prices", "balance"], rows=rows)]
                  if rows else [], text="" if rows else "No provider is configured.")
    for note in notes:
        reply = reply.with_note(note)
    return _simulated(reply, r.simulated)


def instance_cost_reply(r: InstanceCost) -> Reply:
    v = r.instance
    return _simulated(Reply(title=f"Cost of {v.id} · {v.template}", fields=[
        ReplyField(label="rate now", value=rate(r.hourly.per_hour)), ReplyField(label="total", value=usd(r.total)),
        ReplyField(label="compute", value=usd(r.compute)), ReplyField(label="storage", value=usd(r.storage)),
        ReplyField(label="running time", value=duration(r.uptime_s)),
        ReplyField(label="per day at this rate", value=usd(r.hourly.per_day)),
        ReplyField(label="per month at this rate", value=usd(r.hourly.per_month))]), r.simulated)


AUDIT_DETAIL_CHARS = 120
_AUDIT_USD_KEYS = frozenset({"amount", "previous", "limit", "cost", "spent", "price", "total"})


def _audit_value(key: str, value: object) -> str:
    """One audit detail value as words: money as $ (a rate as $/h), seconds as a duration,
    lists comma-separated, booleans yes/no, timestamps as UTC; never a Python repr."""
    leaf = key.rsplit(".", 1)[-1]
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (list, tuple)):
        return ", ".join(_audit_value(key, v) for v in value) or "none"
    if isinstance(value, dict):  # only reached inside a list; top-level dicts are flattened
        return " ".join(f"{k}={_audit_value(str(k), v)}" for k, v in value.items())
    if leaf.endswith("dph") or leaf in _AUDIT_USD_KEYS:
        try:
            amount = Decimal(str(value))
        except ArithmeticError:
            return str(value)
        if amount.is_finite():
            return rate(amount) if leaf.endswith("dph") else usd(amount)
    if leaf.endswith("_s") and isinstance(value, (int, float)):
        return duration(value)
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, str) and len(value) >= 19 and value[4] == "-" and "T" in value:
        try:
            return when(datetime.fromisoformat(value))
        except ValueError:
            return value
    return str(value)


def audit_details(details: dict[str, object]) -> str:
    """`key=value; key=value`, nested keys dotted (`overrides.max_model_len=4096`), empty values
    left out, cut at AUDIT_DETAIL_CHARS with an ellipsis."""
    parts: list[str] = []

    def add(prefix: str, value: object) -> None:
        if value is None or value == "" or value == [] or value == {}:
            return
        if isinstance(value, dict):
            for k, v in value.items():
                add(f"{prefix}.{k}" if prefix else str(k), v)
            return
        parts.append(f"{prefix}={_audit_value(prefix, value)}")

    add("", details)
    text = "; ".join(parts)
    return text if len(text) <= AUDIT_DETAIL_CHARS else text[:AUDIT_DETAIL_CHARS - 1] + "…"


def audit_reply(r: AuditResult) -> Reply:
    rows = []
    for e in r.events:
        detail = audit_details(e.details)
        rows.append([e.ts.strftime("%m-%d %H:%M:%S"), who(e.actor), e.source, e.event + ("" if e.ok else " ✗"),
                     e.instance_id or "", usd(e.cost) if e.cost is not None else "", detail])
    return Reply(title=f"Audit · last {len(rows)} event{'s' if len(rows) != 1 else ''}",
                 tables=[Table(columns=["when", "actor", "via", "event", "instance", "cost", "details"], rows=rows)]
                 if rows else [], text="" if rows else "No events yet.")


def budget_reply(r: BudgetResult) -> Reply:
    if r.changed:
        title = f"Budget for {r.changed.scope.value} {who(r.changed.name)} set to {usd(r.changed.limit)}/month"
    else:
        title = f"Budgets · {r.period}"
    return Reply(title=title, level="success" if r.changed else "info",
                 fields=[budget_line(b) for b in r.budgets],
                 text="" if r.budgets else "No budgets set. An admin sets one with /gpu budget set team=<team> <USD>.")


def attach_reply(r: AttachResult) -> Reply:
    v = r.instance
    reply = Reply(title=f"Attached {v.provider}:{v.provider_id} as {v.id}", level="success",
                  text=f"gpuherd now guards and bills {v.id} ({v.state.value}, {rate(v.current_dph)}).",
                  fields=instance_fields(v), actions=instance_actions(v))
    return _simulated(reply, r.simulated)


def reconcile_reply(r: ReconcileResult) -> Reply:
    counts = ", ".join(f"{name}: {n}" for name, n in r.checked.items()) or "none"
    rows = [[f"{u.provider}:{u.provider_id}", u.gpu_name or "—", str(u.num_gpus), u.state, rate(u.dph),
             u.label or "—", "new" if u.new else ""] for u in r.unmanaged]
    reply = Reply(
        title="Reconciled providers with gpuherd's records",
        level="warning" if (r.unmanaged or r.lost or r.failed) else "success",
        text=f"Machines listed — {counts}.",
        fields=[ReplyField(label=label, value=", ".join(ids))
                for label, ids in (("adopted", r.adopted), ("gone at the provider (billing closed)", r.lost),
                                   ("interrupted boots marked failed", r.failed_intents)) if ids],
        tables=[Table(columns=["machine", "gpu", "n", "state", "$/h", "label", ""], rows=rows)] if rows else [],
        actions=[phrase(a) for u in r.unmanaged[:3] for a in u.actions[:1]])
    if r.unmanaged:
        reply = reply.with_note("Not managed by gpuherd: stop them at the provider if nobody needs them, "
                                "or /gpu attach <provider>:<id> to guard them.")
    for failure in r.failed:
        reply = reply.with_note(f"⚠ {failure.provider} could not be listed: {failure.message}")
    return _simulated(reply, r.simulated)
