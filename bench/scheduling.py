"""Scheduling benchmarks: what the front's placement and the engine's batching do to latency.

Three scenarios, each an async function of a `bench.compare.Bench` returning a results section
(`{"rows": [...], ...}`, printed by `bench.compare.print_table`); `python bench/scheduling.py`
runs them on their own (`--help` for the knobs):

- `gateway_cost`: the time to first token the gateway adds to a lone request on an idle worker.
- `mixed_lengths`: short requests among long ones, against the same short requests alone.
- `prefix_affinity`: TTFT with prefix-cache-aware placement against load-only placement.

All run on the mock engine with GPU-like costs (`GPU_LIKE`). Each runs its two variants in rounds
that alternate their order (A,B then B,A ...), since this machine is a noisy shared VM: a ratio is
the median of the rounds' ratios, with their range beside it; percentiles are pooled over rounds.
Every load is bounded in count and time (`--load-max-s` softly, cancelling what is in flight;
five times that hard), on loopback, streamed.

Knobs are read from `bench.args` with getattr defaults, so compare.py's own Namespace works too.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import trio  # noqa: E402

from harness.load import Result, poisson_arrivals, run_load, run_open_loop  # noqa: E402

MODEL = "cohort-mock"
# The mock made to cost what a GPU would: 50 us of prefill per prompt token, a 10 ms decode step at
# batch 1 growing 2% per extra sequence, no fixed prefill cost, and replies exactly max_tokens long
# (vLLM's ignore_eos). The model length is raised so 2,000-token system prompts fit.
GPU_LIKE = {"MOCK_TOKEN_S": "0.01", "MOCK_BATCH_GROWTH": "0.02", "MOCK_PREFILL_TOKEN_S": "0.00005",
            "MOCK_TTFT_S": "0", "MOCK_REPLY_LENGTH": "max_tokens", "COHORT_MAX_MODEL_LEN": "8192",
            "MOCK_MAX_TOKENS": "1024"}

DEFAULTS = {
    "sched_rounds": 3,            # rounds per scenario, alternating the variants' order
    "load_max_s": 120.0,          # soft bound of one load (seconds); the hard one is 5x
    # gateway_cost
    "gateway_requests": 50,
    "gateway_warmup": 10,
    "gateway_prompt_words": 8,
    "gateway_output_tokens": 16,
    # mixed_lengths
    "mixed_concurrency": [16, 64],
    "mixed_shorts": [200, 400],   # shorts measured per closed-loop load, one per concurrency
    "mixed_open_shorts": 160,     # short requests measured in the open-loop load
    "mixed_open_rate": 0.0,       # requests/s of the open loop; 0: mixed_open_load x the c=16 rate
    "mixed_open_load": 0.7,
    "short_tokens": 8,
    "long_tokens": 512,
    "long_every": 5,              # request i is long when i % long_every == long_every - 1
    "mixed_prompt_words": 8,
    "mixed_seed": 0,
    # prefix_affinity
    "affinity_requests": 300,
    "affinity_warmup": 32,
    "affinity_prompts": 8,
    "affinity_prompt_words": 2000,
    "affinity_cache_tokens": 10000,  # 5 of the 8 prompts: whether a worker's share of them fits is placement's doing
    "affinity_concurrency": 16,
    "affinity_output_tokens": 16,
    "affinity_seed": 0,
    "prefix_seq_tokens": -1,      # COHORT_PREFIX_SEQ_TOKENS for both clusters; -1: the front's default
}


def knob(bench, name: str):
    value = getattr(bench.args, name, None)
    return DEFAULTS[name] if value is None else value


def ms(seconds: float) -> float:
    return round(1000 * seconds, 2)


def pct(values: list[float], q: float) -> float:
    return Result().pct(values, q)


def spread(values: list[float], digits: int = 2) -> tuple[float, str]:
    """Median and "lo-hi" range of per-round figures."""
    ordered = sorted(values)
    if not ordered:
        return 0.0, ""
    low, high = ordered[0], ordered[-1]
    return round(statistics.median(ordered), digits), f"{low:.{digits}f}-{high:.{digits}f}"


def ratio(a: float, b: float) -> float:
    return a / b if b else math.inf


def alternate(rounds: int, first: str, second: str) -> list[tuple[int, list[str]]]:
    """(round, order of the variants): A,B then B,A then A,B ..."""
    return [(r, [first, second] if r % 2 == 0 else [second, first]) for r in range(rounds)]


async def health(cluster) -> dict:
    async with httpx.AsyncClient(timeout=10) as client:
        return (await client.get(cluster.url + "/health")).json()


async def jobs_done(cluster) -> dict[str, int]:
    """Jobs each worker finished so far, from the front's open `/health`."""
    return {w["id"]: w.get("jobs_done", 0) for w in (await health(cluster))["workers"]}


