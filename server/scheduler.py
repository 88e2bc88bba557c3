"""The batching loop: per-model queues turned into batches as soon as a worker can start them.

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
from server.scheduling.queue import ModelQueue, under_share

INTERACTIVE = ("interactive",)
# Interactive traffic is "recent" this long after its last arrival: the headroom is kept for it
# meanwhile, then batch work may take every free slot until the next interactive request comes.
INTERACTIVE_RECENT_S = 5.0

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

    def __init__(self, sink: BatchSink, *, max_batch_size: int, max_wait_s: float,
                 max_queue: int, fair: bool = True) -> None:
        self.sink = sink
        self.fair = fair
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self.queues: dict[str, ModelQueue] = {}
        self._interactive_at: dict[str, float] = {}  # per model, its last interactive arrival
        self._nursery: trio.Nursery | None = None

    async def run(self, *, task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled; the batching tasks live in this nursery."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started(self)
            await trio.sleep_forever()

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
            queue = self.queues[job.spec.model] = ModelQueue(self.max_queue, fair=self.fair)
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

    def _short(self, model: str, queue: ModelQueue) -> dict[str, int]:
        """Interactive users waiting while they hold less than their share of the engines."""
        if not self.fair:
            return {}
        waiting = queue.waiting_tenants("interactive")
        if not waiting:
            return {}
        return under_share(waiting, self.sink.held(model), self.sink.capacity(model))

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
        while True:
            while queue.oldest_arrival() is None:
                await queue.wait_changed()
            room, force = self.sink.room(model), False
            recent_until = self._interactive_at.get(model, -math.inf) + INTERACTIVE_RECENT_S
            headroom = (self.sink.headroom(model)
                        if self.fair and trio.current_time() < recent_until else 0)
            if 0 < room <= headroom and queue.oldest_arrival(INTERACTIVE) is None:
                # Only batch work waits, and the room left is the headroom it leaves free, so
                # that an interactive request that comes finds a slot at once; once interactive
                # traffic is no longer recent, batch work takes that room too.
                with trio.move_on_at(recent_until):
                    await self._either(self.sink.wait_for_change, queue.wait_changed)
                continue
            if not room:
                oldest = queue.oldest_arrival(INTERACTIVE)
                if oldest is None:
                    # Only batch work waits: it takes idle capacity, never an engine's queue,
                    # so an interactive request that comes meanwhile finds room first.
                    await self._either(self.sink.wait_for_change, queue.wait_changed)
                    continue
                # Every worker is full: requests gather until one has room, or until the oldest
                # has waited the window; then the engines' own queues take them. A user below
                # its share of the engines does not wait: see _send_short.
                short: dict[str, int] = {}
                with trio.move_on_at(oldest + self.max_wait_s) as window:
                    while not (room := self.sink.room(model)):
                        if short := self._short(model, queue):
                            break
                        await self._either(self.sink.wait_for_change, queue.wait_changed)
                if short and not room:
                    await self._send_short(model, queue, short)
                    continue
                force = window.cancelled_caught
                if force and not (room := self.sink.backlog_room(model)):
                    # the engines' queues hold their share: the rest waits here, in fair order
                    await self.sink.wait_for_change()
                    continue
            batch = (queue.take(min(self.max_batch_size, room), INTERACTIVE) if force
                     else queue.take(min(self.max_batch_size, room),
                                     lower_max=max(0, room - headroom)))
            if not batch:
                continue
            left = await self.sink.send_batch(model, batch, force=force)
            if left:  # no worker could take them after all: wait for the picture to change
                queue.push_front(left)
                await self.sink.wait_for_change()
