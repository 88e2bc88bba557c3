"""OpenAI's Files and Batch API: `/v1/files` (purpose `batch`, JSONL checked line by line) and
`/v1/batches` (create, retrieve, list, cancel); the batches run in server.batch_runner."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from typing import IO, Any

import trio
from quart import Blueprint, Response, request

from server.batch_runner import FileWriter, request_line
from server.batch_store import File, batch_view, file_view
from server.errors import BadRequest, NotFound
from server.routes.context import caller, json_body, limit_arg, services

blueprint = Blueprint("batches", __name__)
MAX_FILE_LINES = 50_000
READ_BLOCK = 1 << 20


def with_upload_limit(request_class: type, max_file_bytes: int) -> type:
    """The app's request class, whose bodies may be a file's size on `POST /v1/files` only.
    quart fixes a request's body limit when it makes the request (before any hook or route
    runs), and every other route keeps COHORT_MAX_BODY_BYTES."""
    limit = max_file_bytes + (64 << 10)  # the multipart form around the file

    class UploadRequest(request_class):
        def __init__(self, method: str, scheme: str, path: str, *args: Any, **kwargs: Any):
            if method == "POST" and path == "/v1/files":
                kwargs["max_content_length"] = limit
            super().__init__(method, scheme, path, *args, **kwargs)

    return UploadRequest


def _page_args() -> tuple[int, str | None]:
    return limit_arg(20), request.args.get("after") or None


def _listing(page: dict[str, Any]) -> dict[str, Any]:
    data = page["data"]
    return {"object": "list", "data": data, "has_more": page["has_more"],
            "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None}


@blueprint.post("/v1/files")
async def upload():
    """A JSONL file for a batch, checked line by line (the error names the line) as it streams
    into the store a chunk at a time, with its size, line count and SHA-256: the front's memory
    holds about one chunk and one line, whatever the file's size (quart spools the uploaded part
    to a temporary file beyond 500 KB)."""
    principal = await caller()
    form, files = await request.form, await request.files
    if form.get("purpose") != "batch":
        raise BadRequest("purpose must be `batch` (the only purpose Cohort keeps files for)",
                         param="purpose")
    upload = files.get("file")
    if upload is None:
        raise BadRequest("send the file as the multipart field `file`", param="file")
    writer = FileWriter("file-" + secrets.token_hex(12), principal.user_id, "batch",
                        (upload.filename or "input.jsonl")[:255])
    store = services().store
    await store.run(store.begin_file, writer.row())
    try:
        await _store_lines(upload.stream, writer)
        return file_view(await store.run(store.finish_file, writer.row()))
    except BaseException:
        with trio.CancelScope(shield=True):
            await store.run(store.drop_file, writer.id)
        raise


async def _store_lines(stream: IO[bytes], writer: FileWriter) -> None:
    """Check each line of the uploaded file and write the file's chunks as they fill."""
    store, limit = services().store, services().settings.max_file_bytes
    seen: set[str] = set()
    number = size = 0
    async for raw in _lines(stream):
        size += len(raw) + 1
        if size > limit + 1:
            raise BadRequest(f"the file is over {limit} bytes (COHORT_MAX_FILE_BYTES)",
                             param="file")
        try:
            line = raw.decode("utf-8").removesuffix("\r")
        except UnicodeDecodeError:
            raise BadRequest(f"line {number + 1}: not UTF-8", param="file") from None
        if not line.strip():
            continue
        number += 1
        if number > MAX_FILE_LINES:
            raise BadRequest(f"the file has more than {MAX_FILE_LINES} lines, the most a batch "
                             "takes", param="file")
        request_line(line, number, seen)
        chunk = writer.add(line)
        if chunk is not None:
            await store.run(store.add_file_chunk, *chunk)
    if not number:
        raise BadRequest("the file has no lines", param="file")
    rest = writer.rest()
    if rest is not None:
        await store.run(store.add_file_chunk, *rest)


async def _lines(stream: IO[bytes]) -> AsyncIterator[bytes]:
    """The file's lines, split at newlines only (see batch_runner.jsonl_lines), read a block at
    a time in a thread (the spooled file is on disk)."""
    carry = b""
    while block := await trio.to_thread.run_sync(stream.read, READ_BLOCK):
        lines = (carry + block).split(b"\n")
        carry = lines.pop()
        for line in lines:
            yield line
    if carry:
        yield carry


@blueprint.get("/v1/files")
async def list_files():
    principal = await caller()
    limit, after = _page_args()
    store = services().store
    return _listing(await store.run(store.files_of, principal.user_id,
                                    request.args.get("purpose") or None, limit, after))


async def _file(file_id: str) -> File:
    principal = await caller()
    store = services().store
    file = await store.run(store.file_of, principal.user_id, file_id)
    if file is None:
        raise NotFound(f"no file {file_id!r}")
    return file


@blueprint.get("/v1/files/<file_id>")
async def show_file(file_id: str):
    return file_view(await _file(file_id))


@blueprint.get("/v1/files/<file_id>/content")
async def file_content(file_id: str):
    """The file's bytes, streamed a chunk (about 1 MB) at a time."""
    file = await _file(file_id)
    store = services().store

    async def chunks():
        seq = 0
        while (data := await store.run(store.file_chunk, file.id, seq)) is not None:
            yield data.encode()
            seq += 1

    response = Response(chunks(), mimetype="application/jsonl",
                        headers={"Content-Length": str(file.bytes)})
    response.timeout = None
    return response


@blueprint.delete("/v1/files/<file_id>")
async def delete_file(file_id: str):
    principal = await caller()
    store = services().store
    if not await store.run(store.delete_file, principal.user_id, file_id):
        raise NotFound(f"no file {file_id!r}")
    return {"id": file_id, "object": "file", "deleted": True}


@blueprint.post("/v1/batches")
async def create_batch():
    principal = await caller()
    return await services().batches.create(principal, await json_body())


@blueprint.get("/v1/batches")
async def list_batches():
    principal = await caller()
    limit, after = _page_args()
    store = services().store
    return _listing(await store.run(store.batches_of, principal.user_id, limit, after))


@blueprint.get("/v1/batches/<batch_id>")
async def show_batch(batch_id: str):
    principal = await caller()
    store = services().store
    batch = await store.run(store.batch_of, principal.user_id, batch_id)
    if batch is None:
        raise NotFound(f"no batch {batch_id!r}")
    return batch_view(batch)


@blueprint.post("/v1/batches/<batch_id>/cancel")
async def cancel_batch(batch_id: str):
    principal = await caller()
    batch = await services().batches.cancel(principal.user_id, batch_id)
    if batch is None:
        raise NotFound(f"no batch {batch_id!r}")
    return batch
