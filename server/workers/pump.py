"""The ZeroMQ pump of the workers: messages in to the worker lifecycle, its actions out;
batches out as placement decides them; and what the scheduler asks of the workers' capacity.

The front binds a ROUTER; each worker connects a DEALER whose identity is its worker id. What a
message or a tick means for a worker and its jobs is `server.workers.lifecycle`'s decision (no
sockets there); which worker gets a job is `server.scheduling.placement`'s. Jobs handed back
(re-run elsewhere, or failed while queued) go up to the scheduler through a channel, never by
calling it.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import socket
import time

import msgspec
import trio
import zmq

from common import protocol
from common.config import ServerSettings
from common.keys import KeyFiles, is_local, serve_curve
from common.zmqtrio import TrioSocket
from server.workers import zap
from server.errors import BadRequest, CohortError
from server.jobs import Job
from server.metrics import Metrics
from server.scheduling.placement import Placement
from server.scheduling.policy import SchedulingPolicy
from server.workers.lifecycle import Actions, Returned, WorkerLifecycle
from server.workers.registry import GONE, WorkerHandle, WorkerRegistry

log = logging.getLogger("cohort.dispatch")

class Dispatcher:
    """Sends batches to workers and routes what they send back to the waiting jobs."""

    def __init__(self, settings: ServerSettings, metrics: Metrics, policy: SchedulingPolicy,
                 returns: trio.MemorySendChannel[Returned] | None = None) -> None:
        self.settings = settings
        self.metrics = metrics
        self.policy = policy
        self.front_id = f"{socket.gethostname()}-{os.getpid()}"
        self.endpoint = ""
        self.placement = Placement(max_unacked_batches=settings.max_batches_per_worker,
                                   seq_tokens=settings.prefix_seq_tokens,
                                   prefix_affinity=settings.prefix_affinity,
                                   backlog=policy.engine_backlog)
        self.registry = WorkerRegistry(self.placement, metrics)
        self.workers = self.registry.workers
        self.lifecycle = WorkerLifecycle(settings, metrics, self.registry, self.front_id)
        if returns is None:  # nobody takes jobs back (a test of the pump alone)
            returns, self._unread_returns = trio.open_memory_channel[Returned](math.inf)
        self._returns = returns
        self._sock: TrioSocket | None = None
        self._changed = trio.Event()
        self._batch_ids = itertools.count(1)
        # Aborts leave through this outbox, so `abort` never awaits: it runs in `finally` blocks of
        # cancelled handlers and of streaming generators being closed.
        self._outbox_send, self._outbox = trio.open_memory_channel[tuple[bytes, protocol.Message]](
            10_000)

    # --- service ---------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        """Bind, then receive and watch liveness until cancelled; started() once bound."""
        context: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
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
            return raw.getsockopt_string(zmq.LAST_ENDPOINT)
        prefix, _, port = base.rpartition(":")
        for offset in range(self.settings.zmq_port_span):
            try:
                raw.bind(f"{prefix}:{int(port) + offset}")
                return raw.getsockopt_string(zmq.LAST_ENDPOINT)
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
            identity, now = frames[0].bytes, trio.current_time()
            try:
                message = protocol.decode(frames[1].bytes, self.settings.zmq_max_message_bytes)
            except protocol.ProtocolError as error:
                log.warning("refused a message from %r: %s", identity, error)
                await self._carry_out(self.lifecycle.unreadable(identity, frames[1].bytes, error,
                                                                now))
                continue
            if isinstance(message, protocol.Hello):
                key = "" if self.settings.zmq_insecure else frames[1].get("User-Id")
                if not self.lifecycle.may_register(identity, message, key, now):
                    continue
            await self._carry_out(self.lifecycle.take(identity, message, now))

    async def _carry_out(self, actions: Actions) -> None:
        """Do what the lifecycle decided: hand jobs back up, send, wake the waiters."""
        for returned in actions.returned:
            self._returns.send_nowait(returned)
        for identity, message in actions.send:
            await self._send(identity, message)
        if actions.changed:
            self._notify()

    async def _outbox_loop(self) -> None:
        async for identity, message in self._outbox:
            await self._send(identity, message)

    async def _liveness_loop(self) -> None:
        period = min(0.5, self.settings.worker_timeout_s / 4)
        while True:
            await trio.sleep(period)
            await self._carry_out(self.lifecycle.tick(trio.current_time(), period))

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
        return sum(self.policy.headroom(w.load.max_num_seqs) for w in self.registry.ready(model))

    async def send_batch(self, model: str, jobs: list[Job], *, force: bool = False,
                         beyond_backlog: bool = False) -> list[Job]:
        """Place the jobs (see Placement) and send each worker its share as one batch; return
        the jobs no worker could take now."""
        began_ns = time.time_ns()  # the placement span's start, for traced jobs
        workers = {w.identity: w for w in self.registry.ready(model)}
        plan, left = self.placement.assign(jobs, {key: w.load for key, w in workers.items()},
                                           force=force, beyond_backlog=beyond_backlog)
        for identity, assigned in plan.items():
            worker = workers[identity]
            if worker.state != "ready":  # it died while an earlier share was being sent
                left.extend(assigned)
                continue
            await self._send_batch_to(worker, assigned, began_ns)
        return left

    async def _send_batch_to(self, worker: WorkerHandle, jobs: list[Job], began_ns: int) -> None:
        batch_id = f"{self.front_id}-b{next(self._batch_ids)}"
        now = trio.current_time()
        for job in jobs:
            if job.trace is not None:  # before encoding: the item carries its traceparent
                job.trace.placed(worker.worker_id, batch_id, began_ns, job.attempts + 1,
                                 len(job.prefix), job.prefix_held)
        priorities = self.policy.priorities(jobs, worker.jobs.values())
        jobs, data = self._encode_batch(batch_id, jobs, dict(zip((j.id for j in jobs), priorities)))
        if not jobs:
            return
        for job in jobs:
            job.state, job.worker_id, job.batch_id, job.started_at = "running", worker.worker_id, batch_id, now
            worker.jobs[job.id] = job
            if job.attempts == 0:
                self.metrics.queue_wait.labels(job.spec.model, job.spec.tier).observe(
                    now - job.enqueued_at)
        worker.load.sent_batch(jobs)  # unacknowledged work (what it will hold: see Placement)
        worker.batches_sent += 1
        self.metrics.batch_sent(len(jobs))
        if not await self._send_data(worker.identity, "batch", data):
            await self._carry_out(self.lifecycle.mark_dead(worker, "unreachable"))

    def _encode_batch(self, batch_id: str, jobs: list[Job],
                      priorities: dict[str, int]) -> tuple[list[Job], bytes]:
        """The batch's bytes, and the jobs in it: one the wire cannot carry (its body passed the
        routes' checks, yet msgpack refuses it) fails alone with a 400, never the whole loop."""
        def item(job: Job) -> protocol.RequestItem:
            spec = job.spec
            return protocol.request_item(job.id, spec.route, spec.body, trace_id=spec.trace_id,
                                         stream=spec.stream, priority=priorities[job.id],
                                         prefix=list(job.prefix), prompt_chars=job.prompt_chars,
                                         traceparent=job.trace.traceparent if job.trace else "")
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
        self.lifecycle.release(job)
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
