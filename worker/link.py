"""One worker's connection to one front: hello until welcomed, heartbeats, outputs coalesced per step.

A worker connects one DEALER per front (several fronts: `--connect` takes a list) and answers each
on its own link. Outputs emitted together (one engine step) leave as one `out` message. Each link
also tells its front which prompt prefixes the engine's cache took in or let go since the last
message (worker.residency), with its outputs and heartbeats; everything held, when the front is
new to this worker.

A front that is gone leaves no one to answer to: the requests it sent are aborted, so the engine
does not spend minutes decoding for nobody. The worker knows it when the front says it does not
know this worker (`hello_again`: it restarted, or declared the worker dead and re-ran its requests
elsewhere), or when the connection has been down longer than the front waits for a silent worker
(`Welcome.worker_timeout_s`): by then the front, if it lives, has re-run them elsewhere too.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any

import trio
import zmq
from zmq.utils.monitor import parse_monitor_message

from common import protocol
from common.config import WorkerSettings
from common.keys import connect_curve, worker_key_files
from common.zmqtrio import TrioSocket

if TYPE_CHECKING:
    from worker.host import Worker

log = logging.getLogger("cohort.worker.link")

UNWELCOMED_HEARTBEATS = 20  # hellos unanswered before the link says what to check
WATCHED = zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED


class Contact:
    """Whether one front can still hear this worker, from its connection's events: when the
    requests it sent have no one to answer to."""

    def __init__(self) -> None:
        self.cut_since: float | None = None  # when the connection went down (None: it is up)
        self.patience = 0.0  # the front's worker timeout, from its welcome (0: not told yet)

    def event(self, event: int, now: float) -> None:
        if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            self.cut_since = None
        elif event == zmq.EVENT_DISCONNECTED and self.cut_since is None:
            self.cut_since = now

    def acted(self) -> None:
        """Its requests were aborted: once; what the front sends once it is back is new."""
        self.cut_since = None

    def orphaned_at(self) -> float:
        """When this front's requests are orphans, unless it is heard again first."""
        if self.cut_since is None or self.patience <= 0:
            return math.inf
        return self.cut_since + self.patience


def dealer(settings: WorkerSettings, worker_id: str) -> zmq.Socket[bytes]:
    """A DEALER that speaks as `worker_id`, with the worker's CURVE key and a message bound."""
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    raw = context.socket(zmq.DEALER)
    raw.setsockopt(zmq.IDENTITY, worker_id.encode())
    raw.setsockopt(zmq.MAXMSGSIZE, settings.zmq_max_message_bytes)
    files = worker_key_files(settings)
    if files is not None:
        connect_curve(raw, *files)
    return raw


