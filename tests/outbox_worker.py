"""A notice deliverer in a process of its own, for tests/test_outbox.py: it delivers the shell
surface's notices for OUTBOX_TARGET by appending each notice id as a line to OUTBOX_OUT (one
write, then fsync, then a pause before the delivered mark, the window a kill is most likely to
hit) until it is killed.

Environment: OUTBOX_DB_URL, OUTBOX_OUT, OUTBOX_TARGET, OUTBOX_IDENTITY, OUTBOX_LEASE_S,
OUTBOX_PAUSE_S."""

from __future__ import annotations

import asyncio
import os

from gpuherd.core.clock import Clock
from gpuherd.core.db import Database
from gpuherd.core.outbox import DeliveredNotice, Deliverer


async def main() -> None:
    db = Database(os.environ["OUTBOX_DB_URL"])
    out = os.open(os.environ["OUTBOX_OUT"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    pause = float(os.environ.get("OUTBOX_PAUSE_S", "0"))

    async def send(notice: DeliveredNotice) -> None:
        os.write(out, f"{notice.notice_id}\n".encode())
        os.fsync(out)
        await asyncio.sleep(pause)

    deliverer = Deliverer(db, Clock(), surface="shell", targets={os.environ["OUTBOX_TARGET"]}, send=send,
                          identity=os.environ.get("OUTBOX_IDENTITY", "worker"),
                          lease_s=float(os.environ.get("OUTBOX_LEASE_S", "1")), poll_s=0.05, batch=20)
    await deliverer.run(asyncio.Event())


if __name__ == "__main__":
    asyncio.run(main())
