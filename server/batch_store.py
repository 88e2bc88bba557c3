"""Files and batches of OpenAI's Batch API in the store: their models and every query.

A file's lines are kept in the database in chunks of whole lines (about 1 MB each), so every
front sharing the store reads any file and a large one streams chunk by chunk. A batch is one
row, leased to the front that runs it as tasks are (server.leases); each of its
lines is a row of its own that moves from `queued` to `completed` or `failed` once: an outcome
is written only while the line is queued and its batch is still the writer's, so a line has
exactly one outcome and the output file one line per `custom_id`, however often fronts die.
"""

from __future__ import annotations

import datetime
import json
from typing import Any

import peewee

from server import leases
from server.db import BaseModel, unix, utcnow

ACTIVE = ("validating", "in_progress", "finalizing", "cancelling")
UPLOADING = "uploading"  # a file's purpose while its upload is being written: not shown


class File(BaseModel):
    """An uploaded (purpose `batch`) or produced (`batch_output`) JSONL file."""

    id = peewee.CharField(primary_key=True, max_length=40)
    user_id = peewee.IntegerField(index=True)
    purpose = peewee.CharField(max_length=32)
    filename = peewee.CharField(max_length=255)
    bytes = peewee.BigIntegerField()
    lines = peewee.IntegerField()
    sha256 = peewee.CharField(max_length=64)
    created_at = peewee.DateTimeField(default=utcnow)


class FileChunk(BaseModel):
    """Whole lines of a file, in order (`seq`), the first of them numbered `first_line`."""

    file_id = peewee.CharField(max_length=40)
    seq = peewee.IntegerField()
    first_line = peewee.IntegerField()
    data = peewee.TextField()

    class Meta:
        primary_key = peewee.CompositeKey("file_id", "seq")


class Batch(BaseModel):
    id = peewee.CharField(primary_key=True, max_length=40)
    user_id = peewee.IntegerField(index=True)
    key_id = peewee.IntegerField(default=0)
    key_models = peewee.TextField(null=True)  # the creating key's models (JSON), if limited
    endpoint = peewee.CharField(max_length=40)
    input_file_id = peewee.CharField(max_length=40)
    completion_window = peewee.CharField(max_length=8)
    status = peewee.CharField(max_length=16, index=True)
    metadata = peewee.TextField(null=True)
    errors = peewee.TextField(null=True)
    output_file_id = peewee.CharField(null=True, max_length=40)
    error_file_id = peewee.CharField(null=True, max_length=40)
    total = peewee.IntegerField(default=0)
    completed = peewee.IntegerField(default=0)
    failed = peewee.IntegerField(default=0)
    created_at = peewee.DateTimeField(default=utcnow, index=True)
    in_progress_at = peewee.DateTimeField(null=True)
    expires_at = peewee.DateTimeField()
    finalizing_at = peewee.DateTimeField(null=True)
    completed_at = peewee.DateTimeField(null=True)
    failed_at = peewee.DateTimeField(null=True)
    expired_at = peewee.DateTimeField(null=True)
    cancelling_at = peewee.DateTimeField(null=True)
    cancelled_at = peewee.DateTimeField(null=True)
    owner = peewee.CharField(null=True, max_length=128, index=True)
    lease_until = peewee.DateTimeField(null=True, index=True)


class BatchLine(BaseModel):
    """One request of a batch and, once it ran, its one outcome."""

    batch_id = peewee.CharField(max_length=40)
    line = peewee.IntegerField()
    custom_id = peewee.CharField(max_length=512)
    status = peewee.CharField(max_length=16)  # queued | completed | failed
    request = peewee.TextField()
    response = peewee.TextField(null=True)  # {"status_code", "request_id", "body"}

    class Meta:
        primary_key = peewee.CompositeKey("batch_id", "line")
        indexes = ((("batch_id", "status", "line"), False),)


BATCH_MODELS = [File, FileChunk, Batch, BatchLine]


def file_view(file: File) -> dict[str, Any]:
    """A file as OpenAI's API shows it (with its checksum beside)."""
    return {"id": file.id, "object": "file", "bytes": file.bytes, "created_at": unix(file.created_at),
            "filename": file.filename, "purpose": file.purpose, "status": "processed",
            "expires_at": None, "status_details": None, "lines": file.lines, "sha256": file.sha256}


def batch_view(batch: Batch) -> dict[str, Any]:
    """A batch as OpenAI's API shows it."""
    return {"id": batch.id, "object": "batch", "endpoint": batch.endpoint,
            "errors": json.loads(batch.errors) if batch.errors else None,
            "input_file_id": batch.input_file_id, "completion_window": batch.completion_window,
            "status": batch.status, "output_file_id": batch.output_file_id,
            "error_file_id": batch.error_file_id,
            **{name: unix(getattr(batch, name)) for name in (
                "created_at", "in_progress_at", "expires_at", "finalizing_at", "completed_at",
                "failed_at", "expired_at", "cancelling_at", "cancelled_at")},
            "request_counts": {"total": batch.total, "completed": batch.completed,
                               "failed": batch.failed},
            "metadata": json.loads(batch.metadata) if batch.metadata else None}


