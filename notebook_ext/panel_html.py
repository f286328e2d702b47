"""The HTML fragments of the panel (`panel.py`): pure functions from core's results to markup,
so the widgets module holds only widgets and tasks, and these can be tested and timed alone.

Decisions:
- Every string a user, a template or a provider wrote (ids, names, locations, notice texts,
  prompts, error messages) goes through `html.escape`; the only markup is ours. Styles are
  inline: no external CSS, no CDN, no icons.
- Figures are core's (`InstanceView.current_dph`, `CostReport.run_rate`, `BudgetUse.fraction`,
  `Confirmation.cost`), formatted with `core.money.rate` / `usd`; the one computed here is the
  ticking cost, which the caller passes in from `InstanceView.accrued_at`.
- Element conventions the browser test relies on: `span.gpuherd-instance[data-id][data-state]`
  (one per machine), `span.gpuherd-phase[data-phase]` (the boot's progress label),
  `span.gpuherd-indicator[data-running]` (the header), and for the rest (not relied on, for a
  user's own stylesheet): `span.gpuherd-offer[data-ref]`, `span.gpuherd-accrued[data-id]`,
  `span.gpuherd-status[data-level]`, `div.gpuherd-notice[data-level]`, `div.gpuherd-costs`,
  `div.gpuherd-budget[data-percent][data-over][data-hard-cap]`, `div.gpuherd-daily` with one
  `div.gpuherd-day[data-day]` per day.
- The daily chart is CSS bars (flex items whose height is the day's share of the largest day):
  no plotting library, nothing to load."""

from __future__ import annotations

import html
from decimal import Decimal

from gpuherd.bot.replies import duration, who
from gpuherd.core.feed import FeedNotice
from gpuherd.core.money import rate, usd
from gpuherd.core.results import (
    BudgetUse,
    Confirmation,
    CostReport,
    InstanceView,
    OfferView,
    Phase,
    StatusResult,
)

MUTED = "#6e7781"
GREEN = "#1a7f37"
RED = "#cf222e"
COLOURS = {"info": "#0969da", "success": GREEN, "warning": "#9a6700", "error": RED}
# where a boot is, as a share of the way to a healthy model server (the bar's value)
PERCENT: dict[Phase, int] = {Phase.ACCEPTED: 10, Phase.PROVISIONING: 30, Phase.LOADING: 50, Phase.STARTING: 70,
                             Phase.RUNNING: 85, Phase.HEALTHY: 100}
OFFER_COLUMNS = (("GPU", 16), ("n", 3), ("GPU RAM", 8), ("$/h", 9), ("reliability", 10), ("location", 16),
                 ("provider", 9))


def e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _cell(text: str, width_ch: int, *, right: bool = False, head: bool = False) -> str:
    align = "right" if right else "left"
    weight = "font-weight:600;" if head else ""
    return (f'<span style="display:inline-block;width:{width_ch}ch;text-align:{align};padding-right:1ch;'
            f'overflow:hidden;text-overflow:ellipsis;white-space:nowrap;vertical-align:middle;{weight}">{e(text)}</span>')


_RIGHT = {"n", "GPU RAM", "$/h", "reliability"}


def offers_header(sort_label: str = "", descending: bool = False) -> str:
    arrow = " ▼" if descending else " ▲"
    cells = "".join(_cell(name + (arrow if name == sort_label else ""), width, right=name in _RIGHT, head=True)
                    for name, width in OFFER_COLUMNS)
    return f'<div class="gpuherd-offers-head" style="font-variant-numeric:tabular-nums;color:{MUTED};">{cells}</div>'


def offer_cells(view: OfferView) -> str:
    o = view.offer
    values = (o.gpu_name, str(o.num_gpus), f"{o.gpu_ram:g} GB", rate(o.dph), f"{o.reliability:.3f}",
              o.location or "—", o.provider)
    cells = "".join(_cell(v, width, right=name in _RIGHT) for v, (name, width) in zip(values, OFFER_COLUMNS, strict=True))
    return (f'<span class="gpuherd-offer" data-ref="{e(o.ref)}" data-fits="{e(" ".join(view.fits))}" '
            f'style="font-variant-numeric:tabular-nums;">{cells}</span>')


def no_boot(why: str) -> str:
    return f'<span class="gpuherd-no-boot" style="color:{MUTED};font-size:0.9em;">{e(why)}</span>'


