"""A bounded load on loopback, and the figures it yields.

The client speaks HTTP/1.1 through h11 on plain trio sockets, one keep-alive connection per
concurrent caller. httpx cost 3.6-6 ms of CPU per request here, several times what either server
spends; on 2 cores such a client takes the CPU the servers compete for, and the ratios measure it.

Two ways to load: `run_load` is a closed loop (`concurrency` callers, each sending its next request
when its last one is answered); `run_open_loop` starts requests at given arrival times (Poisson,
seeded, by default), whatever is still in flight. Either can tag requests (`tag_for(i)`, or a
`body_for(i)` that returns `(body, tag)`), and the Result then keeps the figures of each tag apart
too (`result.by_tag["short"]`); `stop_starting` / `stop_when` end a load on a condition of its
Result (e.g. enough requests of one tag answered), cancelling what is still in flight.
"""

from __future__ import annotations

import json
import random
import statistics
from collections.abc import Callable, Sequence
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
    started: int = 0  # requests sent (answered, failed or still in flight)
    cancelled: int = 0  # in flight when the load was stopped: not in requests or latencies (a
    # first token it had already received stays in ttfts_s)
    stopped_by_time: bool = False  # max_duration_s ended it, not its count or condition
    start_lags_s: list[float] = field(default_factory=list)  # open loop: sent after its arrival time
    by_tag: dict[str, Result] = field(default_factory=dict)  # the same figures, per request tag

    def tagged(self, tag: str) -> Result:
        """The figures of the requests tagged `tag` (an empty Result until one is sent)."""
        if tag not in self.by_tag:
            self.by_tag[tag] = Result()
        return self.by_tag[tag]

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
                "ttft_p99_ms": round(1000 * self.pct(self.ttfts_s, 0.99), 2),
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
        stream, self._stream = self._stream, None
        if stream is not None:
            await stream.aclose()


def _first_content(chunk: dict) -> bool:
    """Whether an SSE chunk carries output: text (completions), delta.content (chat) or a finish.
    A chat stream's opening chunk with only the role and empty content is not a first token."""
    for choice in chunk.get("choices") or ():
        if choice.get("text") or (choice.get("delta") or {}).get("content"):
            return True
        if choice.get("finish_reason") is not None:
            return True
    return False


class _Requests:
    """Sends one request on a connection and records what it yields, overall and per tag; ends
    the load (cancelling what is in flight) once `stop_when(result)` holds after an answer."""

    def __init__(self, result: Result, body_for, tag_for, stream: bool, progress,
                 stop_when) -> None:
        self.result, self.body_for, self.tag_for = result, body_for, tag_for
        self.stream, self.progress, self.stop_when = stream, progress, stop_when
        self.began = 0.0
        self.scope: trio.CancelScope | None = None
        self.stopped = False

    def prepare(self, i: int) -> tuple[dict, str | None]:
        """Body and tag of request `i`; counted as started."""
        made = self.body_for(i)
        body, tag = made if isinstance(made, tuple) else (made, None)
        if self.tag_for is not None:
            tag = self.tag_for(i)
        if self.stream:
            body = dict(body, stream=True, stream_options={"include_usage": True})
        self.result.started += 1
        if tag is not None:
            self.result.tagged(tag).started += 1
        return body, tag

    async def send(self, conn: Connection, body: dict, tag: str | None,
                   started: float | None = None) -> None:
        result, stream = self.result, self.stream
        records = [result] if tag is None else [result, result.tagged(tag)]
        started = trio.current_time() if started is None else started
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
                    for record in records:
                        record.tokens += chunk["usage"]["completion_tokens"]
                if not _first_content(chunk):
                    continue
                for record in records:
                    if not last:
                        record.ttfts_s.append(now - started)
                    else:
                        record.itls_s.append(now - last[0])
                last[:] = [now]

        try:
            status = await conn.post(json.dumps(body).encode(), on_data)
        except trio.Cancelled:
            for record in records:
                record.cancelled += 1
            await conn.aclose()  # mid-answer: the connection cannot serve another request
            raise
        ok = status == 200
        tokens = 0
        if ok and not stream:
            usage = json.loads(b"".join(pieces)).get("usage") or {}
            tokens = usage.get("completion_tokens", 0)
        finished = trio.current_time()
        for record in records:
            record.tokens += tokens
            record.latencies_s.append(finished - started)
            record.finished_at_s.append(finished - self.began)
            record.requests += 1
            record.errors += 0 if ok else 1
        if self.progress is not None:
            self.progress.update(1)
        if self.stop_when is not None and self.scope is not None and self.stop_when(result):
            self.stopped = True
            self.scope.cancel()

    async def run(self, go, *, timeout_s: float, max_duration_s: float | None) -> None:
        """Run `go(nursery)` under the hard `timeout_s`; `max_duration_s` ends it softly."""
        self.began = trio.current_time()
        with trio.fail_after(timeout_s):
            async with trio.open_nursery() as nursery:
                self.scope = nursery.cancel_scope
                if max_duration_s is not None:
                    self.scope.deadline = self.began + max_duration_s
                await go(nursery)
        self.result.stopped_by_time = self.scope.cancelled_caught and not self.stopped
        self.result.elapsed_s = trio.current_time() - self.began
        for tagged in self.result.by_tag.values():  # the same span: rates per tag add up
            tagged.elapsed_s = self.result.elapsed_s