async def settle(cluster, timeout_s: float = 60) -> float:
    """Wait until no worker has a job in flight (the cancelled tail of a load aborted); the wait."""
    began = time.monotonic()
    with trio.move_on_after(timeout_s):
        while True:
            workers = (await health(cluster))["workers"]
            if all(not w.get("jobs_in_flight") and not w.get("batches_in_flight") for w in workers):
                break
            await trio.sleep(0.1)
    return round(time.monotonic() - began, 2)


def pooled(results: list[Result]) -> Result:
    """Several loads' latencies and first-token times as one (for pooled percentiles)."""
    out = Result()
    for result in results:
        out.requests += result.requests
        out.errors += result.errors
        out.cancelled += result.cancelled
        out.elapsed_s += result.elapsed_s
        out.latencies_s += result.latencies_s
        out.ttfts_s += result.ttfts_s
        out.tokens += result.tokens
    return out


def p50_p99(values: list[float]) -> str:
    return f"{ms(pct(values, 0.5))} / {ms(pct(values, 0.99))}"


def loadavg() -> float:
    """The machine's 1-minute load average: on a shared 2-core VM, what else was running."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return -1.0


def bounds(bench) -> dict:
    soft = float(knob(bench, "load_max_s"))
    return {"max_duration_s": soft, "timeout_s": 5 * soft + 60}


async def engine_alone(env: dict[str, str], prompts: list[str], max_tokens: int
                       ) -> tuple[list[float], list[float]] | None:
    """The mock engine run in this process on `env`'s settings, one request at a time, with no
    gateway: each request's time to its first token and to its end. None if it cannot be built."""
    try:
        from common import protocol
        from common.config import WorkerSettings, load
        from worker.engines import make_engine
        engine = make_engine(load(WorkerSettings, {**os.environ, **env, "COHORT_ENGINE": "mock"}))
        await engine.load()
    except Exception:  # the engine's internals are not this module's API: fall back to the formula
        return None
    firsts, wholes = [], []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(engine.run)
        for i, prompt in enumerate(prompts):
            seen: list[float] = []
            began = trio.current_time()
            request = protocol.request_item(
                f"alone-{i}", "completions",
                {"model": "cohort-mock", "prompt": prompt, "max_tokens": max_tokens}, stream=True)
            await engine.generate(request, lambda item: seen.append(trio.current_time()))
            firsts.append(seen[0] - began if seen else 0.0)
            wholes.append(trio.current_time() - began)
        nursery.cancel_scope.cancel()
    return firsts, wholes


# --- 1. gateway cost -----------------------------------------------------------------------------

