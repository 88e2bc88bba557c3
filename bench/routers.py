"""Scenario 13: Cohort's placement against vLLM's own router, in front of two CPU engines.

Every system runs two vLLM engines of the same model with the same engine arguments (float32,
eager, the same context, the same KV cache of `--router-kv-blocks` blocks, `priority`
scheduling), each engine pinned to one core (`VLLM_CPU_OMP_THREADS_BIND`: engine A "0", B "1"):

- `cohort`: the front and two vLLM workers (placement by load, then prefix affinity);
- `cohort-load-only`: a second front on the same two workers with `COHORT_PREFIX_AFFINITY=0`;
- `cache_aware`, `kv_aware`, `round_robin`: `vllm-router` in front of two `vllm serve`
  processes (the same two for the three policies; kv_aware reads their ZeroMQ KV events);
- `dp2`: `vllm serve --data-parallel-size 2`, vLLM's own balancing over its two engines.

All are loaded once and stay loaded; each round runs every system on both workloads, the order
of the systems turning from round to round. The workloads: vLLM's `vllm bench serve` on its
`prefix_repetition` dataset, and growing chat sessions (`bench/multiturn.py`, since vLLM's CLI
has none). Every load has its own seed, so no load finds another's prefixes cached; the lengths,
counts and structure are the same for every system. Per engine, the prefix-cache hit rate over
the load: from vLLM's /metrics counters (deltas), and for Cohort from /health, which gives each
engine's hit rate since it started (hits and queries summed, not rolling): the load's own rate is
worked out from it with the queries estimated as the requests the worker took times the load's
mean prompt length (exact for prefix_repetition, whose prompts are all one length).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import sys
import time

import httpx
import trio

from bench import cpu, multiturn, peer
from bench.prefix_hits import CohortHits, engine_counters, engine_line, per_engine
from bench.peer import OFFLINE, SERVED

ROUTERS = ("cache_aware", "kv_aware", "round_robin")
SYSTEMS = ("cohort", "cohort-load-only", *ROUTERS, "dp2")
WORKLOADS = ("prefix", "multiturn")
CPUS = ("0", "1")  # engine A, engine B
TOKEN_BYTES = 30 * 2 * 3 * 64 * 4  # SmolLM2-135M, float32: layers x (K, V) x KV heads x dims
DEFAULTS = {"router_rounds": 3, "router_systems": list(SYSTEMS), "router_prefixes": 8,
            "router_prefix_len": 512, "router_suffix_len": 32, "router_output_len": 32,
            "router_concurrency": 8, "router_prompts": 32, "router_sessions": 8,
            "router_turns": 4, "router_first_len": 256, "router_turn_len": 64,
            "router_kv_blocks": 25, "router_block_size": 128, "router_max_model_len": 2048,
            "router_memory": 0.2, "router_seed": 13, "router_load_timeout_s": 900.0,
            "router_run_timeout_s": 300.0}


class Knobs:
    """The scenario's settings: `bench.args.router_*`, or these defaults."""

    def __init__(self, args) -> None:
        for name, default in DEFAULTS.items():
            value = getattr(args, name, None)
            setattr(self, name.removeprefix("router_"), default if value is None else value)
        self.kv_bytes = self.kv_blocks * self.block_size * TOKEN_BYTES


def add_arguments(parser) -> None:
    """The knobs as `--router-*` options."""
    for name, default in DEFAULTS.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(default, list):
            parser.add_argument(flag, nargs="+", default=None, choices=SYSTEMS,
                                help=f"default {' '.join(default)}")
        else:
            parser.add_argument(flag, type=type(default), default=None, help=f"default {default}")


def serve_command(path: str, port: int, knobs: Knobs, events_port: int = 0, dp: int = 1) -> str:
    """`vllm serve` with the engine arguments Cohort's worker builds (worker/engines/vllm.py)
    plus the KV size; stats stay on, for /metrics, and the scale-out routes are on: without
    them (/v1/completions/render answers 403) vllm-router gets no token ids, and its cache_aware
    and kv_aware policies fall back to balancing load ("missing_tokens")."""
    command = (peer.serve_command(path, port, knobs, log_stats=True)
               + f" --kv-cache-memory-bytes {knobs.kv_bytes} --scheduling-policy priority "
               "--enable-scale-out")
    if events_port:
        # vLLM binds only a wildcard endpoint and connects to any other, and the router's
        # subscriber connects too: with tcp://127.0.0.1 no event ever arrives
        config = {"enable_kv_cache_events": True, "publisher": "zmq",
                  "endpoint": f"tcp://*:{events_port}"}
        command += f" --kv-events-config '{json.dumps(config)}'"
    return command + (f" --data-parallel-size {dp}" if dp > 1 else "")


