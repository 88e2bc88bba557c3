"""Durable async tasks: stored before they run, run in the app's nursery, recovered at start-up.

A task accepted is never lost: its row exists before the client hears its id; when the front dies,
the next start re-runs every task that had not finished (up to `MAX_TASK_ATTEMPTS` starts). A task
that cannot run again (its body no longer valid under today's settings) or that broke its runner
is quarantined: failed with the cause, never re-run, so no stored row can keep a front down.
"""

from __future__ import annotations

import json
import logging
import secrets
from typing import Any

import trio

from server.errors import BadRequest, CohortError, NoWorkers, NotFound, QueueFull
from server.jobs import JobSpec
from server.openai_schema import parse_chat, parse_completion

log = logging.getLogger("cohort.tasks")

MAX_TASK_ATTEMPTS = 3
PURGE_PERIOD_S = 3600.0


def parse_task_body(body: Any, settings) -> tuple[str, JobSpec]:
    """An async task body is an OpenAI chat (with `messages`) or completion (with `prompt`) body."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    kind = body.get("kind") or ("chat" if "messages" in body else "completion")
    parse = parse_chat if kind == "chat" else parse_completion
    spec = parse({k: v for k, v in body.items() if k != "kind"}, settings)
    if spec.stream:
        raise BadRequest("async tasks do not stream; drop `stream`", param="stream")
    return kind, spec


class TaskRunner:
    """Runs stored tasks through the gateway and records their outcome in the store."""

    def __init__(self, gateway) -> None:
        self.gateway = gateway
        self.store = gateway.store
        self.settings = gateway.settings
        self._nursery: trio.Nursery | None = None
        self._running: dict[str, trio.CancelScope] = {}

    async def run(self, *, task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            recovered = await self.store.run(self.store.unfinished_tasks)
            for task_id, _user, kind, body, attempts in recovered:
                if attempts >= MAX_TASK_ATTEMPTS:
                    await self.store.run(self.store.task_finished, task_id, "failed", None, {
                        "message": f"the front stopped {attempts} times while this task ran",
                        "type": "server_error"})
                    continue
                try:
                    _, spec = parse_task_body(dict(body, kind=kind), self.settings)
                except CohortError as error:
                    await self._quarantine(task_id, f"it cannot run again: {error.message}")
                    continue
                nursery.start_soon(self._run_task, task_id, spec)
            if recovered:
                log.info("recovered %d unfinished task(s) after a restart", len(recovered))
            nursery.start_soon(self._purge_loop)
            task_status.started()
            await trio.sleep_forever()

    async def submit(self, user_id: int, bodies: list[Any]) -> list[str]:
        """Store tasks (validated first, all in one transaction), then start them; their ids."""
        rows, specs = [], []
        for body in bodies:
            kind, spec = parse_task_body(body, self.settings)
            try:  # a model nobody serves is refused now; one that is loading is waited for
                self.gateway.dispatcher.check_model(spec.model)
            except NoWorkers:
                pass
            task_id = "task-" + secrets.token_hex(10)
            rows.append((task_id, user_id, kind, {k: v for k, v in body.items() if k != "kind"}))
            specs.append((task_id, spec))
        await self.store.run(self.store.add_tasks, rows)
        assert self._nursery is not None
        for task_id, spec in specs:
            self._nursery.start_soon(self._run_task, task_id, spec)
        return [task_id for task_id, _ in specs]

    async def cancel(self, user_id: int, task_id: str) -> dict | None:
        """Cancel a caller's own task; None when it is not theirs (or does not exist)."""
        if await self.store.run(self.store.task_of, user_id, task_id) is None:
            return None
        await self.store.run(self.store.task_finished, task_id, "cancelled", None,
                             {"message": "cancelled by the client", "type": "cancelled"})
        scope = self._running.get(task_id)
        if scope is not None:
            scope.cancel()
        return await self.store.run(self.store.task_of, user_id, task_id)

    async def _submit_when_possible(self, spec: JobSpec):
        """Submit, waiting (within the deadline) for a worker: after a restart they reconnect."""
        with trio.fail_after(self.settings.request_timeout_s):
            while True:
                try:
                    return self.gateway.submit(spec)
                except (NoWorkers, NotFound, QueueFull):
                    await self.gateway.dispatcher.wait_for_change()

    async def _run_task(self, task_id: str, spec: JobSpec) -> None:
        with trio.CancelScope() as scope:
            self._running[task_id] = scope
            try:
                await self.store.run(self.store.task_started, task_id)
                try:
                    job = await self._submit_when_possible(spec)
                except trio.TooSlowError:
                    raise NoWorkers(f"no worker took model {spec.model!r} within "
                                    f"{self.settings.request_timeout_s:g} s") from None
                body = json.loads(await self.gateway.complete(job, "task"))
                await self.store.run(self.store.task_finished, task_id, "completed", body, None)
            except CohortError as error:
                await self.store.run(self.store.task_finished, task_id, "failed", None,
                                     error.body()["error"])
            except Exception as error:  # a bug: it must neither stop the front nor run again
                log.exception("task %s broke its runner", task_id)
                await self._quarantine(task_id, f"it broke the task runner ({type(error).__name__})")
            finally:
                self._running.pop(task_id, None)

    async def _quarantine(self, task_id: str, why: str) -> None:
        log.warning("task %s quarantined: %s", task_id, why)
        await self.store.run(self.store.task_finished, task_id, "failed", None, {
            "message": f"this task is not run again: {why}", "type": "server_error",
            "code": "quarantined"})

    async def _purge_loop(self) -> None:
        while True:
            purged = await self.store.run(self.store.purge_tasks, self.settings.task_retention_s)
            await self.store.run(self.store.purge_expired_tokens)
            if purged:
                log.info("purged %d task(s) past COHORT_TASK_RETENTION_S", purged)
            await trio.sleep(PURGE_PERIOD_S)