async def gateway_cost(bench) -> dict:
    """What the gateway adds to the time to first token of a lone request on an idle worker.

    One worker on the GPU-like mock, one request at a time, streamed `/v1/completions` with
    `gateway_output_tokens` (16) tokens and a prompt of `gateway_prompt_words` + 1 words (a
    distinct number first, so no prefix-cache hit). The engine's own first step, from the mock's
    settings (a token is a whitespace-separated word):

        engine_first_step = MOCK_TTFT_S + prompt_tokens * MOCK_PREFILL_TOKEN_S + MOCK_TOKEN_S

    (one prefill of the prompt, one decode step at batch 1); gateway cost = client-measured TTFT
    minus engine_first_step. Likewise the whole request's engine time is
    MOCK_TTFT_S + prompt_tokens * MOCK_PREFILL_TOKEN_S + max_tokens * MOCK_TOKEN_S.

    The formula is checked against the mock itself: the same prompts go through the mock engine
    run in this process with no gateway (`engine_alone`), and the cost is also given against that
    measured first token (`ttft_cost_vs_engine_alone`), which stays right if the mock's step
    model differs from the formula (e.g. a prefill-only step that samples the first token without
    a decode step's cost, as vLLM does). Target: TTFT cost under 5 ms, and the same with the
    default 0.1 s batch window as with none (an idle worker takes a request at once).
    """
    total, warmup = knob(bench, "gateway_requests"), knob(bench, "gateway_warmup")
    words, tokens = knob(bench, "gateway_prompt_words"), knob(bench, "gateway_output_tokens")
    rounds = knob(bench, "sched_rounds")
    env = dict(GPU_LIKE)
    filler = " ".join(["word"] * words)
    prompt_tokens = words + 1
    first_step = (float(env["MOCK_TTFT_S"]) + prompt_tokens * float(env["MOCK_PREFILL_TOKEN_S"])
                  + float(env["MOCK_TOKEN_S"]))
    whole = (float(env["MOCK_TTFT_S"]) + prompt_tokens * float(env["MOCK_PREFILL_TOKEN_S"])
             + tokens * float(env["MOCK_TOKEN_S"]))
    began, load_before = time.monotonic(), loadavg()
    alone = await engine_alone(env, [f"{i} {filler}" for i in range(20)], tokens)
    alone_first = statistics.median(alone[0]) if alone else None
    alone_whole = statistics.median(alone[1]) if alone else None
    variants = {"window 0": "0", "window 0.1 (default)": "0.1"}
    clusters = {}
    try:
        for name, wait in variants.items():
            clusters[name] = await bench.mock_cluster(workers=1, **env, COHORT_BATCH_WAIT_S=wait)
        runs: dict[str, list[Result]] = {name: [] for name in variants}
        offset = 0
        for round_, order in alternate(rounds, *variants):
            for name in order:
                url = clusters[name].url + "/v1/completions"

                def body_for(i: int, base=offset) -> dict:
                    return {"model": MODEL, "prompt": f"{base + i} {filler}", "max_tokens": tokens}

                await run_load(url, body_for, total=warmup, concurrency=1, stream=True,
                               **bounds(bench))
                offset += warmup
                result = await run_load(url, lambda i, base=offset: body_for(i, base), total=total,
                                        concurrency=1, stream=True, **bounds(bench))
                offset += total
                bench.raw[f"gateway cost {name} #{round_}"] = result
                runs[name].append(result)
    finally:
        for cluster in clusters.values():
            cluster.stop()
    rows = []
    base = list(variants)[0]
    for name in variants:
        pool = pooled(runs[name])
        cost = [t - first_step for t in pool.ttfts_s]
        per_round = [1000 * (pct(r.ttfts_s, 0.5) - first_step) for r in runs[name]]
        median, range_ = spread(per_round)
        row = {"variant": name, "requests": pool.requests, "errors": pool.errors,
               "ttft_p50_p99_ms": p50_p99(pool.ttfts_s),
               "engine_first_step_ms": ms(first_step),
               "ttft_cost_p50_p99_ms": p50_p99(cost),
               "ttft_cost_p50_by_round_ms": f"{median} ({range_})",
               "e2e_cost_p50_p99_ms": p50_p99([t - whole for t in pool.latencies_s])}
        if alone_first is not None:
            row["engine_alone_first_token_ms"] = ms(alone_first)
            row["ttft_cost_vs_engine_alone_p50_p99_ms"] = p50_p99(
                [t - alone_first for t in pool.ttfts_s])
            row["e2e_cost_vs_engine_alone_p50_p99_ms"] = p50_p99(
                [t - alone_whole for t in pool.latencies_s])
        reference = alone_first if alone_first is not None else first_step
        row["target_met"] = (pct(pool.ttfts_s, 0.5) - reference < 0.005
                             and pct(pool.ttfts_s, 0.99) - reference < 0.005)
        if name != base:
            ratios = [ratio(pct(a.ttfts_s, 0.5), pct(b.ttfts_s, 0.5))
                      for a, b in zip(runs[name], runs[base])]
            median, range_ = spread(ratios, 3)
            row["ttft_p50_vs_window_0"] = f"{median} ({range_})"
        rows.append(row)
    return {"rows": rows, "rounds": rounds, "prompt_tokens": prompt_tokens, "max_tokens": tokens,
            "engine_first_step": "MOCK_TTFT_S + prompt_tokens*MOCK_PREFILL_TOKEN_S + MOCK_TOKEN_S",
            "engine_whole_request": "MOCK_TTFT_S + prompt_tokens*MOCK_PREFILL_TOKEN_S "
                                    "+ max_tokens*MOCK_TOKEN_S",
            "engine_alone_ms": "unavailable" if alone is None else
                               f"first token p50 {ms(alone_first)}, whole p50 {ms(alone_whole)} "
                               "(the mock in-process, no gateway)",
            "target": "TTFT cost p50 and p99 under 5 ms (against the engine alone when measured), "
                      "with either window",
            "loadavg_1m_start_end": f"{load_before} / {loadavg()}",
            "wall_s": round(time.monotonic() - began, 1)}


