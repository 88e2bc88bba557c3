"""The front's jobs: submitted to the scheduler, and the two ways to wait for one: whole, or streamed."""

from __future__ import annotations

import json
import logging
import math
import signal
from collections.abc import AsyncIterator
from typing import Any

import trio

from common.config import ServerSettings
from common.protocol import OutItem
from server.workers.lifecycle import Returned
from server.workers.pump import Dispatcher
from server.errors import (CohortError, DeadlineExceeded, Draining, EngineRefused, NoWorkers,
                           NotFound, QueueFull)
from server.jobs import Job, JobSpec, Restart
from server.limits import Limiter
from server.metrics import Metrics
from server.scheduler import Scheduler
from server.scheduling.policy import SchedulingPolicy
from server.scheduling.prefix import prefix_blocks
from server.live_window import LiveWindow
from server.tracing import Tracing

log = logging.getLogger("cohort.gateway")


class Gateway:
    """Owns dispatcher, scheduler, limiter and metrics for one app, and runs its jobs."""

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.metrics = Metrics(per_user=settings.metrics_per_user)
        # jobs the workers' side hands back go up to the scheduler through this channel: the
        # scheduler calls the dispatcher, never the other way round
        returns, returned = trio.open_memory_channel[Returned](math.inf)
        policy = SchedulingPolicy.of(settings)  # fair shares or one line: chosen here, once
        self.dispatcher = Dispatcher(settings, self.metrics, policy, returns)
        self.scheduler = Scheduler(self.dispatcher, policy, returns=returned)
        self.limiter = Limiter()
        self.tracing = Tracing(settings.otlp_endpoint)
        self.live = LiveWindow()  # the console's last hour
        self.nursery: trio.Nursery | None = None
        self.services_up = False  # set once dispatcher, scheduler and task runner all run
        self.draining = False  # set by SIGTERM/SIGINT: no new requests, those in flight finish

    async def drain_on_signal(self) -> None:
        """SIGTERM or SIGINT (honcho, systemd, Kubernetes, Ctrl-C): take no new request (503,
        `/ready` false), let those in flight finish for COHORT_DRAIN_TIMEOUT_S, then end what is
        left with a clear error, so a stream ends with an error event and `[DONE]`, never a bare
        cut. hypercorn, told by the same signal, stops accepting and waits a little longer."""
        for signum in (signal.SIGTERM, signal.SIGINT):  # a late one must not kill our last moments
            signal.signal(signum, signal.SIG_IGN)
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for received in signals:
                if self.draining:
                    continue
                self.draining = True
                log.info("%s: draining for up to %g s (COHORT_DRAIN_TIMEOUT_S)",
                         signal.Signals(received).name, self.settings.drain_timeout_s)
                assert self.nursery is not None
                self.nursery.start_soon(self._end_drain)

    async def _end_drain(self) -> None:
        await trio.sleep(self.settings.drain_timeout_s)
        error = Draining(f"the front shut down; this request ran past its drain time of "
                         f"{self.settings.drain_timeout_s:g} s (COHORT_DRAIN_TIMEOUT_S)")
        self.scheduler.fail_all_queued(error)
        cut = self.dispatcher.fail_all(error)
        if cut:
            log.warning("drain time up: %d request(s) cut with an error", cut)

    async def run(self, *, task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        """Start every service; report started only once workers can connect and jobs queue."""
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            endpoint = await nursery.start(self.dispatcher.run)
            await nursery.start(self.scheduler.run)
            log.info("front %s takes workers on %s", self.dispatcher.front_id, endpoint)
            task_status.started(endpoint)

    def submit(self, spec: JobSpec) -> Job:
        """Accept a job (or raise NotFound / NoWorkers / QueueFull / BadRequest at once)."""
        self.dispatcher.check_model(spec.model)
        self.dispatcher.registry.check_features(spec.model, [spec.route, *spec.features])
        now = trio.current_time()
        job = Job(spec, enqueued_at=now, deadline=now + self.settings.request_timeout_s)
        if self.settings.prefix_affinity and spec.prompt_text:
            job.prefix = prefix_blocks(spec.prompt_text)
        self.scheduler.submit(job)
        return job

    async def submit_when_possible(self, spec: JobSpec) -> Job:
        """Submit stored work (a task, a batch line), waiting within the request timeout for a
        worker of its model: after a restart the workers reconnect. NoWorkers past it."""
        with trio.move_on_after(self.settings.request_timeout_s):
            while True:
                try:
                    return self.submit(spec)
                except (NoWorkers, NotFound, QueueFull):
                    await self.dispatcher.wait_for_change()
        raise NoWorkers(f"no worker took model {spec.model!r} within "
                        f"{self.settings.request_timeout_s:g} s")

    def _observe_end(self, job: Job, last: OutItem, route: str) -> None:
        took = trio.current_time() - job.enqueued_at
        self.metrics.latency.labels(route).observe(took)
        log.debug("request_id=%s job=%s worker=%s batch=%s attempts=%d took=%.4fs", job.spec.trace_id,
                  job.id, job.worker_id, job.batch_id, job.attempts + 1, took)
        usage = last.usage or {}
        self.metrics.prompt_tokens.inc(usage.get("prompt_tokens", 0))
        self.metrics.completion_tokens.inc(usage.get("completion_tokens", 0))
        job.used_tokens = usage.get("prompt_tokens", 0) + usage.get("completion_tokens", 0)
        job.usage = usage

    async def _next(self, job: Job) -> Any:
        """The job's next output; DeadlineExceeded past its deadline; errors raised, and so is
        the engine's refusal (vLLM's status and error body)."""
        with trio.move_on_at(job.deadline):
            output = await job.outputs.receive()
            if isinstance(output, CohortError):
                raise output
            if isinstance(output, OutItem) and output.status >= 400:
                raise EngineRefused(output.status, _json_or_text(output.data))
            return output
        raise DeadlineExceeded(
            f"no answer within {self.settings.request_timeout_s:g} s (COHORT_REQUEST_TIMEOUT_S)")

    async def complete(self, job: Job, route: str) -> bytes:
        """Wait for the whole job and return its JSON body; on cancel, error or deadline, abort it
        on its worker."""
        try:
            while True:
                output = await self._next(job)
                if not isinstance(output, Restart) and output.done:
                    break
        finally:
            self.dispatcher.abort(job)  # a no-op once the job finished
        self._observe_end(job, output, route)
        return output.data

    async def stream(self, job: Job, route: str) -> AsyncIterator[bytes]:
        """Yield the SSE events ready at each moment, joined (so ready events share one write)."""
        try:
            while True:
                output = await self._next(job)
                if isinstance(output, Restart):  # nothing was sent yet, or it would not restart
                    continue
                ready = [output]
                while not ready[-1].done:
                    try:
                        more = job.outputs.receive_nowait()
                    except trio.WouldBlock:
                        break
                    if isinstance(more, CohortError):
                        raise more
                    ready.append(more)  # no Restart here: the job has sent output, so it stays
                data = b"".join(item.data for item in ready)
                job.buffered_bytes -= len(data)
                yield data
                if ready[-1].done:
                    break
        finally:
            self.dispatcher.abort(job)
        self._observe_end(job, ready[-1], route)


def _json_or_text(data: bytes) -> Any:
    try:
        return json.loads(data)
    except ValueError:
        return data.decode(errors="replace")
