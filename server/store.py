"""Users, tokens and tasks in peewee models, and every query, each run in a worker thread.

SQLite by default (a WAL-mode file under the data directory, created on first start); any database
peewee knows by `DATABASE_URL` (PostgreSQL when several fronts share one store). Secrets are never
stored: passwords as bcrypt hashes, tokens and API keys as SHA-256 digests.
"""

from __future__ import annotations

import datetime
import json
import os
from collections.abc import Callable
from typing import Any, TypeVar

import peewee
import trio
from playhouse.db_url import connect

SCHEMA_VERSION = 1
T = TypeVar("T")

database = peewee.DatabaseProxy()


def utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)


class BaseModel(peewee.Model):
    class Meta:
        database = database


class SchemaVersion(BaseModel):
    """The schema version this store was created or last migrated at."""

    version = peewee.IntegerField()


class User(BaseModel):
    username = peewee.CharField(unique=True, max_length=64)
    password_hash = peewee.CharField(max_length=100)
    disabled = peewee.BooleanField(default=False)
    created_at = peewee.DateTimeField(default=utcnow)


class Token(BaseModel):
    """A bearer credential: an access token from /token (expires) or an API key (until revoked)."""

    user = peewee.ForeignKeyField(User, backref="tokens", on_delete="CASCADE")
    digest = peewee.CharField(unique=True, max_length=64)
    kind = peewee.CharField(max_length=16)  # access | api_key
    name = peewee.CharField(default="", max_length=64)
    created_at = peewee.DateTimeField(default=utcnow)
    expires_at = peewee.DateTimeField(null=True)
    revoked = peewee.BooleanField(default=False)


class Task(BaseModel):
    """One async inference request and its outcome."""

    id = peewee.CharField(primary_key=True, max_length=40)
    user = peewee.ForeignKeyField(User, backref="tasks", on_delete="CASCADE")
    status = peewee.CharField(max_length=16, index=True)  # queued|running|completed|failed|cancelled
    kind = peewee.CharField(max_length=16)
    request = peewee.TextField()
    result = peewee.TextField(null=True)
    error = peewee.TextField(null=True)
    attempts = peewee.IntegerField(default=0)
    created_at = peewee.DateTimeField(default=utcnow, index=True)
    started_at = peewee.DateTimeField(null=True)
    finished_at = peewee.DateTimeField(null=True)


MODELS = [SchemaVersion, User, Token, Task]
FINAL = ("completed", "failed", "cancelled")


def task_view(task: Task) -> dict[str, Any]:
    """A task as the API shows it."""
    def stamp(value):
        return value.replace(tzinfo=datetime.timezone.utc).isoformat() if value else None

    return {"id": task.id, "status": task.status, "kind": task.kind,
            "created_at": stamp(task.created_at), "started_at": stamp(task.started_at),
            "finished_at": stamp(task.finished_at), "attempts": task.attempts,
            "request": json.loads(task.request),
            "result": json.loads(task.result) if task.result else None,
            "error": json.loads(task.error) if task.error else None}


