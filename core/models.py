"""Database records (SQLModel). Schema changes go through alembic (core/migrations), never
create_all, so SQLite and PostgreSQL deployments upgrade the same way.

Money columns are integer micro-dollars (see core.money); ledger times are epoch seconds so
period clipping is plain integer arithmetic in SQL on both databases."""

from __future__ import annotations

import enum
from datetime import datetime

from sqlalchemy import BigInteger, Column, DateTime, Index, Text, UniqueConstraint, text
from sqlmodel import Field, SQLModel


def _ts(**kw) -> Column:
    return Column(DateTime(timezone=True), **kw)


class InstanceState(str, enum.Enum):
    PENDING = "pending"             # intent written, provider not yet called (or call in flight)
    PROVISIONING = "provisioning"
    LOADING = "loading"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"
    STARTING = "starting"
    DESTROYING = "destroying"       # our destroy call is in flight
    DESTROYED = "destroyed"
    FAILED = "failed"               # provider refused the create; nothing billed
    ERROR = "error"                 # provider reports an error state
    LOST = "lost"                   # gone at the provider without us destroying it

    @property
    def is_final(self) -> bool:
        return self in (InstanceState.DESTROYED, InstanceState.FAILED, InstanceState.LOST)

    @property
    def is_up(self) -> bool:
        return self in (InstanceState.PROVISIONING, InstanceState.LOADING, InstanceState.RUNNING,
                        InstanceState.STARTING)


class Role(str, enum.Enum):
    VIEWER = "viewer"
    MEMBER = "member"
    ADMIN = "admin"

    @property
    def rank(self) -> int:
        return {"viewer": 0, "member": 1, "admin": 2}[self.value]


class Instance(SQLModel, table=True):
    __tablename__ = "instances"

    id: str = Field(primary_key=True, max_length=16)        # g-7f3a: what users type
    idempotency_key: str = Field(max_length=200, sa_column_kwargs={"unique": True})
    provider: str = Field(max_length=32, index=True)
    provider_id: str | None = Field(default=None, max_length=128, index=True)
    offer_id: str | None = Field(default=None, max_length=128)
    owner: str = Field(max_length=128, index=True)
    team: str = Field(max_length=64, index=True)
    template: str = Field(max_length=64)
    state: str = Field(max_length=16, index=True)
    gpu_name: str = Field(default="", max_length=64)
    num_gpus: int = 0
    dph_micros: int = Field(default=0, sa_type=BigInteger)           # compute USD/h x 1e6
    storage_dph_micros: int = Field(default=0, sa_type=BigInteger)   # USD/h x 1e6 while stopped
    disk_gb: float = 0
    endpoint: str | None = Field(default=None, max_length=512)
    simulated: bool = False
    overrides: str = Field(default="{}", sa_type=Text)                # JSON of validated overrides
    status_message: str | None = Field(default=None, max_length=512)
    created_at: datetime = Field(sa_column=_ts(nullable=False))
    updated_at: datetime = Field(sa_column=_ts(nullable=False))
    started_at: datetime | None = Field(default=None, sa_column=_ts())     # start of current session
    stopped_at: datetime | None = Field(default=None, sa_column=_ts())
    destroyed_at: datetime | None = Field(default=None, sa_column=_ts())
    last_activity_at: datetime | None = Field(default=None, sa_column=_ts())
    keep_until: datetime | None = Field(default=None, sa_column=_ts())      # /gpu keep snooze
    version: int = 0                                                       # bumped on every change

    # guards: settings copied from the template (and boot overrides) at boot
    idle_window_s: int = Field(default=1800, sa_column_kwargs={"server_default": "1800"})
    warn_lead_s: int = Field(default=300, sa_column_kwargs={"server_default": "300"})
    idle_action: str = Field(default="stop", max_length=8,                 # stop | destroy
                             sa_column_kwargs={"server_default": "stop"})
    max_lifetime_s: int | None = None
    destroy_after_stopped_s: int | None = None
    # guards: state, all in the database so a restart loses nothing
    next_guard_at: datetime | None = Field(default=None, sa_column=_ts(index=True))
    idle_warned_at: datetime | None = Field(default=None, sa_column=_ts())
    lifetime_warned_at: datetime | None = Field(default=None, sa_column=_ts())
    stopped_warned_at: datetime | None = Field(default=None, sa_column=_ts())
    guard_checked_at: datetime | None = Field(default=None, sa_column=_ts())
    guard_error: str | None = Field(default=None, max_length=512)          # why a guard could not check
    activity_status: str | None = Field(default=None, max_length=8)        # active | quiet | unknown
    activity_detail: str | None = Field(default=None, max_length=256)
    metrics_sample: str | None = Field(default=None, sa_type=Text)         # last vLLM counters (JSON)
    # what the boot asked for (template, offer, provider, overrides), hashed: the same idempotency
    # key with another request is refused instead of answering with this machine
    request_hash: str | None = Field(default=None, max_length=64)
    ready_at: datetime | None = Field(default=None, sa_column=_ts())       # health check passed (this session)

    @property
    def state_enum(self) -> InstanceState:
        return InstanceState(self.state)


