"""The store on a real SQLite file and a real PostgreSQL server: schema, credentials, task
lifecycle, leases, retention, reconnects."""

import datetime
import os
import sqlite3

import peewee
import pytest
import trio

from server.auth import digest
from server.store import SCHEMA_VERSION, SchemaVersion, Store, Task, utcnow

T0 = datetime.datetime(2026, 1, 1, 12, 0, 0)
LEASE = datetime.timedelta(seconds=15)


def make(url: str) -> Store:
    store = Store(url)
    store.create_schema()
    return store


def test_sqlite_schema_is_created_in_wal_mode_once_with_a_version(tmp_path):
    store = make(f"sqlite:///{tmp_path}/sub/cohort.db")
    store.create_schema()  # idempotent
    with store.db.connection_context():
        assert [row.version for row in SchemaVersion.select()] == [SCHEMA_VERSION]
    assert sqlite3.connect(tmp_path / "sub/cohort.db").execute("pragma journal_mode").fetchone()[0] == "wal"


def test_the_sqlite_files_are_readable_by_their_owner_only(tmp_path):
    """Every prompt of every task and batch is in them: 0600, WAL and shared memory too."""
    old = tmp_path / "old.db"
    old.touch(mode=0o644)
    for path in (tmp_path / "new" / "cohort.db", old):
        store = make(f"sqlite:///{path}")
        with store.db.connection_context():
            store.add_user("alice", "h")
            files = [path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")]
            assert {oct(os.stat(f).st_mode & 0o777) for f in files} == {"0o600"}, path
    assert oct(os.stat(tmp_path / "new").st_mode & 0o777) == "0o700"


def test_a_version_1_store_gains_the_later_columns_and_keeps_its_rows(tmp_path):
    path = tmp_path / "old.db"
    old = sqlite3.connect(path)
    old.executescript("""
        CREATE TABLE schemaversion (id INTEGER PRIMARY KEY, version INTEGER NOT NULL);
        INSERT INTO schemaversion (version) VALUES (1);
        CREATE TABLE user (id INTEGER PRIMARY KEY, username VARCHAR(64) UNIQUE NOT NULL,
            password_hash VARCHAR(100) NOT NULL, disabled INTEGER NOT NULL, created_at DATETIME NOT NULL);
        INSERT INTO user VALUES (1, 'alice', 'h', 0, '2026-01-01 00:00:00');
        CREATE TABLE token (id INTEGER PRIMARY KEY, user_id INTEGER NOT NULL, digest VARCHAR(64)
            UNIQUE NOT NULL, kind VARCHAR(16) NOT NULL, name VARCHAR(64) NOT NULL, created_at
            DATETIME NOT NULL, expires_at DATETIME, revoked INTEGER NOT NULL);
        INSERT INTO token VALUES (1, 1, 'd1', 'api_key', '', '2026-01-01 00:00:00', NULL, 0);
        CREATE TABLE task (id VARCHAR(40) PRIMARY KEY, user_id INTEGER NOT NULL, status VARCHAR(16)
            NOT NULL, kind VARCHAR(16) NOT NULL, request TEXT NOT NULL, result TEXT, error TEXT,
            attempts INTEGER NOT NULL, created_at DATETIME NOT NULL, started_at DATETIME,
            finished_at DATETIME);
        INSERT INTO task VALUES ('t1', 1, 'running', 'completion', '{}', NULL, NULL, 1,
            '2026-01-01 00:00:00', NULL, NULL);
    """)
    old.commit()
    store = make(f"sqlite:///{path}")
    with store.db.connection_context():
        assert SchemaVersion.select().first().version == SCHEMA_VERSION == 5
        owner = store.user_for_token("d1")  # a user of old is a user, its key may use any model
        assert (owner.username, owner.role, owner.models) == ("alice", "user", None)
        [claimed] = store.claim_lapsed("front-a", T0, T0 + LEASE, 10)  # no lease: free to take
        assert claimed.id == "t1" and claimed.attempts == 1


def test_tokens_expire_revoke_and_die_with_a_disabled_user(database_url):
    store = make(database_url)
    with store.db.connection_context():
        user = store.add_user("alice", "hash")
        store.add_token(user, digest("live"), "api_key")
        store.add_token(user, digest("old"), "access", utcnow() - datetime.timedelta(seconds=1))
        live = store.add_token(user, digest("live2"), "api_key")
        found = store.user_for_token(digest("live"))
        assert (found.user_id, found.username, found.role, found.models) == (
            user.id, "alice", "user", None)
        store.set_limits(f"key:{live.id}", rpm=5)
        store.set_limits(f"user:{user.id}", tpm=100, weight=2.0)
        found = store.user_for_token(digest("live2"))
        assert found.key_id == live.id and found.limits[f"key:{live.id}"]["rpm"] == 5
        assert found.limits[f"user:{user.id}"] == {"rpm": 0, "tpm": 100, "concurrency": 0,
                                               "tokens_per_day": 0, "weight": 2.0,
                                               "priority": "interactive"}
        assert store.user_for_token(digest("old")) is None
        assert store.user_for_token(digest("never")) is None
        store.set_disabled("alice", True)
        assert store.user_for_token(digest("live")) is None
        assert store.purge_expired_tokens() == 1


def test_task_lifecycle_and_a_cancel_that_wins_over_a_late_result(database_url):
    store = make(database_url)
    with store.db.connection_context():
        alice, bob = store.add_user("alice", "h"), store.add_user("bob", "h")
        store.add_tasks([("t1", alice.id, "completion", {"prompt": "x"}),
                         ("t2", alice.id, "chat", {"messages": []})], "front-a", T0 + LEASE)
        assert store.task_started("t1", "front-a")
        assert store.task_of(alice.id, "t1")["status"] == "running"
        assert store.task_of(bob.id, "t1") is None  # another user's task does not exist for you
        assert store.task_finished("t2", "cancelled", None, {"message": "by client"})
        assert not store.task_finished("t2", "completed", {"late": True}, None, "front-a")
        assert store.task_of(alice.id, "t2")["result"] is None
        assert store.renew_leases("front-a", T0 + 2 * LEASE) == {"t1"}
        assert store.tasks_of(alice.id, "cancelled", 10, 0)["total"] == 1


def test_a_live_lease_is_left_alone_and_a_lapsed_one_is_taken_by_exactly_one_front(database_url):
    store = make(database_url)
    with store.db.connection_context():
        user = store.add_user("alice", "h")
        store.add_tasks([(f"t{i}", user.id, "completion", {}) for i in range(4)],
                        "front-a", T0 + LEASE)
        store.task_started("t0", "front-a")
        assert store.claim_lapsed("front-b", T0 + LEASE / 2, T0 + 2 * LEASE, 10) == []
        # front-a stops renewing; after its lease two fronts try at once: each task goes to one
        later = T0 + LEASE + datetime.timedelta(seconds=1)
        won_b = store.claim_lapsed("front-b", later, later + LEASE, 3)
        won_c = store.claim_lapsed("front-c", later, later + LEASE, 10)
        assert [t.id for t in won_b] == ["t0", "t1", "t2"] and [t.id for t in won_c] == ["t3"]
        assert all(task.lease_lapsed for task in won_b + won_c)  # counted for the alert
        assert won_b[0].attempts == 1  # t0 ran once on front-a
        # the old owner wakes up: its result no longer counts, the new owner's does
        assert not store.task_finished("t0", "completed", {"by": "a"}, None, "front-a")
        assert store.renew_leases("front-a", later + LEASE) == set()
        assert store.task_started("t0", "front-b")
        assert store.task_finished("t0", "completed", {"by": "b"}, None, "front-b")
        assert store.task_of(user.id, "t0")["result"] == {"by": "b"}
        assert store.task_of(user.id, "t0")["attempts"] == 2


def test_a_released_lease_is_free_at_once(database_url):
    store = make(database_url)
    with store.db.connection_context():
        user = store.add_user("alice", "h")
        store.add_tasks([("t1", user.id, "completion", {})], "front-a", T0 + LEASE)
        assert store.release_leases("front-a", ["t1"]) == 1
        [claimed] = store.claim_lapsed("front-b", T0, T0 + LEASE, 10)
        assert claimed.id == "t1" and not claimed.lease_lapsed  # handed back: a drain, no alert


def test_retention_purges_only_old_finished_tasks(database_url):
    store = make(database_url)
    with store.db.connection_context():
        user = store.add_user("alice", "h")
        store.add_tasks([("old", user.id, "completion", {}), ("new", user.id, "completion", {}),
                         ("open", user.id, "completion", {})])
        store.task_finished("old", "completed", {})
        store.task_finished("new", "completed", {})
        Task.update(finished_at=utcnow() - datetime.timedelta(days=8)).where(Task.id == "old").execute()
        assert store.purge_tasks(7 * 86400) == 1
        assert {t.id for t in Task.select()} == {"new", "open"}


async def test_queries_run_in_threads_concurrently_without_losing_writes(database_url):
    store = make(database_url)
    user = await store.run(store.add_user, "alice", "h")

    async def write(i: int):
        await store.run(store.add_tasks, [(f"t{i}", user.id, "completion", {"i": i})])

    async with trio.open_nursery() as nursery:
        for i in range(200):
            nursery.start_soon(write, i)
    assert (await store.run(store.tasks_of, user.id, None, 1, 0))["total"] == 200


async def test_a_postgresql_restart_costs_a_reconnect_not_a_failed_call(postgres, tmp_path):
    import pgserver

    data = tmp_path / "pg"
    server = pgserver.get_server(data, cleanup_mode="stop")
    store = make(server.get_uri())
    user = await store.run(store.add_user, "alice", "h")
    assert (await store.run(store.user_named, "alice")).id == user.id
    server.cleanup()  # the server stops; the store's pooled connections are now dead
    server = pgserver.get_server(data, cleanup_mode="stop")
    try:
        assert (await store.run(store.user_named, "alice")).id == user.id
        await store.run(store.add_tasks, [("t1", user.id, "completion", {})], "front-a",
                        T0 + LEASE)
        assert await store.run(store.renew_leases, "front-a", T0 + 2 * LEASE) == {"t1"}
    finally:
        server.cleanup()
    with pytest.raises(peewee.OperationalError):  # down for good: the call fails, and says so
        await store.run(store.user_named, "alice")


def test_the_usage_ledger_sums_per_user_and_groups(database_url):
    store = make(database_url)
    with store.db.connection_context():
        alice, bob = store.add_user("alice", "h"), store.add_user("bob", "h")
        row = {"route": "chat", "status": 200, "queue_s": 0.0, "ttft_s": 0.1, "total_s": 0.2}
        store.add_usage([
            {**row, "at": T0, "user_id": alice.id, "key_id": 1, "model": "a",
             "prompt_tokens": 10, "completion_tokens": 5, "request_id": "r1", "username": "alice"},
            {**row, "at": T0 + datetime.timedelta(days=1), "user_id": alice.id, "key_id": 2,
             "model": "b", "prompt_tokens": 1, "completion_tokens": 1, "request_id": "r2",
             "username": "alice"},
            {**row, "at": T0, "user_id": bob.id, "key_id": 3, "model": "a",
             "prompt_tokens": 100, "completion_tokens": 100, "request_id": "r3",
             "username": "bob"}])
        week = (T0 - LEASE, T0 + datetime.timedelta(days=7))
        mine = store.usage_of(alice.id, *week, "day")
        assert (mine["requests"], mine["prompt_tokens"], mine["completion_tokens"]) == (2, 11, 6)
        assert [b["day"] for b in mine["buckets"]] == ["2026-01-01", "2026-01-02"]
        assert store.usage_of(alice.id, T0, T0 + LEASE, None)["requests"] == 1
        by_model = store.usage_of(None, *week, "model")["buckets"]
        assert by_model[0] == {"model": "a", "requests": 2, "prompt_tokens": 110,
                               "completion_tokens": 105}


def _usage(user_id: int, username: str, request_id: str, tokens: int = 1) -> dict:
    return {"at": T0, "request_id": request_id, "user_id": user_id, "username": username,
            "key_id": 0, "model": "m", "route": "chat", "status": 200, "prompt_tokens": tokens,
            "completion_tokens": tokens, "queue_s": 0.0, "ttft_s": None, "total_s": 0.1}


def test_a_ledger_row_written_twice_is_one_row(database_url):
    """Rows are keyed by request id: a rerun after a crash cannot double a request's row."""
    store = make(database_url)
    with store.db.connection_context():
        store.add_usage([_usage(1, "alice", "job-1"), _usage(1, "alice", "job-2")])
        store.add_usage([_usage(1, "alice", "job-1", tokens=99)])
        week = (T0 - LEASE, T0 + datetime.timedelta(days=7))
        assert store.usage_of(1, *week, None) == {"requests": 2, "prompt_tokens": 2,
                                                   "completion_tokens": 2}


def _own_everything(store: Store, user, tag: str) -> None:
    """Give a user one row of every kind a user can own."""
    from server.batch_store import BatchLine, File, FileChunk
    key = store.add_token(user, digest(f"key-{tag}"), "api_key", name=tag)
    store.set_limits(f"user:{user.id}", rpm=5)
    store.set_limits(f"key:{key.id}", tpm=50)
    store.sync_limit_counts("front-a", [{"subject": f"user:{user.id}", "requests": 1,
                                         "tokens": 1, "in_flight": 0, "day": None,
                                         "day_tokens": 0, "requests_left": None,
                                         "tokens_left": None}], T0, [], T0)
    store.add_tasks([(f"task-{tag}", user.id, "chat", {"messages": []})])
    upload = File(id=f"file-{tag}", user_id=user.id, purpose="batch", filename="in.jsonl",
                  bytes=3, lines=1, sha256="x")
    store.begin_file(upload)
    store.add_file_chunk(f"file-{tag}", 0, 1, "{}\n")
    store.finish_file(upload)
    store.add_batch({"id": f"batch-{tag}", "user_id": user.id, "key_id": key.id,
                     "endpoint": "/v1/chat/completions", "input_file_id": f"file-{tag}",
                     "completion_window": "24h", "status": "in_progress", "expires_at": T0})
    store.add_batch_lines([{"batch_id": f"batch-{tag}", "line": 1, "custom_id": "c",
                            "status": "queued", "request": "{}"}])
    store.add_usage([_usage(user.id, user.username, f"req-{tag}")])
    assert BatchLine.select().count() and FileChunk.select().count()


def test_nothing_survives_its_owner_but_its_ledger_rows(database_url):
    """Walk every table of the store: after a user is removed no row points at it (by user
    id, limit subject, file or batch), except its ledger rows, which keep its name; its id is
    never given to the next user, who sees none of its data."""
    from server.store import MODELS, Token, Usage, User
    from server.batch_store import Batch, File
    store = make(database_url)
    with store.db.connection_context():
        alice, bob = store.add_user("alice", "h"), store.add_user("bob", "h")
        _own_everything(store, alice, "a")
        _own_everything(store, bob, "b")
        before = {model: model.select().count() for model in MODELS}
        keys = [f"key:{t.id}" for t in Token.select().where(Token.user == alice.id)]
        files = {f.id for f in File.select().where(File.user_id == alice.id)}
        batches = {b.id for b in Batch.select().where(Batch.user_id == alice.id)}
        store.remove_user(store.user_named("alice"))

        def owned(name: str, value) -> bool:
            return ((name in ("user", "user_id") and value == alice.id)
                    or (name == "subject" and value in (f"user:{alice.id}", *keys))
                    or (name in ("file_id", "input_file_id") and value in files)
                    or (name == "batch_id" and value in batches))

        for model in MODELS:
            if model in (Usage, User):
                continue
            for row in model.select().dicts():
                survivors = [name for name, value in row.items() if owned(name, value)]
                assert not survivors, f"{model.__name__} row {row} survived its owner"
            if model in (File, Batch):
                assert not model.select().where(model.id.in_(files | batches)).exists()
        tombstone = User.get_by_id(alice.id)
        assert (tombstone.username, tombstone.disabled, tombstone.password_hash) == (
            f"removed:{alice.id}", True, "!")
        assert store.users() == [store.user_named("bob")]
        for model, count in before.items():  # bob lost nothing
            if model not in (Usage, User):
                assert model.select().count() == count // 2 or model.select().count() == count - (
                    count // 2), model.__name__

        again = store.add_user("alice", "h2")
        assert again.id > bob.id > alice.id  # never reused
        assert store.files_of(again.id, None, 20, None)["data"] == []
        assert store.batches_of(again.id, 20, None)["data"] == []
        week = (T0 - LEASE, T0 + datetime.timedelta(days=7))
        assert store.usage_of(again.id, *week, None)["requests"] == 0
        by_user = store.usage_of(None, *week, "user")["buckets"]
        assert sorted(b["user"] for b in by_user) == ["alice", "bob"]  # billed by the old name


def test_disabling_a_user_stops_its_queued_tasks_and_running_batches(database_url):
    from server.store import Task
    store = make(database_url)
    with store.db.connection_context():
        alice, bob = store.add_user("alice", "h"), store.add_user("bob", "h")
        _own_everything(store, alice, "a")
        _own_everything(store, bob, "b")
        store.update_user(alice, disabled=True)
        task = Task.get_by_id("task-a")
        assert task.status == "cancelled" and "disabled" in task.error
        batch = store.batch_of(None, "batch-a")
        assert batch.status == "cancelling" and "user_disabled" in batch.errors
        assert Task.get_by_id("task-b").status == "queued"
        assert store.batch_of(None, "batch-b").status == "in_progress"


def test_an_upload_is_hidden_until_whole_and_a_stalled_one_is_purged(database_url):
    from server.batch_store import File, FileChunk
    store = make(database_url)
    with store.db.connection_context():
        alice = store.add_user("alice", "h")
        upload = File(id="file-up", user_id=alice.id, purpose="batch", filename="in.jsonl",
                      bytes=3, lines=1, sha256="x")
        store.begin_file(upload)
        store.add_file_chunk("file-up", 0, 1, "{}\n")
        assert store.file_of(alice.id, "file-up") is None  # still being written
        assert store.files_of(alice.id, None, 20, None)["data"] == []
        assert store.purge_stalled_uploads(T0) == 0  # not stalled yet
        assert store.purge_stalled_uploads(utcnow() + LEASE) == 1  # its front died
        assert not FileChunk.select().where(FileChunk.file_id == "file-up").exists()
        store.begin_file(upload)
        store.finish_file(upload)
        assert store.file_of(alice.id, "file-up").purpose == "batch"
