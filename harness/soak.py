"""Mixed traffic against a front for a bounded time, with the front's health sampled as it goes:
a well-behaved client (whose latency is what the rest must not spoil), streams read whole,
clients that read nothing, clients that leave mid-stream, `Connection: close` clients that
keep their end open, and a slowloris group sending its headers a byte at a time. Loopback only.
"""

from __future__ import annotations

import json
import os
import statistics
from dataclasses import dataclass, field

import httpx
import trio

from harness.cluster import Cluster, descendants

MODEL = "cohort-mock"


@dataclass
class Sample:
    at_s: float
    rss_mb: float
    descriptors: int


@dataclass
class Report:
    """What a soak saw: the well-behaved client's latencies, every group's counts, the front's
    memory and descriptors over time, and the tracebacks in its log."""

    seconds: float
    latencies_s: list[float] = field(default_factory=list)
    errors: int = 0  # the well-behaved client's failures
    counts: dict[str, int] = field(default_factory=dict)
    samples: list[Sample] = field(default_factory=list)
    tracebacks: int = 0

    def percentile(self, share: float) -> float:
        ordered = sorted(self.latencies_s)
        return ordered[min(len(ordered) - 1, int(share * len(ordered)))] if ordered else 0.0

    def summary(self) -> dict[str, object]:
        rss = [s.rss_mb for s in self.samples]
        fds = [s.descriptors for s in self.samples]
        return {"seconds": self.seconds, "well_behaved_requests": len(self.latencies_s),
                "well_behaved_errors": self.errors,
                "p50_ms": round(1000 * statistics.median(self.latencies_s), 1)
                if self.latencies_s else None,
                "p99_ms": round(1000 * self.percentile(0.99), 1),
                "rss_mb_first_last_max": (rss[0], rss[-1], max(rss)) if rss else None,
                "descriptors_first_last_max": (fds[0], fds[-1], max(fds)) if fds else None,
                "tracebacks_in_log": self.tracebacks, **self.counts}


def front_process(cluster: Cluster) -> int:
    """The pid of the process that runs the front's app (hypercorn's worker, below its shell)."""
    below = descendants(cluster.procs["front"].pid)
    return max(below or {cluster.procs["front"].pid}, key=_rss_kb)


def _rss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as status:
            return next((int(line.split()[1]) for line in status if line.startswith("VmRSS:")), 0)
    except OSError:
        return 0


async def soak(cluster: Cluster, seconds: float, *, sample_every_s: float = 5.0) -> Report:
    """Run every group against `cluster` (a front with a mock worker, `api_key` set) for
    `seconds`; every loop is bounded by that time."""
    report = Report(seconds)
    counts = report.counts
    pid = front_process(cluster)
    url, headers = cluster.url, cluster.headers()
    started = trio.current_time()

    def count(name: str) -> None:
        counts[name] = counts.get(name, 0) + 1

    async def well_behaved(http: httpx.AsyncClient) -> None:
        while True:
            began = trio.current_time()
            try:
                answer = await http.post(url + "/v1/completions", json={
                    "model": MODEL, "prompt": "steady", "max_tokens": 8})
                if answer.status_code != 200:
                    report.errors += 1
            except httpx.HTTPError:
                report.errors += 1
            report.latencies_s.append(trio.current_time() - began)
            await trio.sleep(0.05)

    async def streamer(http: httpx.AsyncClient) -> None:
        while True:
            async with http.stream("POST", url + "/v1/completions", json={
                    "model": MODEL, "prompt": "stream", "max_tokens": 64, "stream": True}) as r:
                async for _ in r.aiter_bytes():
                    pass
            count("streams")

    async def leaver(http: httpx.AsyncClient) -> None:
        while True:
            async with http.stream("POST", url + "/v1/completions", json={
                    "model": MODEL, "prompt": "leave", "max_tokens": 512, "ignore_eos": True,
                    "stream": True}) as r:
                async for _ in r.aiter_bytes():
                    break  # gone after the first bytes
            count("left_mid_stream")

    async def non_reader() -> None:
        body = json.dumps({"model": MODEL, "prompt": "hold", "max_tokens": 4096, "n": 4,
                           "ignore_eos": True, "stream": True}).encode()
        while True:
            stream = await trio.open_tcp_stream("127.0.0.1", cluster.port)
            await stream.send_all(b"POST /v1/completions HTTP/1.1\r\nHost: soak\r\n"
                                  + b"".join(f"{k}: {v}\r\n".encode() for k, v in headers.items())
                                  + b"Content-Type: application/json\r\nContent-Length: "
                                  + str(len(body)).encode() + b"\r\n\r\n" + body)
            await trio.sleep(20)  # reads nothing
            await stream.aclose()
            count("non_readers")

    async def closer() -> None:
        while True:
            stream = await trio.open_tcp_stream("127.0.0.1", cluster.port)
            await stream.send_all(b"GET /health HTTP/1.1\r\nHost: soak\r\nConnection: close\r\n\r\n")
            with trio.move_on_after(10):  # the front closes it; this client never does first
                while await stream.receive_some(65536):
                    pass
            await stream.aclose()
            count("connection_close")
            await trio.sleep(0.1)

    async def slowloris() -> None:
        while True:
            stream = await trio.open_tcp_stream("127.0.0.1", cluster.port)
            try:
                for byte in b"GET /health HTTP/1.1\r\nHost: soak\r\nX-Slow: " + b"y" * 1000:
                    await stream.send_all(bytes([byte]))
                    await trio.sleep(1)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                count("slowloris_cut")  # the front closed it: headers not whole in time
            await stream.aclose()

    async def sample() -> None:
        while True:
            fds = len(os.listdir(f"/proc/{pid}/fd"))
            report.samples.append(Sample(round(trio.current_time() - started, 1),
                                         round(_rss_kb(pid) / 1024, 1), fds))
            await trio.sleep(sample_every_s)

    async with httpx.AsyncClient(timeout=60, headers=headers,
                                 limits=httpx.Limits(max_connections=64)) as http:
        with trio.move_on_after(seconds):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(sample)
                nursery.start_soon(well_behaved, http)
                for _ in range(4):
                    nursery.start_soon(streamer, http)
                for _ in range(2):
                    nursery.start_soon(leaver, http)
                    nursery.start_soon(non_reader)
                    nursery.start_soon(closer)
                for _ in range(20):
                    nursery.start_soon(slowloris)
    report.samples.append(Sample(round(trio.current_time() - started, 1),
                                 round(_rss_kb(pid) / 1024, 1), len(os.listdir(f"/proc/{pid}/fd"))))
    report.tracebacks = cluster.log("front").count("Traceback")
    return report
