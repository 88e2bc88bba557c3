"""A bounded load on loopback with an async HTTP client, and the figures it yields."""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field

import httpx
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

    @property
    def rps(self) -> float:
        return self.requests / self.elapsed_s if self.elapsed_s else 0.0

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
                "p50_ms": round(1000 * self.pct(self.latencies_s, 0.5), 2),
                "p99_ms": round(1000 * self.pct(self.latencies_s, 0.99), 2),
                "ttft_p50_ms": round(1000 * self.pct(self.ttfts_s, 0.5), 2),
                "itl_mean_ms": round(1000 * statistics.fmean(self.itls_s), 3) if self.itls_s else 0.0,
                "tokens": self.tokens, "tokens_per_s": round(self.tokens_per_s, 1)}


async def run_load(url: str, body_for, *, total: int, concurrency: int, headers: dict | None = None,
                   stream: bool = False, progress=None, timeout_s: float = 600) -> Result:
    """POST `total` requests (`body_for(i)` gives each body), `concurrency` at a time."""
    result = Result()
    counter = iter(range(total))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=timeout_s, headers=headers or {}, limits=limits) as http:

        async def one(i: int) -> None:
            started = trio.current_time()
            body = body_for(i)
            if stream:
                last = None
                async with http.stream("POST", url, json=dict(body, stream=True,
                                       stream_options={"include_usage": True})) as answer:
                    ok = answer.status_code == 200
                    async for line in answer.aiter_lines():
                        if not line.startswith("data: {"):
                            continue
                        now = trio.current_time()
                        chunk = json.loads(line[6:])
                        if chunk.get("usage"):
                            result.tokens += chunk["usage"]["completion_tokens"]
                        if not chunk.get("choices"):
                            continue
                        if last is None:
                            result.ttfts_s.append(now - started)
                        else:
                            result.itls_s.append(now - last)
                        last = now
            else:
                answer = await http.post(url, json=body)
                ok = answer.status_code == 200
                if ok:
                    usage = answer.json().get("usage") or {}
                    result.tokens += usage.get("completion_tokens", 0)
            result.latencies_s.append(trio.current_time() - started)
            result.requests += 1
            result.errors += 0 if ok else 1
            if progress is not None:
                progress.update(1)

        async def runner() -> None:
            for i in counter:
                await one(i)

        began = trio.current_time()
        with trio.fail_after(timeout_s):
            async with trio.open_nursery() as nursery:
                for _ in range(concurrency):
                    nursery.start_soon(runner)
        result.elapsed_s = trio.current_time() - began
    return result
