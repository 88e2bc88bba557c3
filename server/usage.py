"""The usage ledger: one row per request that reached a worker, never a commit per request.

Interactive requests (chat, completions, embeddings, `/inference/batch` items) hand their row to
the ledger as they end: it is appended to this front's journal (server.ledger_journal: one
write, no commit) before the answer's last byte, and one writer task commits what gathered once
a second, in one transaction. A front SIGKILLed before its commit leaves its journal, and the
next front on its data directory replays it, so a request the client saw answered keeps its
row. Durable work (async tasks, Batch API lines) does not come here: its row is written in the
same transaction as its outcome (server.store, server.batch_store). Every row carries its
request id, unique in the table, so writing one twice is a no-op whoever does it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import trio

from server import ledger_journal
from server.ledger_journal import Journal, Segment
from server.store import utcnow

log = logging.getLogger("cohort.usage")

FLUSH_EVERY_S = 1.0
MAX_PENDING = 200_000  # rows kept while the store is down; beyond it, the oldest commit waits on
# the journal alone (still replayed by a later front), and the front says so


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
    """Journals rows as they come and commits them once a second."""

    def __init__(self, store, enabled: bool = True, journal_dir: str | Path | None = None,
                 front_id: str = "front") -> None:
        self.store = store
        self.enabled = enabled  # COHORT_USAGE_LEDGER
        self.journal_dir = journal_dir
        self._journal = (Journal(journal_dir, front_id)
                         if enabled and journal_dir is not None else None)
        self._pending: list[dict[str, Any]] = []
        self._unwritten: list[tuple[Segment | None, list[dict[str, Any]]]] = []
        self.written = 0

    def record(self, row: dict[str, Any]) -> None:
        """Journal a row and queue it for the next commit; never waits on the store."""
        if not self.enabled:
            return
        if self._journal is not None:
            self._journal.append(row)
        self._pending.append(row)

    async def run(self, *, task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        await self.replay()  # what fronts that died on this data directory left
        task_status.started()
        try:
            while True:
                await trio.sleep(FLUSH_EVERY_S)
                await self.flush()
                await self.replay()
        finally:
            with trio.move_on_after(5) as bounded:  # stopping: what gathered still counts
                bounded.shield = True
                await self.flush()
                if self._journal is not None and not self._unwritten:
                    self._journal.close()

    async def flush(self) -> None:
        """Commit what gathered (one transaction per group), then drop its journal segment; a
        group the store refused waits for the next flush, its segment kept."""
        if self._pending:
            segment = self._journal.rotate() if self._journal is not None else None
            self._unwritten.append((segment, self._pending))
            self._pending = []
        while self._unwritten:
            segment, rows = self._unwritten[0]
            try:
                await self.store.run(self.store.add_usage, rows)
            except Exception:  # the store is down: keep serving, keep the rows, say so
                log.exception("could not write %d usage rows; retrying in %g s (they are kept "
                              "in the journal meanwhile)", len(rows), FLUSH_EVERY_S)
                self._bound()
                return
            self._unwritten.pop(0)
            self.written += len(rows)
            if segment is not None:
                Journal.drop(segment)

    def _bound(self) -> None:
        """Memory stays bounded in a long outage: the oldest groups are left to the journal."""
        while sum(len(rows) for _, rows in self._unwritten) > MAX_PENDING:
            segment, rows = self._unwritten.pop(0)
            log.error("the store has been down long: %d usage rows wait in the journal %s, to "
                      "be replayed once it is back", len(rows), segment.path if segment else "-")
            if segment is not None:  # unlocked: a replay (this front's or another's) takes it
                os.close(segment.fd)

    async def replay(self) -> None:
        """Commit the journals that fronts which died left on this data directory."""
        if self.journal_dir is None or not self.enabled:
            return
        for segment, rows in await trio.to_thread.run_sync(ledger_journal.orphans,
                                                           self.journal_dir):
            try:
                if rows:
                    await self.store.run(self.store.add_usage, rows)
            except Exception:
                log.exception("could not replay the ledger journal %s; it is tried again",
                              segment.path)
                os.close(segment.fd)
                return
            log.info("replayed %d usage rows a stopped front left in %s", len(rows), segment.path)
            Journal.drop(segment)
