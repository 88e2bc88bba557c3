"""The ledger's journal on a real file system: a row is on disk before its answer ends, gone
once committed, and a dead front's rows are replayed once by whichever front comes next."""

import datetime
import os
import stat

import trio

from server.ledger_journal import SUFFIX, Journal
from server.usage import UsageLedger, usage_row


class Store:
    """Commits rows like the real store: keyed by request id (a second write is a no-op)."""

    def __init__(self) -> None:
        self.rows: dict[str, dict] = {}
        self.down = False

    async def run(self, fn, *args):
        return fn(*args)

    def add_usage(self, rows):
        if self.down:
            raise ConnectionError("the store is down")
        for row in rows:
            self.rows.setdefault(row["request_id"], row)


def row(request_id: str) -> dict:
    return usage_row(request_id=request_id, user_id=1, username="alice", key_id=2, model="m",
                     route="chat", status=200, prompt_tokens=3, completion_tokens=4,
                     queue_s=0.0, ttft_s=0.01, total_s=0.02)


def segments(folder) -> list:
    return sorted(p for p in os.listdir(folder) if p.endswith(SUFFIX))


async def test_a_row_is_journaled_at_once_and_dropped_once_committed(tmp_path):
    store = Store()
    ledger = UsageLedger(store, True, tmp_path / "ledger", "front-a")
    ledger.record(row("r1"))
    [name] = segments(tmp_path / "ledger")
    assert b'"request_id":"r1"' in (tmp_path / "ledger" / name).read_bytes()  # before any commit
    assert store.rows == {}
    await ledger.flush()
    assert list(store.rows) == ["r1"] and isinstance(store.rows["r1"]["at"], datetime.datetime)
    assert name not in segments(tmp_path / "ledger")
    folder_mode = stat.S_IMODE(os.stat(tmp_path / "ledger").st_mode)
    file_mode = stat.S_IMODE(os.stat(tmp_path / "ledger" / segments(tmp_path / "ledger")[0]).st_mode)
    assert (folder_mode, file_mode) == (0o700, 0o600)  # prompts' owners and sizes: ours alone


async def test_a_dead_fronts_rows_are_replayed_once_and_a_live_fronts_never(tmp_path):
    folder = tmp_path / "ledger"
    store = Store()
    dead = Journal(folder, "front-a")
    for request_id in ("r1", "r2"):
        dead.append(row(request_id))
    os.close(dead.segment.fd)  # SIGKILLed: its lock goes with it, its file stays
    live = UsageLedger(store, True, folder, "front-b")
    live.record(row("r3"))  # in b's own segment, locked by b
    await live.replay()
    assert sorted(store.rows) == ["r1", "r2"]
    assert len(segments(folder)) == 1  # b's, still waiting for b's commit
    await live.replay()
    assert sorted(store.rows) == ["r1", "r2"]
    await live.flush()
    assert sorted(store.rows) == ["r1", "r2", "r3"]


async def test_rows_the_store_refused_wait_in_memory_and_journal_for_the_next_flush(tmp_path):
    store = Store()
    ledger = UsageLedger(store, True, tmp_path, "front-a")
    ledger.record(row("r1"))
    store.down = True
    await ledger.flush()
    ledger.record(row("r2"))
    await ledger.flush()
    assert store.rows == {} and len(segments(tmp_path)) == 3  # two waiting, one current
    store.down = False
    await ledger.flush()
    assert sorted(store.rows) == ["r1", "r2"] and len(segments(tmp_path)) == 1


async def test_the_ledger_off_keeps_no_journal(tmp_path):
    ledger = UsageLedger(Store(), False, tmp_path / "ledger", "front-a")
    ledger.record(row("r1"))
    await ledger.replay()
    assert not (tmp_path / "ledger").exists()
