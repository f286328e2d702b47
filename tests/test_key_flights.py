"""Concurrent requests with one API key whose cache entry ran out share one database lookup."""

from __future__ import annotations

import asyncio

from gpuherd.core.auth import Role


async def test_concurrent_lookups_of_one_key_share_one_unit_of_work(service, admin, monkeypatch):
    created = await service.create_key(admin, "api:dash", role="viewer")
    units = []
    original = service.db.run

    async def counted(fn):
        units.append(fn)
        return await original(fn)
    monkeypatch.setattr(service.db, "run", counted)
    actors = await asyncio.gather(*(service.actor_for_key(created.key) for _ in range(50)))
    assert len(units) == 1
    assert {a.principal for a in actors} == {"api:dash"} and all(a.role is Role.VIEWER for a in actors)
