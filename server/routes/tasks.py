"""Async and batch inference: `/inference/async`, `/inference/batch`, `/tasks`, `/tasks/{id}`.

Both count against the caller's rpm, tpm and daily quota when they are submitted (a batch of K
items as K requests and the sum of their costs, all or none), not against the concurrency limit:
their work runs in the batch tier, after the interactive requests that limit protects."""

from __future__ import annotations

import json
from typing import Any

import trio
from quart import Blueprint, request

from server.errors import BadRequest, CohortError, NotFound
from server.lifecycle import Run
from server.routes.context import caller, json_body, services
from server.store import FINAL
from server.task_runner import batch_tier, parse_task_body

blueprint = Blueprint("tasks", __name__)
MAX_BATCH_ITEMS = 1024
STATUSES = ("queued", "running") + FINAL


@blueprint.post("/inference/async")
async def inference_async():
    principal = await caller()
    [task_id], headers = await services().tasks.submit(principal, [await json_body()])
    return {"object": "task", "id": task_id, "status": "queued"}, 202, headers


def _batch_items(body: Any) -> list[dict]:
    """Either `requests` (full bodies) or `prompts` with shared fields (model, max_tokens, ...)."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    if "requests" in body:
        items = body["requests"]
    elif "prompts" in body:
        shared = {k: v for k, v in body.items() if k not in ("prompts", "wait")}
        prompts = body["prompts"]
        items = [dict(shared, prompt=p) for p in prompts] if isinstance(prompts, list) else None
    else:
        raise BadRequest("send `prompts` (a list) or `requests` (a list of request bodies)")
    if not isinstance(items, list) or not items or len(items) > MAX_BATCH_ITEMS:
        raise BadRequest(f"a batch holds 1 to {MAX_BATCH_ITEMS} items", param="requests")
    return items


@blueprint.post("/inference/batch")
async def inference_batch():
    principal = await caller()
    body = await json_body()
    items = _batch_items(body)
    cohort = services()
    if body.get("wait", True) is False:
        ids, headers = await cohort.tasks.submit(principal, items)
        return {"object": "batch", "tasks": [{"index": i, "id": task_id}
                                             for i, task_id in enumerate(ids)]}, 202, headers
    results: list[dict[str, Any]] = [{}] * len(items)
    specs = []
    for index, item in enumerate(items):
        try:
            _, spec = parse_task_body(item, cohort.settings)
            principal.check_model(spec.model)
        except CohortError as error:  # one item's failure is that item's answer only
            results[index] = {"index": index, "status": "failed", "error": error.body()["error"]}
            continue
        batch_tier(spec, principal.user_id)
        spec.weight = principal.share()[0]
        specs.append((index, spec))
    # the items that will run count, all or none, before any of them runs
    lifecycle = cohort.lifecycle
    tickets = lifecycle.admit(principal, [spec for _, spec in specs], stored=True)

    async def run(index: int, spec, ticket) -> None:
        item = Run(principal, spec, "batch_item", ticket)
        try:
            result = json.loads(await lifecycle.complete(item))
            results[index] = {"index": index, "status": "completed", "result": result}
        except CohortError as error:
            results[index] = {"index": index, "status": "failed", "error": error.body()["error"]}

    async with trio.open_nursery() as nursery:  # every item submitted at once: they batch
        for (index, spec), ticket in zip(specs, tickets):
            nursery.start_soon(run, index, spec, ticket)
    return {"object": "batch", "data": results}, 200, tickets[0].headers if tickets else {}


@blueprint.get("/tasks")
async def list_tasks():
    principal = await caller()
    status = request.args.get("status") or None
    if status is not None and status not in STATUSES:
        raise BadRequest(f"status must be one of {', '.join(STATUSES)}", param="status")
    try:
        limit = int(request.args.get("limit", 20))
        offset = int(request.args.get("offset", 0))
    except ValueError:
        raise BadRequest("limit and offset must be integers") from None
    if not 1 <= limit <= 100 or not 0 <= offset < 2**62:  # the store's integers are 64-bit
        raise BadRequest("limit must be 1 to 100 and offset from 0 to 2**62", param="limit")
    store = services().store
    return await store.run(store.tasks_of, principal.user_id, status, limit, offset)


@blueprint.get("/tasks/<task_id>")
async def show_task(task_id: str):
    principal = await caller()
    store = services().store
    task = await store.run(store.task_of, principal.user_id, task_id)
    if task is None:
        raise NotFound(f"no task {task_id!r}")
    return task


@blueprint.delete("/tasks/<task_id>")
async def cancel_task(task_id: str):
    principal = await caller()
    task = await services().tasks.cancel(principal.user_id, task_id)
    if task is None:
        raise NotFound(f"no task {task_id!r}")
    return task
