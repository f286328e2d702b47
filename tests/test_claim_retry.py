"""A stop, start or destroy whose claim loses to a change that is not a conflict (the readiness
watcher folding the provider's state in bumps the row's version) is claimed again on a fresh
read; a change that is a conflict (someone stopped it meanwhile) still refuses."""

from __future__ import annotations

import pytest
from sqlalchemy import update

from gpuherd.core.errors import Conflict
from gpuherd.core.models import Instance
from gpuherd.core.results import BootResult, StopResult


def _interfere(service, monkeypatch, values):
    """Before the first claim, another writer changes the row (as a concurrent process would)."""
    original = service.lifecycle.claim
    calls = []

    def claim(s, inst, to_state, now):
        if not calls:
            with service.db.session() as other:
                other.execute(update(Instance).where(Instance.id == inst.id)
                              .values(version=Instance.version + 1, **values))
                other.commit()
        calls.append(to_state)
        return original(s, inst, to_state, now)
    monkeypatch.setattr(service.lifecycle, "claim", claim)
    return calls


async def test_a_version_bump_alone_does_not_refuse_a_stop(service, admin, monkeypatch):
    booted = await service.boot(admin, "budget", wait=True)
    assert isinstance(booted, BootResult)
    calls = _interfere(service, monkeypatch, {})
    stopped = await service.stop(admin, booted.instance.id)
    assert isinstance(stopped, StopResult) and len(calls) == 2       # lost once, claimed on the re-read
    assert (await service.view(admin, booted.instance.id)).state.value == "stopped"


async def test_a_real_change_still_refuses(service, admin, monkeypatch):
    booted = await service.boot(admin, "budget", wait=True)
    assert isinstance(booted, BootResult)
    _interfere(service, monkeypatch, {"state": "stopped"})
    with pytest.raises(Conflict, match="already stopped"):
        await service.stop(admin, booted.instance.id)