def instance_line(v: InstanceView) -> str:
    """One machine as the Instances tab shows it (the ticking cost is a widget of its own)."""
    colour = GREEN if v.state.value == "running" else RED if v.state.value in ("error", "failed") else MUTED
    parts = [f'<b>{e(v.id)}</b>', e(v.template), e(f"{v.gpu_name} x{v.num_gpus} on {v.provider}"),
             f'<span style="color:{colour};font-weight:600;">{e(v.state.value)}</span>', e(rate(v.current_dph))]
    if v.idle_for_s is not None:
        parts.append(f"idle {e(duration(v.idle_for_s))}")
    if v.guard_error:
        parts.append(f'<span style="color:{RED};">⚠ {e(v.guard_error)}</span>')
    elif v.next_action and v.next_action_at:
        parts.append(f'next: {e(v.next_action)} at {e(v.next_action_at.strftime("%H:%M UTC"))}')
    if v.keep_until:
        parts.append(f'kept until {e(v.keep_until.strftime("%m-%d %H:%M UTC"))}')
    if v.endpoint and v.ready:
        parts.append(f'<code>{e(v.endpoint)}</code>')
    return (f'<span class="gpuherd-instance" data-id="{e(v.id)}" data-state="{e(v.state.value)}" '
            f'style="font-variant-numeric:tabular-nums;">{" · ".join(parts)}</span>')


def accrued(v: InstanceView, amount: Decimal) -> str:
    ticking = v.current_dph > 0
    style = "font-variant-numeric:tabular-nums;margin:0 8px;" + ("" if ticking else f"color:{MUTED};")
    return (f'<span class="gpuherd-accrued" data-id="{e(v.id)}" title="accrued so far" style="{style}">'
            f'{e(usd(amount, 4))}</span>')


def instances_summary(status: StatusResult) -> str:
    if not status.instances:
        return (f'<div class="gpuherd-instances-summary" style="color:{MUTED};">No machines of yours. '
                "Pick an offer in the Offers tab and press Boot.</div>")
    n = status.total
    more = f" (the newest {len(status.instances)} shown)" if status.total > len(status.instances) else ""
    stale = "".join(f'<div style="color:{RED};">⚠ states may be out of date: {e(f.message)}</div>' for f in status.stale)
    return (f'<div class="gpuherd-instances-summary">{n} machine{"s" if n != 1 else ""}{e(more)} · spending '
            f'{e(rate(status.run_rate.per_hour))} ({e(usd(status.run_rate.per_day))}/day){stale}</div>')


def indicator(running: int, per_hour: Decimal | None) -> str:
    """The header's light: green with the count and the run-rate, grey when nothing runs."""
    colour = GREEN if running else MUTED
    text = f"● {running} running · {rate(per_hour)}" if running and per_hour is not None else "● none running"
    return (f'<span class="gpuherd-indicator" data-running="{running}" style="color:{colour};font-weight:600;'
            f'margin-right:12px;">{e(text)}</span>')


def status(text: str, level: str = "info") -> str:
    colour = COLOURS.get(level, COLOURS["info"])
    return f'<span class="gpuherd-status" data-level="{e(level)}" style="color:{colour};">{e(text)}</span>' if text else ""


def phase(phase_name: str, text: str, elapsed_s: float | None = None) -> str:
    took = f" · {duration(elapsed_s)}" if elapsed_s is not None else ""
    return (f'<span class="gpuherd-phase" data-phase="{e(phase_name)}" style="margin-left:8px;">'
            f'<b>{e(phase_name)}</b>{e(took)} · {e(text)}</span>')


def question(c: Confirmation, about: InstanceView | None = None) -> str:
    """Core's question with what a yes costs: the Confirmation's own Money when it has one (a
    boot), else what the machine bills now and has cost so far (a destroy: billing ends)."""
    if c.cost is not None:
        figures = f"{rate(c.cost.per_hour)} · {usd(c.cost.per_day)}/day · {usd(c.cost.per_month)}/month"
    elif about is not None:
        figures = (f"{about.id} bills {rate(about.current_dph)} ({usd(about.current_per_day)}/day) now; "
                   f"{usd(about.accrued)} so far")
    else:
        figures = ""
    cost = (f' <span class="gpuherd-question-cost" style="font-variant-numeric:tabular-nums;font-weight:600;">'
            f"{e(figures)}</span>") if figures else ""
    return (f'<span class="gpuherd-question" data-operation="{e(c.operation)}" style="margin-right:8px;">'
            f"<b>{e(c.title)}</b> {e(c.prompt)}{cost}</span>")


def notice(n: FeedNotice) -> str:
    colour = COLOURS.get(n.level, COLOURS["info"])
    return (f'<div class="gpuherd-notice" data-level="{e(n.level)}" data-kind="{e(n.notice_kind)}" '
            f'style="border-left:3px solid {colour};padding-left:8px;">'
            f'<span style="color:{MUTED};">{e(n.created_at.strftime("%H:%M"))}</span> {e(n.text)}</div>')


