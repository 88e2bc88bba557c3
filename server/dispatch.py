"""The workers as the front sees them: registry, liveness, choice of worker, batches out, outputs in.

The front binds a ROUTER; each worker connects a DEALER whose identity is its worker id. A worker
that stays silent past `worker_timeout_s`, says bye, or says hello again from a new process is dead:
its jobs that have streamed nothing are re-run elsewhere, the rest end with a clear error.
"""

from __future__ import annotations

import itertools
import logging
import os
import socket
from dataclasses import dataclass, field

import trio
import zmq

from common import protocol
from common.config import ServerSettings
from common.zmqtrio import TrioSocket
from server.errors import (BadRequest, EngineFailed, NoWorkers, NotFound, UpstreamUnavailable,
                           WorkerDied)
from server.jobs import Job
from server.metrics import Metrics

log = logging.getLogger("cohort.dispatch")

# A worker's per-request error kinds, as the client sees them (anything else: EngineFailed, 502).
FAILURES = {"invalid": BadRequest, "unavailable": UpstreamUnavailable}


@dataclass
class WorkerHandle:
    """One worker: what it serves, its state, and the batches and jobs it holds."""

    identity: bytes
    worker_id: str
    engine: str
    model: str
    capacity: int
    device: str
    pid: int
    state: str  # loading | ready | failed | dead
    last_seen: float
    load_time_s: float = 0.0
    active: int = 0
    error: str = ""
    batches: dict[str, set[str]] = field(default_factory=dict)
    jobs: dict[str, Job] = field(default_factory=dict)
    batches_sent: int = 0
    jobs_done: int = 0

    def shown_state(self, max_batches: int) -> str:
        if self.state == "ready" and len(self.batches) >= max_batches:
            return "busy"
        return self.state


