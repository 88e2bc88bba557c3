"""`python -m worker.host`: the engine host, which `python -m worker` (the supervisor) starts and
restarts. It connects to the front(s), registers, loads the engine, serves batches, heartbeats.

It registers as `loading` at once and says `ready` with its load time when the model is up; a load
failure is reported with its cause and the host stays up (state `failed`) so `/health` shows why.
An engine that dies (vLLM's EngineCore gone) or stops making progress while requests run ends the
host: it says bye, so the front re-runs what it can elsewhere at once, and exits with
ENGINE_DIED for the supervisor to start a fresh one. SIGINT/SIGTERM say bye and free the engine.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import sys
import time

import trio
from opentelemetry.trace import Tracer

from common import protocol
from common.config import SettingError, WorkerSettings, load
from common.keys import worker_key_files
from common.logs import setup_logging
from common.tracing import context_of, failed, make_tracer, traceparent_of
from worker.engines import Engine, EngineError, InvalidRequest, make_engine
from worker.link import FrontLink

log = logging.getLogger("cohort.worker")


ENGINE_DIED = 75  # exit status: the engine died; the supervisor restarts the host


def default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class Worker:
    """One engine shared by the links to every front."""

    def __init__(self, settings: WorkerSettings, engine: Engine) -> None:
        self.settings = settings
        self.engine = engine
        self.worker_id = settings.worker_id or default_worker_id()
        self.state: protocol.WorkerState = "loading"
        self.error = ""
        self.load_time_s = 0.0
        self.links: list[FrontLink] = []
        self.pending = 0  # requests received whose engine has not seen them yet
        # each running request's cancel scope, and the front link it came on
        self._scopes: dict[str, tuple[trio.CancelScope, FrontLink]] = {}
        self._stop = trio.CancelScope()
        self.stop_reason = ""  # what the links' bye says
        self.exit_code = 0
        self.last_progress = 0.0  # when the engine last emitted, or a batch last came in
        self._request_ended = trio.Event()
        self._tracer_provider = make_tracer(settings.otlp_endpoint, "cohort-worker")
        self.tracer: Tracer | None = (self._tracer_provider.get_tracer("cohort")
                                      if self._tracer_provider is not None else None)

    def hello(self) -> protocol.Hello:
        return protocol.Hello(self.worker_id, self.engine.name, self.engine.model,
                              self.engine.capacity, self.engine.device, self.state, os.getpid(),
                              self.load_time_s, self.error, self.capabilities(),
                              self.settings.max_model_len,
                              reports_prefixes=self.engine.residency is not None)

    def capabilities(self) -> list[str]:
        """The routes and request features the engine serves (loading may settle them)."""
        return sorted(self.engine.routes | self.engine.features)

    async def serve(self) -> None:
        with self._stop:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._watch_signals)
                for endpoint in self.settings.connect:
                    link = FrontLink(endpoint, self)
                    await nursery.start(link.run)
                    self.links.append(link)
                await self._load()
                if hasattr(self.engine, "run"):
                    nursery.start_soon(self.engine.run)
                nursery.start_soon(self._watchdog)
        # the links said bye on their way out; now free the engine (and its processes), bounded:
        # a dead engine may not answer, and the supervisor kills what is left
        with trio.move_on_after(2 if self.exit_code == ENGINE_DIED else 30) as bounded:
            bounded.shield = True  # a dead engine's teardown only delays its restart
            await self.engine.close()
            if self._tracer_provider is not None:  # the last spans out
                await trio.to_thread.run_sync(self._tracer_provider.shutdown)

    async def _watchdog(self) -> None:
        """An engine that died, or that makes no progress while it has requests, ends the host."""
        stall_s = self.settings.engine_stall_s
        while True:
            await trio.sleep(self.settings.heartbeat_interval_s)
            if self.state not in ("ready", "draining"):  # a drain must not wait on a dead engine
                continue
            reason = self.engine.dead()
            if not reason and stall_s and self.engine.unfinished() and \
                    trio.current_time() - self.last_progress > stall_s:
                reason = f"no output for {stall_s:g} s with requests running (COHORT_ENGINE_STALL_S)"
            if reason:
                self.engine_died(reason)

    def engine_died(self, reason: str) -> None:
        """Say bye (the front re-runs elsewhere what has streamed nothing) and exit for a restart."""
        if not self.exit_code:
            log.error("the engine died: %s; this host exits for a fresh one", reason)
            self.stop(f"engine died: {reason}", ENGINE_DIED)

    async def _load(self) -> None:
        started = time.monotonic()
        try:
            await self.engine.load()
        except Exception as error:  # any load failure: report its cause, stay up to show it
            self.state, self.error = "failed", f"model load failed: {type(error).__name__}: {error}"
            log.exception("model load failed")
            for link in self.links:
                await link.send(protocol.Error(self.error, [], "load"))
            return
        self.load_time_s = time.monotonic() - started
        self.state = "ready"
        log.info("%s engine ready with %s in %.1f s", self.engine.name, self.engine.model,
                 self.load_time_s)
        for link in self.links:
            await link.send(protocol.Ready(self.load_time_s, self.engine.model,
                                           self.capabilities()))
            # the engine's real limits at once, not at the next heartbeat: until a report the
            # front places as if every engine ran 256 sequences
            await link.send(protocol.Heartbeat(self.engine.unfinished(), self.state,
                                               self.load(link.received)))

    def load(self, received: int) -> protocol.EngineLoad:
        """The engine's load for a link's report; what it has not seen yet counts as waiting."""
        stats = self.engine.stats()
        stats.waiting += self.pending
        stats.received = received
        return stats

    async def run_batch(self, link: FrontLink, batch: protocol.Batch) -> None:
        """Run a batch the link has just counted as received (`pending` includes it)."""
        if self.state not in ("ready", "draining"):  # draining: sent before the front knew
            self.pending -= len(batch.requests)
            await link.send(protocol.Error(f"worker is {self.state}", [r.id for r in batch.requests]))
            return
        self.last_progress = trio.current_time()
        try:
            await self.engine.admit(len(batch.requests))
        except BaseException:
            self.pending -= len(batch.requests)
            raise
        async with trio.open_nursery() as nursery:
            for request in batch.requests:
                request.batch_id = batch.batch_id
                scope = trio.CancelScope()
                self._scopes[request.id] = scope, link
                nursery.start_soon(self._run_request, link, request, scope)

    async def _run_request(self, link: FrontLink, request: protocol.RequestItem,
                           scope: trio.CancelScope) -> None:
        log.debug("request_id=%s job=%s batch=%s starts", request.trace_id, request.id,
                  request.batch_id)
        self.pending -= 1
        span, emit = self._traced(request, link.emit)
        try:
            with scope:
                await self.engine.generate(request, emit)
            if scope.cancelled_caught:
                log.debug("request_id=%s job=%s aborted", request.trace_id, request.id)
                if span is not None:
                    span.add_event("aborted")
        except InvalidRequest as error:  # the engine's own refusal is the request's answer
            link.emit(protocol.out_item(request.id, json.dumps(error.body()).encode(),
                                        done=True, status=400))
        except EngineError as error:
            failed(span, error)
            dead = self.engine.dead()
            if dead:  # not this request's fault: the bye sends it elsewhere
                self.engine_died(dead)
                return
            await link.send(protocol.Error(str(error), [request.id], error.kind))
        except Exception as error:  # a bug or engine crash on one request must not kill the worker
            failed(span, error)
            log.exception("request_id=%s job=%s failed", request.trace_id, request.id)
            await link.send(protocol.Error(f"{type(error).__name__}: {error}", [request.id]))
        finally:
            self._scopes.pop(request.id, None)
            self._request_ended.set()
            if span is not None:
                span.end()

    def _traced(self, request: protocol.RequestItem, emit):
        """The request's span in this worker, under the front's (none when either is not
        tracing), and an emit that marks its first output and its token counts."""
        if self.tracer is None or not request.traceparent:
            return None, emit
        span = self.tracer.start_span("engine", context=context_of(request.traceparent),
                                      attributes={"cohort.worker": self.worker_id,
                                                  "cohort.engine": self.engine.name,
                                                  "cohort.route": request.route})
        request.traceparent = traceparent_of(span)  # vLLM's span hangs under this one
        first = True

        def traced_emit(item: protocol.OutItem) -> None:
            nonlocal first
            if first:
                span.add_event("first output")
                first = False
            if item.done:
                usage = item.usage or {}
                span.set_attributes({"http.response.status_code": item.status,
                                     "gen_ai.usage.input_tokens": usage.get("prompt_tokens", 0),
                                     "gen_ai.usage.output_tokens": usage.get("completion_tokens", 0)})
            emit(item)

        return span, traced_emit

    def abort(self, ids: list[str]) -> None:
        for request_id in ids:
            running = self._scopes.get(request_id)
            if running is not None:
                running[0].cancel()

    def requests_of(self, link: FrontLink) -> list[str]:
        """The ids of the requests running for one front link (a scan: when that front is gone)."""
        return [request_id for request_id, (_, came_on) in self._scopes.items() if came_on is link]

    def stop(self, reason: str, exit_code: int = 0) -> None:
        log.info("stopping: %s", reason)
        self.stop_reason, self.exit_code = reason, exit_code
        self._stop.cancel()

    async def _watch_signals(self) -> None:
        """The first SIGINT/SIGTERM drains the host: it tells the fronts (which send it nothing
        new), finishes what it has for up to COHORT_DRAIN_TIMEOUT_S, then stops. Later signals
        (the supervisor passes on what honcho sent the whole group) change nothing."""
        ignore_after_receiving()
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for signum in signals:
                if self.state == "draining" or self.stop_reason:
                    continue
                name = signal.Signals(signum).name
                if self.state != "ready":
                    self.stop(f"signal {name}")
                    continue
                self.state = "draining"
                log.info("%s: draining for up to %g s", name, self.settings.drain_timeout_s)
                with trio.move_on_after(1):  # a front that is not connected takes nothing
                    for link in self.links:
                        await link.send(protocol.Heartbeat(self.engine.unfinished(), self.state,
                                                           self.load(link.received)))
                with trio.move_on_after(self.settings.drain_timeout_s):
                    while self.pending or self._scopes:
                        self._request_ended = trio.Event()
                        await self._request_ended.wait()
                for link in self.links:  # the last outputs leave before the bye
                    await link.flush()
                self.stop(f"signal {name}, drained")


def ignore_after_receiving() -> None:
    """Make SIGINT and SIGTERM ignored once trio's receiver for them closes: trio hands a signal
    that came after the last one we read to the handler it found, and the default handler would
    kill the process in its last moments, before its sockets send the bye and the last outputs."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m worker", description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--no-supervisor", action="store_true",
                        help="run the engine host in this process, without restarts")
    parser.add_argument("--gpus", help="one engine host per GPU: a list (0,1) or auto")
    parser.add_argument("--connect", help="front endpoint(s), comma-separated (COHORT_CONNECT)")
    parser.add_argument("--engine", choices=["mock", "vllm", "http"], help="(COHORT_ENGINE)")
    parser.add_argument("--model", help="model folder or name (COHORT_MODEL)")
    parser.add_argument("--worker-id", help="(COHORT_WORKER_ID)")
    return parser.parse_args(argv)


CONFIG_ERROR = 2  # exit status for settings that cannot work: restarting will not help


def settings_from(args: argparse.Namespace) -> WorkerSettings:
    """The settings, command line over environment; a configuration error ends the process."""
    try:
        settings = load(WorkerSettings, engine=args.engine, model=args.model,
                        worker_id=args.worker_id,
                        connect=tuple(args.connect.split(",")) if args.connect else None)
        worker_key_files(settings)  # a missing key is a configuration error, found now
        return settings
    except SettingError as error:
        print(f"worker: {error}", file=sys.stderr)
        sys.exit(CONFIG_ERROR)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    settings = settings_from(args)
    setup_logging(settings.log_level)
    worker = Worker(settings, make_engine(settings))
    log.info("worker %s: engine %s, model %s, fronts %s", worker.worker_id, worker.engine.name,
             worker.engine.model, ", ".join(settings.connect))
    trio.run(worker.serve)
    if worker.exit_code == ENGINE_DIED:  # skip vLLM's finalizers for a dead engine (seconds
        logging.shutdown()               # of teardown); the supervisor ends what is left
        os._exit(ENGINE_DIED)
    sys.exit(worker.exit_code)


if __name__ == "__main__":  # vLLM spawns processes that re-import this module
    main()
