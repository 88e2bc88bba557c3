"""Connections are a bounded resource: idle keep-alive connections close, and a full front sheds
its oldest idle connection before it refuses a new one.

hypercorn 0.18's trio worker has no hook for either, so this wraps two methods of its TCPServer
(the one place that owns a connection's socket); `install` checks that they are still there.
- It restarts a connection's idle timer from the task that sends the response, which quart-trio
  cancels as soon as the response is sent: the timer died with it, and an idle keep-alive
  connection stayed open for good. Its timer (a task spawned per response) is replaced by one
  sleeping task per connection that closes it once idle for COHORT_KEEP_ALIVE_S; hypercorn's own
  keep-alive is set out of the way (its first timer still closes idle connections at shutdown).
  That first timer is stopped once the connection's reader ends: otherwise a connection closed
  before its first request (a slowloris cut, a client that connected and left) kept its task,
  and everything its task group held, until the server stopped (a thirty-minute soak grew the
  front by 3 MB a minute).
- It closes a connection that must close (`Connection: close`, a 413) from a task quart-trio has
  already cancelled, so the close never happened: here it is shielded.
- It accepts connections until the process runs out of descriptors, after which every new client
  waits in the backlog behind idle ones. Here a connection past the bound closes the oldest idle
  one to make room; if none is idle, the new one gets a 503 and is closed, and those at work keep
  their descriptors.
"""

from __future__ import annotations

import logging
import resource

import trio
from hypercorn.events import Closed, Updated
from hypercorn.trio.tcp_server import TCPServer

log = logging.getLogger("cohort.connections")

DESCRIPTOR_RESERVE = 256  # the store, ZeroMQ, logs and the worker threads' files
REFUSAL_BODY = (b'{"error":{"message":"the front has no room for another connection; retry",'
                b'"type":"server_error","param":null,"code":"too_many_connections"}}')
REFUSAL = (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
           b"retry-after: 1\r\nconnection: close\r\ncontent-length: "
           + str(len(REFUSAL_BODY)).encode() + b"\r\n\r\n" + REFUSAL_BODY)


def default_limit() -> int:
    """Room below the descriptor limit for everything that is not a client connection."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return max(16, soft - DESCRIPTOR_RESERVE)


class Connections:
    """The open connections, in the order they last became idle (policy, apart from hypercorn)."""

    def __init__(self, limit: int, keep_alive_s: float = 5.0) -> None:
        self.limit = limit
        self.keep_alive_s = keep_alive_s
        self.open: set[object] = set()
        self.idle: dict[object, None] = {}  # insertion-ordered: the first is the oldest idle
        self.shed = 0
        self.refused = 0

    def admit(self, connection: object) -> tuple[bool, object | None]:
        """Whether `connection` may stay open, and the idle connection to close for it, if any."""
        if len(self.open) < self.limit:
            self._add(connection)
            return True, None
        if not self.idle:
            self.refused += 1
            return False, None
        victim = next(iter(self.idle))
        self.forget(victim)
        self.shed += 1
        self._add(connection)
        return True, victim

    def _add(self, connection: object) -> None:
        self.open.add(connection)
        self.idle[connection] = None  # waiting for its first request

    def mark(self, connection: object, idle: bool) -> None:
        self.idle.pop(connection, None)
        if idle and connection in self.open:
            self.idle[connection] = None

    def forget(self, connection: object) -> None:
        self.open.discard(connection)
        self.idle.pop(connection, None)


_registry: Connections | None = None


def counts() -> dict[str, int]:
    """This process's open client connections, at work and idle (for /metrics)."""
    if _registry is None:
        return {"busy": 0, "idle": 0}
    idle = len(_registry.idle)
    return {"busy": len(_registry.open) - idle, "idle": idle}


