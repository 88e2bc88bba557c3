"""A bounded load on loopback, and the figures it yields.

The client speaks HTTP/1.1 through h11 on plain trio sockets, one keep-alive connection per
concurrent caller. httpx cost 3.6-6 ms of CPU per request here, several times what either server
spends; on 2 cores such a client takes the CPU the servers compete for, and the ratios measure it.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import h11
import trio


@dataclass
class Result:
    """One load's outcome: per-request latencies, first-token and inter-token times, tokens."""

    requests: int = 0
    errors: int = 0
    elapsed_s: float = 0.0
    latencies_s: list[float] = field(default_factory=list)
    ttfts_s: list[float] = field(default_factory=list)
    itls_s: list[float] = field(default_factory=list)
    tokens: int = 0
    finished_at_s: list[float] = field(default_factory=list)  # since the load began

    @property
    def rps(self) -> float:
        return self.requests / self.elapsed_s if self.elapsed_s else 0.0

    @property
    def steady_rps(self) -> float:
        """Requests/s over the middle 80% of completions: no ramp-up, and no drain at the end,
        where a bounded load's last partial batch waits out the window with nothing behind it."""
        done = sorted(self.finished_at_s)
        low, high = len(done) // 10, len(done) * 9 // 10
        if high - low < 10 or done[high - 1] <= done[low]:
            return self.rps
        return (high - 1 - low) / (done[high - 1] - done[low])

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.elapsed_s if self.elapsed_s else 0.0

    def pct(self, values: list[float], q: float) -> float:
        if not values:
            return 0.0
        ordered = sorted(values)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    def summary(self) -> dict[str, float]:
        return {"requests": self.requests, "errors": self.errors,
                "elapsed_s": round(self.elapsed_s, 3), "rps": round(self.rps, 1),
                "steady_rps": round(self.steady_rps, 1),
                "p50_ms": round(1000 * self.pct(self.latencies_s, 0.5), 2),
                "p99_ms": round(1000 * self.pct(self.latencies_s, 0.99), 2),
                "ttft_p50_ms": round(1000 * self.pct(self.ttfts_s, 0.5), 2),
                "itl_mean_ms": round(1000 * statistics.fmean(self.itls_s), 3) if self.itls_s else 0.0,
                "tokens": self.tokens, "tokens_per_s": round(self.tokens_per_s, 1)}


class Connection:
    """One keep-alive HTTP/1.1 connection; reopened when the server closes it."""

    def __init__(self, url: str, headers: dict[str, str]) -> None:
        parts = urlsplit(url)
        self.host, self.port, self.path = parts.hostname or "127.0.0.1", parts.port or 80, parts.path
        self.headers = [("Host", parts.netloc), ("Content-Type", "application/json"),
                        *headers.items()]
        self._stream: trio.SocketStream | None = None
        self._h11: h11.Connection | None = None  # a new one with every new socket

    async def post(self, body: bytes, on_data: Callable[[bytes], None]) -> int:
        """POST `body`; hand each piece of the answer to `on_data` as it arrives; the status."""
        if self._stream is None:
            self._stream = await trio.open_tcp_stream(self.host, self.port)
            self._h11 = h11.Connection(h11.CLIENT)
        conn = self._h11
        assert conn is not None
        request = h11.Request(method="POST", target=self.path,
                              headers=[*self.headers, ("Content-Length", str(len(body)))])
        await self._stream.send_all(conn.send(request) + conn.send(h11.Data(data=body))
                                    + conn.send(h11.EndOfMessage()))
        status = 0
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await self._stream.receive_some(65536))
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                on_data(bytes(event.data))
            elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                break
        if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
            conn.start_next_cycle()
        else:
            await self.aclose()
        return status

    async def aclose(self) -> None:
        if self._stream is not None:
            await self._stream.aclose()
            self._stream = None


async def run_load(url: str, body_for, *, total: int, concurrency: int, headers: dict | None = None,
                   stream: bool = False, progress=None, timeout_s: float = 600) -> Result:
    """POST `total` requests (`body_for(i)` gives each body), `concurrency` at a time."""
    result = Result()
    counter = iter(range(total))

    async def one(conn: Connection, i: int) -> None:
        started = trio.current_time()
        body = body_for(i)
        if stream:
            body = dict(body, stream=True, stream_options={"include_usage": True})
        pieces: list[bytes] = []
        last: list[float] = []

        def on_data(data: bytes) -> None:
            if not stream:
                pieces.append(data)
                return
            now = trio.current_time()
            pieces.append(data)
            events = b"".join(pieces).split(b"\n\n")
            pieces[:] = [events.pop()]  # an event cut in two waits for its rest
            for event in events:
                if not event.startswith(b"data: {"):
                    continue
                chunk = json.loads(event[6:])
                if chunk.get("usage"):
                    result.tokens += chunk["usage"]["completion_tokens"]
                if not chunk.get("choices"):
                    continue
                if not last:
                    result.ttfts_s.append(now - started)
                else:
                    result.itls_s.append(now - last[0])
                last[:] = [now]

        status = await conn.post(json.dumps(body).encode(), on_data)
        ok = status == 200
        if ok and not stream:
            usage = json.loads(b"".join(pieces)).get("usage") or {}
            result.tokens += usage.get("completion_tokens", 0)
        finished = trio.current_time()
        result.latencies_s.append(finished - started)
        result.finished_at_s.append(finished - began)
        result.requests += 1
        result.errors += 0 if ok else 1
        if progress is not None:
            progress.update(1)

    began = trio.current_time()

    async def runner() -> None:
        conn = Connection(url, headers or {})
        try:
            for i in counter:
                await one(conn, i)
        finally:
            await conn.aclose()

    with trio.fail_after(timeout_s):
        async with trio.open_nursery() as nursery:
            for _ in range(concurrency):
                nursery.start_soon(runner)
    result.elapsed_s = trio.current_time() - began
    return result