def router_command(policy: str, port: int, serves: list[str], events: dict[str, int],
                   knobs: Knobs, metrics_port: int) -> str:
    command = (f"vllm-router --host 127.0.0.1 --port {port} --worker-urls {' '.join(serves)} "
               f"--policy {policy} --prometheus-port {metrics_port} --log-level warning "
               "--worker-startup-check-interval 1")
    if policy == "kv_aware":
        command += "".join(f" --kv-event-source {url}=tcp://127.0.0.1:{events[url]}"
                           for url in serves)
        command += f" --kv-event-block-size {knobs.block_size} --kv-event-model {SERVED}"
    return command


def prefix_command(url: str, path: str, knobs: Knobs, seed: int, folder, name: str) -> list[str]:
    """vLLM's client (as scenario 5 runs it) on the prefix_repetition dataset."""
    command = peer.client_command(url, path, prompts=knobs.prompts,
                                  concurrency=knobs.concurrency, seed=seed, input_len=0,
                                  output_len=0, folder=folder, name=name)
    at = command.index("--dataset-name")
    command[at:at + 6] = ["--dataset-name", "prefix_repetition",
                          "--prefix-repetition-num-prefixes", str(knobs.prefixes),
                          "--prefix-repetition-prefix-len", str(knobs.prefix_len),
                          "--prefix-repetition-suffix-len", str(knobs.suffix_len),
                          "--prefix-repetition-output-len", str(knobs.output_len)]
    return command


async def front_health(cluster, url: str) -> dict:
    """A front's /health with the worker details (the harness's `Cluster.health`); an error,
    as the load's other failures are, when it does not answer."""
    health = await cluster.health(url)
    if health is None:
        raise httpx.TransportError(f"{url}/health did not answer")
    return health


async def wait_fronts(cluster, urls: list[str], timeout_s: float) -> None:
    """Until each front shows both workers ready, within `timeout_s` in all; the harness's wait
    fails at once, with the log's tail, when a worker's load fails or a process exits."""
    with trio.fail_after(timeout_s):
        for url in urls:
            await cluster.wait_workers_ready(["worker1", "worker2"], timeout_s, url=url)