class BillingSegment(SQLModel, table=True):
    """One stretch of one charge at one rate. Owner, team, template and provider are copied in so
    a month's costs by any group are one indexed scan, with no join."""

    __tablename__ = "billing_segments"
    __table_args__ = (
        Index("ix_segments_period", "start_ts", "end_ts"),
        Index("ix_segments_open", "instance_id", "end_ts"),
        Index("ix_segments_end", "end_ts"),
        # the open segments only (a few thousand however long the ledger), with every column a
        # cost report reads from them: the roll-up's remainder and the run-rate never touch the table
        Index("ix_segments_open_cover", "end_ts", "start_ts", "rate_micros", "kind", "owner", "team", "template", "provider",
              sqlite_where=text("end_ts IS NULL"), postgresql_where=text("end_ts IS NULL")),
    )

    id: int | None = Field(default=None, primary_key=True)
    instance_id: str = Field(max_length=16, index=True)
    kind: str = Field(max_length=16)                   # compute | storage
    rate_micros: int = Field(sa_type=BigInteger)       # USD/h x 1e6
    start_ts: int = Field(sa_type=BigInteger)          # epoch seconds, inclusive
    end_ts: int | None = Field(default=None, sa_type=BigInteger)  # None while open
    owner: str = Field(max_length=128)
    team: str = Field(max_length=64)
    template: str = Field(max_length=64)
    provider: str = Field(max_length=32)


class CostRollup(SQLModel, table=True):
    """Closed billing summed per UTC day and per month for each group (and per day over all groups:
    grain 'total', tags empty, for the daily chart), in micro-dollar-seconds
    (rate_micros x seconds, exact integers). `Ledger.close` adds to it in the same transaction as
    the segment it closes (an upsert that adds), so two processes closing segments at once both
    land and a rolled-back close leaves no trace. Open segments are never in it: a report adds
    them from `billing_segments` (few rows, through ix_segments_open_cover). The composite primary key
    is the lookup order (grain, start): a month is one key range, a week seven days of ranges."""

    __tablename__ = "cost_rollup"
    __table_args__ = {"sqlite_with_rowid": False}

    grain: str = Field(primary_key=True, max_length=5)           # day | month | total (a day, tags '')
    start_ts: int = Field(primary_key=True, sa_type=BigInteger, sa_column_kwargs={"autoincrement": False})
    kind: str = Field(primary_key=True, max_length=16)
    owner: str = Field(primary_key=True, max_length=128)
    team: str = Field(primary_key=True, max_length=64)
    template: str = Field(primary_key=True, max_length=64)
    provider: str = Field(primary_key=True, max_length=32)
    amount: int = Field(default=0, sa_type=BigInteger)            # USD x 1e6 x seconds


class AuditEvent(SQLModel, table=True):
    __tablename__ = "audit_events"

    id: int | None = Field(default=None, primary_key=True)
    ts: datetime = Field(sa_column=_ts(nullable=False, index=True))
    actor: str = Field(max_length=128, index=True)
    source: str = Field(max_length=32)                 # shell, cli, slack, discord, api, notebook, system
    event: str = Field(max_length=64)                  # boot, stop, destroy, budget.set, ...
    instance_id: str | None = Field(default=None, max_length=16, index=True)
    cost_micros: int | None = Field(default=None, sa_type=BigInteger)
    ok: bool = True
    details: str = Field(default="{}", sa_type=Text)   # JSON; never secrets


class Budget(SQLModel, table=True):
    __tablename__ = "budgets"
    __table_args__ = (UniqueConstraint("scope", "name"),)

    id: int | None = Field(default=None, primary_key=True)
    scope: str = Field(max_length=8)                   # team | user
    name: str = Field(max_length=128)
    monthly_micros: int = Field(sa_type=BigInteger)
    hard_cap: bool = False
    updated_by: str = Field(max_length=128)
    updated_at: datetime = Field(sa_column=_ts(nullable=False))


class Activity(SQLModel, table=True):
    __tablename__ = "activity"
    __table_args__ = (Index("ix_activity_instance_ts", "instance_id", "ts"),)

    id: int | None = Field(default=None, primary_key=True)
    instance_id: str = Field(max_length=16)
    ts: datetime = Field(sa_column=_ts(nullable=False))
    source: str = Field(max_length=32)                 # ping, keep, heartbeat, metrics, gpu
    detail: str | None = Field(default=None, max_length=256)