def _page(query, model, user_id: int, limit: int, after: str | None) -> dict[str, Any]:
    """OpenAI's cursor pagination, newest first: `after` is the id the last page ended with."""
    if after:
        anchor = model.get_or_none(model.id == after, model.user_id == user_id)
        if anchor is not None:
            query = query.where((model.created_at < anchor.created_at) |
                                ((model.created_at == anchor.created_at) & (model.id < anchor.id)))
    rows = list(query.order_by(model.created_at.desc(), model.id.desc()).limit(limit + 1))
    return {"rows": rows[:limit], "has_more": len(rows) > limit}


class BatchQueries:
    """The Batch API's queries, mixed into server.store.Store (they run in its threads)."""

    db: peewee.Database

    def insert_usage(self, rows: list[dict[str, Any]]) -> None:  # server.store.Store's
        raise NotImplementedError

    def _writing(self):
        """A transaction that reads, then writes: on SQLite it takes the write lock at its start
        (IMMEDIATE), since a reader that turns writer fails at once, without waiting, when
        another writer got in between."""
        return (self.db.atomic("IMMEDIATE") if isinstance(self.db, peewee.SqliteDatabase)
                else self.db.atomic())

    # --- files ------------------------------------------------------------------------------

    def begin_file(self, file: File) -> None:
        """An upload begins: its row, hidden (purpose UPLOADING) until `finish_file`, so its
        chunks can be written as they come and a front that dies mid-upload leaves a row that
        `purge_stalled_uploads` removes with them."""
        File.create(id=file.id, user_id=file.user_id, purpose=UPLOADING, filename=file.filename,
                    bytes=0, lines=0, sha256="", created_at=utcnow())

    def add_file_chunk(self, file_id: str, seq: int, first_line: int, data: str) -> None:
        FileChunk.create(file_id=file_id, seq=seq, first_line=first_line, data=data)

    def finish_file(self, file: File) -> File:
        """The upload is whole: its size, lines and checksum, and it is shown."""
        File.update(purpose=file.purpose, bytes=file.bytes, lines=file.lines,
                    sha256=file.sha256).where(File.id == file.id).execute()
        return File.get_by_id(file.id)

    def drop_file(self, file_id: str) -> None:
        """An upload that failed: its row and what it wrote."""
        with self.db.atomic():
            FileChunk.delete().where(FileChunk.file_id == file_id).execute()
            File.delete().where(File.id == file_id).execute()

    def purge_stalled_uploads(self, older_than: datetime.datetime) -> int:
        """Uploads their front never finished (it died): their rows and chunks. It reads, then
        writes: SQLite's write lock is taken first (a reader turned writer fails at once)."""
        with self._writing():
            stalled = [f.id for f in File.select(File.id).where(
                File.purpose == UPLOADING, File.created_at < older_than)]
            FileChunk.delete().where(FileChunk.file_id.in_(stalled)).execute()
            return File.delete().where(File.id.in_(stalled)).execute()

    def file_of(self, user_id: int, file_id: str) -> File | None:
        return File.get_or_none(File.id == file_id, File.user_id == user_id,
                                File.purpose != UPLOADING)

    def files_of(self, user_id: int, purpose: str | None, limit: int,
                 after: str | None) -> dict[str, Any]:
        query = File.select().where(File.user_id == user_id, File.purpose != UPLOADING)
        if purpose:
            query = query.where(File.purpose == purpose)
        page = _page(query, File, user_id, limit, after)
        return {"data": [file_view(f) for f in page["rows"]], "has_more": page["has_more"]}

    def file_chunk(self, file_id: str, seq: int) -> str | None:
        chunk = FileChunk.get_or_none(FileChunk.file_id == file_id, FileChunk.seq == seq)
        return chunk.data if chunk else None

    def delete_file(self, user_id: int, file_id: str) -> bool:
        with self.db.atomic():
            if File.delete().where(File.id == file_id, File.user_id == user_id).execute() == 0:
                return False
            FileChunk.delete().where(FileChunk.file_id == file_id).execute()
            return True

    # --- batches ----------------------------------------------------------------------------

    def add_batch(self, row: dict[str, Any]) -> Batch:
        return Batch.create(**row)

    def batch_of(self, user_id: int | None, batch_id: str) -> Batch | None:
        query = Batch.select().where(Batch.id == batch_id)
        if user_id is not None:
            query = query.where(Batch.user_id == user_id)
        return query.first()

    def batches_of(self, user_id: int, limit: int, after: str | None) -> dict[str, Any]:
        page = _page(Batch.select().where(Batch.user_id == user_id), Batch, user_id, limit, after)
        return {"data": [batch_view(b) for b in page["rows"]], "has_more": page["has_more"]}

    def newest_batches(self, limit: int) -> list[tuple[int, dict[str, Any]]]:
        """Every user's newest batches, with whose each is (an admin's view)."""
        return [(b.user_id, batch_view(b)) for b in
                Batch.select().order_by(Batch.created_at.desc(), Batch.id.desc()).limit(limit)]

    def update_batch(self, batch_id: str, holder: str | None, **values: Any) -> bool:
        """Change a batch that `holder` still holds (None: whoever holds it)."""
        query = Batch.update(**values).where(Batch.id == batch_id)
        if holder is not None:
            query = query.where(Batch.owner == holder)
        return query.execute() > 0

    def request_cancel(self, user_id: int, batch_id: str) -> Batch | None:
        """Ask for a batch to stop: `cancelling` until its runner has written what it has."""
        Batch.update(status="cancelling", cancelling_at=utcnow()).where(
            Batch.id == batch_id, Batch.user_id == user_id,
            Batch.status.in_(("validating", "in_progress"))).execute()
        return self.batch_of(user_id, batch_id)

    def add_batch_lines(self, rows: list[dict[str, Any]]) -> None:
        """A page of a batch's lines (queued); a page written before (a validation that a
        stopped front began) is left as it is."""
        with self.db.atomic():
            BatchLine.insert_many(rows).on_conflict_ignore().execute()

    def queued_lines(self, batch_id: str, after_line: int, limit: int) -> list[BatchLine]:
        return list(BatchLine.select().where(
            BatchLine.batch_id == batch_id, BatchLine.status == "queued",
            BatchLine.line > after_line).order_by(BatchLine.line).limit(limit))

    def lines_page(self, batch_id: str, after_line: int, limit: int) -> list[BatchLine]:
        return list(BatchLine.select().where(
            BatchLine.batch_id == batch_id, BatchLine.line > after_line)
            .order_by(BatchLine.line).limit(limit))

    def record_lines(self, batch_id: str, owner: str,
                     outcomes: list[tuple[int, str, str, dict[str, Any] | None]]) -> int:
        """Write outcomes (line, status, response JSON, its usage row or None) in one
        transaction, each only if its line is still queued and the batch still `owner`'s, and
        each line's ledger row with its outcome, so a crash can neither lose nor double a row;
        count them on the batch. Returns how many were written."""
        with self._writing():
            if not self._held(batch_id, owner):
                return 0
            counts = {"completed": 0, "failed": 0}
            rows = []
            for line, status, response, usage in outcomes:
                written = BatchLine.update(status=status, response=response).where(
                    BatchLine.batch_id == batch_id, BatchLine.line == line,
                    BatchLine.status == "queued").execute()
                counts[status] += written
                if written and usage is not None:
                    rows.append(usage)
            self.insert_usage(rows)
            Batch.update(completed=Batch.completed + counts["completed"],
                         failed=Batch.failed + counts["failed"]).where(
                Batch.id == batch_id).execute()
            return counts["completed"] + counts["failed"]

    def renew_batch_leases(self, owner: str, until: datetime.datetime) -> set[str]:
        return leases.renew(Batch, owner, until, ACTIVE)

    def claim_lapsed_batches(self, owner: str, now: datetime.datetime,
                             until: datetime.datetime, limit: int) -> list[tuple[str, bool]]:
        """Take over active batches whose lease lapsed (or that were handed back), each won by
        exactly one front: each batch's id, and whether its lease lapsed (False: handed back, or
        never leased)."""
        return [(batch.id, batch.lease_until is not None)
                for batch in leases.claim_lapsed(Batch, owner, now, until, limit, ACTIVE)]

    def release_batches(self, owner: str, batch_ids: list[str]) -> int:
        return leases.release(Batch, owner, batch_ids, ACTIVE)

    def _held(self, batch_id: str, owner: str) -> bool:
        """Whether `owner` holds the batch, the row locked until the transaction ends (on
        PostgreSQL; SQLite's IMMEDIATE transaction locks the whole store), so a front taking it
        over waits for a write already begun instead of racing it."""
        query = Batch.select(Batch.id).where(Batch.id == batch_id, Batch.owner == owner,
                                             Batch.status.in_(ACTIVE))
        if not isinstance(self.db, peewee.SqliteDatabase):
            query = query.for_update()
        return query.exists()

    def clear_output(self, batch_id: str, owner: str, file_ids: list[str]) -> bool:
        """Forget what an earlier attempt at ending the batch wrote of its output files."""
        with self._writing():
            if not self._held(batch_id, owner):
                return False
            FileChunk.delete().where(FileChunk.file_id.in_(file_ids)).execute()
            return True

    def add_output_chunk(self, batch_id: str, owner: str, file_id: str, seq: int,
                         first_line: int, data: str) -> bool:
        """One chunk of an output file, written only while the batch is `owner`'s."""
        with self._writing():
            if not self._held(batch_id, owner):
                return False
            FileChunk.create(file_id=file_id, seq=seq, first_line=first_line, data=data)
            return True

    def finish_batch(self, batch_id: str, owner: str, status: str, files: list[File],
                     **values: Any) -> bool:
        """Record the output files (their chunks written already) and end the batch, in one
        transaction, if it is still ours."""
        with self._writing():
            if not self._held(batch_id, owner):
                return False
            for file in files:
                File.delete().where(File.id == file.id).execute()
                file.save(force_insert=True)
            Batch.update(status=status, owner=None, lease_until=None, **values).where(
                Batch.id == batch_id).execute()
            return True