class Systems:
    """Every system's processes, started in one Cluster so `cluster.stop()` ends them all."""

    def __init__(self, cluster, path: str, knobs: Knobs, wanted: list[str]) -> None:
        from harness.cluster import free_port

        self.cluster, self.path, self.knobs = cluster, path, knobs
        self.urls: dict[str, str] = {}
        self.metrics: dict[str, list[str]] = {}  # system: the /metrics URLs of its engines
        self.router_metrics: dict[str, str] = {}  # policy: the router's own /metrics
        self.waits: dict[str, object] = {}  # what to wait for, by the system(s) it serves
        self.failed: dict[str, str] = {}
        if {"cohort", "cohort-load-only"} & set(wanted):
            cluster.start_front()
            cluster.env["COHORT_PREFIX_AFFINITY"] = "0"  # for the second front only
            self.urls["cohort-load-only"] = cluster.start_second_front()
            del cluster.env["COHORT_PREFIX_AFFINITY"]
            self.urls["cohort"] = cluster.url
            for i, cpu in enumerate(CPUS, 1):
                # the engine host alone: a bounded benchmark needs no supervisor's restarts
                cluster._spawn(f"worker{i}", f"{sys.executable} -m worker.host --worker-id worker{i}",
                               VLLM_CPU_OMP_THREADS_BIND=cpu,
                               COHORT_KV_CACHE_MEMORY_BYTES=str(knobs.kv_bytes))
            urls = [cluster.url, self.urls["cohort-load-only"]]
            self.waits["cohort"] = lambda: wait_fronts(cluster, urls, knobs.load_timeout_s)
        policies = [p for p in ROUTERS if p in wanted]
        if policies:
            serves, events, waits = [], {}, {}
            for i, cpu in enumerate(CPUS, 1):
                port, events_port = free_port(), free_port()
                url = f"http://127.0.0.1:{port}"
                serves.append(url)
                events[url] = events_port
                proc = cluster._spawn(f"serve{i}", serve_command(path, port, knobs, events_port),
                                      VLLM_CPU_OMP_THREADS_BIND=cpu)
                waits[f"serve{i}"] = self._wait(url, proc, f"serve{i}")
            for policy in policies:
                port, metrics_port = free_port(), free_port()
                self.urls[policy] = f"http://127.0.0.1:{port}"
                self.metrics[policy] = serves
                self.router_metrics[policy] = f"http://127.0.0.1:{metrics_port}/metrics"
                proc = cluster._spawn(policy, router_command(policy, port, serves, events, knobs,
                                                             metrics_port),
                                      VLLM_ROUTER_TOKENIZER=path)
                waits[policy] = self._wait(self.urls[policy], proc, policy)
            self.waits["routers"] = lambda: self._routers_ready(waits, policies)
        if "dp2" in wanted:
            port = free_port()
            self.urls["dp2"] = f"http://127.0.0.1:{port}"
            self.metrics["dp2"] = [self.urls["dp2"]]
            proc = cluster._spawn("dp2", serve_command(path, port, knobs, dp=2),
                                  VLLM_CPU_OMP_THREADS_BIND="|".join(CPUS))
            self.waits["dp2"] = self._wait(self.urls["dp2"], proc, "dp2")

    async def router_decisions(self) -> dict[str, list[str]]:
        """What each router says it based its choices on (prefix hit or miss, load, no tokens)."""
        found = {}
        async with httpx.AsyncClient(timeout=10) as http:
            for policy, url in self.router_metrics.items():
                with contextlib.suppress(httpx.HTTPError):
                    text = (await http.get(url)).text
                    found[policy] = [line for line in text.splitlines()
                                     if line.startswith("vllm_router_prefix_routing_decisions")]
        return found

    def _wait(self, url: str, proc, name: str):
        return lambda: peer.wait_models(url, proc, self.cluster.tmp / f"{name}.log",
                                        self.knobs.load_timeout_s)

    async def _one(self, name: str, wait) -> None:
        try:
            await wait()
        except (RuntimeError, AssertionError, trio.TooSlowError) as error:
            self.failed[name] = f"{type(error).__name__}: {str(error)[-1200:]}"

    async def _routers_ready(self, waits: dict, policies: list[str]) -> None:
        """Both `vllm serve` processes, then each router (a router waits for its serves)."""
        async with trio.open_nursery() as nursery:
            for serve in ("serve1", "serve2"):
                nursery.start_soon(self._one, serve, waits[serve])
        broken = [serve for serve in ("serve1", "serve2") if serve in self.failed]
        for policy in policies:
            if broken:
                self.failed[policy] = f"{' and '.join(broken)} did not load"
            else:
                await self._one(policy, waits[policy])

    async def wait(self, late_s: float = 120) -> None:
        """Wait for everything side by side, data-parallel at most `late_s` longer than the rest
        (it is the optional peer); what fails is recorded with its cause."""
        late = trio.CancelScope()

        async def optional(name: str, wait) -> None:
            with late:
                await self._one(name, wait)
            if late.cancelled_caught:
                self.failed[name] = f"not ready {late_s:g} s after the other systems"

        async with trio.open_nursery() as outer:
            async with trio.open_nursery() as nursery:
                for name, wait in self.waits.items():
                    if name == "dp2":
                        outer.start_soon(optional, name, wait)
                    else:
                        nursery.start_soon(self._one, name, wait)
            late.deadline = trio.current_time() + late_s
        if "cohort" in self.failed:  # both fronts share the workers
            self.failed["cohort-load-only"] = self.failed["cohort"]
        for name in self.failed:
            self.urls.pop(name, None)
            print(f"routers: {name} failed: {self.failed[name][-400:]}", file=sys.stderr)


def process_groups(cluster, system: str) -> list[int]:
    """The process groups serving `system`: its engines and what stands in front of them."""
    if system.startswith("cohort"):  # both fronts run: the idle one takes heartbeats too
        names = ["front", "front_b", "worker1", "worker2"]
    elif system in ROUTERS:
        names = ["serve1", "serve2", system]
    else:
        names = [system]
    return [cluster.procs[name].pid for name in names if name in cluster.procs]


