"""Users, tokens and tasks in peewee models, and every query, each run in a worker thread.

SQLite by default (a WAL-mode file under the data directory, created on first start); PostgreSQL
by `DATABASE_URL` when several fronts share one store (pooled connections that reconnect after the
server restarts). Secrets are never stored: passwords as bcrypt hashes, tokens and API keys as
SHA-256 digests.

A task row names the front that runs it (`owner`) and until when (`lease_until`), leased as
server.leases says; only the owner may record the outcome.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import peewee
import trio
from peewee import EXCLUDED
from playhouse.db_url import connect, parse
from playhouse.migrate import SchemaMigrator, migrate
from playhouse.pool import PooledPostgresqlDatabase

from server import leases
from server.batch_store import BATCH_MODELS, Batch, BatchLine, BatchQueries, File, FileChunk
from server.db import BaseModel, database, stamp, utcnow

log = logging.getLogger("cohort.store")

# 2: task leases; 3: limits, the usage ledger; 4: roles, keys limited to models; 5: ledger rows
# keyed by request id and named by user, removed users kept as tombstones, a task's key
SCHEMA_VERSION = 5
T = TypeVar("T")

class SchemaVersion(BaseModel):
    """The schema version this store was created or last migrated at."""

    version = peewee.IntegerField()


class User(BaseModel):
    id = peewee.AutoField()  # peewee's own, declared so that the type checker knows it
    username = peewee.CharField(unique=True, max_length=64)
    password_hash = peewee.CharField(max_length=100)
    disabled = peewee.BooleanField(default=False)
    role = peewee.CharField(default="user", max_length=16)  # user | admin
    created_at = peewee.DateTimeField(default=utcnow)
    # a removed user stays as a tombstone (renamed `removed:ID`, no password, disabled), owning
    # nothing, so its id is never given to another user
    removed_at = peewee.DateTimeField(null=True)


class Token(BaseModel):
    """A bearer credential: an access token from /token (expires) or an API key (until revoked)."""

    id = peewee.AutoField()
    user = peewee.ForeignKeyField(User, backref="tokens", on_delete="CASCADE")
    user_id: int  # the key of `user`, as peewee names it
    digest = peewee.CharField(unique=True, max_length=64)
    kind = peewee.CharField(max_length=16)  # access | api_key
    name = peewee.CharField(default="", max_length=64)
    created_at = peewee.DateTimeField(default=utcnow)
    expires_at = peewee.DateTimeField(null=True)
    revoked = peewee.BooleanField(default=False)
    models = peewee.TextField(null=True)  # an API key limited to some models: their JSON list


class Task(BaseModel):
    """One async inference request and its outcome."""

    id = peewee.CharField(primary_key=True, max_length=40)
    user = peewee.ForeignKeyField(User, backref="tasks", on_delete="CASCADE")
    user_id: int
    status = peewee.CharField(max_length=16, index=True)  # queued|running|completed|failed|cancelled
    kind = peewee.CharField(max_length=16)
    key_id = peewee.IntegerField(default=0)  # the API key that submitted it, for the ledger
    request = peewee.TextField()
    result = peewee.TextField(null=True)
    error = peewee.TextField(null=True)
    attempts = peewee.IntegerField(default=0)
    owner = peewee.CharField(null=True, max_length=128, index=True)  # the front that runs it
    lease_until = peewee.DateTimeField(null=True, index=True)
    created_at = peewee.DateTimeField(default=utcnow, index=True)
    started_at = peewee.DateTimeField(null=True)
    finished_at = peewee.DateTimeField(null=True)


class Limit(BaseModel):
    """One user's or one API key's limits (`user:ID`, `key:ID`); 0 means no limit."""

    subject = peewee.CharField(primary_key=True, max_length=40)
    rpm = peewee.IntegerField(default=0)
    tpm = peewee.IntegerField(default=0)
    concurrency = peewee.IntegerField(default=0)
    tokens_per_day = peewee.IntegerField(default=0)
    weight = peewee.FloatField(default=1.0)
    priority = peewee.CharField(default="interactive", max_length=16)


class Usage(BaseModel):
    """One finished request: who, what, how many tokens, how long (the usage ledger)."""

    id = peewee.AutoField()
    at = peewee.DateTimeField(index=True)
    # the request's id, unique: writing a row twice (a rerun after a crash) is a no-op
    request_id = peewee.CharField(null=True, max_length=80)
    user_id = peewee.IntegerField()  # no index of its own: each costs every insert; `at` narrows
    username = peewee.CharField(default="", max_length=64)  # kept for billing after removal
    key_id = peewee.IntegerField(default=0)
    model = peewee.CharField(max_length=200)
    route = peewee.CharField(max_length=16)
    status = peewee.IntegerField()
    prompt_tokens = peewee.IntegerField(default=0)
    completion_tokens = peewee.IntegerField(default=0)
    queue_s = peewee.FloatField(default=0.0)
    ttft_s = peewee.FloatField(null=True)
    total_s = peewee.FloatField(default=0.0)


Usage.add_index(Usage.request_id, unique=True)


class LimitCount(BaseModel):
    """One front's counts of one limited subject, for the other fronts (server/limit_sync.py):
    requests admitted and tokens charged (net of refunds) since the front began counting it,
    in flight now, tokens of `day`, and what its buckets held at `updated_at`."""

    front = peewee.CharField(max_length=128)
    subject = peewee.CharField(max_length=40, index=True)
    requests = peewee.BigIntegerField(default=0)
    tokens = peewee.BigIntegerField(default=0)
    in_flight = peewee.IntegerField(default=0)
    day = peewee.DateField(null=True)
    day_tokens = peewee.BigIntegerField(default=0)
    requests_left = peewee.FloatField(null=True)
    tokens_left = peewee.FloatField(null=True)
    updated_at = peewee.DateTimeField(index=True)

    class Meta:
        primary_key = peewee.CompositeKey("front", "subject")


MODELS = [SchemaVersion, User, Token, Task, Limit, Usage, LimitCount, *BATCH_MODELS]
USAGE_GROUPS = {"model": Usage.model, "route": Usage.route, "key": Usage.key_id,
                "user": Usage.user_id, "day": peewee.fn.substr(peewee.Cast(Usage.at, "text"), 1, 10).coerce(False)}
LIMIT_FIELDS = ("rpm", "tpm", "concurrency", "tokens_per_day", "weight", "priority")
FINAL = ("completed", "failed", "cancelled")
UNFINISHED = ("queued", "running")


@dataclass(frozen=True)
class Claimed:
    """A task a front has just taken the lease of."""

    id: str
    user_id: int
    kind: str
    request: dict
    attempts: int
    key_id: int = 0
    lease_lapsed: bool = False  # its front stopped without handing it back (False: handed back)


@dataclass(frozen=True)
class TokenOwner:
    """Who a live token belongs to, as authentication needs it."""

    user_id: int
    username: str
    role: str
    key_id: int
    models: tuple[str, ...] | None  # None: every model
    limits: dict[str, dict]


@dataclass(frozen=True)
class FrontCount:
    """Another front's counts of one subject, as read by the limit sync."""

    front: str
    subject: str
    requests: int
    tokens: int
    in_flight: int
    day: datetime.date | None
    day_tokens: int
    requests_left: float | None
    tokens_left: float | None
    updated_at: datetime.datetime


