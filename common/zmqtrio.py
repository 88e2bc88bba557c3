"""pyzmq sockets driven by trio (pyzmq ships asyncio and gevent drivers, none for trio).

The socket's `zmq.FD` is an edge-triggered "something changed" signal, not "a message is waiting",
and any libzmq call on the socket (send, recv, reading `EVENTS`) may consume it. So: the level state
is always read from `EVENTS` before anyone waits; after every send or receive `EVENTS` is read again
and whoever can now progress is woken; trio allows one waiter per FD, so exactly one parked task
(the first to need it) waits on the FD and wakes the others, who re-check `EVENTS` themselves.
"""

from __future__ import annotations

import trio
import zmq


class TrioSocket:
    """A zmq socket whose sends and receives are trio checkpoints and never block the loop."""

    def __init__(self, sock: zmq.Socket) -> None:
        self.sock = sock
        self._wake = trio.Event()
        self._interest: dict[int, int] = {zmq.POLLIN: 0, zmq.POLLOUT: 0}
        self._fd_watch: trio.CancelScope | None = None
        self._send_lock = trio.Lock()
        self._closed = False

    def _wake_all(self) -> None:
        self._wake.set()
        self._wake = trio.Event()
        # The FD watcher must hear it too: when another task's EVENTS read consumed the edge, the FD
        # stays quiet, and a watcher left on it would sleep through the change it waits for.
        if self._fd_watch is not None:
            self._fd_watch.cancel()

    def _poll(self) -> int:
        """Read EVENTS (which consumes the FD's edge), and wake the parked tasks it concerns."""
        events = int(self.sock.getsockopt(zmq.EVENTS))  # an int for this option
        if any(events & flag and waiting for flag, waiting in self._interest.items()):
            self._wake_all()
        return events

    async def _wait(self, flag: int) -> None:
        """Return once EVENTS shows `flag`; park meanwhile, one parked task watching the FD."""
        while True:
            if self._closed:
                raise trio.ClosedResourceError("socket closed")
            if self._poll() & flag:
                return
            self._interest[flag] += 1
            try:
                if self._fd_watch is not None:
                    await self._wake.wait()
                else:
                    try:
                        with trio.CancelScope() as self._fd_watch:
                            await trio.lowlevel.wait_readable(self.sock.FD)
                    finally:
                        self._fd_watch = None
                        self._wake_all()  # re-check everyone; another parked task takes the FD
            finally:
                self._interest[flag] -= 1

    async def send_multipart(self, frames: list[bytes]) -> None:
        """Send one message, waiting (not blocking) while the socket is at its high-water mark."""
        async with self._send_lock:
            while True:
                await trio.lowlevel.checkpoint_if_cancelled()
                if self._closed:
                    raise trio.ClosedResourceError("socket closed")
                try:
                    self.sock.send_multipart(frames, zmq.NOBLOCK, )
                except zmq.Again:
                    await self._wait(zmq.POLLOUT)
                    continue
                self._poll()
                await trio.lowlevel.cancel_shielded_checkpoint()
                return

    async def recv_multipart(self, copy: bool = True) -> list:
        """Receive one message, parking until one is there (zmq Frames with `copy=False`, which
        carry the connection's metadata, such as its CURVE User-Id)."""
        await trio.lowlevel.checkpoint_if_cancelled()
        while True:
            if self._closed:
                raise trio.ClosedResourceError("socket closed")
            try:
                frames = self.sock.recv_multipart(zmq.NOBLOCK, copy=copy)
            except zmq.Again:
                await self._wait(zmq.POLLIN)
                continue
            self._poll()
            await trio.lowlevel.cancel_shielded_checkpoint()
            return frames

    def close(self, linger_ms: int = 0) -> None:
        """Close the socket, first telling trio so a parked FD waiter gets ClosedResourceError."""
        if self._closed:
            return
        self._closed = True
        trio.lowlevel.notify_closing(self.sock.FD)
        self._wake_all()
        self.sock.close(linger=linger_ms)

    def __enter__(self) -> "TrioSocket":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
