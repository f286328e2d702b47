"""cost rollup

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03

`cost_rollup`: closed billing summed per UTC day and per month for each (kind, owner, team,
template, provider), and per day over all of them, in micro-dollar-seconds, so `/gpu costs` and the budget check at boot read
a few thousand rows instead of scanning a month of segments. `Ledger.close` keeps it from now on;
this revision fills it from the segments already closed. The arithmetic is written out here, not
imported from the ledger, so this revision keeps meaning what it meant when the ledger changes.
On SQLite the table is WITHOUT ROWID: rows are stored in primary-key order, so a month or a week
is one contiguous range. `ix_segments_open_cover` is a partial index of the open segments holding
every column a report reads from them, so the part of a report the roll-up cannot hold (what is
still accruing) is an index-only read of a few thousand entries.
"""
from datetime import UTC, datetime

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None

DAY_S = 86400
BATCH = 5000


def _month_start(day: int, cache: dict[int, int]) -> int:
    if day not in cache:
        d = datetime.fromtimestamp(day, UTC)
        cache[day] = int(d.replace(day=1, hour=0, minute=0, second=0, microsecond=0).timestamp())
    return cache[day]


def _backfill() -> None:
    bind = op.get_bind()
    segments = sa.table('billing_segments', *(sa.column(c) for c in (
        'kind', 'owner', 'team', 'template', 'provider', 'rate_micros', 'start_ts', 'end_ts')))
    rollup = sa.table('cost_rollup', *(sa.column(c) for c in (
        'grain', 'start_ts', 'kind', 'owner', 'team', 'template', 'provider', 'amount')))
    acc: dict[tuple, int] = {}
    months: dict[int, int] = {}
    result = bind.execute(sa.select(segments).where(segments.c.end_ts.is_not(None)))
    while rows := result.fetchmany(BATCH):
        for kind, owner, team, template, provider, rate, start, end in rows:
            tags = (kind, owner, team, template, provider)
            day = start - start % DAY_S
            while day < end:
                amount = rate * (min(end, day + DAY_S) - max(start, day))
                if amount:
                    for key in (('day', day, *tags), ('month', _month_start(day, months), *tags),
                                ('total', day, '', '', '', '', '')):
                        acc[key] = acc.get(key, 0) + amount
                day += DAY_S
    names = ('grain', 'start_ts', 'kind', 'owner', 'team', 'template', 'provider')
    out = [{**dict(zip(names, key, strict=True)), 'amount': amount} for key, amount in acc.items()]
    for i in range(0, len(out), BATCH):
        bind.execute(rollup.insert(), out[i:i + BATCH])


def upgrade() -> None:
    op.create_table('cost_rollup',
    sa.Column('grain', sqlmodel.sql.sqltypes.AutoString(length=5), nullable=False),
    sa.Column('start_ts', sa.BigInteger(), autoincrement=False, nullable=False),
    sa.Column('kind', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
    sa.Column('owner', sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
    sa.Column('team', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('template', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('provider', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
    sa.Column('amount', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('grain', 'start_ts', 'kind', 'owner', 'team', 'template', 'provider'),
    sqlite_with_rowid=False,
    )
    with op.batch_alter_table('billing_segments', schema=None) as batch_op:
        batch_op.create_index('ix_segments_open_cover',
                              ['end_ts', 'start_ts', 'rate_micros', 'kind', 'owner', 'team', 'template', 'provider'],
                              unique=False, sqlite_where=sa.text('end_ts IS NULL'),
                              postgresql_where=sa.text('end_ts IS NULL'))
    _backfill()


def downgrade() -> None:
    with op.batch_alter_table('billing_segments', schema=None) as batch_op:
        batch_op.drop_index('ix_segments_open_cover')
    op.drop_table('cost_rollup')