# --- 2. mixed lengths ----------------------------------------------------------------------------

class MixedWorkload:
    """Request i: short (`short_tokens`) or, every `long_every`-th, long (`long_tokens`); the same
    short prompt length for both, a distinct number first (no prefix sharing)."""

    def __init__(self, bench) -> None:
        self.short = knob(bench, "short_tokens")
        self.long = knob(bench, "long_tokens")
        self.every = knob(bench, "long_every")
        self.filler = " ".join(["word"] * knob(bench, "mixed_prompt_words"))

    def tag(self, i: int) -> str:
        return "long" if i % self.every == self.every - 1 else "short"

    def mixed(self, i: int) -> tuple[dict, str]:
        tag = self.tag(i)
        return {"model": MODEL, "prompt": f"{i} {self.filler}",
                "max_tokens": self.long if tag == "long" else self.short}, tag

    def shorts(self, count: int) -> list[int]:
        """The indexes of the first `count` short requests of the mixed sequence."""
        out, i = [], 0
        while len(out) < count:
            if self.tag(i) == "short":
                out.append(i)
            i += 1
        return out

    def total_for(self, shorts: int) -> int:
        """Requests of the mixed sequence up to and including its `shorts`-th short one."""
        return self.shorts(shorts)[-1] + 1


def enough(shorts: int, *, answered: bool):
    def check(result: Result) -> bool:
        tagged = result.tagged("short")
        return (tagged.requests if answered else tagged.started) >= shorts
    return check


