"""Runs OpenAI Batch API batches: validates the input file into line rows, runs the lines in the
batch tier (only capacity interactive requests leave idle), writes their outcomes in batches,
and ends the batch with its output and error files.

A batch is leased to one front at a time (see server.batch_store); the front renews its leases
every third of COHORT_TASK_LEASE_S and takes over those that lapsed, so a front that dies leaves
no batch stranded and two fronts never run one. Lines stream from the store a page at a time
and at most COHORT_BATCH_CONCURRENCY run at once per batch, and its output files are written a
chunk at a time, so a batch of 50,000 lines costs the front no more memory than one of 500.
Outcomes are written once a second in one transaction, each with its line's ledger row; a front
that dies loses the outcomes (and rows) of its last second, and those lines run again on the
front that takes the batch over: a line runs at least once, and is answered and billed exactly
once.
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import json
import logging
import secrets
from typing import Any

import peewee
import trio

from server.auth import Principal
from server.batch_store import File, batch_view
from server.errors import BadRequest, CohortError, Draining, NoWorkers, NotFound
from server.jobs import JobSpec
from server.gateway import Gateway
from server.lifecycle import Lifecycle, Run
from server.limits import Limits
from server.openai_schema import parse_chat, parse_completion, parse_embeddings
from server.periodic import Streak, every
from server.store import Store, utcnow
from server.task_runner import batch_tier

log = logging.getLogger("cohort.batches")

ENDPOINTS = {"/v1/chat/completions": (parse_chat, "chat"),
             "/v1/completions": (parse_completion, "completions"),
             "/v1/embeddings": (parse_embeddings, "embeddings")}
WINDOWS = {"24h": datetime.timedelta(hours=24)}
PAGE = 500  # lines read from the store at a time
CHUNK_BYTES = 1 << 20  # a file chunk: about 1 MB of whole lines
FLUSH_EVERY_S = 1.0
MAX_ERRORS = 100  # validation errors a failed batch reports


def request_line(text: str, number: int, seen: set[str]) -> dict[str, Any]:
    """One line of a batch input file, checked: a JSON object with a unique `custom_id`,
    `method` POST, a `url` Cohort serves and a `body` object. BadRequest names the line."""
    def refuse(why: str) -> BadRequest:
        return BadRequest(f"line {number}: {why}", param="file", code="invalid_batch_line")

    try:
        item = json.loads(text)
    except RecursionError:
        raise refuse("nested too deeply") from None
    except ValueError:
        raise refuse("not valid JSON") from None
    if not isinstance(item, dict):
        raise refuse("not a JSON object")
    unknown = sorted(set(item) - {"custom_id", "method", "url", "body"})
    if unknown:
        raise refuse(f"unknown field {', '.join(unknown)}")
    custom_id = item.get("custom_id")
    if not isinstance(custom_id, str) or not 0 < len(custom_id) <= 512:
        raise refuse("custom_id must be a string of 1 to 512 characters")
    if custom_id in seen:
        raise refuse(f"custom_id {custom_id!r} is used twice; each line needs its own")
    seen.add(custom_id)
    if item.get("method") != "POST":
        raise refuse("method must be POST")
    if not isinstance(item.get("url"), str) or item["url"] not in ENDPOINTS:
        raise refuse(f"url must be one of {', '.join(ENDPOINTS)}")
    if not isinstance(item.get("body"), dict):
        raise refuse("body must be a JSON object")
    return item


def jsonl_lines(text: str) -> list[str]:
    """The lines of a JSONL text: split at newlines only (a raw U+2028 or other Unicode line
    separator inside a JSON string is valid JSON, and stays in its line), a CRLF's CR dropped,
    blank lines skipped."""
    return [line.removesuffix("\r") for line in text.split("\n") if line.strip()]


def request_id(batch_id: str, line: int) -> str:
    """A line's id in the output files, the same whichever front ran or ended the batch."""
    return "batch_req_" + hashlib.sha256(f"{batch_id}/{line}".encode()).hexdigest()[:24]


class TakenOver(Exception):
    """Another front holds the batch now (this one stalled past its lease): it goes on there."""


