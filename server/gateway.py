"""The front's services in one place, and the two ways a route waits for a job: whole, or streamed."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import trio

from common.config import ServerSettings
from server.dispatch import Dispatcher
from server.errors import CohortError, DeadlineExceeded
from server.jobs import Job, JobSpec, Restart
from server.metrics import Metrics
from server.openai_format import Collector
from server.scheduler import Scheduler
from server.scheduling.prefix import prefix_blocks, prompt_text

log = logging.getLogger("cohort.gateway")


class Gateway:
    """Owns dispatcher and scheduler (and, when set, the store and auth) for one app."""

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.dispatcher = Dispatcher(settings, self.metrics)
        self.scheduler = Scheduler(self.dispatcher, max_batch_size=settings.max_batch_size,
                                   max_wait_s=settings.max_wait_s, max_queue=settings.max_queue)
        self.dispatcher.scheduler = self.scheduler
        self.nursery: trio.Nursery | None = None
        # set by create_app: the store, the auth checks and the durable task runner
        self.store: Any = None
        self.auth: Any = None
        self.tasks: Any = None

    async def run(self, *, task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        """Start every service; report started only once workers can connect and jobs queue."""
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            endpoint = await nursery.start(self.dispatcher.run)
            await nursery.start(self.scheduler.run)
            log.info("front %s takes workers on %s", self.dispatcher.front_id, endpoint)
            task_status.started(endpoint)

    def submit(self, spec: JobSpec) -> Job:
        """Accept a job (or raise NotFound / NoWorkers / QueueFull at once)."""
        self.dispatcher.check_model(spec.model)
        if spec.features:
            self.dispatcher.registry.check_features(spec.model, spec.features)
        now = trio.current_time()
        job = Job(spec, enqueued_at=now, deadline=now + self.settings.request_timeout_s)
        if self.settings.prefix_affinity:
            job.prefix = prefix_blocks(prompt_text(spec.kind, spec.prompt, spec.messages))
        self.scheduler.submit(job)
        return job

    def _observe_end(self, job: Job, collected: Collector, route: str) -> None:
        took = trio.current_time() - job.enqueued_at
        self.metrics.latency.labels(route).observe(took)
        log.debug("request_id=%s job=%s worker=%s batch=%s attempts=%d took=%.4fs", job.spec.trace_id,
                  job.id, job.worker_id, job.batch_id, job.attempts + 1, took)
        usage = collected.usage()
        self.metrics.prompt_tokens.inc(usage["prompt_tokens"])
        self.metrics.completion_tokens.inc(usage["completion_tokens"])

    async def _next(self, job: Job) -> Any:
        """The job's next output; DeadlineExceeded past its deadline; errors raised."""
        with trio.move_on_at(job.deadline):
            output = await job.outputs.receive()
            if isinstance(output, CohortError):
                raise output
            return output
        raise DeadlineExceeded(
            f"no answer within {self.settings.request_timeout_s:g} s (COHORT_REQUEST_TIMEOUT_S)")

    async def complete(self, job: Job, route: str) -> Collector:
        """Wait for the whole job; on cancel, error or deadline, abort it on its worker."""
        collected = Collector(job.spec.n)
        try:
            while not collected.done:
                output = await self._next(job)
                if isinstance(output, Restart):
                    collected.reset()
                else:
                    collected.add(output)
        finally:
            self.dispatcher.abort(job)  # a no-op once the job finished
        self._observe_end(job, collected, route)
        return collected

    async def stream(self, job: Job, collected: Collector, route: str
                     ) -> AsyncIterator[list[dict[str, Any]]]:
        """Yield the outputs ready at each moment, as lists (so ready tokens share one event)."""
        try:
            while not collected.done:
                output = await self._next(job)
                if isinstance(output, Restart):  # nothing was sent yet, or it would not restart
                    collected.reset()
                    continue
                ready = [output]
                while True:
                    try:
                        more = job.outputs.receive_nowait()
                    except trio.WouldBlock:
                        break
                    if isinstance(more, CohortError):
                        raise more
                    if isinstance(more, Restart):
                        collected.reset()
                        ready = []
                    else:
                        ready.append(more)
                if not ready:
                    continue
                for item in ready:
                    collected.add(item)
                yield ready
        finally:
            self.dispatcher.abort(job)
        self._observe_end(job, collected, route)