def _budget(b: BudgetUse) -> str:
    percent = b.percent
    over = b.fraction > 1
    colour = RED if over else ("#9a6700" if b.fraction >= Decimal("0.8") else GREEN)
    width = min(100, max(0, percent))
    cap = (f'<span style="color:{RED};font-weight:600;margin-left:6px;">hard cap</span>' if b.hard_cap else "")
    edge = f"border-right:3px solid {RED};" if b.hard_cap else f"border-right:1px solid {MUTED};"
    return (f'<div class="gpuherd-budget" data-percent="{percent}" data-over="{str(over).lower()}" '
            f'data-hard-cap="{str(b.hard_cap).lower()}" style="margin:3px 0;">'
            f'<div>{e(b.scope.value)} <b>{e(who(b.name))}</b>: {e(usd(b.spent))} of {e(usd(b.limit))} '
            f'<span style="color:{colour};font-weight:600;">{percent} %</span>{cap}</div>'
            f'<div style="width:320px;height:10px;background:#eaeef2;{edge}">'
            f'<div style="width:{width}%;height:100%;background:{colour};"></div></div></div>')


def _daily(r: CostReport) -> str:
    if not r.daily:
        return ""
    top = max((d.amount for d in r.daily), default=Decimal(0))
    bars = []
    for d in r.daily:
        share = int((d.amount / top * 100).to_integral_value()) if top > 0 else 0
        label = f"{d.day.isoformat()}: {usd(d.amount)}"
        bars.append(f'<div class="gpuherd-day" data-day="{d.day.isoformat()}" title="{e(label)}" '
                    f'style="display:flex;flex-direction:column;justify-content:flex-end;align-items:center;'
                    f'width:18px;height:100%;">'
                    f'<div style="width:12px;height:{share}%;min-height:{1 if d.amount > 0 else 0}px;'
                    f'background:#0969da;"></div>'
                    f'<div style="font-size:9px;color:{MUTED};">{d.day.day}</div></div>')
    return (f'<div style="margin-top:8px;font-weight:600;">Daily spend (largest day {e(usd(top))})</div>'
            f'<div class="gpuherd-daily" style="display:flex;align-items:flex-end;gap:2px;height:90px;'
            f'border-bottom:1px solid {MUTED};padding-bottom:2px;">{"".join(bars)}</div>')


def costs(r: CostReport) -> str:
    """The Costs tab: the period's spend by the chosen grouping, run-rate, projection, budgets,
    and the daily chart."""
    rows = "".join(f'<tr><td style="padding:1px 12px 1px 0;">{e(who(g.key) if r.group_by.value == "user" else g.key)}'
                   f'</td><td style="text-align:right;">{e(usd(g.amount))}</td></tr>' for g in r.groups)
    groups = (f'<table class="gpuherd-groups" style="border-collapse:collapse;font-variant-numeric:tabular-nums;">'
              f'<thead><tr><th style="text-align:left;">{e(r.group_by.value)}</th>'
              f'<th style="text-align:right;">spend</th></tr></thead><tbody>{rows}</tbody></table>'
              if rows else f'<div style="color:{MUTED};">Nothing billed in this period.</div>')
    facts = [("spend", usd(r.total)),
             ("run-rate", f"{rate(r.run_rate.per_hour)} · {usd(r.run_rate.per_day)}/day"),
             ("month to date", usd(r.month_to_date)),
             ("month-end projection", usd(r.projected_month_end))]
    dl = "".join(f'<dt style="color:{MUTED};">{e(k)}</dt><dd style="margin:0;font-variant-numeric:tabular-nums;">'
                 f"{e(v)}</dd>" for k, v in facts)
    running = (f'<div style="color:{MUTED};">{r.running_count} billing now</div>' if r.running_count else "")
    budgets = "".join(_budget(b) for b in r.budgets)
    budgets = f'<div style="margin-top:8px;font-weight:600;">Budgets</div>{budgets}' if budgets else ""
    return (f'<div class="gpuherd-costs" data-period="{e(r.period)}" data-group-by="{e(r.group_by.value)}">'
            f'<div style="font-weight:600;">Costs · {e(r.period)} · by {e(r.group_by.value)}</div>'
            f'<dl style="display:grid;grid-template-columns:max-content auto;column-gap:12px;margin:4px 0;">{dl}</dl>'
            f"{running}{groups}{budgets}{_daily(r)}</div>")
