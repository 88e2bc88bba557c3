"""How the workers' states move: messages and ticks in, actions out. No sockets, no waiting.

A worker is registered by its hello (loading or ready), ready once its model loaded, failing
while its breaker pauses it, draining when it says so, and gone (dead, restarting) when it says
bye, says hello again from a new process, or stays silent past `worker_timeout_s`. What becomes
of its jobs is decided here too: those that streamed nothing run again elsewhere (`Requeue`),
the rest end with a clear error, and a model that lost its last ready worker fails what waits
for it (`FailQueued`). The pump (server.workers.pump) feeds this object and carries out what it
returns: messages to send, jobs handed back to the scheduler through a channel, and a wake of
whoever waits for the workers' picture to change.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from common import protocol
from common.config import ServerSettings
from server.errors import (BadRequest, CohortError, EngineFailed, NoWorkers, SlowReader,
                           UpstreamUnavailable, WorkerDied)
from server.jobs import Job
from server.metrics import Metrics
from server.rate import TokenBucket
from server.workers import zap
from server.workers.registry import GONE, WorkerHandle, WorkerRegistry

log = logging.getLogger("cohort.dispatch")

# A worker's per-request error kinds, as the client sees them (anything else: EngineFailed, 502).
FAILURES = {"invalid": BadRequest, "unavailable": UpstreamUnavailable,
            "undecodable": EngineFailed}
HELLO_RATE, HELLO_BURST = 20.0, 200  # new registrations a second per key, and in one burst
MAX_WORKERS = 1024  # live workers one front takes
DEAD_KEPT, DEAD_KEPT_S = 64, 600.0  # gone workers /health still shows, and for how long
RESTART_LIMIT_S = 90.0  # the supervisor's longest wait before a restart (60 s), and a margin


@dataclass(frozen=True)
class Requeue:
    """Jobs whose worker died or failed them: back to the head of their queues."""

    jobs: list[Job]


@dataclass(frozen=True)
class FailQueued:
    """The model lost its last ready worker: what waits for it fails now, not at its deadline."""

    model: str
    error: CohortError


Returned = Requeue | FailQueued  # what goes back up to the scheduler, through a channel


@dataclass
class Actions:
    """What the pump does after an event: send these, hand these back, wake the waiters."""

    send: list[tuple[bytes, protocol.Message]] = field(default_factory=list)
    returned: list[Returned] = field(default_factory=list)
    changed: bool = False

    def add(self, other: Actions) -> Actions:
        self.send += other.send
        self.returned += other.returned
        self.changed = self.changed or other.changed
        return self


class WorkerLifecycle:
    """Every worker's state, moved by its messages (`take`) and by the clock (`tick`)."""

    def __init__(self, settings: ServerSettings, metrics: Metrics, registry: WorkerRegistry,
                 front_id: str) -> None:
        self.settings = settings
        self.metrics = metrics
        self.registry = registry
        self.workers = registry.workers
        self.front_id = front_id
        self.refused_hellos = 0
        self._hello_buckets: dict[str | bytes, TokenBucket] = {}
        self._woke: float | None = None
        self._deferred = False

    # --- registration ---------------------------------------------------------------------------

    def may_register(self, identity: bytes, hello: protocol.Hello, key: str, now: float) -> bool:
        """A hello's worker id is its connection's, and one its CURVE key (`key`, "" without
        CURVE) may use; new workers come at a bounded rate per key, and in a bounded number."""
        if hello.worker_id.encode() != identity or (key and not zap.may_use(key, identity)):
            why = "a key registers only the worker ids it was made for"
        elif self._is_new(identity, hello) and not self._new_worker_allowed(key or identity, now):
            why = (f"more than {HELLO_RATE:g} new workers a second from one key, or "
                   f"{MAX_WORKERS} workers already")
        else:
            return True
        self.refused_hellos += 1
        if self.refused_hellos == 1 or self.refused_hellos % 100 == 0:
            log.warning("refused a hello as %r over a connection named %r with key %r: %s "
                        "(%d refused so far)", hello.worker_id, identity, key, why,
                        self.refused_hellos)
        return False

    def _is_new(self, identity: bytes, hello: protocol.Hello) -> bool:
        old = self.workers.get(identity)
        return old is None or old.pid != hello.pid or old.state in GONE

    def _new_worker_allowed(self, key: str | bytes, now: float) -> bool:
        live = sum(worker.state not in GONE for worker in self.workers.values())
        if live >= MAX_WORKERS:
            return False
        if len(self._hello_buckets) > 10_000:  # keys seen; without CURVE, connections
            self._hello_buckets.clear()
        bucket = self._hello_buckets.setdefault(key, TokenBucket(HELLO_RATE, HELLO_BURST))
        return bucket.take(now)

    def _register(self, identity: bytes, hello: protocol.Hello, now: float) -> Actions:
        actions = Actions()
        old = self.workers.get(identity)
        if old is not None and old.state not in GONE and old.pid != hello.pid:
            actions.add(self.mark_dead(old, "restarted (new process under the same id)"))
        if old is not None and old.state not in GONE and old.pid == hello.pid:
            old.last_seen = now  # a repeated hello from the same process: nothing is lost
            worker = old
        else:
            worker = WorkerHandle(identity, hello.worker_id, hello.engine, hello.model,
                                  hello.capacity, hello.device, hello.pid, hello.state, now,
                                  hello.load_time_s)
            worker.load.max_num_seqs = hello.capacity  # until its engine reports its own limit
            worker.load.reports_prefixes = hello.reports_prefixes
            worker.features, worker.max_model_len = frozenset(hello.features), hello.max_model_len
            self.workers[identity] = worker
            log.info("worker %s joined: engine %s, model %s, %s, state %s", hello.worker_id,
                     hello.engine, hello.model, hello.device, hello.state)
        actions.send.append((identity, protocol.Welcome(self.front_id,
                                                         self.settings.worker_timeout_s)))
        actions.changed = actions.changed or worker.state == "ready"
        return actions

    # --- messages -------------------------------------------------------------------------------

    def take(self, identity: bytes, message: protocol.Message, now: float) -> Actions:
        """A message a worker sent (decoded, and a hello already allowed by `may_register`)."""
        worker = self.workers.get(identity)
        if isinstance(message, protocol.Hello):
            return self._register(identity, message, now)
        if worker is not None and worker.state == "dead" and isinstance(message, protocol.Bye) \
                and message.restarting:  # the host said bye itself; now its supervisor speaks
            worker.state, worker.error = "restarting", f"said bye: {message.reason}"
            log.info("worker %s is restarting: %s", worker.worker_id, message.reason)
            return Actions()
        if worker is None or worker.state in GONE:
            return Actions(send=[(identity, protocol.HelloAgain())])
        worker.last_seen = now
        actions = Actions()
        if isinstance(message, (protocol.Out, protocol.Heartbeat)) and \
                (message.held or message.dropped):
            self.registry.placement.reported(identity, message.held, message.dropped)
        if isinstance(message, protocol.Out):
            actions.add(self._outputs(worker, message.items, now))
            actions.changed |= self._take_load(worker, message.load)
        elif isinstance(message, protocol.Heartbeat):
            worker.active = message.active
            if message.state == "draining" and worker.state in ("ready", "failing"):
                worker.state = "draining"  # it finishes what it has; nothing new goes to it
                log.info("worker %s is draining", worker.worker_id)
                actions.changed = True
            actions.changed |= self._take_load(worker, message.load)
        elif isinstance(message, protocol.Ready):
            worker.state, worker.load_time_s = "ready", message.load_time_s
            worker.model = message.model or worker.model
            if message.features is not None:
                worker.features = frozenset(message.features)
            log.info("worker %s ready with %s after %.1f s", worker.worker_id, worker.model,
                     message.load_time_s)
            actions.changed = True
        elif isinstance(message, protocol.Error):
            actions.add(self._failed(worker, message, now))
        elif isinstance(message, protocol.Bye):
            actions.add(self.mark_dead(worker, f"said bye: {message.reason or 'no reason given'}",
                                       state="restarting" if message.restarting else "dead"))
        return actions

    def unreadable(self, identity: bytes, data: bytes, error: protocol.ProtocolError,
                   now: float) -> Actions:
        """A worker's message the front cannot read: the jobs it names end now with the cause,
        rather than wait out their deadline for outputs that were in it."""
        worker = self.workers.get(identity)
        ids = protocol.request_ids(data) if worker is not None else []
        if worker is None or not ids:
            return Actions()
        return self._failed(worker, protocol.Error(
            f"the front could not read the worker's answer: {error}", ids, "undecodable"), now)

    @staticmethod
    def _take_load(worker: WorkerHandle, load: protocol.EngineLoad | None) -> bool:
        if load is None:
            return False
        worker.load.report(load)
        return True

    def _outputs(self, worker: WorkerHandle, items: list[protocol.OutItem], now: float) -> Actions:
        actions = Actions()
        for item in items:
            job = worker.jobs.get(item.id)
            if job is None:  # aborted, or re-run elsewhere: its late outputs are dropped
                continue
            if not job.got_output:
                job.first_output_at = now
                if job.trace is not None:
                    job.trace.first_output()
                self.metrics.ttft.labels(job.spec.model, job.spec.tier).observe(
                    job.first_output_at - job.enqueued_at)
            if not job.deliver(item):
                if job.buffered_bytes > self.settings.stream_buffer_bytes:
                    actions.add(self._too_slow(worker, job))
                continue
            self.release(job)
            if item.status >= 500:
                actions.add(self._count_failure(worker, f"the engine answered {item.status}", now))
            else:
                worker.breaker.succeeded()
        return actions

    def _too_slow(self, worker: WorkerHandle, job: Job) -> Actions:
        """A stream whose client does not read: the front holds at most COHORT_STREAM_BUFFER_BYTES
        of its events; past that the engine's request is aborted (its work freed) and the
        stream ends, after what is buffered, with an error that says why."""
        self.release(job)
        self.metrics.aborts.inc()
        job.fail(SlowReader(
            f"the client read this stream too slowly: over {self.settings.stream_buffer_bytes} "
            "bytes of its events waited (COHORT_STREAM_BUFFER_BYTES), so it was stopped"))
        return Actions(send=[(worker.identity, protocol.Abort([job.id]))])

    def _failed(self, worker: WorkerHandle, message: protocol.Error, now: float) -> Actions:
        """Requests that failed on a worker (or, without ids, the worker itself)."""
        if not message.ids:
            log.error("worker %s failed: %s", worker.worker_id, message.message)
            worker.error = message.message
            return self.mark_dead(worker, message.message, state="failed")
        # an invalid request is the client's fault; an unreadable message the wire's, and the
        # same bytes would be unreadable on any worker: neither counts against the engine
        engine_fault = message.kind not in ("invalid", "undecodable")
        actions, retry = Actions(), []
        for job_id in message.ids:
            job = worker.jobs.get(job_id)
            if job is None:
                continue
            self.release(job)
            if engine_fault and self._may_run_elsewhere(job, worker):
                job.failed_on.add(worker.identity)
                job.restart()
                retry.append(job)
            else:
                job.fail(FAILURES.get(message.kind, EngineFailed)(
                    message.message if message.kind in FAILURES
                    else f"the engine failed this request: {message.message}"))
            if engine_fault:
                actions.add(self._count_failure(worker, message.message, now))
        if retry:
            self.metrics.retries.inc(len(retry))
            actions.returned.append(Requeue(retry))
        return actions

    def _may_run_elsewhere(self, job: Job, worker: WorkerHandle) -> bool:
        """A job its engine failed runs again if it streamed nothing and another worker can take it."""
        return (job.retryable and job.attempts < self.settings.max_retries
                and any(other is not worker for other in self.registry.ready(worker.model)))

    def _count_failure(self, worker: WorkerHandle, reason: str, now: float) -> Actions:
        """One more engine failure in a row; enough of them pause the worker (its breaker).
        Each shows in /health, so a worker failing some requests is not shown plainly ready."""
        worker.jobs_failed += 1
        worker.last_failure = reason
        if not worker.breaker.failed(now, running=worker.jobs.keys()) \
                or worker.state not in ("ready", "failing"):
            return Actions()
        worker.state = "failing"
        worker.error = f"{worker.breaker.failures} requests in a row failed; last: {reason}"
        log.warning("worker %s paused for %g s: %s", worker.worker_id, worker.breaker.pause_s,
                    worker.error)
        return Actions(returned=self._orphaned(worker.model), changed=True)

    def _orphaned(self, model: str) -> list[Returned]:
        """A FailQueued for `model` if it has no ready worker left."""
        if self.registry.ready(model):
            return []
        return [FailQueued(model, NoWorkers(self.registry.why_unavailable(model)))]

    # --- the clock ------------------------------------------------------------------------------

    def tick(self, now: float, period: float) -> Actions:
        """A round of the liveness check, run every `period`: a worker silent past
        `worker_timeout_s` is dead, a paused one is tried again, a restarting one that never
        came back is dead, and gone workers are forgotten after a while."""
        # Woken late, the front itself did not run (starved of CPU, or a blocking call): the
        # heartbeats of that time still wait unread in its socket. Judging silence now would
        # kill sound workers; the next round judges it, after the receive loop read them (only
        # one round waits: a front late every round still finds dead workers).
        woke = now - period if self._woke is None else self._woke
        self._deferred = now - woke > 2 * period and not self._deferred
        self._woke = now
        actions = Actions()
        for worker in list(self.workers.values()):
            if worker.state not in GONE and not self._deferred \
                    and now - worker.last_seen > self.settings.worker_timeout_s:
                actions.add(self.mark_dead(
                    worker, f"silent for over {self.settings.worker_timeout_s:g} s"))
            elif worker.state == "failing" and worker.breaker.may_resume(now):
                worker.state = "ready"  # one failure pauses it again
                log.info("worker %s is tried again after its pause", worker.worker_id)
                actions.changed = True
            elif worker.state == "restarting" and now - worker.last_seen > RESTART_LIMIT_S:
                worker.state = "dead"  # its supervisor waits at most a minute between starts
                worker.error = f"said it would restart, and was not heard from again: {worker.error}"
        self._prune(now)
        return actions

    def _prune(self, now: float) -> None:
        """Forget gone workers past the newest DEAD_KEPT or older than DEAD_KEPT_S."""
        gone = sorted((w for w in self.workers.values() if w.state in GONE),
                      key=lambda w: w.last_seen, reverse=True)
        for index, worker in enumerate(gone):
            if index >= DEAD_KEPT or now - worker.last_seen > DEAD_KEPT_S:
                del self.workers[worker.identity]

    # --- ends -----------------------------------------------------------------------------------

    def mark_dead(self, worker: WorkerHandle, reason: str, state: str = "dead") -> Actions:
        """Take a worker out of service; re-run its jobs that streamed nothing, fail the rest."""
        log.warning("worker %s is %s: %s", worker.worker_id, state, reason)
        worker.state = state
        worker.error = reason if state == "restarting" else worker.error or reason
        self.metrics.worker_deaths.inc()
        retry: list[Job] = []
        for job in list(worker.jobs.values()):
            if job.finished:
                continue
            if job.retryable and job.attempts < self.settings.max_retries:
                job.restart()
                retry.append(job)
            else:
                job.fail(WorkerDied(
                    f"worker {worker.worker_id} died ({reason}) while running this request"
                    + ("" if job.retryable else " after part of it was streamed")))
        worker.jobs.clear()
        self.registry.placement.forget(worker.identity)
        actions = Actions(changed=True)
        if retry:
            self.metrics.retries.inc(len(retry))
            actions.returned.append(Requeue(retry))
        actions.returned += self._orphaned(worker.model)
        return actions

    def release(self, job: Job) -> None:
        """Forget a finished job (the worker's next load report tells what it freed)."""
        worker = self.registry.by_id(job.worker_id)
        if worker is not None and worker.jobs.pop(job.id, None) is not None:
            worker.jobs_done += 1
