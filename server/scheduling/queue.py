"""What waits: one model's queue of jobs, bounded, oldest first, with retries put back in front."""

from __future__ import annotations

import collections
from collections.abc import Iterable

import trio

from server.errors import QueueFull
from server.jobs import Job


class ModelQueue:
    """The queue policy for one model, with no tasks in it: what waits, and what leaves next."""

    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        self._jobs: collections.deque[Job] = collections.deque()
        self._changed = trio.Event()

    def __len__(self) -> int:
        return len(self._jobs)

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def push(self, job: Job) -> None:
        """Queue a new job, or refuse it with QueueFull when the queue is at its bound."""
        if len(self._jobs) >= self.max_size:
            raise QueueFull(
                f"the queue for model {job.spec.model!r} holds {self.max_size} requests; "
                "retry later (COHORT_MAX_QUEUE sets the bound)")
        self._jobs.append(job)
        self._notify()

    def push_front(self, jobs: Iterable[Job]) -> None:
        """Put jobs back at the head (a retry after a worker died); the bound does not apply."""
        self._jobs.extendleft(reversed(list(jobs)))
        self._notify()

    def oldest_arrival(self) -> float | None:
        self._drop_cancelled()
        return self._jobs[0].enqueued_at if self._jobs else None

    def take(self, max_jobs: int) -> list[Job]:
        """Remove and return up to `max_jobs` live jobs, oldest first."""
        batch: list[Job] = []
        while self._jobs and len(batch) < max_jobs:
            job = self._jobs.popleft()
            if job.state == "queued":
                batch.append(job)
        return batch

    def drain(self) -> list[Job]:
        jobs = self.take(len(self._jobs))
        self._notify()
        return jobs

    def _drop_cancelled(self) -> None:
        while self._jobs and self._jobs[0].state != "queued":
            self._jobs.popleft()

    def live_count(self) -> int:
        return sum(1 for job in self._jobs if job.state == "queued")

    async def wait_changed(self) -> None:
        await self._changed.wait()