class FrontLink:
    """The DEALER side of one front: registration, heartbeats, batches in, outputs out."""

    def __init__(self, endpoint: str, worker: "Worker") -> None:
        self.endpoint = endpoint
        self.worker = worker
        self.welcomed = False
        self.received = 0  # requests taken from this front: the acknowledgement in every load
        self.contact = Contact()
        self.max_message_bytes = worker.settings.zmq_max_message_bytes
        self._sock: TrioSocket | None = None
        self.residency = worker.engine.residency  # None: its engine reports no prefixes
        self.changes = self.residency.listen() if self.residency is not None else None
        # Unbounded: emit() is called from the engine's step and must never wait; the flush task
        # drains it as fast as the socket takes messages.
        # `None` asks for a load report alone (a batch just arrived).
        self._out_send, self._out_receive = trio.open_memory_channel[Any](math.inf)

    async def run(self, *, task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        raw = dealer(self.worker.settings, self.worker.worker_id)
        raw.setsockopt(zmq.LINGER, 500)  # long enough for a last bye, no longer
        raw.setsockopt(zmq.SNDHWM, 100_000)
        raw.setsockopt(zmq.RCVHWM, 100_000)
        monitor = raw.get_monitor_socket(WATCHED)
        raw.connect(self.endpoint)
        with TrioSocket(raw) as sock, TrioSocket(monitor) as events:
            self._sock = sock
            await self.send(self.worker.hello())
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._heartbeat_loop)
                    nursery.start_soon(self._flush_loop)
                    nursery.start_soon(self._watch_contact, events)
                    task_status.started()
                    await self._receive_loop(nursery)
            finally:  # leaving (stopped, or failed): tell the front while the socket is open
                await self._say_bye(self.worker.stop_reason or "worker stopping")
                if self.residency is not None and self.changes is not None:
                    self.residency.unlisten(self.changes)

    async def send(self, message: protocol.Message) -> None:
        assert self._sock is not None
        await self._sock.send_multipart([message.encode()])

    async def flush(self) -> None:
        """Return once everything emitted so far has been sent (a drain's last step)."""
        sent = trio.Event()
        self._out_send.send_nowait(sent)
        with trio.move_on_after(5):
            await sent.wait()

    def emit(self, item: protocol.OutItem) -> None:
        self.worker.last_progress = trio.current_time()
        self._out_send.send_nowait(item)

    def orphan(self, why: str) -> None:
        """Abort this front's requests: it is gone, or has re-run them elsewhere."""
        running = self.worker.requests_of(self)
        if running:
            log.warning("front at %s %s: aborting its %d request(s)", self.endpoint, why,
                        len(running))
            self.worker.abort(running)

    async def _watch_contact(self, events: TrioSocket) -> None:
        """Follow the connection's events; orphan the front's requests once it has been cut off
        longer than it waits for a silent worker."""
        while True:
            with trio.move_on_at(self.contact.orphaned_at()):
                message = parse_monitor_message(await events.recv_multipart())
                self.contact.event(int(message["event"]), trio.current_time())
                continue
            self.orphan(f"has been out of reach for over {self.contact.patience:g} s")
            self.contact.acted()

    async def _say_bye(self, reason: str) -> None:
        """Best effort, bounded: the front re-runs our jobs at once instead of after a timeout."""
        with trio.move_on_after(1) as scope:
            scope.shield = True
            try:
                await self.send(protocol.Bye(reason))
            except (trio.ClosedResourceError, zmq.ZMQError):
                pass

    async def _flush_loop(self) -> None:
        """Everything emitted together leaves as one `out`, with the engine's load as of now."""
        async for item in self._out_receive:
            items = [item]
            while True:
                try:
                    items.append(self._out_receive.receive_nowait())
                except trio.WouldBlock:
                    break
            held, dropped = self._prefix_changes()
            await self.send(protocol.Out([i for i in items if isinstance(i, protocol.OutItem)],
                                         self.worker.load(self.received), held, dropped))
            for item in items:
                if isinstance(item, trio.Event):
                    item.set()

    async def _heartbeat_loop(self) -> None:
        unwelcome_since, warned = trio.current_time(), False
        patience = UNWELCOMED_HEARTBEATS * self.worker.settings.heartbeat_interval_s
        while True:
            await trio.sleep(self.worker.settings.heartbeat_interval_s)
            if self.welcomed:
                unwelcome_since, warned = trio.current_time(), False
            else:  # the front is not up yet, or lost our hello: say it again
                await self.send(self.worker.hello())
                if not warned and trio.current_time() - unwelcome_since > patience:
                    warned = True  # CURVE refusals are silent on this side: say what to check
                    log.warning("no welcome from the front at %s after %g s: is it up, does it "
                                "know this worker's key (python -m server.keys list), and is "
                                "COHORT_FRONT_KEY its key?", self.endpoint, patience)
            held, dropped = self._prefix_changes()
            await self.send(protocol.Heartbeat(self.worker.engine.unfinished(), self.worker.state,
                                               self.worker.load(self.received), held, dropped))

    def _prefix_changes(self) -> tuple[list[int], list[int]]:
        """What the engine's cache took in and let go that this front has not been told."""
        return self.changes.take() if self.changes is not None else ([], [])

    async def _receive_loop(self, nursery: trio.Nursery) -> None:
        assert self._sock is not None
        while True:
            [data] = (await self._sock.recv_multipart())[-1:]
            try:
                message = protocol.decode(bytes(data), self.max_message_bytes)
            except protocol.ProtocolError as error:
                log.warning("refused a message from %s: %s", self.endpoint, error)
                ids = protocol.request_ids(bytes(data))
                if ids:  # answered at once: the front fails or re-runs them, they never hang
                    await self.send(protocol.Error(
                        f"the worker could not read this batch: {error}", ids, "undecodable"))
                continue
            if isinstance(message, protocol.Welcome):
                if not self.welcomed:  # a hello said again before the first welcome: one log
                    log.info("registered with front %s at %s", message.front_id, self.endpoint)
                self.welcomed = True
                self.contact.patience = message.worker_timeout_s
            elif isinstance(message, protocol.HelloAgain):
                self.orphan("does not know this worker (it restarted, or re-ran them elsewhere)")
                self.welcomed = False
                self.received = 0  # the front forgot us: its new record of us counts from zero
                if self.residency is not None and self.changes is not None:
                    self.residency.resync(self.changes)  # ... and what our engine holds
                await self.send(self.worker.hello())
            elif isinstance(message, protocol.Batch):
                self.received += len(message.requests)
                self.worker.pending += len(message.requests)
                nursery.start_soon(self.worker.run_batch, self, message)
                self._out_send.send_nowait(None)  # acknowledge at once, with the new load
            elif isinstance(message, protocol.Abort):
                self.worker.abort(message.ids)
            elif isinstance(message, protocol.Shutdown):
                self.worker.stop("the front asked for shutdown")