async def mixed_lengths(bench) -> dict:
    """Short requests among long ones (4 short of `short_tokens`=8 for every long of
    `long_tokens`=512, in a fixed order), two workers on the GPU-like mock, streamed: the short
    requests' TTFT and end-to-end latency against the same short requests alone, in closed loops at
    each of `mixed_concurrency` (16, 64) and in an open loop of Poisson arrivals (seeded) at
    `mixed_open_rate`, by default `mixed_open_load` (0.7) x the requests/s the mixed c=16 closed
    loop sustained in round 1. The shorts alone: the same concurrency, or the same arrival times
    with the long requests taken out.

    A mixed load stops starting requests once its `mixed_shorts` short ones have started and ends
    (cancelling the long ones still running) once those are answered. Target: the shorts' p99
    (TTFT and end to end) at most 1.5x their p99 alone.
    """
    rounds = knob(bench, "sched_rounds")
    work = MixedWorkload(bench)
    concurrencies = list(knob(bench, "mixed_concurrency"))
    counts = list(knob(bench, "mixed_shorts"))
    counts += [counts[-1]] * (len(concurrencies) - len(counts))
    open_shorts = knob(bench, "mixed_open_shorts")
    open_rate = float(knob(bench, "mixed_open_rate"))
    seed = knob(bench, "mixed_seed")
    began, load_before = time.monotonic(), loadavg()
    cluster = await bench.mock_cluster(workers=2, **GPU_LIKE)
    url = cluster.url + "/v1/completions"
    loads = [f"c={c}" for c in concurrencies] + ["open"]
    runs = {(load, variant): [] for load in loads for variant in ("mixed", "alone")}
    shares = {key: [] for key in runs}
    settles, rates = [], []
    try:
        # a warm-up: connections, the first batches, the engine loop
        await run_load(url, lambda i: work.mixed(work.shorts(8)[i]), total=8, concurrency=4,
                       stream=True, **bounds(bench))
        for round_, order in alternate(rounds, "mixed", "alone"):
            for c, shorts in zip(concurrencies, counts):
                index = work.shorts(shorts)
                for variant in order:
                    before = await jobs_done(cluster)
                    if variant == "mixed":
                        result = await run_load(
                            url, work.mixed, total=work.total_for(shorts), concurrency=c,
                            stream=True, stop_starting=enough(shorts, answered=False),
                            stop_when=enough(shorts, answered=True), **bounds(bench))
                    else:
                        result = await run_load(url, lambda j, index=index: work.mixed(index[j]),
                                                total=shorts, concurrency=c, stream=True,
                                                **bounds(bench))
                    settles.append(await settle(cluster))
                    shares[(f"c={c}", variant)].append(share(before, await jobs_done(cluster)))
                    bench.raw[f"mixed {variant} c={c} #{round_}"] = result
                    runs[(f"c={c}", variant)].append(result)
                    if variant == "mixed" and not rates:  # the first closed loop's rate
                        rates.append(result.requests / result.elapsed_s)
            rate = open_rate or knob(bench, "mixed_open_load") * rates[0]
            arrivals = poisson_arrivals(work.total_for(open_shorts), rate, seed)
            index = work.shorts(open_shorts)
            for variant in order:
                before = await jobs_done(cluster)
                if variant == "mixed":
                    result = await run_open_loop(url, work.mixed, arrivals=arrivals, stream=True,
                                                 stop_when=enough(open_shorts, answered=True),
                                                 **bounds(bench))
                else:
                    result = await run_open_loop(url, lambda j: work.mixed(index[j]),
                                                 arrivals=[arrivals[k] for k in index],
                                                 stream=True, **bounds(bench))
                settles.append(await settle(cluster))
                shares[("open", variant)].append(share(before, await jobs_done(cluster)))
                bench.raw[f"mixed {variant} open #{round_}"] = result
                runs[("open", variant)].append(result)
    finally:
        cluster.stop()
    rows = []
    for load in loads:
        mixed = [r.tagged("short") for r in runs[(load, "mixed")]]
        alone = [r.tagged("short") for r in runs[(load, "alone")]]
        longs = [r.tagged("long") for r in runs[(load, "mixed")]]
        pm, pa = pooled(mixed), pooled(alone)
        ttft, ttft_range = spread([ratio(pct(m.ttfts_s, .99), pct(a.ttfts_s, .99))
                                   for m, a in zip(mixed, alone)])
        e2e, e2e_range = spread([ratio(pct(m.latencies_s, .99), pct(a.latencies_s, .99))
                                 for m, a in zip(mixed, alone)])
        label = load if load != "open" else f"open {rate:.1f}/s"
        rows.append({
            "load": label,
            "shorts": f"{pm.requests} / {pa.requests}",
            "short_ttft_alone_p50_p99_ms": p50_p99(pa.ttfts_s),
            "short_ttft_mixed_p50_p99_ms": p50_p99(pm.ttfts_s),
            "ttft_p99_ratio": f"{ttft} ({ttft_range})",
            "short_e2e_alone_p50_p99_ms": p50_p99(pa.latencies_s),
            "short_e2e_mixed_p50_p99_ms": p50_p99(pm.latencies_s),
            "e2e_p99_ratio": f"{e2e} ({e2e_range})",
            "longs_done_cancelled": f"{sum(r.requests for r in longs)} / "
                                    f"{sum(r.cancelled for r in longs)}",
            "long_e2e_p50_s": round(pct(pooled(longs).latencies_s, 0.5), 2),
            "mixed_rps": round(statistics.median(r.rps for r in runs[(load, "mixed")]), 1),
            "load_s_mixed_alone": " / ".join(
                f"{statistics.median(r.elapsed_s for r in runs[(load, v)]):.1f}"
                for v in ("mixed", "alone")),
            "max_worker_share_mixed_alone": f"{max(shares[(load, 'mixed')]):.0%} / "
                                            f"{max(shares[(load, 'alone')]):.0%}",
            "errors": sum(r.errors for key in ((load, "mixed"), (load, "alone"))
                          for r in runs[key]),
            "target_met": ttft <= 1.5 and e2e <= 1.5})
    return {"rows": rows, "rounds": rounds,
            "requests": f"{work.every - 1} short (max_tokens {work.short}) : 1 long "
                        f"(max_tokens {work.long}); shorts measured per load: "
                        f"{dict(zip(loads, counts + [open_shorts]))}",
            "open_loop_rate": f"{rate:.2f} requests/s" + (
                "" if open_rate else f" ({knob(bench, 'mixed_open_load')} x {rates[0]:.2f}, "
                                     f"what the mixed c={concurrencies[0]} closed loop sustained)"),
            "worker_share": "the largest share of a load's requests one worker answered",
            "open_loop_client_lag_p99_ms": ms(pct([lag for load in runs if load[0] == "open"
                                                   for r in runs[load] for lag in r.start_lags_s],
                                                  0.99)),
            "settle_s_max": max(settles, default=0.0),
            "target": "short requests' p99 (TTFT, e2e) mixed / alone <= 1.5",
            "loadavg_1m_start_end": f"{load_before} / {loadavg()}",
            "wall_s": round(time.monotonic() - began, 1)}


