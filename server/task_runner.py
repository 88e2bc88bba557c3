"""Durable async tasks: stored before they run, run in the app's nursery, taken over by another
front (or this one, restarted) when the front that ran them stops.

A task accepted is never lost: its row exists, leased to this front, before the client hears its
id. The front renews its leases in one statement every third of COHORT_TASK_LEASE_S; when a front
dies, its leases lapse and each of its tasks is claimed by exactly one other front (a
compare-and-set on the row), and only the owner records an outcome, so every task ends once. A
draining front hands back what it could not finish. A task is run at most `MAX_TASK_ATTEMPTS`
times; one that cannot run again (its body no longer valid under today's settings) or that broke
its runner is quarantined: failed with the cause, never re-run, so no stored row can keep a front
down.

Submitting counts against the caller's limits through the one lifecycle (server.lifecycle), as
requests do: a batch of K tasks is K requests and the sum of their costs against rpm, tpm and
the daily quota, admitted whole or refused whole with the same 429; not against the concurrency
limit (a stored task runs later, in the batch tier, and holds no connection). When it ends on
the front that took it, it is settled against what it used (a failure gives everything back);
one that another front takes over keeps the charge its first front made. Its ledger row is
written with its outcome, in one transaction, keyed by the task's id: exactly one row, however
often fronts die under it.
"""

from __future__ import annotations

import datetime
import functools
import json
import logging
import secrets
from typing import Any

import trio

from server.auth import Principal
from server.errors import BadRequest, CohortError, Draining, NoWorkers
from server.jobs import JobSpec
from server.gateway import Gateway
from server.lifecycle import Lifecycle, Run
from server.openai_schema import parse_chat, parse_completion
from server.periodic import Streak, every
from server.store import Store, utcnow

log = logging.getLogger("cohort.tasks")

MAX_TASK_ATTEMPTS = 3
CLAIMS_PER_ROUND = 256  # lapsed tasks one front takes over at a time
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


def batch_tier(spec: JobSpec, user_id: int) -> JobSpec:
    """Tasks fill the capacity interactive requests leave idle, in their user's turn."""
    spec.tenant, spec.tier = f"user:{user_id}", "batch"
    return spec


