"""What service operations return. Every surface renders these; none computes its own figures.

Shaped for an API as much as for chat: every result has a `kind` discriminator, states, scopes
and groupings are enums, lists hold models (never tuples), and lists that can grow (status,
audit, search) take a limit and return `next_cursor` (opaque; None on the last page). Figures a
reader wants per day or per month are computed here once (`per_day`, `per_month`), so no
surface multiplies by 24 on its own. Next steps are typed `Action`s computed for the asking
actor. `simulated` is set whenever the sandbox is involved so every reply can say so."""

from __future__ import annotations

import enum
from datetime import date, datetime
from decimal import Decimal
from typing import Any, Literal

from pydantic import BaseModel, Field

from .actions import Action
from .models import InstanceState
from .money import HOURS_PER_DAY, HOURS_PER_MONTH
from .offers import Offer


class GroupBy(str, enum.Enum):
    USER = "user"
    TEAM = "team"
    TEMPLATE = "template"
    PROVIDER = "provider"


class BudgetScope(str, enum.Enum):
    TEAM = "team"
    USER = "user"


class Phase(str, enum.Enum):
    """Where a long operation is. `healthy` and `failed` are final."""

    ACCEPTED = "accepted"          # the provider took the order; the record exists, billing started
    PROVISIONING = "provisioning"
    LOADING = "loading"
    STARTING = "starting"
    RUNNING = "running"            # the machine runs; its model server is not answering yet
    HEALTHY = "healthy"
    FAILED = "failed"


class Money(BaseModel):
    """A rate with what it comes to per day and per month if it holds."""

    per_hour: Decimal
    per_day: Decimal
    per_month: Decimal

    @classmethod
    def of(cls, per_hour: Decimal) -> Money:
        return cls(per_hour=per_hour, per_day=per_hour * HOURS_PER_DAY, per_month=per_hour * HOURS_PER_MONTH)


class GuardInfo(BaseModel):
    name: str                       # idle | lifetime | stopped
    armed: bool
    detail: str


class Field_(BaseModel):
    label: str
    value: str


class InstanceView(BaseModel):
    kind: Literal["instance"] = "instance"
    id: str
    provider: str
    provider_id: str | None
    owner: str
    team: str
    template: str
    state: InstanceState
    gpu_name: str
    num_gpus: int
    dph: Decimal                    # compute USD/h
    storage_dph: Decimal            # USD/h while stopped
    current_dph: Decimal            # what it costs right now (compute, storage or 0)
    current_per_day: Decimal = Decimal(0)
    accrued: Decimal                # total billed so far
    uptime_s: int | None            # current running session
    idle_for_s: int | None
    keep_until: datetime | None
    endpoint: str | None
    ready: bool = False             # its health check passed this session
    created_at: datetime
    stopped_at: datetime | None
    message: str | None = None
    simulated: bool = False
    next_action: str | None = None          # "stop (idle)"
    next_action_at: datetime | None = None
    guards: list[GuardInfo] = Field(default_factory=list)
    guard_error: str | None = None          # why a guard could not check, shown loudly
    activity: str | None = None             # active | quiet | unknown (last probe)
    activity_detail: str | None = None
    operation_id: str | None = None         # a boot or start still in progress
    actions: list[Action] = Field(default_factory=list)   # what the asking actor may do with it
    observed_at: datetime | None = None     # when `accrued`, `uptime_s` and `idle_for_s` were true

    def accrued_at(self, when: datetime) -> Decimal:
        """What it will have cost by `when` if its current rate holds (a panel's ticking cost):
        the ledger's figure at `observed_at` plus the current rate for the time since."""
        if self.observed_at is None or self.current_dph <= 0:
            return self.accrued
        seconds = max(0, int((when - self.observed_at).total_seconds()))
        return self.accrued + self.current_dph * Decimal(seconds) / 3600


class PriceSource(BaseModel):
    """Where some shown offers' prices came from when not from the live search (a cached price
    list, a table shipped with gpuherd) and when that price was set."""

    provider: str
    source: str
    priced_at: datetime | None = None
    age_s: int | None = None        # how old the price was at the search


class ProviderFailure(BaseModel):
    provider: str
    message: str


class OfferView(BaseModel):
    offer: Offer
    fits: list[str] = Field(default_factory=list)          # templates this offer can boot
    actions: list[Action] = Field(default_factory=list)
    unfit: str | None = None                               # why no template fits (so no Boot action)