async def run_load(url: str, body_for, *, total: int, concurrency: int, headers: dict | None = None,
                   stream: bool = False, progress=None, timeout_s: float = 600,
                   tag_for: Callable[[int], str] | None = None,
                   stop_starting: Callable[[Result], bool] | None = None,
                   stop_when: Callable[[Result], bool] | None = None,
                   max_duration_s: float | None = None) -> Result:
    """POST `total` requests (`body_for(i)` gives each body), `concurrency` at a time.

    `body_for(i)` may return `(body, tag)`, or `tag_for(i)` tag request i: each tag's figures are
    also kept in `result.by_tag`. No new request starts once `stop_starting(result)` holds; the
    load ends, cancelling what is in flight, once `stop_when(result)` holds after an answer or at
    `max_duration_s` (a soft bound; `timeout_s` is the hard one and raises trio.TooSlowError).
    """
    result = Result()
    counter = iter(range(total))
    requests = _Requests(result, body_for, tag_for, stream, progress, stop_when)

    async def runner() -> None:
        conn = Connection(url, headers or {})
        try:
            for i in counter:
                if stop_starting is not None and stop_starting(result):
                    break
                body, tag = requests.prepare(i)
                await requests.send(conn, body, tag)
        finally:
            await conn.aclose()

    async def go(nursery: trio.Nursery) -> None:
        for _ in range(concurrency):
            nursery.start_soon(runner)

    await requests.run(go, timeout_s=timeout_s, max_duration_s=max_duration_s)
    return result


IDLE_REUSE_S = 2.0  # hypercorn closes a keep-alive connection idle for 5 s


def poisson_arrivals(total: int, rate_per_s: float, seed: int = 0) -> list[float]:
    """`total` arrival times (seconds from the start) of a Poisson process of `rate_per_s`."""
    rng = random.Random(seed)
    now, times = 0.0, []
    for _ in range(total):
        now += rng.expovariate(rate_per_s)
        times.append(now)
    return times


async def run_open_loop(url: str, body_for, *, arrivals: Sequence[float] | None = None,
                        total: int | None = None, rate_per_s: float | None = None, seed: int = 0,
                        headers: dict | None = None, stream: bool = False, progress=None,
                        timeout_s: float = 600, tag_for: Callable[[int], str] | None = None,
                        stop_starting: Callable[[Result], bool] | None = None,
                        stop_when: Callable[[Result], bool] | None = None,
                        max_duration_s: float | None = None, max_in_flight: int = 1024) -> Result:
    """An open loop: request i starts at `arrivals[i]` seconds after the load begins, whatever is
    still in flight (or, without `arrivals`, `total` Poisson arrivals at `rate_per_s`, seeded).

    Latency and TTFT count from the arrival time, not from the send: a client late to send (it
    waits for a free connection past `max_in_flight`, or for the CPU) does not hide the wait;
    `result.start_lags_s` shows how late each was sent. Idle keep-alive connections are reused.
    Tags and stop conditions as in `run_load`.
    """
    if arrivals is None:
        if total is None or not rate_per_s:
            raise ValueError("run_open_loop needs arrivals, or total and rate_per_s")
        arrivals = poisson_arrivals(total, rate_per_s, seed)
    result = Result()
    requests = _Requests(result, body_for, tag_for, stream, progress, stop_when)
    idle: list[tuple[float, Connection]] = []  # (when it went idle, connection), newest last
    slots = trio.Semaphore(max_in_flight)

    async def one(i: int, at: float) -> None:
        async with slots:
            body, tag = requests.prepare(i)
            conn = None
            while idle and conn is None:
                since, conn = idle.pop()
                if trio.current_time() - since > IDLE_REUSE_S:  # the server may have closed it
                    await conn.aclose()
                    conn = None
            conn = conn or Connection(url, headers or {})
            result.start_lags_s.append(trio.current_time() - at)
            await requests.send(conn, body, tag, started=at)
            idle.append((trio.current_time(), conn))

    async def go(nursery: trio.Nursery) -> None:
        for i, offset in enumerate(arrivals):
            at = requests.began + offset
            await trio.sleep_until(at)
            if stop_starting is not None and stop_starting(result):
                break
            nursery.start_soon(one, i, at)

    try:
        await requests.run(go, timeout_s=timeout_s, max_duration_s=max_duration_s)
    finally:
        for _, conn in idle:
            await conn.aclose()
    return result
