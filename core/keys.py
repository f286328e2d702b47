"""Per-user API keys for the HTTP API (SPEC §8): created by an admin (`gpuherd keys create`),
shown once, stored as a hash, revoked by id.

Decisions:

- A key reads `ghk_<id>_<secret>`: `id` (9 characters, `k` + 8 hex) is public and names the key
  in lists, audit records and logs; `secret` is 32 random bytes (base64url). The table holds
  sha256 of the whole key: with 256 bits of randomness a fast hash is as safe as a slow one,
  and it lets every request be checked in microseconds. Comparison is constant-time.
- A key's `role` caps what it may do below its user's role (a read-only key for a dashboard);
  the user's role and team still come from the users table, so demoting a user demotes every
  key they hold. Creating a key for an unknown principal records the user with the key's role
  (or the default role).
- Resolved keys are remembered for `CACHE_S` seconds per process, so a burst of requests costs
  one lookup (and concurrent lookups of one key share one); a revoke or a role change therefore
  takes effect within that time on every replica (and at once on the replica that made it). `last_used_at` is written at most once a
  minute per key (cached hits write nothing).
- Nothing here logs, audits or returns the key after `create`; errors name the key id at most.
- The key's user is a principal and its name a label as `core/names.py` defines them, checked
  before anything is written; a revoke's key id is checked for its shape before the lookup
  (a NUL must be a "no such key" on PostgreSQL as on SQLite, not a database error).
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import hmac
import re
import secrets
import time
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import select
from sqlmodel import Session, col

from . import audit as audit_log
from .auth import Actor, Directory
from .clock import Clock, as_utc
from .db import Database
from .errors import InvalidInput, NotFound, Unauthenticated
from .models import ApiKeyRecord, Role, User
from .names import check_key_label, check_principal
from .results import CreatedKey, KeyView
from .text import clip

PREFIX = "ghk_"
CACHE_S = 5.0
TOUCH_EVERY = timedelta(minutes=1)
_SHAPE = re.compile(r"^ghk_(k[0-9a-f]{8})_([A-Za-z0-9_-]{43})$")
_KEY_ID = re.compile(r"k[0-9a-f]{8}")


def _hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def key_id_of(presented: str) -> str | None:
    """The public id in a presented key, or None when it does not look like one of ours."""
    m = _SHAPE.match(presented)
    return m.group(1) if m else None


def view_of(r: ApiKeyRecord) -> KeyView:
    """Times in UTC with their offset: SQLite hands them back naive, and an API answer without
    the offset is not an RFC 3339 date-time."""
    return KeyView(id=r.id, principal=r.principal, name=r.name, role=r.role, created_by=r.created_by,
                   created_at=as_utc(r.created_at), last_used_at=as_utc(r.last_used_at) if r.last_used_at else None,
                   revoked_at=as_utc(r.revoked_at) if r.revoked_at else None)


@dataclass
class _Resolved:
    actor: Actor
    at: float


class KeyStore:
    def __init__(self, db: Database, clock: Clock, directory: Directory) -> None:
        self.db = db
        self.clock = clock
        self.directory = directory
        self._cache: dict[str, _Resolved] = {}
        self._flights: dict[str, asyncio.Future[Actor]] = {}

    async def create(self, actor: Actor, principal: str, *, role: str | None = None, name: str = "") -> CreatedKey:
        actor.require(Role.ADMIN, "creating API keys")
        check_principal(principal)
        if role is not None and role not in {r.value for r in Role}:
            raise InvalidInput(f"Unknown role '{clip(role, 20)}': use viewer, member or admin.")
        check_key_label(name)
        key_id = f"k{secrets.token_hex(4)}"
        key = f"{PREFIX}{key_id}_{secrets.token_urlsafe(32)}"
        now = self.clock.now()

        def work(s: Session) -> KeyView:
            if s.get(User, principal) is None:
                s.add(User(principal=principal, role=role or self.directory.default_role.value,
                           team=self.directory.default_team, created_at=now))
            record = ApiKeyRecord(id=key_id, principal=principal, name=name, role=role, secret_hash=_hash(key),
                                  created_by=actor.principal, created_at=now)
            s.add(record)
            audit_log.record(s, actor, "key.create", now=now, key_id=key_id, principal=principal, role=role,
                             name=name or None)
            s.commit()
            return view_of(record)
        return CreatedKey(key=key, view=await self.db.run(work))

    async def list(self, actor: Actor, *, include_revoked: bool = False) -> list[KeyView]:
        actor.require(Role.ADMIN, "listing API keys")

        def work(s: Session) -> list[KeyView]:
            q = select(ApiKeyRecord).order_by(col(ApiKeyRecord.principal), col(ApiKeyRecord.created_at))
            if not include_revoked:
                q = q.where(col(ApiKeyRecord.revoked_at).is_(None))
            return [view_of(r) for r in s.execute(q).scalars()]
        return await self.db.run(work)

    async def revoke(self, actor: Actor, key_id: str) -> KeyView:
        actor.require(Role.ADMIN, "revoking API keys")
        now = self.clock.now()

        def work(s: Session) -> KeyView:
            r = s.get(ApiKeyRecord, key_id) if _KEY_ID.fullmatch(key_id) else None
            if r is None:
                raise NotFound(f"There is no API key '{clip(key_id, 20)}' (gpuherd keys list shows them).")
            if r.revoked_at is None:
                r.revoked_at = now
                s.add(r)
                audit_log.record(s, actor, "key.revoke", now=now, key_id=r.id, principal=r.principal)
                s.commit()
            return view_of(r)
        view = await self.db.run(work)
        self._cache = {k: v for k, v in self._cache.items() if key_id_of(k) != key_id}
        return view

    async def actor_for(self, presented: str, *, source: str = "api") -> Actor:
        """The actor a presented key speaks for; `Unauthenticated` for anything else."""
        hit = self._cache.get(presented)
        if hit is not None and time.monotonic() - hit.at < CACHE_S:
            return hit.actor
        key_id = key_id_of(presented)
        if key_id is None:
            raise Unauthenticated("That is not a gpuherd API key (they look like ghk_k…_…).")
        now = self.clock.now()

        def work(s: Session) -> Actor:
            r = s.get(ApiKeyRecord, key_id)
            if r is None or not hmac.compare_digest(r.secret_hash, _hash(presented)):
                raise Unauthenticated(f"API key {key_id} is not known here.")
            if r.revoked_at is not None:
                raise Unauthenticated(f"API key {key_id} was revoked.")
            user = self.directory.resolve(s, r.principal, source=source, now=now)
            role = user.role
            if r.role is not None and Role(r.role).rank < role.rank:
                role = Role(r.role)
            last = as_utc(r.last_used_at) if r.last_used_at else None   # SQLite reads it back naive
            if last is None or now - last >= TOUCH_EVERY:
                r.last_used_at = now
                s.add(r)
                s.commit()
            return Actor(principal=user.principal, role=role, team=user.team, source=source,
                         display=user.display)
        # concurrent requests with the same key when its cache entry ran out (a dashboard's
        # burst every CACHE_S) share one lookup instead of queueing a hundred
        flight = self._flights.get(presented)
        if flight is None:
            flight = asyncio.ensure_future(self.db.run(work))
            self._flights[presented] = flight
            flight.add_done_callback(functools.partial(self._landed, presented))
        actor = await asyncio.shield(flight)
        if len(self._cache) > 10_000:
            self._cache.clear()
        self._cache[presented] = _Resolved(actor, time.monotonic())
        return actor

    def _landed(self, presented: str, flight: asyncio.Future[Actor]) -> None:
        self._flights.pop(presented, None)
        if not flight.cancelled():
            flight.exception()   # retrieved: a lookup whose waiters all left must not warn later
