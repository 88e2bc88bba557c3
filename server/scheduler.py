"""The batching loop: per-model queues turned into batches as soon as a worker can start them.
What leaves when is decided by the policy (server.scheduling.policy, a plain function of what
the loop sees); this module keeps the queues, carries decisions out and does the waiting.

Work-conserving: while some worker of the model has room (see `server.scheduling.placement`), a
request leaves at once, with whatever gathered behind it (up to `max_batch_size` and the room
there is). Only while every worker is full do requests gather; they leave when room appears, or
once the oldest has waited `max_wait_s` (VLLM_BATCH_WAIT_TIMEOUT), into the least loaded engine's
own queue, as `vllm serve` would have queued them. The window never delays a request while a
worker is idle. What leaves is chosen by the queue's fair shares (`server.scheduling.queue`):
interactive before batch, tenants by turns; batch work only ever takes room that is free, less
a headroom (COHORT_BATCH_HEADROOM) kept for interactive requests that arrive, and only while
interactive traffic is recent (INTERACTIVE_RECENT_S): the headroom may delay batch work, never
stop it, so idle engines always take it (work-conserving, whatever max_num_seqs is). A user
holding less than its share of the engines skips the window: its requests go into an engine's
queue at once, where their priority starts them before the busier users' (engine_priority).
"""

from __future__ import annotations

import logging
import math
from typing import Protocol

import trio

from server.errors import CohortError
from server.jobs import Job
from server.scheduling.policy import (INTERACTIVE, INTERACTIVE_RECENT_S, QueueView,
                                     SchedulingPolicy, SendShort, Wait)
from server.scheduling.queue import ModelQueue, under_share
from server.workers.lifecycle import Requeue, Returned


log = logging.getLogger("cohort.scheduler")


class BatchSink(Protocol):
    """What the scheduler needs from the dispatcher."""

    def room(self, model: str) -> int:
        """Sequences the ready workers of `model` could start now (0: all saturated)."""

    def backlog_room(self, model: str) -> int:
        """Sequences that may still be forced into the engines' own queues (0: none)."""

    def held(self, model: str) -> dict[str, tuple[int, float]]:
        """Per tenant, the sequences it has on the ready workers of `model`, and its weight."""

    def capacity(self, model: str) -> int:
        """Sequences the ready workers of `model` run at once (their max_num_seqs together)."""

    def headroom(self, model: str) -> int:
        """Sequences batch work leaves free on the ready workers of `model`."""

    async def wait_for_change(self) -> None:
        """Return at the next change of the workers' load or state."""

    async def send_batch(self, model: str, jobs: list[Job], *, force: bool = False,
                         beyond_backlog: bool = False) -> list[Job]:
        """Place jobs on workers with room (`force`: on any that reads, within the backlog
        bound unless `beyond_backlog`); return those left over."""


