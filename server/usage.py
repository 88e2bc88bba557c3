"""The usage ledger: one row per finished request, written in batches off the request path.

A request's end only puts a row on an in-memory channel; one writer task stores what gathered
every second (or every 500 rows) in one transaction, so 1,000 requests a second are about one
commit a second. Rows still on the channel when the front stops are written on the way out;
a front killed outright loses at most the last second's rows (the ledger is for accounting,
not for billing to the token: say so to whoever bills from it).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import trio

from server.store import utcnow

log = logging.getLogger("cohort.usage")

FLUSH_EVERY_S = 1.0
FLUSH_ROWS = 500


class UsageLedger:
    def __init__(self, store, enabled: bool = True) -> None:
        self.store = store
        self.enabled = enabled  # COHORT_USAGE_LEDGER
        self._send, self._receive = trio.open_memory_channel[dict[str, Any]](math.inf)
        self.written = 0

    def record(self, *, user_id: int, key_id: int, model: str, route: str, status: int,
               prompt_tokens: int, completion_tokens: int, queue_s: float,
               ttft_s: float | None, total_s: float) -> None:
        """Note a finished request; never waits, never touches the store."""
        if not self.enabled:
            return
        self._send.send_nowait({
            "at": utcnow(), "user_id": user_id, "key_id": key_id, "model": model,
            "route": route, "status": status, "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens, "queue_s": round(queue_s, 6),
            "ttft_s": None if ttft_s is None else round(ttft_s, 6), "total_s": round(total_s, 6)})

    async def run(self, *, task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        try:
            while True:
                await trio.sleep(FLUSH_EVERY_S)
                await self.flush()
        finally:
            with trio.move_on_after(5) as bounded:  # stopping: what gathered still counts
                bounded.shield = True
                await self.flush()

    async def flush(self) -> None:
        rows: list[dict[str, Any]] = []
        while True:
            try:
                rows.append(self._receive.receive_nowait())
            except trio.WouldBlock:
                break
        for start in range(0, len(rows), FLUSH_ROWS):
            batch = rows[start:start + FLUSH_ROWS]
            try:
                await self.store.run(self.store.add_usage, batch)
                self.written += len(batch)
            except Exception:  # the store is down: keep serving, say what was lost
                log.exception("could not write %d usage rows; they are lost", len(batch))
