"""The ZeroMQ side of the workers: registration, liveness, batches out, outputs and loads in.

The front binds a ROUTER; each worker connects a DEALER whose identity is its worker id. Which
worker gets a job is `server.scheduling.placement`'s decision; this module carries it out. A worker
that stays silent past `worker_timeout_s`, says bye, or says hello again from a new process is dead:
its jobs that have streamed nothing are re-run elsewhere, the rest end with a clear error.
"""

from __future__ import annotations

import itertools
import logging
import os
import socket

import msgspec
import trio
import zmq

from common import protocol
from common.config import ServerSettings
from common.keys import KeyFiles, is_local, serve_curve
from common.zmqtrio import TrioSocket
from server import zap
from server.errors import (BadRequest, CohortError, EngineFailed, NoWorkers, UpstreamUnavailable,
                           WorkerDied)
from server.jobs import Job
from server.metrics import Metrics
from server.scheduling.engine_priority import engine_priorities
from server.scheduling.queue import batch_headroom
from server.scheduling.placement import ENGINE_BACKLOG, Placement
from server.scheduling.rate import TokenBucket
from server.workers import GONE, WorkerHandle, WorkerRegistry

log = logging.getLogger("cohort.dispatch")

# A worker's per-request error kinds, as the client sees them (anything else: EngineFailed, 502).
FAILURES = {"invalid": BadRequest, "unavailable": UpstreamUnavailable,
            "undecodable": EngineFailed}
HELLO_RATE, HELLO_BURST = 20.0, 200  # new registrations a second per key, and in one burst
MAX_WORKERS = 1024  # live workers one front takes
DEAD_KEPT, DEAD_KEPT_S = 64, 600.0  # gone workers /health still shows, and for how long
RESTART_LIMIT_S = 90.0  # the supervisor's longest wait before a restart (60 s), and a margin