class Dispatcher:
    """Sends batches to workers and routes what they send back to the waiting jobs."""

    def __init__(self, settings: ServerSettings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.front_id = f"{socket.gethostname()}-{os.getpid()}"
        self.endpoint = ""
        self.workers: dict[bytes, WorkerHandle] = {}
        self.scheduler = None  # set by the app: where retried jobs go back to
        self._sock: TrioSocket | None = None
        self._slots_changed = trio.Event()
        self._batch_ids = itertools.count(1)
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
        raw.setsockopt(zmq.SNDHWM, 100_000)
        raw.setsockopt(zmq.RCVHWM, 100_000)
        raw.setsockopt(zmq.LINGER, 0)
        self.endpoint = self._bind(raw)
        with TrioSocket(raw) as sock:
            self._sock = sock
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._liveness_loop)
                nursery.start_soon(self._outbox_loop)
                task_status.started(self.endpoint)
                await self._receive_loop()

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
            frames = await self._sock.recv_multipart()
            if len(frames) != 2:
                log.warning("dropped a message of %d frames", len(frames))
                continue
            identity, data = frames[0], bytes(frames[1])
            try:
                message = protocol.decode(data)
            except protocol.ProtocolError as error:
                log.warning("refused a message from %r: %s", identity, error)
                continue
            await self._handle(identity, message)

    async def _outbox_loop(self) -> None:
        async for identity, message in self._outbox:
            await self._send(identity, message)

    async def _liveness_loop(self) -> None:
        period = min(0.5, self.settings.worker_timeout_s / 4)
        while True:
            await trio.sleep(period)
            now = trio.current_time()
            for worker in list(self.workers.values()):
                if worker.state != "dead" and now - worker.last_seen > self.settings.worker_timeout_s:
                    self._mark_dead(worker, f"silent for over {self.settings.worker_timeout_s:g} s")

    # --- messages from workers -------------------------------------------------------------

    async def _handle(self, identity: bytes, message: protocol.Message) -> None:
        worker = self.workers.get(identity)
        if isinstance(message, protocol.Hello):
            await self._register(identity, message)
            return
        if worker is None or worker.state == "dead":
            await self._send(identity, protocol.HelloAgain())
            return
        worker.last_seen = trio.current_time()
        if isinstance(message, protocol.Out):
            self._route_outputs(worker, message.items)
        elif isinstance(message, protocol.Heartbeat):
            worker.active = message.active
        elif isinstance(message, protocol.Ready):
            worker.state, worker.load_time_s = "ready", message.load_time_s
            worker.model = message.model or worker.model
            self.metrics.load_time.labels(worker.worker_id, worker.model).set(message.load_time_s)
            log.info("worker %s ready with %s after %.1f s", worker.worker_id, worker.model,
                     message.load_time_s)
            self._slots_freed()
        elif isinstance(message, protocol.Error):
            self._handle_error(worker, message)
        elif isinstance(message, protocol.Bye):
            self._mark_dead(worker, f"said bye: {message.reason or 'no reason given'}")

    async def _register(self, identity: bytes, hello: protocol.Hello) -> None:
        old = self.workers.get(identity)
        if old is not None and old.state != "dead" and old.pid != hello.pid:
            self._mark_dead(old, "restarted (new process under the same id)")
        now = trio.current_time()
        if old is not None and old.state != "dead" and old.pid == hello.pid:
            old.last_seen = now  # a repeated hello from the same process: nothing is lost
            worker = old
        else:
            worker = WorkerHandle(identity, hello.worker_id, hello.engine, hello.model,
                                  hello.capacity, hello.device, hello.pid, hello.state, now,
                                  hello.load_time_s)
            self.workers[identity] = worker
            log.info("worker %s joined: engine %s, model %s, %s, state %s", hello.worker_id,
                     hello.engine, hello.model, hello.device, hello.state)
        await self._send(identity, protocol.Welcome(self.front_id))
        if worker.state == "ready":
            self._slots_freed()

    def _route_outputs(self, worker: WorkerHandle, items: list[dict]) -> None:
        for item in items:
            job = worker.jobs.get(item["id"])
            if job is None:  # aborted, or re-run elsewhere: its late outputs are dropped
                continue
            if not job.got_output:
                self.metrics.ttft.observe(trio.current_time() - job.enqueued_at)
            if job.deliver(item):
                self._release(job)

    def _handle_error(self, worker: WorkerHandle, message: protocol.Error) -> None:
        if not message.ids:
            log.error("worker %s failed: %s", worker.worker_id, message.message)
            worker.error = message.message
            self._mark_dead(worker, message.message, state="failed")
            return
        for job_id in message.ids:
            job = worker.jobs.get(job_id)
            if job is not None:
                job.fail(FAILURES.get(message.kind, EngineFailed)(
                    message.message if message.kind in FAILURES
                    else f"the engine failed this request: {message.message}"))
                self._release(job)

    # --- liveness --------------------------------------------------------------------------

    def _mark_dead(self, worker: WorkerHandle, reason: str, state: str = "dead") -> None:
        """Take a worker out of service; re-run its jobs that streamed nothing, fail the rest."""
        log.warning("worker %s is %s: %s", worker.worker_id, state, reason)
        worker.state = state
        worker.error = worker.error or reason
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
        worker.batches.clear()
        if retry and self.scheduler is not None:
            self.metrics.retries.inc(len(retry))
            self.scheduler.requeue(retry)
        if self.scheduler is not None and not self._ready_workers(worker.model):
            self.scheduler.fail_queued(worker.model, NoWorkers(self._why_unavailable(worker.model)))
        self._slots_freed()

    # --- choosing and sending --------------------------------------------------------------

    def _ready_workers(self, model: str) -> list[WorkerHandle]:
        return [w for w in self.workers.values() if w.state == "ready" and w.model == model]

    def pick_worker(self, model: str) -> WorkerHandle | None:
        """The ready worker of `model` with a free batch slot and the least outstanding work."""
        free = [w for w in self._ready_workers(model)
                if len(w.batches) < self.settings.max_batches_per_worker]
        return min(free, key=lambda w: (len(w.jobs), w.batches_sent), default=None)

    async def wait_for_slot(self, model: str) -> None:
        while self.pick_worker(model) is None:
            await self._slots_changed.wait()

    async def wait_for_change(self) -> None:
        """Return at the next change of worker state or batch slots (a join, a death, a batch done)."""
        await self._slots_changed.wait()

    def _slots_freed(self) -> None:
        self._slots_changed.set()
        self._slots_changed = trio.Event()

    async def send_batch(self, model: str, jobs: list[Job]) -> bool:
        worker = self.pick_worker(model)
        if worker is None:
            return False
        batch_id = f"{self.front_id}-b{next(self._batch_ids)}"
        now = trio.current_time()
        requests = []
        for job in jobs:
            job.state, job.worker_id, job.batch_id, job.started_at = "running", worker.worker_id, batch_id, now
            worker.jobs[job.id] = job
            if job.attempts == 0:
                self.metrics.queue_wait.observe(now - job.enqueued_at)
            spec = job.spec
            requests.append(protocol.request_item(job.id, spec.kind, spec.params, prompt=spec.prompt,
                                                  messages=spec.messages, trace_id=spec.trace_id,
                                                  stream=spec.stream))
        worker.batches[batch_id] = {job.id for job in jobs}
        worker.batches_sent += 1
        self.metrics.batch_sent(len(jobs))
        if not await self._send(worker.identity, protocol.Batch(batch_id, requests)):
            self._mark_dead(worker, "unreachable")
        return True

    def abort(self, job: Job) -> None:
        """Stop a job: dropped from its queue, or aborted on its worker. Safe to call twice."""
        if job.finished:
            return
        self.metrics.aborts.inc()
        was_running = job.state == "running"
        job.state = "cancelled"
        if not was_running:
            return
        worker = self._worker_by_id(job.worker_id)
        self._release(job)
        if worker is not None and worker.state != "dead":
            try:
                self._outbox_send.send_nowait((worker.identity, protocol.Abort([job.id])))
            except trio.WouldBlock:
                log.warning("abort outbox full; %s runs on until its worker finishes it", job.id)

    def _release(self, job: Job) -> None:
        """Forget a finished job; a batch whose jobs all finished frees its worker's slot."""
        worker = self._worker_by_id(job.worker_id)
        if worker is None or worker.jobs.pop(job.id, None) is None:
            return
        worker.jobs_done += 1
        members = worker.batches.get(job.batch_id)
        if members is not None:
            members.discard(job.id)
            if not members:
                del worker.batches[job.batch_id]
                self._slots_freed()

    def _worker_by_id(self, worker_id: str) -> WorkerHandle | None:
        return self.workers.get(worker_id.encode())

    async def _send(self, identity: bytes, message: protocol.Message) -> bool:
        assert self._sock is not None
        try:
            await self._sock.send_multipart([identity, message.encode()])
        except zmq.ZMQError as error:  # EHOSTUNREACH: that worker has disconnected
            log.warning("could not send %s to %r: %s", message.type, identity, error)
            return False
        return True

    # --- what routes ask -------------------------------------------------------------------

    def check_model(self, model: str) -> None:
        """Raise NotFound for a model nobody serves, NoWorkers when none of its workers is ready."""
        if self._ready_workers(model):
            return
        if any(w.model == model for w in self.workers.values()):
            raise NoWorkers(self._why_unavailable(model))
        if not any(w.state == "ready" for w in self.workers.values()):
            raise NoWorkers("no worker is ready: start one with `python -m worker` "
                            f"(it connects to {self.endpoint or self.settings.zmq_bind})")
        raise NotFound(f"the model {model!r} does not exist; served here: "
                       f"{', '.join(self.models()) or 'none'}", param="model",
                       code="model_not_found")

    def _why_unavailable(self, model: str) -> str:
        states = [w.state for w in self.workers.values() if w.model == model]
        if "loading" in states:
            return (f"model {model!r} is still loading on {states.count('loading')} worker(s); "
                    "retry shortly (GET /ready tells when)")
        return f"no ready worker serves model {model!r}: its {len(states)} worker(s) are dead or failed"

    def models(self) -> list[str]:
        return sorted({w.model for w in self.workers.values() if w.state == "ready"})

    def describe_workers(self) -> list[dict[str, object]]:
        now = trio.current_time()
        limit = self.settings.max_batches_per_worker
        return [{
            "id": w.worker_id, "engine": w.engine, "model": w.model, "device": w.device,
            "state": w.shown_state(limit), "capacity": w.capacity, "pid": w.pid,
            "load_time_s": round(w.load_time_s, 3), "batches_in_flight": len(w.batches),
            "jobs_in_flight": len(w.jobs), "engine_active": w.active,
            "batches_sent": w.batches_sent, "jobs_done": w.jobs_done,
            "last_seen_s_ago": round(now - w.last_seen, 3), "error": w.error,
        } for w in self.workers.values()]

    def refresh_gauges(self) -> None:
        """Set the workers-by-state gauges; called when they are scraped, not on every message."""
        limit = self.settings.max_batches_per_worker
        counts = {state: 0 for state in ("loading", "ready", "busy", "failed", "dead")}
        for worker in self.workers.values():
            counts[worker.shown_state(limit)] += 1
        for state, count in counts.items():
            self.metrics.workers.labels(state).set(count)