class SearchResult(BaseModel):
    kind: Literal["search"] = "search"
    query: str
    description: str
    offers: list[OfferView]
    total_matches: int
    providers: list[str]
    failures: list[ProviderFailure] = Field(default_factory=list)
    price_age_s: int = 0                                        # the oldest provider's
    provider_ages: dict[str, int] = Field(default_factory=dict)  # seconds since each was asked
    price_sources: list[PriceSource] = Field(default_factory=list)  # prices not read live, and from where
    search_disk_gb: int = 50                                    # the disk included in every $/h
    next_cursor: str | None = None
    simulated: bool = False


class TemplateSummary(BaseModel):
    kind: Literal["template_summary"] = "template_summary"
    name: str
    description: str
    model: str | None
    min_gpu_ram: float
    num_gpus: int
    max_dph: Decimal | None
    idle_minutes: float
    source: str = "built-in"
    openai_api: bool = False        # a vLLM server: its endpoint answers the OpenAI API under /v1


def openai_base_url(endpoint: str | None) -> str | None:
    """The base URL an OpenAI client takes for a vLLM machine's endpoint (vLLM serves the
    OpenAI-compatible API under `/v1` of its API port)."""
    if not endpoint:
        return None
    return endpoint.rstrip("/") + "/v1"


class OverrideHelp(BaseModel):
    key: str
    takes: str


class TemplateDetail(BaseModel):
    kind: Literal["template"] = "template"
    summary: TemplateSummary
    fields: list[Field_]
    overrides: list[OverrideHelp]
    actions: list[Action] = Field(default_factory=list)


class TemplateList(BaseModel):
    kind: Literal["templates"] = "templates"
    templates: list[TemplateSummary]


class ConfirmReason(str, enum.Enum):
    PRICE = "price"            # above the template's max $/h
    BUDGET = "budget"          # this month's budget is used up (admins may go on)
    DESTROY = "destroy"        # deletes the disk and everything on it


class Confirmation(BaseModel):
    """Returned (not raised) when an operation needs an explicit yes. The question is stored in
    core: `token` is opaque, bound to this actor, this request and (for a price) the price said
    yes to, and it expires. A surface shows `prompt` with the two actions (confirm, cancel)."""

    kind: Literal["confirmation"] = "confirmation"
    operation: str                  # boot | destroy
    reason: ConfirmReason
    title: str
    prompt: str
    token: str
    expires_at: datetime
    instance_id: str | None = None
    cost: Money | None = None       # the money at stake: what a boot's yes starts paying, a destroy's ends
    actions: list[Action] = Field(default_factory=list)
    simulated: bool = False


class Cancelled(BaseModel):
    """A question answered no: closed, nothing changed."""

    kind: Literal["cancelled"] = "cancelled"
    simulated: bool = False


class ProgressEvent(BaseModel):
    """One step of a long operation, as any surface shows it."""

    kind: Literal["progress"] = "progress"
    operation_id: str
    seq: int
    instance_id: str
    phase: Phase
    provider_state: str | None = None
    elapsed_s: float
    text: str
    at: datetime

    @property
    def final(self) -> bool:
        return self.phase in (Phase.HEALTHY, Phase.FAILED)


class BootResult(BaseModel):
    kind: Literal["boot"] = "boot"
    instance: InstanceView
    offer: Offer | None
    operation_id: str | None = None         # follow it for readiness (None on a replay)
    replayed: bool = False                  # same idempotency key: the first boot's result
    ready: bool = False
    overrides: dict[str, str] = Field(default_factory=dict)
    price_note: str | None = None
    cost: Money | None = None
    simulated: bool = False


class StartResult(BaseModel):
    kind: Literal["start"] = "start"
    instance: InstanceView
    operation_id: str | None = None
    ready: bool
    waited_s: float
    simulated: bool = False


class StopResult(BaseModel):
    kind: Literal["stop"] = "stop"
    instance: InstanceView
    session_cost: Decimal
    session_s: int
    storage: Money                  # what the stopped machine still bills
    simulated: bool = False

    @property
    def storage_dph(self) -> Decimal:
        return self.storage.per_hour


class DestroyResult(BaseModel):
    kind: Literal["destroy"] = "destroy"
    instance: InstanceView
    total_cost: Decimal
    simulated: bool = False


class StatusResult(BaseModel):
    kind: Literal["status"] = "status"
    instances: list[InstanceView]
    total: int                                            # how many match, over all pages
    run_rate: Money
    include_ended: bool = False
    stale: list[ProviderFailure] = Field(default_factory=list)   # providers whose states could not be refreshed
    next_cursor: str | None = None
    actions: list[Action] = Field(default_factory=list)
    simulated: bool = False


class KeepResult(BaseModel):
    kind: Literal["keep"] = "keep"
    instance: InstanceView
    until: datetime
    simulated: bool = False