class BatchRunner:
    """Holds the leases of the batches this front runs, and runs them in its nursery."""

    def __init__(self, gateway: Gateway, store: Store, lifecycle: Lifecycle) -> None:
        self.gateway = gateway
        self.store = store
        self.lifecycle = lifecycle
        self.settings = gateway.settings
        self.owner = gateway.dispatcher.front_id
        self.lease_streak = Streak()  # failed lease rounds in a row (/metrics)
        self._held: dict[str, trio.CancelScope] = {}
        self._nursery: trio.Nursery | None = None

    def _lease_until(self) -> datetime.datetime:
        return utcnow() + datetime.timedelta(seconds=self.settings.task_lease_s)

    async def run(self, *, task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                await self._take_over()
                nursery.start_soon(functools.partial(
                    every, self.settings.task_lease_s / 3, self._lease_round,
                    what="renewing batch leases",
                    meanwhile="this front's batches run on, and another front may take one over "
                              "once its lease lapses (a line's outcome is written only by its "
                              "batch's owner)", streak=self.lease_streak))
                task_status.started()
                await trio.sleep_forever()
        finally:  # stopping: hand the batches back, for another front to go on at once
            with trio.move_on_after(2) as bounded:
                bounded.shield = True
                if self._held:
                    await self.store.run(self.store.release_batches, self.owner, list(self._held))

    async def _lease_round(self) -> None:
        """Renew our batches' leases, stop those taken over while this front stalled, and take
        over lapsed ones."""
        held = await self.store.run(self.store.renew_batch_leases, self.owner,
                                    self._lease_until())
        for batch_id in set(self._held) - held:  # taken over while this front stalled
            log.info("batch %s is no longer ours; stopping it here", batch_id)
            self._held[batch_id].cancel()
        await self._take_over()

    async def _take_over(self) -> None:
        claimed = await self.store.run(self.store.claim_lapsed_batches, self.owner, utcnow(),
                                       self._lease_until(), 16)
        for batch_id, lease_lapsed in claimed:
            if batch_id not in self._held:
                log.info("took over batch %s (%s)", batch_id,
                         "its front's lease lapsed" if lease_lapsed else "handed back")
                self.gateway.metrics.took_over("batch", lease_lapsed)
                self._start(batch_id)

    def _start(self, batch_id: str) -> None:
        assert self._nursery is not None
        scope = trio.CancelScope()
        self._held[batch_id] = scope
        self._nursery.start_soon(self._drive, batch_id, scope)

    # --- creating ---------------------------------------------------------------------------

    async def create(self, principal, body: Any) -> dict[str, Any]:
        """A new batch (`validating`), leased to this front, which starts on it at once."""
        if not isinstance(body, dict):
            raise BadRequest("the request body must be a JSON object")
        unknown = sorted(set(body) - {"input_file_id", "endpoint", "completion_window",
                                      "metadata"})
        if unknown:
            raise BadRequest(f"unknown field {', '.join(unknown)}", param=unknown[0],
                             code="unknown_parameter")
        if not isinstance(body.get("endpoint"), str) or body["endpoint"] not in ENDPOINTS:
            raise BadRequest(f"endpoint must be one of {', '.join(ENDPOINTS)}", param="endpoint")
        window = body.get("completion_window")
        if not isinstance(window, str) or window not in WINDOWS:
            raise BadRequest(f"completion_window must be one of {', '.join(WINDOWS)}",
                             param="completion_window")
        metadata = body.get("metadata")
        if metadata is not None and (not isinstance(metadata, dict) or len(metadata) > 16 or not all(
                isinstance(k, str) and len(k) <= 64 and isinstance(v, str) and len(v) <= 512
                for k, v in metadata.items())):
            raise BadRequest("metadata holds at most 16 string pairs (keys up to 64 characters, "
                             "values up to 512)", param="metadata")
        file_id = body.get("input_file_id")
        file = (await self.store.run(self.store.file_of, principal.user_id, file_id)
                if isinstance(file_id, str) else None)
        if file is None:
            raise NotFound(f"no file {body.get('input_file_id')!r}", param="input_file_id")
        if file.purpose != "batch":
            raise BadRequest(f"file {file.id} has purpose {file.purpose!r}; a batch reads a file "
                             "uploaded with purpose `batch`", param="input_file_id")
        now = utcnow()
        batch = await self.store.run(self.store.add_batch, {
            "id": "batch_" + secrets.token_hex(12), "user_id": principal.user_id,
            "key_id": principal.key_id,
            "key_models": json.dumps(principal.models) if principal.models is not None else None,
            "endpoint": body["endpoint"], "input_file_id": file.id, "completion_window": window,
            "status": "validating", "metadata": json.dumps(metadata) if metadata else None,
            "created_at": now, "expires_at": now + WINDOWS[window], "owner": self.owner,
            "lease_until": self._lease_until()})
        self._start(batch.id)
        return batch_view(batch)

    async def cancel(self, user_id: int, batch_id: str) -> dict[str, Any] | None:
        batch = await self.store.run(self.store.request_cancel, user_id, batch_id)
        return batch_view(batch) if batch else None

    # --- running ----------------------------------------------------------------------------

    async def _drive(self, batch_id: str, scope: trio.CancelScope) -> None:
        """Take a held batch from wherever it stands to its end."""
        try:
            with scope:
                batch = await self.store.run(self.store.batch_of, None, batch_id)
                if batch is None:
                    return
                if batch.status == "validating":
                    batch = await self._validate(batch)
                if batch is not None and batch.status == "in_progress":
                    batch = await self._run_lines(batch)
                if batch is not None and batch.status in ("finalizing", "cancelling"):
                    await self._finish(batch)
        except Draining:
            pass  # the lease goes back as the runner stops
        except TakenOver:
            log.info("batch %s was taken over by another front; it ends there", batch_id)
        except Exception:  # a bug: the batch fails with its cause, the front keeps serving
            log.exception("batch %s broke its runner", batch_id)
            try:
                await self.store.run(lambda: self.store.update_batch(
                    batch_id, self.owner, status="failed", failed_at=utcnow(), owner=None,
                    errors=json.dumps({"object": "list", "data": [{
                        "code": "server_error", "message": "the batch broke its runner; see "
                        "the front's log", "line": None, "param": None}]})))
            except Exception:  # the store is down too: the lease lapses, another front tries
                log.exception("batch %s could not be marked failed", batch_id)
        finally:
            self._held.pop(batch_id, None)

    def _parse(self, endpoint: str, body: dict) -> JobSpec:
        parse, _ = ENDPOINTS[endpoint]
        spec = parse(body, self.settings)
        if spec.stream:
            raise BadRequest("batch lines do not stream; drop `stream`", param="stream")
        return spec

    async def _validate(self, batch):
        """Read the input file chunk by chunk, check every line (its body as the endpoint's own
        route would), and store the lines: then `in_progress`, or `failed` with the errors."""
        errors: list[dict[str, Any]] = []
        seen: set[str] = set()
        models = json.loads(batch.key_models) if batch.key_models else None
        page: list[dict[str, Any]] = []
        total = 0
        seq = 0
        while (data := await self.store.run(self.store.file_chunk, batch.input_file_id, seq)):
            seq += 1
            for text in jsonl_lines(data):
                total += 1
                try:
                    item = request_line(text, total, seen)
                    if item["url"] != batch.endpoint:
                        raise BadRequest(f"line {total}: url {item['url']} is not the batch's "
                                         f"endpoint {batch.endpoint}", param="url")
                    spec = self._parse(batch.endpoint, item["body"])
                    try:  # a model nobody serves fails the line now, not after a long wait
                        self.gateway.dispatcher.check_model(spec.model)
                    except NoWorkers:  # known, loading: its lines wait for it
                        pass
                    except NotFound as error:
                        raise BadRequest(f"line {total}: {error.message}", param="body.model",
                                         code="model_not_found") from None
                    if models is not None and spec.model not in models:
                        raise BadRequest(f"line {total}: this API key may not use model "
                                         f"{spec.model!r}", param="body.model")
                except CohortError as error:
                    if len(errors) < MAX_ERRORS:
                        errors.append({"code": error.code or "invalid_request",
                                       "message": error.message, "param": error.param,
                                       "line": total})
                    continue
                page.append({"batch_id": batch.id, "line": total, "custom_id": item["custom_id"],
                             "status": "queued", "request": json.dumps(item["body"])})
                if len(page) >= PAGE and not errors:
                    await self.store.run(self.store.add_batch_lines, page)
                    page = []
        now = utcnow()
        if errors or not total:
            errors = errors or [{"code": "empty_file", "message": "the input file has no lines",
                                 "param": None, "line": None}]
            await self.store.run(lambda: self.store.update_batch(
                batch.id, self.owner, status="failed", failed_at=now, owner=None,
                lease_until=None, errors=json.dumps({"object": "list", "data": errors})))
            return None
        if page:
            await self.store.run(self.store.add_batch_lines, page)
        await self.store.run(lambda: self.store.update_batch(
            batch.id, self.owner, status="in_progress", in_progress_at=now, total=total))
        return await self.store.run(self.store.batch_of, None, batch.id)

    async def _run_lines(self, batch):
        """Run every queued line, COHORT_BATCH_CONCURRENCY at a time, writing outcomes once a
        second; stop early when the batch is cancelled or its window passes."""
        outcomes: list[tuple[int, str, str, dict[str, Any] | None]] = []
        limiter = trio.CapacityLimiter(self.settings.batch_concurrency)
        state: dict[str, Any] = {"stop": None, "payer": await self._payer(batch), "cut": []}

        async def flush() -> None:
            written, outcomes[:] = list(outcomes), []
            if not written:
                return
            try:
                await self.store.run(self.store.record_lines, batch.id, self.owner, written)
            except (peewee.OperationalError, peewee.InterfaceError) as error:
                log.warning("batch %s: %d outcomes not written yet (%s); retrying",
                            batch.id, len(written), error)
                outcomes[:0] = written

        async def watch(scope: trio.CancelScope) -> None:
            """Flush once a second, and stop the lines on a cancel or at the window's end."""
            while True:
                await trio.sleep(FLUSH_EVERY_S)
                await flush()
                state["payer"] = await self._payer(batch)  # an admin's change counts soon
                now_batch = await self.store.run(self.store.batch_of, None, batch.id)
                if now_batch is None:  # its user was removed, and the batch with it
                    state["stop"] = "removed"
                elif now_batch.status == "cancelling":
                    state["stop"] = "cancelling"
                elif utcnow() >= now_batch.expires_at:
                    state["stop"] = "expired"
                if state["stop"]:
                    scope.cancel()
                    return

        async def run_line(line) -> None:
            try:
                outcomes.append(await self._run_line(batch, line, state))
            finally:
                limiter.release_on_behalf_of(line)


        async with trio.open_nursery() as outer:
            with trio.CancelScope() as lines_scope:
                outer.start_soon(watch, lines_scope)
                async with trio.open_nursery() as nursery:
                    after = 0
                    while page := await self.store.run(self.store.queued_lines, batch.id,
                                                       after, PAGE):
                        for line in page:
                            await limiter.acquire_on_behalf_of(line)
                            nursery.start_soon(run_line, line)
                        after = page[-1].line
            outer.cancel_scope.cancel()
        with trio.CancelScope(shield=True):
            await flush()
            if state["stop"] and state["cut"]:  # lines stopped mid-run reached a worker: billed
                await self.store.run(self.store.add_usage, state["cut"])
        now = utcnow()
        if state["stop"] == "expired":
            await self.store.run(lambda: self.store.update_batch(
                batch.id, self.owner, status="cancelling", expired_at=now))
        elif state["stop"] is None:
            await self.store.run(lambda: self.store.update_batch(
                batch.id, self.owner, status="finalizing", finalizing_at=now))
        return await self.store.run(self.store.batch_of, None, batch.id)

    async def _payer(self, batch) -> Principal:
        """Who the batch's lines bill to: its creator, with the limits of its user and its key
        (not concurrency: a line holds no connection)."""
        subjects = [f"user:{batch.user_id}", f"key:{batch.key_id}"]
        name, found = await self.store.run(lambda: (
            self.store.username_of(batch.user_id),
            [(s, self.store.limits_of(s)) for s in subjects]))
        return Principal(batch.user_id, name or f"#{batch.user_id}", batch.key_id, tuple(
            (subject, Limits(**values)) for subject, values in found if values))  # type: ignore[arg-type]

    async def _run_line(self, batch, line, state
                        ) -> tuple[int, str, str, dict[str, Any] | None]:
        """One line through the lifecycle, in the batch tier: (line, status, response JSON,
        its ledger row), the row written with the outcome, keyed by the line's request id."""
        _, route = ENDPOINTS[batch.endpoint]
        lifecycle = self.lifecycle
        rid = request_id(batch.id, line.line)
        run = None
        try:
            spec = batch_tier(self._parse(batch.endpoint, json.loads(line.request)),
                              batch.user_id)
            run = Run(state["payer"], spec, "batch_api", request_id=rid, durable=True)
            run.ticket = await lifecycle.admit_when_allowed(run.payer, spec)
            body = json.loads(await lifecycle.complete(run, wait_for_worker=True))
            status, code = "completed", 200
        except Draining:
            raise
        except CohortError as error:
            body, status, code = error.body(), "failed", error.status
        except trio.Cancelled:  # the batch stopped (cancelled, expired, its user gone)
            if run is not None and run.row is not None:
                state["cut"].append(run.row)
            raise
        response = {"status_code": code, "request_id": rid, "body": body}
        return line.line, status, json.dumps(response), run.row if run else None

    async def _finish(self, batch) -> None:
        """Write the output file (lines answered 200) and the error file (the others, and lines
        that never ran when the batch was cancelled or expired) a chunk at a time, then end the
        batch; a front that takes the ending over starts the files again."""
        ending = "cancelled" if batch.status == "cancelling" else "completed"
        if ending == "cancelled" and batch.expired_at is not None:
            ending = "expired"
        files = {kind: FileWriter.output_of(batch, kind) for kind in ("output", "error")}
        if not await self.store.run(self.store.clear_output, batch.id, self.owner,
                                    [f.id for f in files.values()]):
            return

        async def write(chunk: tuple[str, int, int, str] | None) -> None:
            if chunk is not None and not await self.store.run(
                    self.store.add_output_chunk, batch.id, self.owner, *chunk):
                raise TakenOver(batch.id)  # the new owner writes them again

        after = 0
        while page := await self.store.run(self.store.lines_page, batch.id, after, PAGE):
            for line in page:
                if line.response is not None:
                    response = json.loads(line.response)
                    kind = "output" if response["status_code"] == 200 else "error"
                    entry = {"id": request_id(batch.id, line.line), "custom_id": line.custom_id,
                             "response": response, "error": None}
                else:
                    kind = "error"
                    code = "batch_expired" if ending == "expired" else "batch_cancelled"
                    entry = {"id": request_id(batch.id, line.line),
                             "custom_id": line.custom_id, "response": None,
                             "error": {"code": code, "message": "this request did not run: "
                                                                f"the batch was {ending}"}}
                await write(files[kind].add(json.dumps(entry)))
            after = page[-1].line
        for file in files.values():
            await write(file.rest())
        values: dict[str, Any] = {f"{ending}_at": utcnow()}
        if ending != "completed":
            values["failed"] = files["error"].lines
            values["completed"] = files["output"].lines
        rows = []
        for kind, file in files.items():
            if file.lines:
                rows.append(file.row())
                values[f"{kind}_file_id"] = file.id
        if not await self.store.run(lambda: self.store.finish_batch(
                batch.id, self.owner, ending, rows, **values)):
            log.info("batch %s ended elsewhere", batch.id)


class FileWriter:
    """A JSONL file being written: whole lines gathered into chunks of at most CHUNK_BYTES (a
    longer line is a chunk of its own), its size, line count and SHA-256 kept as they go. An
    upload and a batch's output files are cut the same way."""

    def __init__(self, file_id: str, user_id: int, purpose: str, filename: str) -> None:
        self.id, self.user_id, self.purpose, self.filename = file_id, user_id, purpose, filename
        self.lines = self.bytes = self.seq = 0
        self.sha256 = hashlib.sha256()
        self._pending: list[str] = []
        self._pending_bytes = 0
        self._first_line = 1

    @classmethod
    def output_of(cls, batch, kind: str) -> FileWriter:
        """A batch's output or error file: a fixed id per batch and kind, so a front that takes
        the ending over writes the same file."""
        file_id = "file-" + hashlib.sha256(f"{batch.id}/{kind}".encode()).hexdigest()[:24]
        return cls(file_id, batch.user_id, "batch_output", f"{batch.id}_{kind}.jsonl")

    def add(self, text: str) -> tuple[str, int, int, str] | None:
        """Take a line; the chunk (file id, seq, first line, data) it completes, if it does."""
        data = text + "\n"
        encoded = data.encode()
        full = self.rest() if self._pending_bytes + len(encoded) > CHUNK_BYTES else None
        self.lines += 1
        self.bytes += len(encoded)
        self.sha256.update(encoded)
        self._pending.append(data)
        self._pending_bytes += len(encoded)
        return full

    def rest(self) -> tuple[str, int, int, str] | None:
        """The lines not yet written, as a chunk (None: there are none)."""
        if not self._pending:
            return None
        chunk = (self.id, self.seq, self._first_line, "".join(self._pending))
        self.seq += 1
        self._first_line += len(self._pending)
        self._pending, self._pending_bytes = [], 0
        return chunk

    def row(self) -> File:
        return File(id=self.id, user_id=self.user_id, purpose=self.purpose,
                    filename=self.filename, bytes=self.bytes, lines=self.lines,
                    sha256=self.sha256.hexdigest(), created_at=utcnow())
