"""One request's way through the front, the same for every way in: admit against its payer's
limits, submit, run, settle the charge against real use, record its one ledger row.

The routes (chat, completions, embeddings, `/inference/batch`), the task runner and the Batch
API's runner all go through `Lifecycle`; nothing else charges or records. Its rules, once:

- A request is admitted against its payer's limits before it is queued (`admit`), all or none
  for a group; stored work (tasks, Batch API lines) holds no concurrency slot.
- Whatever way it ends, it is settled once (`end`): what it really used is charged (above the
  estimate too), so a refusal at submit or a failure before any output gives back everything,
  and a request cut off mid-run (the client left, or read its stream too slowly) keeps its
  estimate, its real use unknown.
- A request that reached a worker leaves exactly one ledger row, keyed by its request id, with
  its ledger route (`chat`, `completions`, `embeddings`, `async`, `batch_item`, `batch_api`).
  An interactive request's row is journaled as it ends, before its answer does (server.usage);
  a durable one's (`durable=True`) is written by its runner in the same transaction as its
  outcome.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncGenerator, Iterator
from dataclasses import dataclass
from typing import Any

import trio

from server.auth import Principal
from server.errors import CohortError, QuotaExceeded, RateLimited
from server.jobs import Job, JobSpec
from server.limits import Ticket
from server.store import utcnow
from server.tracing import RequestTrace
from server.usage import UsageLedger, usage_row

CLIENT_LEFT = 499  # nginx's status for a client that went away before its answer


@dataclass
class Run:
    """One request in the lifecycle: who pays, what runs, its hold on the limits, and how it
    ended (its job once submitted, its ledger row once it reached a worker)."""

    payer: Principal
    spec: JobSpec
    ledger_route: str  # chat | completions | embeddings | ... | async | batch_item | batch_api
    ticket: Ticket | None = None
    request_id: str = ""  # the ledger's key; a job's own id unless the runner names it
    durable: bool = False  # its runner writes the row with its outcome (tasks, Batch API lines)
    job: Job | None = None
    status: int = 0  # once ended
    row: dict[str, Any] | None = None
    trace: RequestTrace | None = None  # its spans (COHORT_OTLP_ENDPOINT), from the route's start

    @property
    def ended(self) -> bool:
        return self.status != 0

    @property
    def reached_worker(self) -> bool:
        return self.job is not None and bool(self.job.worker_id)


class Lifecycle:
    """Admission, settlement and the ledger for every request; the gateway runs the jobs."""

    def __init__(self, gateway, ledger: UsageLedger) -> None:
        self.gateway = gateway
        self.limiter = gateway.limiter
        self.metrics = gateway.metrics
        self.ledger = ledger
        self.tracing = gateway.tracing
        self.live = gateway.live

    # --- admitting ------------------------------------------------------------------------------

    def admit(self, payer: Principal, specs: list[JobSpec], *, stored: bool = False
              ) -> list[Ticket]:
        """Count requests against the payer's limits, all or none (a 429 says which limit).
        `stored` work (tasks, batches of items) holds no concurrency slot: it runs later, in the
        batch tier, and holds no connection."""
        now, today = trio.current_time(), utcnow().date()
        subjects = list(payer.limits)
        if len(specs) == 1 and not stored:
            return [self.limiter.admit(subjects, specs[0].cost, now, today)]
        return self.limiter.admit_batch(subjects, [spec.cost for spec in specs], now, today)

    async def admit_when_allowed(self, payer: Principal, spec: JobSpec) -> Ticket:
        """Admit stored work that must not be refused (a Batch API line): past a limit it
        waits the time the refusal names, so a batch spreads itself instead of overspending."""
        while True:
            try:
                return self.admit(payer, [spec], stored=True)[0]
            except (RateLimited, QuotaExceeded) as error:
                await trio.sleep(max(1, int(error.headers.get("Retry-After", "1"))))

    # --- running ------------------------------------------------------------------------------

    def start(self, run: Run) -> Job:
        """Submit now (a refusal ends the run, then raises: NoWorkers, QueueFull, ...)."""
        self._trace(run)
        try:
            run.job = self.gateway.submit(run.spec)
        except CohortError as error:
            self.end(run, error.status)
            raise
        self._queued(run)
        return run.job

    def _trace(self, run: Run) -> None:
        """Stored work is traced from here: it has no route of its own around it."""
        if run.trace is None:
            run.trace = self.tracing.begin(f"cohort {run.ledger_route}")

    @staticmethod
    def _queued(run: Run) -> None:
        if run.trace is not None and run.job is not None:
            run.job.trace = run.trace
            run.trace.queued()

    async def complete(self, run: Run, *, wait_for_worker: bool = False) -> bytes:
        """Run the request to its whole answer and end it, whichever way it goes.
        `wait_for_worker`: stored work waits (within the request timeout) for a worker of its
        model, as after a restart; a request refuses at once."""
        with self._ending(run):
            if wait_for_worker:
                self._trace(run)
                run.job = await self.gateway.submit_when_possible(run.spec)
                self._queued(run)
            else:
                self.start(run)
            assert run.job is not None
            body = await self.gateway.complete(run.job, run.ledger_route)
        self.end(run, 200)
        return body

    async def stream(self, run: Run) -> AsyncGenerator[bytes, None]:
        """The started run's SSE events as they come; it ends (and is settled) when they do."""
        assert run.job is not None
        events = self.gateway.stream(run.job, run.ledger_route)
        try:
            with self._ending(run):
                async for data in events:
                    yield data
        finally:
            await events.aclose()
        self.end(run, 200)

    @contextlib.contextmanager
    def _ending(self, run: Run) -> Iterator[None]:
        """End the run with the status of what stops it: an error's, or 499 for a client that
        left (a cancel, or a stream closed early)."""
        try:
            yield
        except CohortError as error:
            self.end(run, error.status)
            raise
        except BaseException:
            self.end(run, CLIENT_LEFT)
            raise

    # --- ending -------------------------------------------------------------------------------

    def end(self, run: Run, status: int) -> None:
        """Settle the run's charge against what it used and make its ledger row; once only."""
        if run.ended:
            return
        run.status = status
        job = run.job
        if job is not None and job.used_tokens is not None:
            used: int | None = job.used_tokens
        elif job is not None and run.reached_worker and (job.got_output or status == CLIENT_LEFT):
            used = None  # cut off mid-run (the client left, read too slowly, ...): its use is
            # unknown, its estimate stands
        else:
            used = 0  # refused, or failed before any output: nothing is charged
        if run.ticket is not None:
            self.limiter.settle(run.ticket, used, trio.current_time())
        usage = job.usage if job is not None else {}
        prompt, completion = usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0)
        if run.trace is not None:
            run.trace.end(status, model=run.spec.model, user_id=run.payer.user_id,
                          prompt_tokens=prompt, completion_tokens=completion)
        if not run.reached_worker:
            return
        assert job is not None
        now = trio.current_time()
        ttft_s = job.first_output_at - job.enqueued_at if job.first_output_at else None
        self.live.observe(time.time(), now - job.enqueued_at, ttft_s, status)
        self.metrics.user_request(run.payer.username, run.spec.model, status, prompt, completion)
        run.row = usage_row(
            request_id=run.request_id or job.id, user_id=run.payer.user_id,
            username=run.payer.username, key_id=run.payer.key_id, model=run.spec.model,
            route=run.ledger_route, status=status, prompt_tokens=prompt,
            completion_tokens=completion, queue_s=(job.started_at or now) - job.enqueued_at,
            ttft_s=ttft_s,
            total_s=now - job.enqueued_at)
        if not run.durable:
            self.ledger.record(run.row)
