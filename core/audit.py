"""The audit trail: who did what, from which surface, to which instance, at what cost.
Details are scrubbed of anything that looks like a secret before they are stored."""

from __future__ import annotations

import json
import re
from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import select
from sqlmodel import Session, col

from .auth import Actor
from .models import AuditEvent
from .money import to_micros

SECRET_KEY_RE = re.compile(r"(token|secret|password|passwd|api[_-]?key|credential|authorization)", re.I)
SECRET_VALUE_RE = re.compile(
    r"(xox[abposr]-[\w-]{10,}|xapp-[\w-]{10,}|AKIA[0-9A-Z]{16}|(?:sk|rpa|hf)_[A-Za-z0-9]{16,}"
    r"|Bearer\s+\S+|-----BEGIN [A-Z ]*PRIVATE KEY-----)")
MASK = "••••"


def scrub(value: Any, key: str = "") -> Any:
    """Replace secret-looking values, recursively. Used for audit details and logs."""
    if key and SECRET_KEY_RE.search(key):
        return MASK
    if isinstance(value, dict):
        return {k: scrub(v, str(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [scrub(v) for v in value]
    if isinstance(value, str):
        return SECRET_VALUE_RE.sub(MASK, value)
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, datetime):
        return value.isoformat()
    return value


def record(session: Session, actor: Actor, event: str, *, now: datetime, instance_id: str | None = None,
           cost: Decimal | None = None, ok: bool = True, **details: Any) -> AuditEvent:
    row = AuditEvent(ts=now, actor=actor.principal, source=actor.source, event=event,
                     instance_id=instance_id, cost_micros=to_micros(cost) if cost is not None else None,
                     ok=ok, details=json.dumps(scrub(details), sort_keys=True, default=str))
    session.add(row)
    return row


def recent(session: Session, limit: int, instance_id: str | None = None) -> list[AuditEvent]:
    stmt = select(AuditEvent).order_by(col(AuditEvent.ts).desc(), col(AuditEvent.id).desc()).limit(limit)
    if instance_id:
        stmt = stmt.where(col(AuditEvent.instance_id) == instance_id)
    return list(session.execute(stmt).scalars())