async def measure(systems: Systems, system: str, workload: str, round_: int, tokenizer,
                  hits: CohortHits, folder) -> dict:
    """One bounded load of one system: the client's figures, each engine's line, and the CPU
    its engines and its serving processes spent."""
    knobs, cluster, url = systems.knobs, systems.cluster, systems.urls[system]
    groups = process_groups(cluster, system)
    cpu_before = cpu.cpu_seconds(groups)
    seed = knobs.seed + 1000 * round_ + 100 * WORKLOADS.index(workload) + SYSTEMS.index(system)
    name = f"{system}-{workload}-r{round_}"
    cohort = system.startswith("cohort")
    metrics = systems.metrics.get(system, [])
    before = await front_health(cluster, url) if cohort else [await engine_counters(u) for u in metrics]
    if workload == "prefix":
        raw = await peer.run_client(prefix_command(url, systems.path, knobs, seed, folder, name),
                                    folder / f"{name}.json", folder / f"{name}.log",
                                    knobs.run_timeout_s)
        figures = peer.figures(raw, knobs.prompts * knobs.output_len)
        figures["input_tokens"] = raw.get("total_input_tokens", 0)
    else:
        conversations = multiturn.sessions(tokenizer, seed, knobs.sessions, knobs.turns,
                                           knobs.first_len, knobs.turn_len)
        figures = await multiturn.run_sessions(url, SERVED, conversations,
                                               concurrency=knobs.concurrency,
                                               output_len=knobs.output_len,
                                               timeout_s=knobs.run_timeout_s)
    figures.update(cpu.over_load(cpu_before, cpu.cpu_seconds(groups), figures["output_tokens"]))
    if cohort:
        await trio.sleep(1.0)  # the workers' next heartbeats carry the load's last figures
        mean_prompt = figures["input_tokens"] / figures["completed"] if figures["completed"] else 0
        engines = hits.over_load(before, await front_health(cluster, url), mean_prompt)
    else:
        engines = {}
        for i, (url_, start) in enumerate(zip(metrics, before)):
            for engine, counts in per_engine(start, await engine_counters(url_)).items():
                engines[f"{i}-{engine}"] = counts
    figures.update(engine_line(engines))
    return figures


def summarize(runs: dict, rounds: int, order: list[str]) -> list[dict]:
    """One row per workload and system: medians over rounds, with their ranges."""
    rows = []
    for workload in WORKLOADS:
        for system in order:
            mine = [runs[(system, workload, r)] for r in range(rounds) if (system, workload, r) in runs]
            if not mine:
                continue
            row: dict = {"workload": workload, "system": system, "rounds": len(mine)}
            for key in ("ttft_p50_ms", "ttft_p99_ms", "tokens_per_s", "hit_A", "hit_B",
                        "share_A", "share_B", "engine_cpu_s_per_1k_tokens",
                        "serving_cpu_s_per_1k_tokens"):
                digits = 3 if key.startswith(("hit", "share")) else 2 if "cpu" in key else 1
                row[key], row[f"{key}_range"] = peer.spread([f.get(key) for f in mine], digits)
            row["tokens"] = (f"{sum(f['output_tokens'] for f in mine)}/"
                             f"{sum(f['expected_tokens'] for f in mine)}")
            row["failed"] = sum(f["failed"] for f in mine)
            rows.append(row)
    return rows


def against_best_router(runs: dict, rows: list[dict], rounds: int) -> list[dict]:
    """Cohort against the router policy with the lowest median TTFT p50, round by round:
    TTFT as the router's over Cohort's (above 1: Cohort better), tokens/s as Cohort's over it."""
    checks = []
    for workload in WORKLOADS:
        policies = [r for r in rows if r["workload"] == workload and r["system"] in ROUTERS
                    and r["ttft_p50_ms"] is not None]
        if not policies:
            continue
        best = min(policies, key=lambda r: r["ttft_p50_ms"])["system"]
        for system in ("cohort", "cohort-load-only"):
            pairs = [(runs[(best, workload, r)], runs[(system, workload, r)]) for r in range(rounds)
                     if (best, workload, r) in runs and (system, workload, r) in runs]
            if not pairs:
                continue
            line: dict = {"workload": workload, "system": system, "best_router": best}
            for key, label, flip in (("ttft_p50_ms", "ttft_p50_better", True),
                                     ("ttft_p99_ms", "ttft_p99_better", True),
                                     ("tokens_per_s", "tokens_per_s_ratio", False)):
                ratios = [(b[key] / c[key]) if flip else (c[key] / b[key]) for b, c in pairs
                          if b.get(key) and c.get(key)]
                line[label], line[f"{label}_range"] = peer.spread(ratios, 2)
            if system == "cohort" and line["ttft_p50_better"] is not None:
                line["target"] = ">= 1.3x TTFT p50 at tokens/s ratio >= 1.0"
                line["met"] = line["ttft_p50_better"] >= 1.3 and line["tokens_per_s_ratio"] >= 1.0
            checks.append(line)
    return checks


def unavailable(path: str) -> str:
    """Why the scenario cannot run on this machine; "" when it can."""
    from worker.models import is_prepared

    if importlib.util.find_spec("vllm") is None:
        return "vLLM is not installed"
    return "" if is_prepared(path) else f"{path} not prepared"


