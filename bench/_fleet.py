"""Building large fleets for the benchmarks: booting thousands of machines through the service
takes minutes, so a few are booted for real and the rest are copies of them. The copies' sandbox
records go in through the sandbox's bulk hook (`SandboxProvider._state(write=True)`)."""

from __future__ import annotations

import copy
import uuid
from typing import Any

import _path  # noqa: F401

from gpuherd.core.auth import Actor
from gpuherd.core.ids import new_instance_id
from gpuherd.core.models import Instance
from gpuherd.core.service import MAX_PAGE, GpuService


def clone_instance(model: Instance, state: dict[str, Any], taken: set[str], **fields: Any) -> tuple[Instance, dict]:
    """A copy of a booted instance under a new gpuherd id, provider id and idempotency key, with
    its sandbox record copied into `state` (the sandbox's state dict) so the simulated provider
    knows the machine. `fields` override the copied row's values. Returns (row, sandbox record)."""
    data = model.model_dump()
    number = int(state["next_id"])
    state["next_id"] = number + 1
    pid = f"sbx-{number:06d}"
    key = f"gh-{uuid.uuid4().hex}"
    data.update(id=new_instance_id(taken), idempotency_key=key, provider_id=pid,
                endpoint=(model.endpoint or "").replace(model.provider_id or "?", pid) or None,
                version=1, keep_until=None)
    data.update(fields)
    inst = Instance(**data)
    taken.add(inst.id)
    record = copy.deepcopy(state["instances"][model.provider_id])
    record.update(provider_id=pid, label=key)
    state["instances"][pid] = record
    return inst, record


async def settle(svc: GpuService, actor: Actor) -> int:
    """Walk `/gpu status` over every live instance (pages of the largest size), so booted rows
    move provisioning -> running as the first status of each would make them. Returns the count."""
    seen = 0
    cursor: str | None = None
    while True:
        page = await svc.status(actor, limit=MAX_PAGE, cursor=cursor)
        seen += len(page.instances)
        cursor = page.next_cursor
        if not cursor:
            return seen