def share(before: dict[str, int], after: dict[str, int]) -> float:
    """The largest share of one load's jobs that one worker did."""
    done = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    total = sum(done.values())
    return round(max(done.values()) / total, 3) if total else 0.0


# --- 3. prefix affinity --------------------------------------------------------------------------

async def prefix_affinity(bench) -> dict:
    """Prefix-cache-aware placement against load-only placement.

    Two workers on the GPU-like mock whose prefix cache keeps `affinity_cache_tokens` (6500)
    tokens, about 3 of the `affinity_prompts` (8) system prompts of `affinity_prompt_words` (2000)
    words. Streamed chat completions, `affinity_concurrency` (16) at a time, each with a system
    prompt drawn at random (fixed seed: the same sequence for both variants) and a distinct short
    user message, max_tokens 16: TTFT with `COHORT_PREFIX_AFFINITY=1` against `=0`, and each
    worker's share of the requests (from `/health`: workers[].jobs_done). Targets: TTFT p50 at
    least 2x better with affinity, no worker above 60% of the requests.
    """
    rounds = knob(bench, "sched_rounds")
    count, warmup = knob(bench, "affinity_requests"), knob(bench, "affinity_warmup")
    prompts_n, words = knob(bench, "affinity_prompts"), knob(bench, "affinity_prompt_words")
    concurrency, tokens = knob(bench, "affinity_concurrency"), knob(bench, "affinity_output_tokens")
    rng = random.Random(knob(bench, "affinity_seed"))
    prompts = [" ".join(f"s{k}w{j}" for j in range(words)) for k in range(prompts_n)]
    warm_picks = [rng.randrange(prompts_n) for _ in range(warmup)]
    picks = [rng.randrange(prompts_n) for _ in range(count)]  # the same in every load

    def bodies(chosen: list[int], offset: int):
        def body_for(i: int) -> dict:
            n = offset + i  # a distinct user message in every request of the run
            question = f"question {n}: what comes after {n}?"
            return {"model": MODEL, "max_tokens": tokens,
                    "messages": [{"role": "system", "content": prompts[chosen[i]]},
                                 {"role": "user", "content": question}]}
        return body_for

    env = {**GPU_LIKE, "MOCK_PREFIX_CACHE_TOKENS": str(knob(bench, "affinity_cache_tokens"))}
    if knob(bench, "prefix_seq_tokens") >= 0:
        env["COHORT_PREFIX_SEQ_TOKENS"] = str(knob(bench, "prefix_seq_tokens"))
    variants = {"affinity": "1", "load only": "0"}
    began, load_before = time.monotonic(), loadavg()
    clusters = {}
    runs: dict[str, list[Result]] = {name: [] for name in variants}
    shares: dict[str, list[dict[str, float]]] = {name: [] for name in variants}
    hit_rates: dict[str, str] = {}
    try:
        for name, flag in variants.items():
            clusters[name] = await bench.mock_cluster(workers=2, **env, COHORT_PREFIX_AFFINITY=flag)
        for name, cluster in clusters.items():  # the caches from cold to their steady state
            await run_load(cluster.url + "/v1/chat/completions", bodies(warm_picks, 0),
                           total=warmup, concurrency=concurrency, stream=True, **bounds(bench))
        for round_, order in alternate(rounds, *variants):
            for name in order:
                cluster = clusters[name]
                before = await jobs_done(cluster)
                result = await run_load(cluster.url + "/v1/chat/completions",
                                        bodies(picks, warmup + count * round_),
                                        total=count, concurrency=concurrency, stream=True,
                                        **bounds(bench))
                await settle(cluster)
                after = await jobs_done(cluster)
                done = {k: after[k] - before.get(k, 0) for k in after}
                total = sum(done.values()) or 1
                shares[name].append({k: v / total for k, v in sorted(done.items())})
                bench.raw[f"prefix {name} #{round_}"] = result
                runs[name].append(result)
        for name, cluster in clusters.items():
            hit_rates[name] = " / ".join(
                f"{w['prefix_hit_rate']:.0%}" for w in sorted((await health(cluster))["workers"],
                                                             key=lambda w: w["id"])
                if "prefix_hit_rate" in w) or "not reported"
    finally:
        for cluster in clusters.values():
            cluster.stop()
    rows = []
    base = "load only"
    for name in variants:
        pool = pooled(runs[name])
        worker_ids = sorted({k for s in shares[name] for k in s})
        mean_share = {k: statistics.fmean(s.get(k, 0.0) for s in shares[name]) for k in worker_ids}
        row = {"placement": name, "requests": pool.requests, "errors": pool.errors,
               "ttft_p50_p99_ms": p50_p99(pool.ttfts_s),
               "e2e_p50_p99_ms": p50_p99(pool.latencies_s),
               "rps": round(statistics.median(r.rps for r in runs[name]), 1),
               "worker_shares": " / ".join(f"{100 * mean_share[k]:.0f}%" for k in worker_ids),
               "max_share_any_round": f"{100 * max(max(s.values()) for s in shares[name]):.0f}%",
               "prefix_hit_rate": hit_rates.get(name, "")}
        if name != base:
            p50, p50_range = spread([ratio(pct(b.ttfts_s, .5), pct(a.ttfts_s, .5))
                                     for a, b in zip(runs[name], runs[base])])
            p99, p99_range = spread([ratio(pct(b.ttfts_s, .99), pct(a.ttfts_s, .99))
                                     for a, b in zip(runs[name], runs[base])])
            row["ttft_p50_gain"] = f"{p50} ({p50_range})"
            row["ttft_p99_gain"] = f"{p99} ({p99_range})"
            row["target_met"] = p50 >= 2 and max(max(s.values()) for s in shares[name]) <= 0.6
        rows.append(row)
    return {"rows": rows, "rounds": rounds,
            "workload": f"{prompts_n} system prompts of {words} words, prefix cache "
                        f"{knob(bench, 'affinity_cache_tokens')} tokens per worker, "
                        f"{count} requests per load at c={concurrency}, max_tokens {tokens}, "
                        f"prefix seq tokens {env.get('COHORT_PREFIX_SEQ_TOKENS', 'default')}",
            "gain": "load-only TTFT / affinity TTFT, median of rounds (range)",
            "prefix_hit_rate": "per worker, share of prompt tokens served from its prefix cache "
                               "since it started (warm-up included), from /health",
            "target": "ttft_p50_gain >= 2, no worker above 60% of the requests",
            "loadavg_1m_start_end": f"{load_before} / {loadavg()}",
            "wall_s": round(time.monotonic() - began, 1)}