async def run_routers(bench) -> dict:
    """The scenario: every system loaded once, rounds of interleaved loads, one results section."""
    from worker.models import default_model_path

    path = os.environ.get("COHORT_MODEL") or default_model_path()
    if unavailable(path):
        return {"skipped": unavailable(path)}
    knobs = Knobs(bench.args)
    wanted = list(knobs.systems)
    missing = {} if shutil.which("vllm-router") else {
        p: "vllm-router is not installed" for p in ROUTERS if p in wanted}
    wanted = [s for s in wanted if s not in missing]
    engine = {"COHORT_ENGINE": "vllm", "COHORT_MODEL": path, "COHORT_SERVED_MODEL_NAME": SERVED,
              "COHORT_WORKER_TIMEOUT_S": "30", "COHORT_GPU_MEMORY_UTILIZATION": f"{knobs.memory:g}",
              "COHORT_MAX_MODEL_LEN": str(knobs.max_model_len)}
    cluster = bench.cluster(**engine, **OFFLINE)
    folder = cluster.tmp / "routers"
    folder.mkdir()
    runs: dict[tuple[str, str, int], dict] = {}
    problems: list[str] = []
    began = time.monotonic()
    try:
        systems = Systems(cluster, path, knobs, wanted)
        await systems.wait()
        loaded_s = round(time.monotonic() - began, 1)
        from transformers import AutoTokenizer
        tokenizer = await trio.to_thread.run_sync(AutoTokenizer.from_pretrained, path)
        warm = {}
        for system, url in systems.urls.items():
            try:
                warm[system] = await peer.warm_up(url, output_len=8, parallel=knobs.concurrency)
            except trio.TooSlowError:
                warm[system] = ["no answer within 300 s"]
        engines = {name: peer.engine_facts(cluster.log(name))
                   for name in ("worker1", "worker2", "serve1", "serve2", "dp2")
                   if name in cluster.procs}
        order = [s for s in SYSTEMS if s in systems.urls]
        hits = CohortHits()
        round_wall_s = []
        for round_ in range(knobs.rounds):
            started = time.monotonic()
            turn = round_ % max(1, len(order))
            for workload in WORKLOADS:
                for system in order[turn:] + order[:turn]:
                    name = f"{system}-{workload}-r{round_}"
                    try:
                        f = runs[(system, workload, round_)] = await measure(
                            systems, system, workload, round_, tokenizer, hits, folder)
                    except (RuntimeError, trio.TooSlowError, OSError, httpx.HTTPError,
                            KeyError, ValueError) as error:
                        problems.append(f"{name}: {type(error).__name__}: {str(error)[-600:]}")
                        print(f"routers: {name} failed: {str(error)[-300:]}", file=sys.stderr)
                        continue
                    with open(folder / "runs.jsonl", "a") as out:  # kept if the run is cut short
                        out.write(json.dumps({"system": system, "workload": workload,
                                              "round": round_, **f}) + "\n")
                    print(f"routers: {name}: TTFT p50 {f['ttft_p50_ms']} p99 {f['ttft_p99_ms']} ms, "
                          f"{f['tokens_per_s']} tokens/s, hits {f.get('hit_A')}/{f.get('hit_B')}, "
                          f"shares {f.get('share_A')}/{f.get('share_B')}, CPU s per 1k tokens "
                          f"engines {f['engine_cpu_s_per_1k_tokens']} serving "
                          f"{f['serving_cpu_s_per_1k_tokens']}, {f['failed']} failed",
                          file=sys.stderr)
            round_wall_s.append(round(time.monotonic() - started, 1))
        rows = summarize(runs, knobs.rounds, order)
        decisions = await systems.router_decisions()
        return {
            "rows": rows, "against_best_router": against_best_router(runs, rows, knobs.rounds),
            "failed_systems": {**missing, **systems.failed}, "run_errors": problems,
            "router_decisions": decisions,
            "warm_up_problems": {s: p for s, p in warm.items() if p},
            "load_s": loaded_s, "round_wall_s": round_wall_s, "rounds": knobs.rounds,
            "kv_cache": f"{knobs.kv_blocks} blocks of {knobs.block_size} tokens = "
                        f"{knobs.kv_bytes} bytes per engine", "engines": engines,
            "sizes": {k: getattr(knobs, k) for k in ("prefixes", "prefix_len", "suffix_len",
                                                     "output_len", "concurrency", "prompts",
                                                     "sessions", "turns", "first_len",
                                                     "turn_len", "max_model_len")},
            "commands": {name: " ".join(proc.args[-1:]) for name, proc in cluster.procs.items()},
            "per_run": {f"{s} {w} r={r}": f for (s, w, r), f in sorted(runs.items())},
            "folder": str(cluster.tmp)}
    finally:
        cluster.stop()
