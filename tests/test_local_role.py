"""The configured local role applies every time, not only when the terminal's user is first seen:
an admin who sets GPUHERD_LOCAL_ROLE=viewer gets a terminal that cannot boot (and the reverse)."""

from __future__ import annotations

from pathlib import Path

import pytest

from gpuherd.core.config import Settings
from gpuherd.core.errors import PermissionDenied
from gpuherd.core.models import Role
from gpuherd.core.service import GpuService


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
async def test_the_local_role_follows_the_configuration(tmp_path: Path, db_url: str) -> None:
    def service(role: str) -> GpuService:
        return GpuService.from_settings(Settings(home=tmp_path / "home", database_url=db_url,
                                                 local_user="alice", local_role=role))

    first = service("admin")
    try:
        assert first.local_actor().role is Role.ADMIN
    finally:
        await first.aclose()
    second = service("viewer")                  # the same user, already in the database as admin
    try:
        me = second.local_actor()
        assert me.role is Role.VIEWER
        with pytest.raises(PermissionDenied):
            await second.boot(me, "budget")
        with pytest.raises(PermissionDenied):
            await second.set_budget(me, "team", "ml", "100")
    finally:
        await second.aclose()
    third = service("member")
    try:
        assert third.local_actor().role is Role.MEMBER
    finally:
        await third.aclose()
