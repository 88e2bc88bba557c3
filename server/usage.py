"""The usage ledger: one row per request that reached a worker, written by group commit.

Interactive requests (chat, completions, embeddings, `/inference/batch` items) hand their row to
the ledger and wait, before the last byte of their answer, until it is committed: one writer
task commits whatever gathered while the previous commit ran, in one transaction, so 1,000
requests a second are a few commits a second, in a worker thread, never on the trio loop. So a
request the client saw answered has its row even if the front is SIGKILLed the next moment.

Durable work (async tasks, Batch API lines) does not come here: its row is written in the same
transaction as its outcome (server.store, server.batch_store), so a crash can neither lose nor
double it. Every row carries its request id, unique in the table, so writing one twice is a
no-op whoever does it.
"""

from __future__ import annotations

import logging
from typing import Any

import trio

from server.store import utcnow

log = logging.getLogger("cohort.usage")

FLUSH_ROWS = 500  # rows in one INSERT
RETRY_S = 1.0  # after a failed write (the store is down), the rows wait and are tried again
MAX_PENDING = 200_000  # rows kept while the store is down; the oldest go beyond it, logged
WAIT_S = 2.0  # the longest an answer waits for its row's commit (the store is slow or down)


def usage_row(*, request_id: str, user_id: int, username: str, key_id: int, model: str,
              route: str, status: int, prompt_tokens: int, completion_tokens: int,
              queue_s: float, ttft_s: float | None, total_s: float) -> dict[str, Any]:
    """One ledger row, as the store writes it."""
    return {"at": utcnow(), "request_id": request_id, "user_id": user_id, "username": username,
            "key_id": key_id, "model": model, "route": route, "status": status,
            "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "queue_s": round(queue_s, 6), "ttft_s": None if ttft_s is None else round(ttft_s, 6),
            "total_s": round(total_s, 6)}


class UsageLedger:
    """Commits rows in groups; `record` never waits, `committed` waits for a row's group."""

    def __init__(self, store, enabled: bool = True) -> None:
        self.store = store
        self.enabled = enabled  # COHORT_USAGE_LEDGER
        self._pending: list[dict[str, Any]] = []
        self._group = trio.Event()  # set once the rows now pending are committed
        self._wake = trio.Event()
        self._unwritten: list[trio.Event] = []  # groups whose commit failed, to be retried
        self.written = 0

    def record(self, row: dict[str, Any]) -> trio.Event | None:
        """Queue a row for the next commit; the event set once it is committed (None when the
        ledger is off). Never waits, never touches the store."""
        if not self.enabled:
            return None
        if len(self._pending) >= MAX_PENDING:
            log.error("the usage ledger holds %d unwritten rows (is the store down?); the "
                      "oldest is dropped", len(self._pending))
            del self._pending[0]
        self._pending.append(row)
        self._wake.set()
        return self._group

    async def committed(self, group: trio.Event | None) -> None:
        """Wait (at most WAIT_S) for a recorded row's commit: an answer is sent once its row is
        safe, yet a store that is down delays answers by at most that much."""
        if group is not None:
            with trio.move_on_after(WAIT_S):
                await group.wait()

    async def run(self, *, task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        try:
            while True:
                await self._wake.wait()
                await self.flush()
        finally:
            with trio.move_on_after(5) as bounded:  # stopping: what gathered still counts
                bounded.shield = True
                await self.flush()

    async def flush(self) -> None:
        """Commit every pending row (in one transaction), then wake those waiting for them; on
        a failure keep them, and try again after RETRY_S."""
        self._wake = trio.Event()
        rows, group = self._pending, self._group
        self._pending, self._group = [], trio.Event()
        waiting, self._unwritten = [*self._unwritten, group], []
        try:
            if rows:
                await self.store.run(self.store.add_usage, rows)
        except Exception:  # the store is down: keep serving, keep the rows, say so
            log.exception("could not write %d usage rows; retrying in %g s", len(rows), RETRY_S)
            self._pending[:0] = rows
            self._unwritten = waiting  # their waiters wait for the retry (at most WAIT_S)
            self._wake.set()
            await trio.sleep(RETRY_S)
            return
        self.written += len(rows)
        for event in waiting:
            event.set()
