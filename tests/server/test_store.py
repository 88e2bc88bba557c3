"""The store on a real SQLite file: schema, credentials, task lifecycle, retention."""

import datetime
import sqlite3

import trio

from server.auth import digest
from server.store import SchemaVersion, Store, Task, utcnow


def make(tmp_path) -> Store:
    store = Store(f"sqlite:///{tmp_path}/sub/cohort.db")
    store.create_schema()
    return store


def test_schema_is_created_in_wal_mode_once_with_a_version(tmp_path):
    store = make(tmp_path)
    store.create_schema()  # idempotent
    with store.db.connection_context():
        assert [row.version for row in SchemaVersion.select()] == [1]
    assert sqlite3.connect(tmp_path / "sub/cohort.db").execute("pragma journal_mode").fetchone()[0] == "wal"


def test_tokens_expire_revoke_and_die_with_a_disabled_user(tmp_path):
    store = make(tmp_path)
    with store.db.connection_context():
        user = store.add_user("alice", "hash")
        store.add_token(user, digest("live"), "api_key")
        store.add_token(user, digest("old"), "access", utcnow() - datetime.timedelta(seconds=1))
        assert store.user_for_token(digest("live")) == (user.id, "alice")
        assert store.user_for_token(digest("old")) is None
        assert store.user_for_token(digest("never")) is None
        store.set_disabled("alice", True)
        assert store.user_for_token(digest("live")) is None
        assert store.purge_expired_tokens() == 1


def test_task_lifecycle_and_a_cancel_that_wins_over_a_late_result(tmp_path):
    store = make(tmp_path)
    with store.db.connection_context():
        alice, bob = store.add_user("alice", "h"), store.add_user("bob", "h")
        store.add_tasks([("t1", alice.id, "completion", {"prompt": "x"}),
                         ("t2", alice.id, "chat", {"messages": []})])
        store.task_started("t1")
        assert store.task_of(alice.id, "t1")["status"] == "running"
        assert store.task_of(bob.id, "t1") is None  # another user's task does not exist for you
        assert store.task_finished("t2", "cancelled", None, {"message": "by client"})
        assert not store.task_finished("t2", "completed", {"late": True})
        assert store.task_of(alice.id, "t2")["result"] is None
        assert [t[0] for t in store.unfinished_tasks()] == ["t1"]
        assert store.tasks_of(alice.id, "cancelled", 10, 0)["total"] == 1


def test_retention_purges_only_old_finished_tasks(tmp_path):
    store = make(tmp_path)
    with store.db.connection_context():
        user = store.add_user("alice", "h")
        store.add_tasks([("old", user.id, "completion", {}), ("new", user.id, "completion", {}),
                         ("open", user.id, "completion", {})])
        store.task_finished("old", "completed", {})
        store.task_finished("new", "completed", {})
        Task.update(finished_at=utcnow() - datetime.timedelta(days=8)).where(Task.id == "old").execute()
        assert store.purge_tasks(7 * 86400) == 1
        assert {t.id for t in Task.select()} == {"new", "open"}


async def test_queries_run_in_threads_concurrently_without_losing_writes(tmp_path):
    store = make(tmp_path)
    user = await store.run(store.add_user, "alice", "h")

    async def write(i: int):
        await store.run(store.add_task, f"t{i}", user.id, "completion", {"i": i})

    async with trio.open_nursery() as nursery:
        for i in range(200):
            nursery.start_soon(write, i)
    assert (await store.run(store.tasks_of, user.id, None, 1, 0))["total"] == 200