SCENARIOS = {"gateway_cost": gateway_cost, "mixed_lengths": mixed_lengths,
             "prefix_affinity": prefix_affinity}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """This module's knobs as command-line options (`--mixed-shorts 400 800`, ...)."""
    for name, default in DEFAULTS.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(default, list):
            parser.add_argument(flag, type=type(default[0]), nargs="+", default=None,
                                help=f"default {' '.join(map(str, default))}")
        else:
            parser.add_argument(flag, type=type(default), default=None, help=f"default {default}")


def main() -> None:
    from bench.compare import Bench, print_table

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", choices=sorted(SCENARIOS),
                        help="run only these scenarios (default: all)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--batch-wait", type=float, default=0.1)
    parser.add_argument("--json", type=Path, help="write the results here")
    add_arguments(parser)
    args = parser.parse_args()
    # what compare.py's Bench and its helpers read
    for name, value in {"prompt_words": 8, "output_tokens": 16, "requests": 2000, "rounds": 5,
                        "n": [8, 64, 256], "real_tokens": 64, "tasks": 2000}.items():
        setattr(args, name, value)
    bench = Bench(args)
    print(f"# Cohort scheduling benchmarks on {platform.node()}: {os.cpu_count()} cores, "
          f"{platform.processor() or platform.machine()}, Python {platform.python_version()}")
    results: dict[str, dict] = {}

    async def run_all() -> None:
        for name in args.only or SCENARIOS:
            results[name] = await SCENARIOS[name](bench)

    trio.run(run_all)
    print_table(results)
    if args.json:
        args.json.write_text(json.dumps({"results": results,
                                         "raw": {k: v.summary() for k, v in bench.raw.items()}},
                                        indent=2))


if __name__ == "__main__":
    main()