def task_view(task: Task) -> dict[str, Any]:
    """A task as the API shows it."""
    return {"id": task.id, "status": task.status, "kind": task.kind,
            "created_at": stamp(task.created_at), "started_at": stamp(task.started_at),
            "finished_at": stamp(task.finished_at), "attempts": task.attempts,
            "request": json.loads(task.request),
            "result": json.loads(task.result) if task.result else None,
            "error": json.loads(task.error) if task.error else None}


class Store(BatchQueries):
    """The database and its queries, each run in a worker thread by `run` from trio."""

    def __init__(self, url: str) -> None:
        if url.startswith("sqlite:///"):
            _private_file(url.removeprefix("sqlite:///"))
        self.url = url
        self.db = _postgres(url) if url.startswith(("postgres://", "postgresql://")) else connect(url)
        if isinstance(self.db, peewee.SqliteDatabase):
            # WAL: readers never wait for the writer; busy_timeout: writers queue instead of failing
            self.db.init(self.db.database, pragmas={"journal_mode": "wal", "foreign_keys": 1,
                                                    "busy_timeout": 10_000, "synchronous": 1})
        database.initialize(self.db)
        self.reconnects = isinstance(self.db, peewee.PostgresqlDatabase)
        self.limiter = trio.CapacityLimiter(8)

    def create_schema(self) -> None:
        """Create missing tables, bring an older schema up to date, and record its version; safe
        to run at every start, by several fronts at once."""
        # Fronts that start together take turns here: SQLite's write lock taken at once (a read
        # first, then a write, fails at once against another writer), PostgreSQL's advisory lock.
        begin = self.db.atomic("IMMEDIATE") if isinstance(self.db, peewee.SqliteDatabase) \
            else self.db.atomic()
        with self.db.connection_context(), begin:
            if self.reconnects:
                self.db.execute_sql("SELECT pg_advisory_xact_lock(7406)")
            self._add_missing_columns()
            self.db.create_tables(MODELS, safe=True)
            if not SchemaVersion.select().exists():
                SchemaVersion.create(version=SCHEMA_VERSION)
            SchemaVersion.update(version=SCHEMA_VERSION).where(
                SchemaVersion.version < SCHEMA_VERSION).execute()

    def _add_missing_columns(self) -> None:
        """Bring tables of an older schema up to date: the columns later versions added."""
        migrator = SchemaMigrator.from_database(self.db)
        for table, fields in (("task", (Task.owner, Task.lease_until, Task.key_id)),  # 2, 5
                              ("user", (User.role, User.removed_at)),  # 4, 5
                              ("token", (Token.models,)),  # 4
                              ("usage", (Usage.request_id, Usage.username))):  # 5
            if not self.db.table_exists(table):
                continue
            present = {column.name for column in self.db.get_columns(table)}
            migrate(*[migrator.add_column(table, field.column_name, field) for field in fields
                      if field.column_name not in present])

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run one store call in a worker thread; each thread keeps its own open connection.
        A call whose connection broke (PostgreSQL restarted, or dropped it) runs once more on a
        fresh one, so a database restart costs a reconnect, not failed requests."""
        def call():
            for attempt in (1, 2):
                self.db.connect(reuse_if_open=True)
                try:
                    return fn(*args)
                except (peewee.OperationalError, peewee.InterfaceError) as error:
                    if attempt == 2 or not self.reconnects:
                        raise
                    log.warning("the database connection broke (%s); reconnecting", error)
                    self._drop_connection()
        return await trio.to_thread.run_sync(call, limiter=self.limiter)

    def _drop_connection(self) -> None:
        """Forget this thread's broken connection, whatever state peewee kept for it."""
        while self.db.transaction_depth():
            self.db.pop_transaction()
        try:
            self.db.close()
        except peewee.PeeweeException:
            self.db._state.reset()  # type: ignore[attr-defined]

    # --- users and tokens -------------------------------------------------------------------

    def add_user(self, username: str, password_hash: str, role: str = "user") -> User:
        return User.create(username=username, password_hash=password_hash, role=role)

    def user_named(self, username: str) -> User | None:
        return User.get_or_none(User.username == username, User.removed_at.is_null())

    def set_disabled(self, username: str, disabled: bool) -> bool:
        return User.update(disabled=disabled).where(User.username == username).execute() > 0

    def update_user(self, user: User, **values: object) -> None:
        """Change a user; disabling it also stops its queued tasks and running batches, in the
        same transaction."""
        with self._writing():
            User.update(**values).where(User.id == user.id).execute()
            if values.get("disabled"):
                self.stop_work_of(user.id, "the user was disabled")

    def remove_user(self, user: User) -> None:
        """Remove a user and everything it owns, in one transaction: its keys and tokens, tasks,
        files, batches (with their lines and output files) and limits. The user's row stays as
        a tombstone, so its id is never another user's; its ledger rows stay, with its name."""
        with self._writing():
            keys = [f"key:{token.id}" for token in Token.select(Token.id).where(Token.user == user)]
            subjects = [f"user:{user.id}", *keys]
            Limit.delete().where(Limit.subject.in_(subjects)).execute()
            LimitCount.delete().where(LimitCount.subject.in_(subjects)).execute()
            Task.delete().where(Task.user == user).execute()
            Token.delete().where(Token.user == user).execute()
            batches = Batch.select(Batch.id).where(Batch.user_id == user.id)
            BatchLine.delete().where(BatchLine.batch_id.in_(batches)).execute()
            Batch.delete().where(Batch.user_id == user.id).execute()
            files = File.select(File.id).where(File.user_id == user.id)
            FileChunk.delete().where(FileChunk.file_id.in_(files)).execute()
            File.delete().where(File.user_id == user.id).execute()
            User.update(username=f"removed:{user.id}", password_hash="!", disabled=True,
                        role="user", removed_at=utcnow()).where(User.id == user.id).execute()

    def stop_work_of(self, user_id: int, why: str) -> tuple[int, int]:
        """Cancel a user's unfinished tasks and stop its active batches (`cancelling`, with the
        reason as the batch's error), so a disabled user's work stops; (tasks, batches)."""
        now = utcnow()
        tasks = Task.update(status="cancelled", finished_at=now, owner=None, lease_until=None,
                            error=json.dumps({"message": f"cancelled: {why}",
                                              "type": "cancelled", "code": "user_disabled"})
                            ).where(Task.user == user_id, Task.status.in_(UNFINISHED)).execute()
        batches = Batch.update(status="cancelling", cancelling_at=now, errors=json.dumps({
            "object": "list", "data": [{"code": "user_disabled", "message": f"cancelled: {why}",
                                        "line": None, "param": None}]})).where(
            Batch.user_id == user_id, Batch.status.in_(("validating", "in_progress"))).execute()
        return tasks, batches

    def username_of(self, user_id: int) -> str | None:
        """A user's name by id (a removed user's tombstone name too)."""
        user = User.get_or_none(User.id == user_id)
        return user.username if user else None

    def admins(self) -> int:
        """How many enabled admins there are (the last one may not be removed)."""
        return User.select().where(User.role == "admin", User.disabled == False).count()  # noqa: E712

    def users(self) -> list[User]:
        return list(User.select().where(User.removed_at.is_null()).order_by(User.username))

    def user_view(self, user: User) -> dict[str, Any]:
        """A user as the admin API shows it: never its password hash."""
        keys = Token.select().where(Token.user == user, Token.kind == "api_key",
                                    Token.revoked == False).count()  # noqa: E712
        return {"object": "user", "username": user.username, "role": user.role,
                "disabled": user.disabled, "created_at": stamp(user.created_at),
                "api_keys": keys, "limits": self.limits_of(f"user:{user.id}")}

    def add_token(self, user: User | int, digest: str, kind: str,
                  expires_at: datetime.datetime | None = None, name: str = "",
                  models: list[str] | None = None) -> Token:
        return Token.create(user=user, digest=digest, kind=kind, expires_at=expires_at, name=name,
                            models=json.dumps(models) if models is not None else None)

    def keys_of(self, user: User) -> list[dict[str, Any]]:
        """A user's API keys as the admin API shows them: never their digests."""
        return [self.key_view(token) for token in Token.select().where(
            Token.user == user, Token.kind == "api_key").order_by(Token.id)]

    def key_of(self, user: User, key_id: int) -> Token | None:
        return Token.get_or_none(Token.id == key_id, Token.user == user, Token.kind == "api_key")

    def key_named(self, user: User, name: str) -> Token | None:
        return Token.get_or_none(Token.user == user, Token.kind == "api_key", Token.name == name,
                                 Token.revoked == False)  # noqa: E712

    def key_view(self, token: Token) -> dict[str, Any]:
        return {"object": "api_key", "id": token.id, "name": token.name,
                "created_at": stamp(token.created_at), "revoked": token.revoked,
                "models": json.loads(token.models) if token.models else None,
                "limits": self.limits_of(f"key:{token.id}")}

    def revoke(self, user: User, key_id: int | None = None, kind: str | None = None) -> int:
        """Revoke one API key of a user, or every credential it has (of one `kind`)."""
        query = Token.update(revoked=True).where(Token.user == user)
        if key_id is not None:
            query = query.where(Token.id == key_id, Token.kind == "api_key")
        if kind is not None:
            query = query.where(Token.kind == kind)
        return query.execute()

    def user_for_token(self, digest: str) -> TokenOwner | None:
        """Who holds a live token of an enabled user, with its role, the models the token may
        use, and the limits of `user:ID` and `key:ID` that are set; None if nobody does."""
        row = (Token.select(Token, User).join(User)
               .where(Token.digest == digest, Token.revoked == False,  # noqa: E712
                      User.disabled == False)  # noqa: E712
               .first())
        if row is None or (row.expires_at is not None and row.expires_at < utcnow()):
            return None
        subjects = [f"user:{row.user.id}", f"key:{row.id}"]
        limits = {limit.subject: {name: getattr(limit, name) for name in LIMIT_FIELDS}
                  for limit in Limit.select().where(Limit.subject.in_(subjects))}
        models = tuple(json.loads(row.models)) if row.models else None
        return TokenOwner(row.user.id, row.user.username, row.user.role, row.id, models, limits)

    def set_limits(self, subject: str, **values: object) -> dict[str, object]:
        """Set some of a subject's limits (the others keep their value); the whole set."""
        with self.db.atomic():
            Limit.insert(subject=subject).on_conflict_ignore().execute()
            if values:
                Limit.update(**values).where(Limit.subject == subject).execute()
            limit = Limit.get(Limit.subject == subject)
        return {name: getattr(limit, name) for name in LIMIT_FIELDS}

    def limits_of(self, subject: str) -> dict[str, object] | None:
        limit = Limit.get_or_none(Limit.subject == subject)
        return {name: getattr(limit, name) for name in LIMIT_FIELDS} if limit else None

    def clear_limits(self, subject: str) -> bool:
        return Limit.delete().where(Limit.subject == subject).execute() > 0

    def all_limits(self) -> dict[str, dict[str, object]]:
        return {limit.subject: {name: getattr(limit, name) for name in LIMIT_FIELDS}
                for limit in Limit.select().order_by(Limit.subject)}

    def end_session(self, digest: str) -> None:
        """A login token signed out: it stops working at once (an API key is not one)."""
        Token.delete().where(Token.digest == digest, Token.kind == "access").execute()

    def purge_expired_tokens(self) -> int:
        return Token.delete().where(Token.expires_at < utcnow()).execute()

    # --- tasks ------------------------------------------------------------------------------

    def add_tasks(self, rows: list[tuple[str, int, str, dict]], owner: str | None = None,
                  lease_until: datetime.datetime | None = None, key_id: int = 0) -> None:
        """Many tasks in one transaction (a batch request), leased to `owner` from the start."""
        with self.db.atomic():
            Task.insert_many([{
                "id": task_id, "user": user_id, "status": "queued", "kind": kind,
                "key_id": key_id, "request": json.dumps(request), "owner": owner,
                "lease_until": lease_until, "created_at": utcnow()}
                for task_id, user_id, kind, request in rows]).execute()

    def task_started(self, task_id: str, owner: str | None = None) -> bool:
        """Mark a run of the task begun (one more attempt); False if it is not ours to run."""
        return Task.update(status="running", started_at=utcnow(),
                           attempts=Task.attempts + 1).where(
            Task.id == task_id, Task.status.not_in(FINAL), *_owned_by(owner)).execute() > 0

    def task_finished(self, task_id: str, status: str, result: dict | None = None,
                      error: dict | None = None, owner: str | None = None,
                      usage: dict[str, Any] | None = None) -> bool:
        """Record an outcome, unless the task already has one (a cancel wins over a late result)
        or, given `owner`, another front has taken it over: one outcome per task, whoever ran it.
        Its ledger row (`usage`, keyed by the task's id) is written in the same transaction, so
        a crash can neither lose nor double it."""
        with self.db.atomic():
            self.insert_usage([usage] if usage is not None else [])
            return Task.update(
                status=status, finished_at=utcnow(),
                result=json.dumps(result) if result is not None else None,
                error=json.dumps(error) if error is not None else None,
            ).where(Task.id == task_id, Task.status.not_in(FINAL), *_owned_by(owner)).execute() > 0

    # --- usage ------------------------------------------------------------------------------

    def add_usage(self, rows: list[dict[str, Any]]) -> None:
        """A group of ledger rows in one transaction (never one commit per request)."""
        with self.db.atomic():
            self.insert_usage(rows)

    def insert_usage(self, rows: list[dict[str, Any]]) -> None:
        """Ledger rows in one `executemany` (peewee's insert_many, which builds each row's SQL,
        took ten times as long), within the caller's transaction; a row whose request id is
        already there is skipped, so a rerun never doubles it."""
        if not rows:
            return
        columns = [name for name in Usage._meta.sorted_field_names if name != "id"]
        sql = 'INSERT INTO "{}" ({}) VALUES ({}) ON CONFLICT DO NOTHING'.format(
            Usage._meta.table_name, ", ".join(f'"{name}"' for name in columns),
            ", ".join(self.db.param for _ in columns))
        as_text = isinstance(self.db, peewee.SqliteDatabase)  # peewee's own DATETIME format
        values = [tuple(str(row[name]) if as_text and name == "at" else row[name]
                        for name in columns) for row in rows]
        self.db.cursor().executemany(sql, values)

    def usage_of(self, user_id: int | None, start: datetime.datetime, end: datetime.datetime,
                 group_by: str | None) -> dict[str, Any]:
        """Totals of requests and tokens in [start, end), for one user (None: everyone), and the
        same per model, key or day."""
        totals = [peewee.fn.COUNT(Usage.id).alias("requests"),
                  peewee.fn.COALESCE(peewee.fn.SUM(Usage.prompt_tokens), 0).alias("prompt_tokens"),
                  peewee.fn.COALESCE(peewee.fn.SUM(Usage.completion_tokens), 0).alias(
                      "completion_tokens")]
        where = [Usage.at >= start, Usage.at < end]
        if user_id is not None:
            where.append(Usage.user_id == user_id)
        whole: dict[str, Any] = Usage.select(*totals).where(*where).dicts().get()  # type: ignore[assignment]
        answer: dict[str, Any] = {name: int(whole[name]) for name in
                                  ("requests", "prompt_tokens", "completion_tokens")}
        if group_by:
            column = USAGE_GROUPS[group_by]
            rows: Any = (Usage.select(column.alias("group"), *totals).where(*where)  # type: ignore[attr-defined]
                         .group_by(column).order_by(column).dicts())
            answer["buckets"] = [{group_by: row["group"], **{
                name: int(row[name]) for name in ("requests", "prompt_tokens", "completion_tokens")}}
                for row in rows]
            if group_by == "user":  # by the name each row keeps (a removed user's too)
                names: dict[int, str] = dict(Usage.select(  # type: ignore[arg-type]
                    Usage.user_id, peewee.fn.MAX(Usage.username)).where(*where).group_by(
                    Usage.user_id).tuples())
                for bucket in answer["buckets"]:
                    bucket["user"] = names.get(bucket["user"]) or f"#{bucket['user']}"
        return answer

    # --- limit counts shared by the fronts -----------------------------------------------------

    def sync_limit_counts(self, front: str, changes: list[dict[str, Any]],
                          since: datetime.datetime, subjects: list[str],
                          now: datetime.datetime) -> list[FrontCount]:
        """In one transaction: add this front's new counts to its rows (and set what stands now),
        mark its rows with requests in flight as alive at `now`, and read the other fronts' rows
        updated since `since`, and every row of `subjects` (those it has just begun to count)."""
        with self.db.atomic():
            rows = [dict(change, front=front, updated_at=now) for change in changes]
            for start in range(0, len(rows), 500):
                LimitCount.insert_many(rows[start:start + 500]).on_conflict(
                    conflict_target=[LimitCount.front, LimitCount.subject],
                    update={LimitCount.requests: LimitCount.requests + EXCLUDED.requests,
                            LimitCount.tokens: LimitCount.tokens + EXCLUDED.tokens,
                            **{column: getattr(EXCLUDED, column.name) for column in (
                                LimitCount.in_flight, LimitCount.day, LimitCount.day_tokens,
                                LimitCount.requests_left, LimitCount.tokens_left,
                                LimitCount.updated_at)}}).execute()
            LimitCount.update(updated_at=now).where(
                LimitCount.front == front, LimitCount.in_flight > 0,
                LimitCount.updated_at < now).execute()
            found = {}
            queries = [LimitCount.select().where(LimitCount.front != front,
                                                 LimitCount.updated_at >= since)]
            queries += [LimitCount.select().where(LimitCount.front != front,
                                                  LimitCount.subject.in_(subjects[i:i + 500]))
                        for i in range(0, len(subjects), 500)]
            for query in queries:
                for row in query:
                    found[row.front, row.subject] = FrontCount(
                        row.front, row.subject, row.requests, row.tokens, row.in_flight, row.day,
                        row.day_tokens, row.requests_left, row.tokens_left, row.updated_at)
        return list(found.values())

    def prune_limit_counts(self, before: datetime.datetime) -> int:
        """Forget counts not updated since `before`: fronts long gone, subjects long idle."""
        return LimitCount.delete().where(LimitCount.updated_at < before).execute()

    # --- leases -----------------------------------------------------------------------------

    def renew_leases(self, owner: str, until: datetime.datetime) -> set[str]:
        """Extend every unfinished lease of `owner` in one statement; the ids it still holds."""
        return leases.renew(Task, owner, until, UNFINISHED)

    def claim_lapsed(self, owner: str, now: datetime.datetime, until: datetime.datetime,
                     limit: int) -> list[Claimed]:
        """Take over up to `limit` unfinished tasks whose lease lapsed (or that never had one),
        each won by exactly one of the fronts that try at once."""
        return [Claimed(task.id, task.user_id, task.kind, json.loads(task.request), task.attempts,
                        task.key_id, task.lease_until is not None)
                for task in leases.claim_lapsed(Task, owner, now, until, limit, UNFINISHED)]

    def release_leases(self, owner: str, task_ids: list[str]) -> int:
        """Give tasks back at once (a draining front), for another front to take over now."""
        return leases.release(Task, owner, task_ids, UNFINISHED)

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

    def everyones_work(self, limit: int) -> dict[str, list[dict[str, Any]]]:
        """Every user's newest tasks and batches, each with its user's name: what an admin's
        console shows (a removed user's are gone with them)."""
        names: dict[int, str] = dict(User.select(User.id, User.username).tuples())  # type: ignore[arg-type]
        tasks = Task.select().order_by(Task.created_at.desc(), Task.id).limit(limit)
        return {"tasks": [{**task_view(task), "user": names.get(task.user_id, "")}
                          for task in tasks],
                "batches": [{**view, "user": names.get(user_id, "")}
                            for user_id, view in self.newest_batches(limit)]}

    def purge_tasks(self, older_than_s: int) -> int:
        cutoff = utcnow() - datetime.timedelta(seconds=older_than_s)
        return Task.delete().where(Task.status.in_(FINAL), Task.finished_at < cutoff).execute()


def _private_file(path: str) -> None:
    """The SQLite file holds every prompt of every task and batch: readable by this user only
    (0600; SQLite gives its WAL and shared-memory files the database's own mode), in a folder
    made 0700 when it is made here. An existing file is narrowed too."""
    folder = os.path.dirname(path)
    if folder:
        os.makedirs(folder, mode=0o700, exist_ok=True)
    if path and path != ":memory:":
        os.close(os.open(path, os.O_CREAT | os.O_RDONLY | os.O_CLOEXEC, 0o600))
        if os.stat(path).st_mode & 0o077:
            os.chmod(path, 0o600)


def _owned_by(owner: str | None) -> list:
    return [] if owner is None else [Task.owner == owner]


def _postgres(url: str) -> peewee.Database:
    """A pool of PostgreSQL connections (one per store thread, reused)."""
    settings = parse(url)  # database, user, password, host, port and the query's options
    settings.setdefault("max_connections", 16)
    settings.setdefault("stale_timeout", 300)
    return PooledPostgresqlDatabase(settings.pop("database"), **settings)