class TaskRunner:
    """Runs stored tasks through the gateway and records their outcome in the store."""

    def __init__(self, gateway: Gateway, store: Store, lifecycle: Lifecycle) -> None:
        self.gateway = gateway
        self.store = store
        self.lifecycle = lifecycle
        self.settings = gateway.settings
        self.owner = gateway.dispatcher.front_id
        self.metrics = gateway.metrics
        self.lease_streak = Streak()  # failed lease rounds in a row (/metrics)
        self.housekeeping_streak = Streak()
        self._nursery: trio.Nursery | None = None
        self._running: dict[str, tuple[trio.CancelScope, int]] = {}  # task: (scope, user id)
        self._stray: set[str] = set()  # held but not running here at the last lease round

    async def run(self, *, task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                await self._take_over_lapsed()
                nursery.start_soon(functools.partial(
                    every, self.settings.task_lease_s / 3, self._lease_round,
                    what="renewing task leases",
                    meanwhile="this front's tasks run on, and another front may take one over "
                              "once its lease lapses (only its owner records the outcome)",
                    streak=self.lease_streak))
                nursery.start_soon(functools.partial(
                    every, PURGE_PERIOD_S, self._purge, what="hourly housekeeping",
                    first_now=True, streak=self.housekeeping_streak))
                task_status.started()
                await trio.sleep_forever()
        finally:  # stopping: hand back what still runs, so another front need not wait a lease
            with trio.move_on_after(2) as bounded:
                bounded.shield = True
                if self._running:
                    await self.store.run(self.store.release_leases, self.owner,
                                         list(self._running))

    def _lease_until(self) -> datetime.datetime:
        return utcnow() + datetime.timedelta(seconds=self.settings.task_lease_s)

    async def _lease_round(self) -> None:
        """Renew our leases, stop what is no longer ours (cancelled, or taken over while this
        front stalled), and take over lapsed leases of fronts that stopped."""
        held = await self.stop_lost()
        # Held but not running here two rounds in a row (not just submitted): hand it back, so it
        # is taken over rather than renewed forever.
        stray = held - set(self._running)
        if stray & self._stray:
            log.warning("%d task(s) held but not running; handing them back",
                        len(stray & self._stray))
            await self.store.run(self.store.release_leases, self.owner, sorted(stray & self._stray))
        self._stray = stray
        await self._take_over_lapsed()

    async def stop_lost(self) -> set[str]:
        """Renew our leases and stop at once what is no longer ours to run (cancelled, its user
        disabled or removed, or taken over while this front stalled); the ids still held."""
        running = set(self._running)  # before the query: their rows are committed
        held = await self.store.run(self.store.renew_leases, self.owner, self._lease_until())
        for task_id in running - held:
            if task_id in self._running:
                log.info("task %s is no longer ours (cancelled, its user stopped, or taken "
                         "over); stopping it", task_id)
                self._running[task_id][0].cancel()
        return held

    async def _take_over_lapsed(self) -> None:
        claimed = await self.store.run(self.store.claim_lapsed, self.owner, utcnow(),
                                       self._lease_until(), CLAIMS_PER_ROUND)
        for task in claimed:
            self.metrics.took_over("task", task.lease_lapsed)
            if task.attempts >= MAX_TASK_ATTEMPTS:
                await self._quarantine(task.id, f"it was started {task.attempts} times and "
                                       "its front stopped each time")
                continue
            try:
                _, spec = parse_task_body(dict(task.request, kind=task.kind), self.settings)
            except CohortError as error:
                await self._quarantine(task.id, f"it cannot run again: {error.message}")
                continue
            payer = await self._payer(task.user_id, task.key_id)
            assert self._nursery is not None
            self._nursery.start_soon(self._run_task, task.id, Run(
                payer, batch_tier(spec, task.user_id), "async", request_id=task.id,
                durable=True))
        if claimed:
            log.info("took over %d task(s) whose front stopped", len(claimed))

    async def submit(self, payer: Principal, bodies: list[Any]) -> tuple[list[str], dict[str, str]]:
        """Store tasks (validated, their models checked against the caller's key, admitted
        against its limits, then stored in one transaction), then start them; their ids, and
        the x-ratelimit headers to answer with."""
        rows, specs = [], []
        for body in bodies:
            kind, spec = parse_task_body(body, self.settings)
            payer.check_model(spec.model)
            try:  # a model nobody serves is refused now; one that is loading is waited for
                self.gateway.dispatcher.check_model(spec.model)
            except NoWorkers:
                pass
            task_id = "task-" + secrets.token_hex(10)
            rows.append((task_id, payer.user_id, kind, {k: v for k, v in body.items() if k != "kind"}))
            specs.append((task_id, batch_tier(spec, payer.user_id)))
        lifecycle = self.lifecycle
        tickets = lifecycle.admit(payer, [spec for _, spec in specs], stored=True)
        runs = [Run(payer, spec, "async", ticket, request_id=task_id, durable=True)
                for (task_id, spec), ticket in zip(specs, tickets)]
        try:
            await self.store.run(self.store.add_tasks, rows, self.owner, self._lease_until(),
                                 payer.key_id)
        except BaseException:  # nothing stored: nothing ran, everything is given back
            for run in runs:
                lifecycle.end(run, 500)
            raise
        assert self._nursery is not None
        for (task_id, _), run in zip(specs, runs):
            self._nursery.start_soon(self._run_task, task_id, run)
        return [task_id for task_id, _ in specs], tickets[0].headers if tickets else {}

    async def _payer(self, user_id: int, key_id: int) -> Principal:
        """Who a taken-over task bills to (its charge stays with the front that admitted it)."""
        name = await self.store.run(self.store.username_of, user_id)
        return Principal(user_id, name or f"#{user_id}", key_id)

    async def cancel(self, user_id: int, task_id: str) -> dict | None:
        """Cancel a caller's own task; None when it is not theirs (or does not exist)."""
        if await self.store.run(self.store.task_of, user_id, task_id) is None:
            return None
        await self.store.run(self.store.task_finished, task_id, "cancelled", None,
                             {"message": "cancelled by the client", "type": "cancelled"})
        running = self._running.get(task_id)
        if running is not None:
            running[0].cancel()
        return await self.store.run(self.store.task_of, user_id, task_id)

    async def _run_task(self, task_id: str, run: Run) -> None:
        with trio.CancelScope() as scope:
            self._running[task_id] = (scope, run.payer.user_id)
            lifecycle = self.lifecycle
            try:
                if not await self.store.run(self.store.task_started, task_id, self.owner):
                    lifecycle.end(run, 409)  # cancelled, or taken over, before it began here
                    return
                body = json.loads(await lifecycle.complete(run, wait_for_worker=True))
                await self._finish(task_id, "completed", body, None, run.row)
            except Draining:  # not the task's fault: another front (or our successor) runs it
                await self.store.run(self.store.release_leases, self.owner, [task_id])
            except CohortError as error:
                await self._finish(task_id, "failed", None, error.body()["error"], run.row)
            except Exception as error:  # a bug: it must neither stop the front nor run again
                log.exception("task %s broke its runner", task_id)
                lifecycle.end(run, 500)
                await self._quarantine(task_id, f"it broke the task runner ({type(error).__name__})")
            finally:
                self._running.pop(task_id, None)
        if scope.cancelled_caught and run.row is not None:
            # stopped mid-run (cancelled, its user disabled, taken over): it reached a worker,
            # so its row is written; the outcome stands as whoever set it
            with trio.move_on_after(5) as bounded:
                bounded.shield = True
                await self.store.run(self.store.add_usage, [run.row])

    async def _finish(self, task_id: str, status: str, result: dict | None,
                      error: dict | None, usage: dict[str, Any] | None = None) -> None:
        """Record the outcome if the task is still ours (one outcome per task, whoever ran it),
        and its ledger row (if it reached a worker) in the same transaction."""
        if not await self.store.run(self.store.task_finished, task_id, status, result, error,
                                    self.owner, usage):
            log.info("task %s ended here after it was cancelled or taken over; its outcome "
                     "stands as recorded", task_id)

    async def _quarantine(self, task_id: str, why: str) -> None:
        log.warning("task %s quarantined: %s", task_id, why)
        await self._finish(task_id, "failed", None, {
            "message": f"this task is not run again: {why}", "type": "server_error",
            "code": "quarantined"})

    async def _purge(self) -> None:
        """Housekeeping: finished tasks past their retention, expired tokens, uploads whose
        front died. An old row waiting an hour more is harmless."""
        purged = await self.store.run(self.store.purge_tasks, self.settings.task_retention_s)
        await self.store.run(self.store.purge_expired_tokens)
        await self.store.run(self.store.purge_stalled_uploads,  # their front died
                             utcnow() - datetime.timedelta(seconds=PURGE_PERIOD_S))
        if purged:
            log.info("purged %d task(s) past COHORT_TASK_RETENTION_S", purged)