class Scheduler:
    """Owns one ModelQueue and one batching task per model, in the nursery it is started in."""

    def __init__(self, sink: BatchSink, policy: SchedulingPolicy,
                 returns: trio.MemoryReceiveChannel[Returned] | None = None) -> None:
        self.sink = sink
        self.policy = policy
        self.returns = returns  # jobs the workers hand back: re-run, or failed while queued
        self.queues: dict[str, ModelQueue] = {}
        self._interactive_at: dict[str, float] = {}  # per model, its last interactive arrival
        self._nursery: trio.Nursery | None = None

    async def run(self, *, task_status: trio.TaskStatus[Scheduler] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Serve until cancelled; the batching tasks live in this nursery."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            if self.returns is not None:
                nursery.start_soon(self._take_returns, self.returns)
            task_status.started(self)
            await trio.sleep_forever()

    async def _take_returns(self, returns: trio.MemoryReceiveChannel[Returned]) -> None:
        """What the workers' side hands back, in the order it decided it."""
        async for returned in returns:
            if isinstance(returned, Requeue):
                self.requeue(returned.jobs)
            else:
                self.fail_queued(returned.model, returned.error)

    @staticmethod
    async def _either(*waits) -> None:
        """Return as soon as one of `waits` returns."""
        async with trio.open_nursery() as nursery:
            async def wait(event) -> None:
                await event()
                nursery.cancel_scope.cancel()
            for event in waits:
                nursery.start_soon(wait, event)

    def submit(self, job: Job) -> None:
        """Queue a job (QueueFull if its model's queue is at its bound)."""
        queue = self.queues.get(job.spec.model)
        if queue is None:
            if self._nursery is None:
                raise RuntimeError("the scheduler is not running")
            queue = self.queues[job.spec.model] = self.policy.queue()
            self._nursery.start_soon(self._batch_loop, job.spec.model, queue)
        queue.push(job)
        if job.spec.tier == "interactive":
            self._interactive_at[job.spec.model] = trio.current_time()

    def requeue(self, jobs: list[Job]) -> None:
        """Put jobs whose worker died back at the head of their queues."""
        for job in jobs:
            self.queues[job.spec.model].push_front([job])

    def fail_all_queued(self, error: CohortError) -> None:
        for model in list(self.queues):
            self.fail_queued(model, error)

    def fail_queued(self, model: str, error: CohortError) -> None:
        """The model lost its last ready worker: fail what waits for it now, not at its deadline."""
        queue = self.queues.get(model)
        if queue is not None:
            for job in queue.drain():
                job.fail(error)

    def queued(self) -> dict[str, int]:
        return {model: queue.live_count() for model, queue in self.queues.items()}

    def queued_by_tier(self) -> dict[str, dict[str, int]]:
        return {model: queue.live_by_tier() for model, queue in self.queues.items()}

    def _view(self, model: str, queue: ModelQueue) -> QueueView:
        """What the decision needs, read from the workers and the queue now; who is short of
        their share is worked out only when it can matter (every worker full, with fair shares)."""
        room = self.sink.room(model)
        oldest = queue.oldest_arrival(INTERACTIVE)
        short: dict[str, int] = {}
        if not room and oldest is not None and self.policy.fair:
            waiting = queue.waiting_tenants("interactive")
            if waiting:
                short = under_share(waiting, self.sink.held(model), self.sink.capacity(model))
        return QueueView(trio.current_time(), room, self.sink.backlog_room(model),
                         self.sink.headroom(model),
                         self._interactive_at.get(model, -math.inf) + INTERACTIVE_RECENT_S,
                         oldest, short)

    async def _send_short(self, model: str, queue: ModelQueue, short: dict[str, int]) -> None:
        """Send the jobs of users below their share (`short`: how far below) into the engines'
        queues at once, beyond the backlog bound: their engine priority starts them at the next
        free slot, ahead of what the busiest users queued there. Each goes only up to its share."""
        jobs = queue.take_from(short, "interactive")
        if not jobs:
            return
        left = await self.sink.send_batch(model, jobs, force=True, beyond_backlog=True)
        if left:
            queue.push_front(left)
            await self.sink.wait_for_change()

    async def _batch_loop(self, model: str, queue: ModelQueue) -> None:
        """The policy decides; this loop only carries the decision out and waits."""
        while True:
            while queue.oldest_arrival() is None:
                await queue.wait_changed()
            decision = self.policy.decide(self._view(model, queue))
            if isinstance(decision, Wait):
                with trio.move_on_at(decision.until):
                    if decision.queue_too:
                        await self._either(self.sink.wait_for_change, queue.wait_changed)
                    else:
                        await self.sink.wait_for_change()
            elif isinstance(decision, SendShort):
                await self._send_short(model, queue, decision.short)
            else:
                batch = queue.take(decision.count, decision.tiers, lower_max=decision.lower_max)
                if not batch:
                    continue
                left = await self.sink.send_batch(model, batch, force=decision.force)
                if left:  # no worker could take them after all: wait for the picture to change
                    queue.push_front(left)
                    await self.sink.wait_for_change()