class User(SQLModel, table=True):
    __tablename__ = "users"

    principal: str = Field(primary_key=True, max_length=128)   # local:alice, slack:U123, discord:42
    display_name: str = Field(default="", max_length=128)
    role: str = Field(max_length=8)
    team: str = Field(max_length=64)
    created_at: datetime = Field(sa_column=_ts(nullable=False))


class BudgetAlert(SQLModel, table=True):
    """One row per budget, month and threshold crossed: the unique key is what makes each
    warning go out exactly once, even with several processes checking."""

    __tablename__ = "budget_alerts"
    __table_args__ = (UniqueConstraint("scope", "name", "period", "threshold"),)

    id: int | None = Field(default=None, primary_key=True)
    scope: str = Field(max_length=8)
    name: str = Field(max_length=128)
    period: str = Field(max_length=7)                  # YYYY-MM
    threshold: int                                     # 50, 80, 100
    spent_micros: int = Field(sa_type=BigInteger)
    created_at: datetime = Field(sa_column=_ts(nullable=False))


class SchedulerState(SQLModel, table=True):
    """What the guard scheduler did last, readable by `gpuherd guards` from any process."""

    __tablename__ = "scheduler_state"

    name: str = Field(primary_key=True, max_length=32)
    leader: str | None = Field(default=None, max_length=128)   # host:pid holding the lock
    last_run_at: datetime | None = Field(default=None, sa_column=_ts())
    last_pass_ms: float | None = None
    last_checked: int = 0
    last_acted: int = 0
    next_wake_at: datetime | None = Field(default=None, sa_column=_ts())
    last_error: str | None = Field(default=None, max_length=512)
    budgets_checked_at: datetime | None = Field(default=None, sa_column=_ts())


class ActionRecord(SQLModel, table=True):
    """Result of a mutating action by its idempotency key: a retried chat delivery or a
    double-clicked button gets the first result back instead of acting twice."""

    __tablename__ = "action_records"

    key: str = Field(primary_key=True, max_length=200)
    action: str = Field(max_length=32)
    actor: str = Field(max_length=128)
    instance_id: str | None = Field(default=None, max_length=16)
    fingerprint: str | None = Field(default=None, max_length=64)   # hash of the request the key was used for
    result: str = Field(sa_type=Text)                  # JSON of the result object
    created_at: datetime = Field(sa_column=_ts(nullable=False))


class UnmanagedInstance(SQLModel, table=True):
    """A machine a provider lists that gpuherd does not manage and that carries no gpuherd label:
    created by hand in the console, or by another tool. Reconcile reports each one to admins once
    (it may be someone's forgotten GPU) and keeps the row so the report is not repeated."""

    __tablename__ = "unmanaged_instances"
    __table_args__ = (UniqueConstraint("provider", "provider_id"),)

    id: int | None = Field(default=None, primary_key=True)
    provider: str = Field(max_length=32)
    provider_id: str = Field(max_length=128)
    label: str | None = Field(default=None, max_length=256)
    state: str = Field(max_length=16)
    gpu_name: str = Field(default="", max_length=64)
    num_gpus: int = 0
    dph_micros: int = Field(default=0, sa_type=BigInteger)
    first_seen_at: datetime = Field(sa_column=_ts(nullable=False))
    last_seen_at: datetime = Field(sa_column=_ts(nullable=False))
    reported_at: datetime | None = Field(default=None, sa_column=_ts())
    gone_at: datetime | None = Field(default=None, sa_column=_ts())         # no longer listed


class NoticeRecord(SQLModel, table=True):
    """A notice (warning, ready, stopped, budget) in the durable outbox, written in the same
    transaction as the change it reports. Who receives it is decided when it is written: one
    `NoticeDelivery` per surface and destination."""

    __tablename__ = "notices"

    id: int | None = Field(default=None, primary_key=True)
    kind: str = Field(max_length=48)                   # instance.ready, guard.warn_idle, budget.threshold, ...
    level: str = Field(default="info", max_length=8)   # info | warning | error
    text: str = Field(sa_type=Text)
    created_at: datetime = Field(sa_column=_ts(nullable=False, index=True))
    instance_id: str | None = Field(default=None, max_length=16, index=True)
    owner: str | None = Field(default=None, max_length=128)
    team: str | None = Field(default=None, max_length=64)
    actor: str | None = Field(default=None, max_length=128)   # who caused it (never told twice)
    simulated: bool = False
    actions: str = Field(default="[]", sa_type=Text)   # JSON list of typed actions (core.actions)