class Store:
    """The database and its queries; call the `a*` coroutines from trio, never the sync ones."""

    def __init__(self, url: str) -> None:
        if url.startswith("sqlite:///"):
            folder = os.path.dirname(url.removeprefix("sqlite:///"))
            if folder:
                os.makedirs(folder, exist_ok=True)
        self.url = url
        self.db = connect(url)
        if isinstance(self.db, peewee.SqliteDatabase):
            # WAL: readers never wait for the writer; busy_timeout: writers queue instead of failing
            self.db.init(self.db.database, pragmas={"journal_mode": "wal", "foreign_keys": 1,
                                                    "busy_timeout": 10_000, "synchronous": 1})
        database.initialize(self.db)
        self.limiter = trio.CapacityLimiter(8)

    def create_schema(self) -> None:
        """Create missing tables and record the schema version; safe to run at every start."""
        with self.db.connection_context():
            self.db.create_tables(MODELS, safe=True)
            if not SchemaVersion.select().exists():
                SchemaVersion.create(version=SCHEMA_VERSION)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run one store call in a worker thread; each thread keeps its own open connection."""
        def call():
            self.db.connect(reuse_if_open=True)
            return fn(*args)
        return await trio.to_thread.run_sync(call, limiter=self.limiter)

    # --- users and tokens -------------------------------------------------------------------

    def add_user(self, username: str, password_hash: str) -> User:
        return User.create(username=username, password_hash=password_hash)

    def user_named(self, username: str) -> User | None:
        return User.get_or_none(User.username == username)

    def set_disabled(self, username: str, disabled: bool) -> bool:
        return User.update(disabled=disabled).where(User.username == username).execute() > 0

    def users(self) -> list[User]:
        return list(User.select().order_by(User.username))

    def add_token(self, user: User | int, digest: str, kind: str,
                  expires_at: datetime.datetime | None = None, name: str = "") -> Token:
        return Token.create(user=user, digest=digest, kind=kind, expires_at=expires_at, name=name)

    def user_for_token(self, digest: str) -> tuple[int, str] | None:
        """(user id, username) for a live token of an enabled user, else None."""
        row = (Token.select(Token, User).join(User)
               .where(Token.digest == digest, Token.revoked == False,  # noqa: E712
                      User.disabled == False)  # noqa: E712
               .first())
        if row is None or (row.expires_at is not None and row.expires_at < utcnow()):
            return None
        return row.user.id, row.user.username

    def purge_expired_tokens(self) -> int:
        return Token.delete().where(Token.expires_at < utcnow()).execute()

    # --- tasks ------------------------------------------------------------------------------

    def add_task(self, task_id: str, user_id: int, kind: str, request: dict) -> None:
        Task.create(id=task_id, user=user_id, status="queued", kind=kind,
                    request=json.dumps(request))

    def add_tasks(self, rows: list[tuple[str, int, str, dict]]) -> None:
        """Many tasks in one transaction (a batch request)."""
        with self.db.atomic():
            for task_id, user_id, kind, request in rows:
                self.add_task(task_id, user_id, kind, request)

    def task_started(self, task_id: str) -> None:
        Task.update(status="running", started_at=utcnow(), attempts=Task.attempts + 1).where(
            Task.id == task_id, Task.status.not_in(FINAL)).execute()

    def task_finished(self, task_id: str, status: str, result: dict | None = None,
                      error: dict | None = None) -> bool:
        """Record an outcome, unless the task already has one (a cancel wins over a late result)."""
        return Task.update(
            status=status, finished_at=utcnow(),
            result=json.dumps(result) if result is not None else None,
            error=json.dumps(error) if error is not None else None,
        ).where(Task.id == task_id, Task.status.not_in(FINAL)).execute() > 0

    def task_of(self, user_id: int, task_id: str) -> dict | None:
        task = Task.get_or_none(Task.id == task_id, Task.user == user_id)
        return task_view(task) if task else None

    def tasks_of(self, user_id: int, status: str | None, limit: int, offset: int) -> dict:
        query = Task.select().where(Task.user == user_id)
        if status:
            query = query.where(Task.status == status)
        total = query.count()
        rows = query.order_by(Task.created_at.desc(), Task.id).limit(limit).offset(offset)
        return {"data": [task_view(t) for t in rows], "total": total, "limit": limit,
                "offset": offset}

    def unfinished_tasks(self) -> list[tuple[str, int, str, dict, int]]:
        rows = Task.select().where(Task.status.in_(("queued", "running"))).order_by(Task.created_at)
        return [(t.id, t.user_id, t.kind, json.loads(t.request), t.attempts) for t in rows]

    def purge_tasks(self, older_than_s: int) -> int:
        cutoff = utcnow() - datetime.timedelta(seconds=older_than_s)
        return Task.delete().where(Task.status.in_(FINAL), Task.finished_at < cutoff).execute()