class Dispatcher:
    """Sends batches to workers and routes what they send back to the waiting jobs."""

    def __init__(self, settings: ServerSettings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.front_id = f"{socket.gethostname()}-{os.getpid()}"
        self.endpoint = ""
        self.placement = Placement(max_unacked_batches=settings.max_batches_per_worker,
                                   affinity_margin=settings.affinity_margin,
                                   prefix_affinity=settings.prefix_affinity,
                                   backlog=ENGINE_BACKLOG if settings.fair_shares else 0.0)
        self.registry = WorkerRegistry(self.placement, metrics)
        self.workers = self.registry.workers
        self.scheduler = None  # set by the app: where retried jobs go back to
        self._sock: TrioSocket | None = None
        self._changed = trio.Event()
        self._batch_ids = itertools.count(1)
        self.refused_hellos = 0
        self._hello_buckets: dict[str | bytes, TokenBucket] = {}
        # Aborts leave through this outbox, so `abort` never awaits: it runs in `finally` blocks of
        # cancelled handlers and of streaming generators being closed.
        self._outbox_send, self._outbox = trio.open_memory_channel[tuple[bytes, protocol.Message]](
            10_000)

    # --- service ---------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        """Bind, then receive and watch liveness until cancelled; started() once bound."""
        context = zmq.Context.instance()
        raw = context.socket(zmq.ROUTER)
        raw.setsockopt(zmq.ROUTER_MANDATORY, 1)  # an unroutable batch must fail, not vanish
        # No ROUTER_HANDOVER: a connection under a worker id in use is refused, so no peer can take
        # over another's route; ZMTP heartbeats free the id of a connection that went silent.
        raw.setsockopt(zmq.HEARTBEAT_IVL, 1000)
        raw.setsockopt(zmq.HEARTBEAT_TIMEOUT, int(self.settings.worker_timeout_s * 1000))
        raw.setsockopt(zmq.SNDHWM, 100_000)
        raw.setsockopt(zmq.RCVHWM, 100_000)
        raw.setsockopt(zmq.LINGER, 0)
        raw.setsockopt(zmq.MAXMSGSIZE, self.settings.zmq_max_message_bytes)
        self._secure(raw)
        self.endpoint = self._bind(raw)
        with TrioSocket(raw) as sock:
            self._sock = sock
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._liveness_loop)
                nursery.start_soon(self._outbox_loop)
                task_status.started(self.endpoint)
                await self._receive_loop()

    def _secure(self, raw: zmq.Socket) -> None:
        """CURVE with the data directory's keys, each worker checked by the ZAP handler."""
        if self.settings.zmq_insecure:
            where = ("this machine" if is_local(self.settings.zmq_bind)
                     else "ANY MACHINE THAT REACHES IT")
            log.warning("THE WORKER WIRE IS NOT AUTHENTICATED (COHORT_ZMQ_INSECURE): any process "
                        "on %s can connect to %s, read users' prompts and forge answers",
                        where, self.settings.zmq_bind)
            return
        files = KeyFiles.of(self.settings.data_dir).ensure()
        domain = f"cohort-{os.getpid()}-{id(self)}"
        zap.authenticator().serve(domain, files.authorized)
        serve_curve(raw, files, domain)

    def _bind(self, raw: zmq.Socket) -> str:
        """Bind the configured endpoint, or with a port span the first free port of the span."""
        base = self.settings.zmq_bind
        if self.settings.zmq_port_span <= 1:
            raw.bind(base)
            return raw.getsockopt(zmq.LAST_ENDPOINT).decode()
        prefix, _, port = base.rpartition(":")
        for offset in range(self.settings.zmq_port_span):
            try:
                raw.bind(f"{prefix}:{int(port) + offset}")
                return raw.getsockopt(zmq.LAST_ENDPOINT).decode()
            except zmq.ZMQError as error:
                if error.errno != zmq.EADDRINUSE:
                    raise
        raise OSError(f"no free port in {base} + {self.settings.zmq_port_span} "
                      "(COHORT_ZMQ_PORT_SPAN): more fronts than ports")

    async def _receive_loop(self) -> None:
        assert self._sock is not None
        while True:
            frames = await self._sock.recv_multipart(copy=False)
            if len(frames) != 2:
                log.warning("dropped a message of %d frames", len(frames))
                continue
            identity = frames[0].bytes
            try:
                message = protocol.decode(frames[1].bytes, self.settings.zmq_max_message_bytes)
            except protocol.ProtocolError as error:
                log.warning("refused a message from %r: %s", identity, error)
                self._unreadable(identity, frames[1].bytes, error)
                continue
            if isinstance(message, protocol.Hello) and not self._may_register(
                    identity, message, frames[1]):
                continue
            await self._handle(identity, message)

    def _may_register(self, identity: bytes, hello: protocol.Hello, frame: zmq.Frame) -> bool:
        """A hello's worker id is its connection's, and one its CURVE key may use."""
        key = "" if self.settings.zmq_insecure else frame.get("User-Id")
        if hello.worker_id.encode() != identity or (key and not zap.may_use(key, identity)):
            why = "a key registers only the worker ids it was made for"
        elif self._is_new(identity, hello) and not self._new_worker_allowed(key or identity):
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

    def _new_worker_allowed(self, key: str | bytes) -> bool:
        """New registrations are rate-limited per key, and the live workers bounded."""
        live = sum(worker.state not in GONE for worker in self.workers.values())
        if live >= MAX_WORKERS:
            return False
        if len(self._hello_buckets) > 10_000:  # keys seen; without CURVE, connections
            self._hello_buckets.clear()
        bucket = self._hello_buckets.setdefault(key, TokenBucket(HELLO_RATE, HELLO_BURST))
        return bucket.take(trio.current_time())

    def _prune(self, now: float) -> None:
        """Forget gone workers past the newest DEAD_KEPT or older than DEAD_KEPT_S."""
        gone = sorted((w for w in self.workers.values() if w.state in GONE),
                      key=lambda w: w.last_seen, reverse=True)
        for index, worker in enumerate(gone):
            if index >= DEAD_KEPT or now - worker.last_seen > DEAD_KEPT_S:
                del self.workers[worker.identity]

    async def _outbox_loop(self) -> None:
        async for identity, message in self._outbox:
            await self._send(identity, message)

    async def _liveness_loop(self) -> None:
        period = min(0.5, self.settings.worker_timeout_s / 4)
        woke, deferred = trio.current_time(), False
        while True:
            await trio.sleep(period)
            now = trio.current_time()
            # Woken late, the front itself did not run (starved of CPU, or a blocking call): the
            # heartbeats of that time still wait unread in its socket. Judging silence now would
            # kill sound workers; the next round judges it, after the receive loop read them
            # (only one round waits: a front late every round still finds dead workers).
            deferred = now - woke > 2 * period and not deferred
            woke = now
            for worker in list(self.workers.values()):
                if worker.state not in GONE and not deferred \
                        and now - worker.last_seen > self.settings.worker_timeout_s:
                    self._mark_dead(worker, f"silent for over {self.settings.worker_timeout_s:g} s")
                elif worker.state == "failing" and worker.breaker.may_resume(now):
                    self._resume(worker)
                elif worker.state == "restarting" and now - worker.last_seen > RESTART_LIMIT_S:
                    worker.state = "dead"  # its supervisor waits at most a minute between starts
                    worker.error = f"said it would restart, and was not heard from again: {worker.error}"
            self._prune(now)

    # --- messages from workers -------------------------------------------------------------

    def _unreadable(self, identity: bytes, data: bytes, error: protocol.ProtocolError) -> None:
        """A worker's message the front cannot read: the jobs it names end now with the cause,
        rather than wait out their deadline for outputs that were in it."""
        worker = self.workers.get(identity)
        ids = protocol.request_ids(data) if worker is not None else []
        if ids:
            assert worker is not None
            self._handle_error(worker, protocol.Error(
                f"the front could not read the worker's answer: {error}", ids, "undecodable"))

    async def _handle(self, identity: bytes, message: protocol.Message) -> None:
        worker = self.workers.get(identity)
        if isinstance(message, protocol.Hello):
            await self._register(identity, message)
            return
        if worker is not None and worker.state == "dead" and isinstance(message, protocol.Bye) \
                and message.restarting:  # the host said bye itself; now its supervisor speaks
            worker.state, worker.error = "restarting", f"said bye: {message.reason}"
            log.info("worker %s is restarting: %s", worker.worker_id, message.reason)
            return
        if worker is None or worker.state in GONE:
            await self._send(identity, protocol.HelloAgain())
            return
        worker.last_seen = trio.current_time()
        if isinstance(message, protocol.Out):
            self._route_outputs(worker, message.items)
            self._take_load(worker, message.load)
        elif isinstance(message, protocol.Heartbeat):
            worker.active = message.active
            if message.state == "draining" and worker.state in ("ready", "failing"):
                worker.state = "draining"  # it finishes what it has; nothing new goes to it
                log.info("worker %s is draining", worker.worker_id)
                self._notify()
            self._take_load(worker, message.load)
        elif isinstance(message, protocol.Ready):
            worker.state, worker.load_time_s = "ready", message.load_time_s
            worker.model = message.model or worker.model
            if message.features is not None:
                worker.features = frozenset(message.features)
            self.metrics.load_time.labels(worker.worker_id, worker.model).set(message.load_time_s)
            log.info("worker %s ready with %s after %.1f s", worker.worker_id, worker.model,
                     message.load_time_s)
            self._notify()
        elif isinstance(message, protocol.Error):
            self._handle_error(worker, message)
        elif isinstance(message, protocol.Bye):
            self._mark_dead(worker, f"said bye: {message.reason or 'no reason given'}",
                            state="restarting" if message.restarting else "dead")

    async def _register(self, identity: bytes, hello: protocol.Hello) -> None:
        old = self.workers.get(identity)
        if old is not None and old.state not in GONE and old.pid != hello.pid:
            self._mark_dead(old, "restarted (new process under the same id)")
        now = trio.current_time()
        if old is not None and old.state not in GONE and old.pid == hello.pid:
            old.last_seen = now  # a repeated hello from the same process: nothing is lost
            worker = old
        else:
            worker = WorkerHandle(identity, hello.worker_id, hello.engine, hello.model,
                                  hello.capacity, hello.device, hello.pid, hello.state, now,
                                  hello.load_time_s)
            worker.load.max_num_seqs = hello.capacity  # until its engine reports its own limit
            worker.features, worker.max_model_len = frozenset(hello.features), hello.max_model_len
            self.workers[identity] = worker
            log.info("worker %s joined: engine %s, model %s, %s, state %s", hello.worker_id,
                     hello.engine, hello.model, hello.device, hello.state)
        await self._send(identity, protocol.Welcome(self.front_id))
        if worker.state == "ready":
            self._notify()

    def _take_load(self, worker: WorkerHandle, load: protocol.EngineLoad | None) -> None:
        if load is not None:
            worker.load.report(load)
            self._notify()

    def _route_outputs(self, worker: WorkerHandle, items: list[protocol.OutItem]) -> None:
        for item in items:
            job = worker.jobs.get(item.id)
            if job is None:  # aborted, or re-run elsewhere: its late outputs are dropped
                continue
            if not job.got_output:
                job.first_output_at = trio.current_time()
                self.metrics.ttft.observe(job.first_output_at - job.enqueued_at)
            if job.deliver(item):
                self._release(job)
                if item.status >= 500:
                    self._count_failure(worker, f"the engine answered {item.status}")
                else:
                    worker.breaker.succeeded()

    def _handle_error(self, worker: WorkerHandle, message: protocol.Error) -> None:
        if not message.ids:
            log.error("worker %s failed: %s", worker.worker_id, message.message)
            worker.error = message.message
            self._mark_dead(worker, message.message, state="failed")
            return
        # an invalid request is the client's fault; an unreadable message the wire's, and the
        # same bytes would be unreadable on any worker: neither counts against the engine
        engine_fault = message.kind not in ("invalid", "undecodable")
        retry: list[Job] = []
        for job_id in message.ids:
            job = worker.jobs.get(job_id)
            if job is None:
                continue
            self._release(job)
            if engine_fault and self._may_run_elsewhere(job, worker):
                job.failed_on.add(worker.identity)
                job.restart()
                retry.append(job)
            else:
                job.fail(FAILURES.get(message.kind, EngineFailed)(
                    message.message if message.kind in FAILURES
                    else f"the engine failed this request: {message.message}"))
            if engine_fault:
                self._count_failure(worker, message.message)
        if retry and self.scheduler is not None:
            self.metrics.retries.inc(len(retry))
            self.scheduler.requeue(retry)

    def _may_run_elsewhere(self, job: Job, worker: WorkerHandle) -> bool:
        """A job its engine failed runs again if it streamed nothing and another worker can take it."""
        return (job.retryable and job.attempts < self.settings.max_retries
                and any(other is not worker for other in self.registry.ready(worker.model)))

    def _count_failure(self, worker: WorkerHandle, reason: str) -> None:
        """One more engine failure in a row; enough of them pause the worker (its breaker).
        Each shows in /health, so a worker failing some requests is not shown plainly ready."""
        worker.jobs_failed += 1
        worker.last_failure = reason
        if not worker.breaker.failed(trio.current_time(), running=worker.jobs.keys()) \
                or worker.state not in ("ready", "failing"):
            return
        worker.state = "failing"
        worker.error = f"{worker.breaker.failures} requests in a row failed; last: {reason}"
        log.warning("worker %s paused for %g s: %s", worker.worker_id, worker.breaker.pause_s,
                    worker.error)
        self.placement.owners.forget(worker.identity)
        if self.scheduler is not None and not self.registry.ready(worker.model):
            self.scheduler.fail_queued(worker.model,
                                       NoWorkers(self.registry.why_unavailable(worker.model)))
        self._notify()

    def _resume(self, worker: WorkerHandle) -> None:
        """A paused worker's pause is over: it is tried again (one failure pauses it again)."""
        worker.state = "ready"
        log.info("worker %s is tried again after its pause", worker.worker_id)
        self._notify()

    # --- liveness --------------------------------------------------------------------------

    def _mark_dead(self, worker: WorkerHandle, reason: str, state: str = "dead") -> None:
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
        self.placement.owners.forget(worker.identity)
        if retry and self.scheduler is not None:
            self.metrics.retries.inc(len(retry))
            self.scheduler.requeue(retry)
        if self.scheduler is not None and not self.registry.ready(worker.model):
            self.scheduler.fail_queued(worker.model,
                                       NoWorkers(self.registry.why_unavailable(worker.model)))
        self._notify()

    # --- choosing and sending --------------------------------------------------------------

    def room(self, model: str) -> int:
        """Sequences the ready workers of `model` could start now."""
        return self.registry.room(model)

    def backlog_room(self, model: str) -> int:
        """Sequences the front may still force into the engines' own queues."""
        return self.registry.backlog_room(model)

    async def wait_for_change(self) -> None:
        """Return at the next change of a worker's load or state (a report, a join, a death)."""
        await self._changed.wait()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def held(self, model: str) -> dict[str, tuple[int, float]]:
        """Per tenant, the sequences it has on the ready workers of `model`, and its weight."""
        held: dict[str, tuple[int, float]] = {}
        for worker in self.registry.ready(model):
            for job in worker.jobs.values():
                seqs, _ = held.get(job.spec.tenant, (0, 1.0))
                held[job.spec.tenant] = (seqs + job.seqs, job.spec.weight)
        return held

    def capacity(self, model: str) -> int:
        return sum(w.load.max_num_seqs for w in self.registry.ready(model))

    def headroom(self, model: str) -> int:
        share = self.settings.batch_headroom
        return sum(batch_headroom(w.load.max_num_seqs, share) for w in self.registry.ready(model))

    async def send_batch(self, model: str, jobs: list[Job], *, force: bool = False,
                         beyond_backlog: bool = False) -> list[Job]:
        """Place the jobs (see Placement) and send each worker its share as one batch; return
        the jobs no worker could take now."""
        workers = {w.identity: w for w in self.registry.ready(model)}
        plan, left = self.placement.assign(jobs, {key: w.load for key, w in workers.items()},
                                           force=force, beyond_backlog=beyond_backlog)
        for identity, assigned in plan.items():
            worker = workers[identity]
            if worker.state != "ready":  # it died while an earlier share was being sent
                left.extend(assigned)
                continue
            await self._send_batch_to(worker, assigned)
        return left

    async def _send_batch_to(self, worker: WorkerHandle, jobs: list[Job]) -> None:
        batch_id = f"{self.front_id}-b{next(self._batch_ids)}"
        now = trio.current_time()
        priorities = (engine_priorities(jobs, worker.jobs.values()) if self.settings.fair_shares
                      else [0] * len(jobs))
        jobs, data = self._encode_batch(batch_id, jobs, dict(zip((j.id for j in jobs), priorities)))
        if not jobs:
            return
        for job in jobs:
            job.state, job.worker_id, job.batch_id, job.started_at = "running", worker.worker_id, batch_id, now
            worker.jobs[job.id] = job
            if job.attempts == 0:
                self.metrics.queue_wait.observe(now - job.enqueued_at)
        self.placement.sent(worker.identity, worker.load, jobs)
        worker.batches_sent += 1
        self.metrics.batch_sent(len(jobs))
        if not await self._send_data(worker.identity, "batch", data):
            self._mark_dead(worker, "unreachable")

    def _encode_batch(self, batch_id: str, jobs: list[Job],
                      priorities: dict[str, int]) -> tuple[list[Job], bytes]:
        """The batch's bytes, and the jobs in it: one the wire cannot carry (its body passed the
        routes' checks, yet msgpack refuses it) fails alone with a 400, never the whole loop."""
        def item(job: Job) -> protocol.RequestItem:
            spec = job.spec
            return protocol.request_item(job.id, spec.route, spec.body, trace_id=spec.trace_id,
                                         stream=spec.stream, priority=priorities[job.id])
        try:
            return jobs, protocol.Batch(batch_id, [item(job) for job in jobs]).encode()
        except (ValueError, TypeError, OverflowError, msgspec.EncodeError):
            carried = []
            for job in jobs:
                try:
                    protocol.Batch(batch_id, [item(job)]).encode()
                    carried.append(job)
                except (ValueError, TypeError, OverflowError, msgspec.EncodeError) as error:
                    log.warning("job %s cannot go on the wire: %s", job.id, error)
                    job.fail(BadRequest(f"the request cannot be sent to a worker ({error})"))
            if not carried:
                return [], b""
            return carried, protocol.Batch(batch_id, [item(job) for job in carried]).encode()

    def abort(self, job: Job) -> None:
        """Stop a job: dropped from its queue, or aborted on its worker. Safe to call twice."""
        if job.finished:
            return
        self.metrics.aborts.inc()
        was_running = job.state == "running"
        job.state = "cancelled"
        if not was_running:
            return
        worker = self.registry.by_id(job.worker_id)
        self._release(job)
        if worker is not None and worker.state not in GONE:
            try:
                self._outbox_send.send_nowait((worker.identity, protocol.Abort([job.id])))
            except trio.WouldBlock:
                log.warning("abort outbox full; %s runs on until its worker finishes it", job.id)

    def fail_all(self, error: CohortError) -> int:
        """End every job on every worker with `error` (and abort it there); how many there were."""
        ended = 0
        for worker in self.workers.values():
            ids = [job.id for job in worker.jobs.values() if not job.finished]
            for job in list(worker.jobs.values()):
                job.fail(error)
            worker.jobs.clear()
            ended += len(ids)
            if ids and worker.state not in GONE:
                try:
                    self._outbox_send.send_nowait((worker.identity, protocol.Abort(ids)))
                except trio.WouldBlock:
                    pass
        return ended

    def _release(self, job: Job) -> None:
        """Forget a finished job (the worker's next load report tells what it freed)."""
        worker = self.registry.by_id(job.worker_id)
        if worker is not None and worker.jobs.pop(job.id, None) is not None:
            worker.jobs_done += 1

    async def _send(self, identity: bytes, message: protocol.Message) -> bool:
        return await self._send_data(identity, message.type, message.encode())

    async def _send_data(self, identity: bytes, what: str, data: bytes) -> bool:
        assert self._sock is not None
        try:
            await self._sock.send_multipart([identity, data])
        except zmq.ZMQError as error:  # EHOSTUNREACH: that worker has disconnected
            log.warning("could not send %s to %r: %s", what, identity, error)
            return False
        return True

    # --- what routes ask -------------------------------------------------------------------

    def check_model(self, model: str) -> None:
        """Raise NotFound for a model nobody serves, NoWorkers when none of its workers is ready."""
        self.registry.check_model(model, self.endpoint or self.settings.zmq_bind)

    def models(self) -> list[str]:
        return self.registry.models()

    def describe_workers(self) -> list[dict[str, object]]:
        return self.registry.describe(trio.current_time())

    def refresh_gauges(self) -> None:
        self.registry.refresh_gauges()
