"""What service operations return. Every surface renders these; none computes its own figures.
`simulated` is set whenever the sandbox is involved so every reply can say so."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any, Literal

from pydantic import BaseModel, Field

from .offers import Offer


class InstanceView(BaseModel):
    id: str
    provider: str
    provider_id: str | None
    owner: str
    team: str
    template: str
    state: str
    gpu_name: str
    num_gpus: int
    dph: Decimal                    # compute USD/h
    storage_dph: Decimal            # USD/h while stopped
    current_dph: Decimal            # what it costs right now (compute, storage or 0)
    accrued: Decimal                # total billed so far
    uptime_s: int | None            # current running session
    idle_for_s: int | None
    keep_until: datetime | None
    endpoint: str | None
    created_at: datetime
    stopped_at: datetime | None
    message: str | None = None
    simulated: bool = False
    next_action: str | None = None          # "stop (idle)"
    next_action_at: datetime | None = None
    guards: list[tuple[str, bool, str]] = Field(default_factory=list)   # (name, armed, what it does)
    guard_error: str | None = None          # why a guard could not check, shown loudly
    activity: str | None = None             # active | quiet | unknown (last probe)
    activity_detail: str | None = None


class PriceSource(BaseModel):
    """Where some shown offers' prices came from when not from the live search (a cached price
    list, a table shipped with gpuherd) and when that price was set."""

    provider: str
    source: str
    priced_at: datetime | None = None
    age_s: int | None = None        # how old the price was at the search


class SearchResult(BaseModel):
    query: str
    description: str
    offers: list[Offer]
    total_matches: int
    providers: list[str]
    failures: dict[str, str] = Field(default_factory=dict)
    price_age_s: int = 0                                        # the oldest provider's
    provider_ages: dict[str, int] = Field(default_factory=dict)  # seconds since each was asked
    price_sources: list[PriceSource] = Field(default_factory=list)  # prices not read live, and from where
    simulated: bool = False


class TemplateSummary(BaseModel):
    name: str
    description: str
    model: str | None
    min_gpu_ram: float
    num_gpus: int
    max_dph: Decimal | None
    idle_minutes: float
    source: str = "built-in"


class TemplateDetail(BaseModel):
    summary: TemplateSummary
    fields: list[tuple[str, str]]           # (label, value) for display
    overrides: list[tuple[str, str]]        # (key, what it takes)


class TemplateList(BaseModel):
    templates: list[TemplateSummary]


class Confirmation(BaseModel):
    """Returned (not raised) when an action needs an explicit yes. Surfaces show `prompt` with a
    confirm button/dialog that re-runs `command` (which carries confirm=yes and the same key)."""

    kind: Literal["confirm"] = "confirm"
    action: str
    title: str
    prompt: str
    command: str
    cost_per_hour: Decimal | None = None
    cost_per_day: Decimal | None = None
    cost_per_month: Decimal | None = None
    simulated: bool = False


class BootResult(BaseModel):
    instance: InstanceView
    offer: Offer | None
    replayed: bool = False                  # same idempotency key: the first boot's result
    ready: bool = False
    overrides: dict[str, str] = Field(default_factory=dict)
    price_note: str | None = None
    simulated: bool = False


class StartResult(BaseModel):
    instance: InstanceView
    ready: bool
    waited_s: float
    simulated: bool = False


class StopResult(BaseModel):
    instance: InstanceView
    session_cost: Decimal
    session_s: int
    storage_dph: Decimal
    simulated: bool = False


class DestroyResult(BaseModel):
    instance: InstanceView
    total_cost: Decimal
    simulated: bool = False


class StatusResult(BaseModel):
    instances: list[InstanceView]
    run_rate: Decimal
    include_ended: bool = False
    stale: dict[str, str] = Field(default_factory=dict)   # provider -> why its states could not be refreshed
    simulated: bool = False


class KeepResult(BaseModel):
    instance: InstanceView
    until: datetime
    simulated: bool = False


class BudgetUse(BaseModel):
    scope: str                      # team | user
    name: str
    limit: Decimal
    spent: Decimal
    hard_cap: bool = False

    @property
    def fraction(self) -> Decimal:
        return self.spent / self.limit if self.limit else Decimal(0)


class CostReport(BaseModel):
    period: str
    start: datetime
    end: datetime
    group_by: str
    total: Decimal
    groups: list[tuple[str, Decimal]]
    running: list[InstanceView]
    run_rate: Decimal
    month_to_date: Decimal
    projected_month_end: Decimal
    budgets: list[BudgetUse]
    simulated: bool = False


class InstanceCost(BaseModel):
    """Per-instance cost analysis (SPEC §6)."""

    instance: InstanceView
    hourly: Decimal
    total: Decimal
    compute: Decimal
    storage: Decimal
    uptime_s: int
    projected_day: Decimal
    projected_month: Decimal
    simulated: bool = False


class AuditEntry(BaseModel):
    ts: datetime
    actor: str
    source: str
    event: str
    instance_id: str | None
    cost: Decimal | None
    ok: bool
    details: dict[str, Any]


class AuditResult(BaseModel):
    events: list[AuditEntry]


class BudgetResult(BaseModel):
    budgets: list[BudgetUse]
    changed: BudgetUse | None = None
    period: str = ""


class GuardOverview(BaseModel):
    """The scheduler's state for `gpuherd guards` / `/gpu guards`."""

    leader: str | None
    last_run_at: datetime | None
    last_pass_ms: float | None
    last_checked: int
    last_acted: int
    next_wake_at: datetime | None
    last_error: str | None
    budgets_checked_at: datetime | None
    upcoming: list[InstanceView]            # instances with a guard action coming, soonest first
    blind: list[InstanceView]               # instances a guard could not check
    simulated: bool = False


class UnmanagedView(BaseModel):
    provider: str
    provider_id: str
    label: str | None
    state: str
    gpu_name: str
    num_gpus: int
    dph: Decimal
    new: bool = False               # first seen by this reconcile (admins were just told)


class ReconcileResult(BaseModel):
    providers: list[str]
    checked: dict[str, int] = Field(default_factory=dict)       # provider -> machines it listed
    adopted: list[str] = Field(default_factory=list)            # instance ids now tracked
    lost: list[str] = Field(default_factory=list)               # gone at the provider; billing closed
    failed_intents: list[str] = Field(default_factory=list)     # boots that never reached the provider
    unmanaged: list[UnmanagedView] = Field(default_factory=list)
    failed: dict[str, str] = Field(default_factory=dict)        # provider -> why it was not listed
    simulated: bool = False


class AttachResult(BaseModel):
    instance: InstanceView
    simulated: bool = False