class NoticeDelivery(SQLModel, table=True):
    """One notice to one destination on one surface. A deliverer claims a row with a lease
    (`claimed_until`), sends, then sets `delivered_at`: a process killed between the two may send
    that notice again when the lease runs out, never lose it."""

    __tablename__ = "notice_deliveries"
    __table_args__ = (UniqueConstraint("notice_id", "surface", "target"),
                      Index("ix_deliveries_due", "surface", "delivered_at", "next_attempt_at"))

    id: int | None = Field(default=None, primary_key=True)
    notice_id: int = Field(index=True)
    surface: str = Field(max_length=16)                # shell | slack | discord | api | notebook
    target: str = Field(max_length=160)                # user:<principal> | team:<team> | admins
    attempts: int = 0
    next_attempt_at: datetime = Field(sa_column=_ts(nullable=False))
    claimed_by: str | None = Field(default=None, max_length=128)
    claimed_until: datetime | None = Field(default=None, sa_column=_ts())
    delivered_at: datetime | None = Field(default=None, sa_column=_ts())
    expires_at: datetime | None = Field(default=None, sa_column=_ts())
    gave_up_at: datetime | None = Field(default=None, sa_column=_ts())
    last_error: str | None = Field(default=None, max_length=512)


class ConfirmationRecord(SQLModel, table=True):
    """A question waiting for a yes (a boot above the price limit or past a budget, a destroy).
    Only the token's hash is stored; secret arguments are sealed (encrypted), never plain text."""

    __tablename__ = "confirmations"

    token_hash: str = Field(primary_key=True, max_length=64)
    actor: str = Field(max_length=128, index=True)
    operation: str = Field(max_length=32)              # boot | destroy
    reason: str = Field(max_length=16)                 # price | budget | destroy
    instance_id: str | None = Field(default=None, max_length=16)
    args: str = Field(default="{}", sa_type=Text)      # JSON of the request, secrets masked
    sealed: str | None = Field(default=None, sa_type=Text)    # encrypted JSON of the secret arguments
    accepted_dph_micros: int | None = Field(default=None, sa_type=BigInteger)   # the price said yes to
    created_at: datetime = Field(sa_column=_ts(nullable=False))
    expires_at: datetime = Field(sa_column=_ts(nullable=False, index=True))
    used_at: datetime | None = Field(default=None, sa_column=_ts())
    result: str | None = Field(default=None, sa_type=Text)    # JSON of what the yes did (a replayed yes gets it)


class OperationRecord(SQLModel, table=True):
    """Long work (a boot, a start) after the provider accepted it: the readiness watcher moves it
    to succeeded (healthy) or failed, writing progress events any process can follow."""

    __tablename__ = "operations"

    id: str = Field(primary_key=True, max_length=32)
    kind: str = Field(max_length=16)                   # boot | start
    instance_id: str = Field(max_length=16, index=True)
    actor: str = Field(max_length=128)
    state: str = Field(max_length=16, index=True)      # running | succeeded | failed
    phase: str = Field(max_length=16)                  # accepted | provisioning | loading | healthy | failed
    message: str | None = Field(default=None, max_length=512)
    created_at: datetime = Field(sa_column=_ts(nullable=False))
    updated_at: datetime = Field(sa_column=_ts(nullable=False))
    deadline_at: datetime = Field(sa_column=_ts(nullable=False))   # health timeout
    finished_at: datetime | None = Field(default=None, sa_column=_ts())
    last_seq: int = 0


class OperationEvent(SQLModel, table=True):
    __tablename__ = "operation_events"
    __table_args__ = (UniqueConstraint("operation_id", "seq"),)

    id: int | None = Field(default=None, primary_key=True)
    operation_id: str = Field(max_length=32, index=True)
    seq: int
    at: datetime = Field(sa_column=_ts(nullable=False))
    phase: str = Field(max_length=16)
    provider_state: str | None = Field(default=None, max_length=16)
    elapsed_s: float = 0
    text: str = Field(max_length=512)


class ApiKeyRecord(SQLModel, table=True):
    """A per-user API key for `gpuherd serve`. Only a hash of the key is kept: the key itself is
    shown once, when it is created. `role` caps what the key may do below its user's role."""

    __tablename__ = "api_keys"

    id: str = Field(primary_key=True, max_length=16)            # the public part, e.g. k1a2b3c4d
    principal: str = Field(max_length=128, index=True)
    name: str = Field(default="", max_length=64)
    role: str | None = Field(default=None, max_length=8)
    secret_hash: str = Field(max_length=64)                     # sha256 of the whole key, hex
    created_by: str = Field(max_length=128)
    created_at: datetime = Field(sa_column=_ts(nullable=False))
    last_used_at: datetime | None = Field(default=None, sa_column=_ts())
    revoked_at: datetime | None = Field(default=None, sa_column=_ts())