def install(limit: int = 0, keep_alive_s: float = 5.0) -> Connections:
    """Wrap hypercorn's TCPServer once per process; `limit` 0 means below the descriptor limit."""
    global _registry
    limit = limit or default_limit()
    if _registry is not None:
        _registry.limit, _registry.keep_alive_s = limit, keep_alive_s
        return _registry
    for name in ("run", "protocol_send", "_idle_timeout", "_read_data"):
        if not hasattr(TCPServer, name):
            raise RuntimeError(f"hypercorn's TCPServer has no {name}: server/connections.py "
                               "needs updating for this hypercorn")
    registry = _registry = Connections(limit, keep_alive_s)
    run, protocol_send, read_data = TCPServer.run, TCPServer.protocol_send, TCPServer._read_data

    async def bounded_run(self: TCPServer) -> None:
        admitted, victim = registry.admit(self)
        if not admitted:
            await _refuse(self.stream)
            return
        if victim is not None:
            await _close(victim.stream)  # type: ignore[attr-defined]
        self.cohort_idle_since = trio.current_time()  # type: ignore[attr-defined]  # ours, on hypercorn's object
        try:
            async with trio.open_nursery() as watch:
                watch.start_soon(_close_when_idle, self, registry)
                try:
                    await run(self)
                finally:
                    watch.cancel_scope.cancel()
        finally:
            registry.forget(self)

    async def tracked_send(self: TCPServer, event) -> None:
        if isinstance(event, Updated):  # hypercorn's per-request idle timer is not used
            registry.mark(self, event.idle)
            self.cohort_idle_since = (  # type: ignore[attr-defined]
                trio.current_time() if event.idle else None)
            if not event.idle and self.idle_task._handle is not None:
                # its first timer (started with the connection) would close this busy
                # connection at shutdown; stopped once, nothing per request after
                await self.idle_task.stop()
        elif isinstance(event, Closed):
            # The protocol closes a connection it must not keep (`Connection: close`, a 413)
            # from the task that sent the response, which quart-trio has cancelled by then:
            # unshielded, the close stopped at its first checkpoint and the socket stayed open
            # for good, counted busy, never reclaimed.
            with trio.CancelScope(shield=True):
                await protocol_send(self, event)
        else:
            await protocol_send(self, event)

    async def read_then_stop_timer(self: TCPServer) -> None:
        try:
            await read_data(self)
        finally:  # the connection is done: its task group may end (no checkpoint: a sync cancel)
            timer = self.idle_task._handle
            if timer is not None:
                timer.cancel()

    TCPServer.run = bounded_run  # type: ignore[method-assign]
    TCPServer._read_data = read_then_stop_timer  # type: ignore[method-assign]
    TCPServer.protocol_send = tracked_send  # type: ignore[method-assign]
    log.info("at most %d open connections", limit)
    return registry


async def _close_when_idle(server: TCPServer, registry: Connections) -> None:
    """One sleeping task per connection closes it once idle for the keep-alive time; nothing
    is spawned or cancelled per request (hypercorn's timer cost a task per response)."""
    terminated = server.context.terminated  # the server is shutting down
    while True:
        since = server.cohort_idle_since  # type: ignore[attr-defined]
        wait = registry.keep_alive_s if since is None else (
            since + registry.keep_alive_s - trio.current_time())
        if since is not None and (wait <= 0 or terminated.is_set()):
            await _close(server.stream)  # a busy one is left to finish, or to the drain
            return
        if terminated.is_set():
            await trio.sleep(0.1)  # shutting down: close it as soon as its answer is out
            continue
        with trio.move_on_after(wait):
            await terminated.wait()


async def _close(stream) -> None:
    with trio.CancelScope(shield=True):
        await stream.aclose()  # the connection's reader sees it closed and its task ends


async def _refuse(stream) -> None:
    """A 503 the client can read: the request is read first, or closing would reset the link."""
    with trio.move_on_after(1):
        await stream.receive_some(65536)
    with trio.move_on_after(1):
        try:
            await stream.send_all(REFUSAL)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
    await _close(stream)