class ActivityResult(BaseModel):
    kind: Literal["activity"] = "activity"
    instance: InstanceView


class BudgetUse(BaseModel):
    kind: Literal["budget_use"] = "budget_use"
    scope: BudgetScope
    name: str
    limit: Decimal
    spent: Decimal
    hard_cap: bool = False

    @property
    def fraction(self) -> Decimal:
        return self.spent / self.limit if self.limit else Decimal(0)

    @property
    def percent(self) -> int:
        return int((self.fraction * 100).to_integral_value())


class CostGroup(BaseModel):
    key: str
    amount: Decimal


class DailySpend(BaseModel):
    day: date                       # a UTC day of the report's period
    amount: Decimal


class ProviderBalance(BaseModel):
    """An account balance a provider reports (vast.ai's credit, RunPod's balance), beside what
    gpuherd bills there now: `hours_left` is balance / run_rate (None while nothing bills there)."""

    provider: str
    balance: Decimal
    run_rate: Decimal
    hours_left: Decimal | None = None
    checked_at: datetime


class CostReport(BaseModel):
    kind: Literal["costs"] = "costs"
    period: str
    start: datetime
    end: datetime
    group_by: GroupBy
    total: Decimal
    groups: list[CostGroup]
    running: list[InstanceView]     # the costliest billing now (at most a screenful)
    running_count: int = 0          # how many bill now in all
    run_rate: Money
    month_to_date: Decimal
    projected_month_end: Decimal
    budgets: list[BudgetUse]
    daily: list[DailySpend] = Field(default_factory=list)   # spend per UTC day of the period, up to today
    balances: list[ProviderBalance] = Field(default_factory=list)   # provider credit, where reported
    simulated: bool = False
    current: bool = True            # the period includes now: run-rate and projection apply to it


class InstanceCost(BaseModel):
    """Per-instance cost analysis (SPEC §6)."""

    kind: Literal["instance_cost"] = "instance_cost"
    instance: InstanceView
    hourly: Money
    total: Decimal
    compute: Decimal
    storage: Decimal
    uptime_s: int
    simulated: bool = False


class AuditEntry(BaseModel):
    kind: Literal["audit_event"] = "audit_event"
    id: int
    ts: datetime
    actor: str
    source: str
    event: str
    instance_id: str | None
    cost: Decimal | None
    ok: bool
    details: dict[str, Any]


class AuditResult(BaseModel):
    kind: Literal["audit"] = "audit"
    events: list[AuditEntry]
    next_cursor: str | None = None


class BudgetResult(BaseModel):
    kind: Literal["budgets"] = "budgets"
    budgets: list[BudgetUse]
    changed: BudgetUse | None = None
    period: str = ""


class GuardOverview(BaseModel):
    """The scheduler's state for `gpuherd guards` / `/gpu guards`."""

    kind: Literal["guards"] = "guards"
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
    kind: Literal["unmanaged"] = "unmanaged"
    provider: str
    provider_id: str
    label: str | None
    state: str
    gpu_name: str
    num_gpus: int
    dph: Decimal
    new: bool = False               # first seen by this reconcile (admins were just told)
    actions: list[Action] = Field(default_factory=list)


class ReconcileResult(BaseModel):
    kind: Literal["reconcile"] = "reconcile"
    providers: list[str]
    checked: dict[str, int] = Field(default_factory=dict)       # provider -> machines it listed
    adopted: list[str] = Field(default_factory=list)            # instance ids now tracked
    lost: list[str] = Field(default_factory=list)               # gone at the provider; billing closed
    failed_intents: list[str] = Field(default_factory=list)     # boots that never reached the provider
    unmanaged: list[UnmanagedView] = Field(default_factory=list)
    failed: list[ProviderFailure] = Field(default_factory=list)  # providers that could not be listed
    simulated: bool = False


class AttachResult(BaseModel):
    kind: Literal["attach"] = "attach"
    instance: InstanceView
    simulated: bool = False


class UserView(BaseModel):
    kind: Literal["user"] = "user"
    principal: str
    role: str
    team: str


class KeyView(BaseModel):
    """An API key as anyone may see it: never the key itself."""

    kind: Literal["key"] = "key"
    id: str
    principal: str
    name: str
    role: str | None                  # the most the key may do; None: its user's role
    created_by: str
    created_at: datetime
    last_used_at: datetime | None = None
    revoked_at: datetime | None = None


class CreatedKey(BaseModel):
    """The one answer that holds the key in clear: shown once, stored only as a hash."""

    kind: Literal["key.created"] = "key.created"
    key: str
    view: KeyView
