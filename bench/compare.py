"""`python bench/compare.py`: Cohort against its baselines, each measured in the same run.

Scenarios: 1 sequential vs batched (mock, GPU-like costs), 2 gateway overhead (zero-cost mock
through the whole path vs a bare Quart-trio route), 3 streaming, 4 scaling over workers,
5 real engine (Cohort + a vLLM worker vs `vllm serve`, measured with vLLM's own benchmark client;
when vLLM is installed), 6 front scale-out (1 vs 2 front processes), 7 store task writes,
8 the gateway's cost on a lone request, 9 short requests among long ones, 10 prefix affinity
(8-10: `bench/scheduling.py`), 13 placement against vLLM's own router (`bench/routers.py`;
when vLLM is installed). Every load is bounded in count and time, on loopback.
"""

from __future__ import annotations

import argparse
import json
from functools import partial
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import trio  # noqa: E402

from bench import peer, routers, scheduling  # noqa: E402
from harness.load import Result, run_load  # noqa: E402
from harness.cluster import Cluster, free_port, procfile  # noqa: E402

ZERO_COST = {"MOCK_TTFT_S": "0", "MOCK_PREFILL_TOKEN_S": "0", "MOCK_TOKEN_S": "0",
             "MOCK_BATCH_GROWTH": "0"}
# the mock's defaults: 50 us per prompt token of prefill, 10 ms per decode step, +2% per sequence
GPU_LIKE = {"MOCK_TTFT_S": "0", "MOCK_PREFILL_TOKEN_S": "0.00005", "MOCK_TOKEN_S": "0.01",
            "MOCK_BATCH_GROWTH": "0.02"}
OPEN = {"COHORT_AUTH_DISABLED": "1", "COHORT_LOG_LEVEL": "WARNING"}


def progress(total: int, label: str):
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=label, leave=False, file=sys.stderr, disable=not sys.stderr.isatty())


class Bench:
    """Runs the scenarios and keeps their figures."""

    def __init__(self, args) -> None:
        self.args = args
        self.tmp = Path(tempfile.mkdtemp(prefix="cohort-bench-"))
        self.results: dict[str, dict] = {}
        self.raw: dict[str, Result] = {}
        self._count = 0
        self._postgres = None

    def cluster(self, **env) -> Cluster:
        self._count += 1
        folder = self.tmp / f"run{self._count}"
        folder.mkdir()
        return Cluster(folder, **{**OPEN, "COHORT_MAX_BATCH_SIZE": str(self.args.batch_size),
                                  "COHORT_BATCH_WAIT_S": str(self.args.batch_wait), **env})

    async def mock_cluster(self, workers: int = 1, front_workers: int = 1, **env) -> Cluster:
        cluster = self.cluster(**env)
        if front_workers > 1:
            ports = [free_port() for _ in range(front_workers)]
            cluster.env["COHORT_ZMQ_PORT_SPAN"] = str(front_workers)
            cluster.env["COHORT_ZMQ_BIND"] = f"tcp://127.0.0.1:{ports[0]}"
            cluster.env["COHORT_CONNECT"] = ",".join(
                f"tcp://127.0.0.1:{ports[0] + i}" for i in range(front_workers))
            cluster._spawn("front", procfile()["front"] + f" --workers {front_workers}")
        else:
            cluster.start_front()
        for i in range(workers):
            cluster.start_worker(f"worker{i + 1}")
        await cluster.wait_ready(workers)
        return cluster

    async def load(self, name: str, url: str, *, total: int, concurrency: int, stream=False,
                   headers=None, body=None) -> Result:
        body = body or {"model": "cohort-mock", "max_tokens": self.args.output_tokens}
        prompt = "word " * self.args.prompt_words

        def body_for(i: int) -> dict:
            return dict(body, prompt=f"{i} {prompt}")

        bar = progress(total, name)
        result = await run_load(url, body_for, total=total, concurrency=concurrency,
                                stream=stream, headers=headers, progress=bar)
        if bar is not None:
            bar.close()
        if result.requests and result.errors == result.requests:
            # a ratio of failures looks like a throughput: once every request was a 404 (the
            # mock served under COHORT_MODEL's name) and the table still read 0.86
            raise RuntimeError(f"{name}: all {result.requests} requests failed; no figure")
        self.raw[name] = result
        return result

    def pool(self, name: str, results: list[Result]) -> Result:
        """Several loads as one, run back to back: their requests, time and latencies summed."""
        pooled = Result()
        for result in results:  # end to end on one timeline, so steady_rps still means something
            pooled.finished_at_s += [pooled.elapsed_s + t for t in result.finished_at_s]
            pooled.requests += result.requests
            pooled.errors += result.errors
            pooled.elapsed_s += result.elapsed_s
            pooled.latencies_s += result.latencies_s
            pooled.tokens += result.tokens
        self.raw[name] = pooled
        return pooled

    # --- scenarios ---------------------------------------------------------------------------

    async def sequential_vs_batched(self) -> None:
        cluster = await self.mock_cluster(**GPU_LIKE)
        try:
            url = cluster.url + "/v1/completions"
            rows = []
            for n in self.args.n:
                one = await self.load(f"sequential n={n}", url, total=n, concurrency=1)
                many = await self.load(f"batched n={n}", url, total=n, concurrency=n)
                rows.append({"n": n, "sequential_s": round(one.elapsed_s, 3),
                             "batched_s": round(many.elapsed_s, 3),
                             "ratio": round(one.elapsed_s / many.elapsed_s, 2),
                             "errors": one.errors + many.errors})
            stats = httpx.get(cluster.url + "/stats").json()
        finally:
            cluster.stop()
        self.results["1 sequential vs batched"] = {"rows": rows, "old system at n=8": "4.0 s vs 1.8 s (2.2x)",
                                                   "batch_sizes": stats.get("batches", {})}

    async def gateway_overhead(self) -> None:
        rows = []
        base = self.cluster()
        port = free_port()
        base._spawn("baseline", f"hypercorn --worker-class trio --bind 127.0.0.1:{port} "
                                '"bench.baseline_app:create_app()"')
        bare_url = f"http://127.0.0.1:{port}/v1/completions"
        await wait_http(f"http://127.0.0.1:{port}/ready")
        # The batch window is latency the operator chooses, not overhead: measure the path with the
        # configured window and with none, and with an API key checked on every request.
        window = self.args.batch_wait
        targets = {f"window {wait:g}": await self.mock_cluster(**ZERO_COST, COHORT_BATCH_WAIT_S=str(wait))
                   for wait in dict.fromkeys((window, 0.0))}
        # CURVE on the worker wire is the default; the same path without it prices it
        targets["no CURVE"] = await self.mock_cluster(
            **ZERO_COST, COHORT_BATCH_WAIT_S=str(window), COHORT_ZMQ_INSECURE="1")
        secured = targets["auth"] = await self.mock_cluster(**ZERO_COST, COHORT_AUTH_DISABLED="0")
        key_header = {"Authorization": f"Bearer {secured.add_user('bench')}"}
        # the same user with limits that never bite: what checking them costs on every request
        secured.users("add", "limited", "--password-stdin", stdin="correct-horse\n")
        limited_header = {"Authorization": f"Bearer {secured.users('key', 'limited')}"}
        secured.users("limit", "limited", "--rpm", "1000000000", "--tpm", "1000000000000",
                      "--concurrency", "100000", "--tokens-per-day", "1000000000000")
        targets["auth + limits"] = secured
        # and an API key with neither limits nor the usage ledger: what the two cost together
        bare_auth = targets["auth, no ledger"] = await self.mock_cluster(
            **ZERO_COST, COHORT_AUTH_DISABLED="0", COHORT_USAGE_LEDGER="0")
        unledgered_header = {"Authorization": f"Bearer {bare_auth.add_user('bench')}"}
        try:
            for concurrency, total in ((1, self.args.requests // 4), (64, self.args.requests)):
                # Rounds alternate bare and Cohort so a slow moment of the machine hits both, in
                # an order that turns; a ratio is the median of its rounds' ratios, the
                # latencies are pooled.
                # one at a time, an API key with and without the ledger: what waiting for a
                # row's group commit costs a lone request
                names = ["bare", *(t for t in targets if not t.startswith("auth + limits")
                                   or concurrency == 64)]
                runs: dict[str, list[Result]] = {name: [] for name in names}
                for round_ in range(self.args.rounds):
                    turn = round_ % len(names)  # each round starts elsewhere: no path always last
                    for name in names[turn:] + names[:turn]:
                        url = bare_url if name == "bare" else targets[name].url + "/v1/completions"
                        runs[name].append(await self.load(
                            f"{name} c={concurrency} #{round_}", url, total=total,
                            concurrency=concurrency,
                            headers={"auth": key_header, "auth + limits": limited_header,
                                     "auth, no ledger": unledgered_header}.get(name)))
                bare = self.pool(f"bare c={concurrency}", runs["bare"])
                for name in names[1:]:
                    ours = self.pool(f"cohort c={concurrency} {name}", runs[name])
                    ratios = sorted(o.steady_rps / b.steady_rps
                                    for o, b in zip(runs[name], runs["bare"]))
                    rows.append({"concurrency": concurrency,
                                 "path": f"window {window:g} + {name}" if name.startswith("auth") else name,
                                 "bare_rps": round(statistics.median(r.steady_rps for r in runs["bare"]), 1),
                                 "cohort_rps": round(statistics.median(r.steady_rps for r in runs[name]), 1),
                                 "ratio": round(statistics.median(ratios), 3),
                                 "ratio_range": f"{ratios[0]:.3f}-{ratios[-1]:.3f}",
                                 "bare_p50_ms": bare.summary()["p50_ms"],
                                 "bare_p99_ms": bare.summary()["p99_ms"],
                                 "cohort_p50_ms": ours.summary()["p50_ms"],
                                 "cohort_p99_ms": ours.summary()["p99_ms"], "errors": ours.errors})
                if concurrency == 64:
                    costs = sorted(limited.steady_rps / plain.steady_rps for limited, plain in
                                   zip(runs["auth + limits"], runs["auth"]))
                    rows.append({"concurrency": concurrency, "path": "limits vs none (throughput)",
                                 "ratio": round(statistics.median(costs), 3),
                                 "ratio_range": f"{costs[0]:.3f}-{costs[-1]:.3f}"})
                    both = sorted(limited.steady_rps / plain.steady_rps for limited, plain in
                                  zip(runs["auth + limits"], runs["auth, no ledger"]))
                    rows.append({"concurrency": concurrency,
                                 "path": "limits + ledger vs neither (throughput)",
                                 "ratio": round(statistics.median(both), 3),
                                 "ratio_range": f"{both[0]:.3f}-{both[-1]:.3f}"})
                ledger = sorted(led.steady_rps / plain.steady_rps for led, plain in
                                zip(runs["auth"], runs["auth, no ledger"]))
                rows.append({"concurrency": concurrency, "path": "ledger vs none (throughput)",
                             "ratio": round(statistics.median(ledger), 3),
                             "ratio_range": f"{ledger[0]:.3f}-{ledger[-1]:.3f}"})
                curve = sorted(c.steady_rps / p.steady_rps for c, p in
                               zip(runs[f"window {window:g}"], runs["no CURVE"]))
                rows.append({"concurrency": concurrency, "path": "CURVE vs none (throughput)",
                             "ratio": round(statistics.median(curve), 3),
                             "ratio_range": f"{curve[0]:.3f}-{curve[-1]:.3f}"})
        finally:
            for target in {id(t): t for t in targets.values()}.values():
                target.stop()
            base.stop()
        self.results["2 gateway overhead"] = {"rows": rows, "rounds": self.args.rounds}

    async def streaming(self) -> None:
        cluster = await self.mock_cluster(MOCK_TTFT_S="0", MOCK_TOKEN_S="0.005",
                                          MOCK_BATCH_GROWTH="0", MOCK_REPLY_LENGTH="max_tokens")
        try:
            body = {"model": "cohort-mock", "max_tokens": 200}
            result = await self.load("streaming c=32", cluster.url + "/v1/completions",
                                     total=64, concurrency=32, stream=True, body=body)
        finally:
            cluster.stop()
        summary = result.summary()
        self.results["3 streaming"] = {
            "rows": [{"streams": 64, "concurrency": 32, "tokens_per_s": summary["tokens_per_s"],
                      "ideal_tokens_per_s": round(32 / 0.005, 1),
                      "ttft_p50_ms": summary["ttft_p50_ms"], "itl_mean_ms": summary["itl_mean_ms"],
                      "engine_step_ms": 5.0, "errors": result.errors}]}

    async def scaling(self) -> None:
        # The engines must be the bottleneck, not the front or the load client: each runs at most
        # 8 sequences of 32 tokens at the GPU-like step cost, about 22 requests/s per worker.
        rows, base = [], None
        for workers in (1, 2, 4):
            cluster = await self.mock_cluster(workers=workers, **GPU_LIKE, COHORT_MAX_NUM_SEQS="8",
                                              MOCK_REPLY_LENGTH="max_tokens")
            try:
                result = await self.load(f"{workers} worker(s)", cluster.url + "/v1/completions",
                                         total=256, concurrency=64,
                                         body={"model": "cohort-mock", "max_tokens": 32})
            finally:
                cluster.stop()
            base = base or result.steady_rps
            rows.append({"workers": workers, "rps": round(result.steady_rps, 1),
                         "speedup": round(result.steady_rps / base, 2), "ideal": workers,
                         "errors": result.errors})
        self.results["4 scaling"] = {"rows": rows, "engine": "GPU-like mock, max_num_seqs 8, "
                                                             "32-token replies"}

    async def front_scale_out(self) -> None:
        """Chat requests/s and async tasks/s with one and two front processes, on SQLite and on
        PostgreSQL (the store for fronts on several machines)."""
        rows = []
        for store in ("sqlite", "postgres"):
            base = None
            for fronts in (1, 2):
                env = {"DATABASE_URL": self.postgres_url()} if store == "postgres" else {}
                cluster = await self.mock_cluster(workers=2, front_workers=fronts, **ZERO_COST,
                                                  **env)
                try:
                    result = await self.load(f"{fronts} front(s), {store}",
                                             cluster.url + "/v1/completions",
                                             total=self.args.requests, concurrency=64)
                    tasks_per_s = await self.task_throughput(cluster, self.args.requests // 2)
                finally:
                    cluster.stop()
                base = base or result.steady_rps
                rows.append({"store": store, "fronts": fronts, "chat_rps": round(result.steady_rps, 1),
                             "speedup": round(result.steady_rps / base, 2),
                             "tasks_per_s": round(tasks_per_s, 1), "errors": result.errors})
        self.results["6 front scale-out"] = {"rows": rows}

    async def task_throughput(self, cluster: Cluster, count: int) -> float:
        """Async tasks submitted at once (64 clients) until the store says all completed."""
        body = {"model": "cohort-mock", "prompt": "later", "max_tokens": self.args.output_tokens}
        began = trio.current_time()
        async with httpx.AsyncClient(timeout=60) as http:
            limit = trio.Semaphore(64)

            async def submit(_: int) -> None:
                async with limit:
                    (await http.post(cluster.url + "/inference/async", json=body)).raise_for_status()

            async with trio.open_nursery() as nursery:
                for i in range(count):
                    nursery.start_soon(submit, i)
            with trio.fail_after(300):
                while (await http.get(cluster.url + "/tasks", params={
                        "status": "completed", "limit": 1})).json()["total"] < count:
                    await trio.sleep(0.05)
        return count / (trio.current_time() - began)

    def postgres_url(self) -> str:
        """A new database on the bench's own PostgreSQL server (pgserver: started here)."""
        import pgserver
        if self._postgres is None:
            self._postgres = pgserver.get_server(self.tmp / "postgres", cleanup_mode="stop")
        self._count += 1
        name = f"bench{self._count}"
        self._postgres.psql(f"CREATE DATABASE {name};")
        return self._postgres.get_uri(name)

    async def store_writes(self) -> None:
        """Task writes per second on SQLite and on PostgreSQL: each task's life is three writes
        (queued with its lease, running, finished), each in a store thread as the front runs them."""
        from server.store import Store, utcnow
        rows = []
        for database, url in (("SQLite, WAL, synchronous=NORMAL", f"sqlite:///{self.tmp / 'store.db'}"),
                              ("PostgreSQL 16 (pgserver), pooled", self.postgres_url())):
            store = Store(url)
            store.create_schema()
            user = await store.run(store.add_user, "bench", "x")
            count, lease = self.args.tasks, utcnow()

            async def life(i: int) -> None:
                await store.run(store.add_tasks, [(f"t{i}", user.id, "completion", {"prompt": "x"})],
                                "bench-front", lease)
                await store.run(store.task_started, f"t{i}", "bench-front")
                await store.run(store.task_finished, f"t{i}", "completed", {"text": "y"}, None,
                                "bench-front")

            began = trio.current_time()
            async with trio.open_nursery() as nursery:
                limit = trio.Semaphore(64)

                async def bounded(i: int) -> None:
                    async with limit:
                        await life(i)

                for i in range(count):
                    nursery.start_soon(bounded, i)
            took = trio.current_time() - began
            rows.append({"database": database, "tasks": count, "writes": 3 * count,
                         "writes_per_s": round(3 * count / took, 1),
                         "task_lives_per_s": round(count / took, 1)})
        self.results["7 store"] = {"rows": rows}

    async def fair_shares(self) -> None:
        """Two tenants on a saturated model (the issue's shape): A keeps about 600 requests
        queued, B sends 8 at a time; B's latency behind A against B alone, with fair shares and
        with one line (COHORT_FAIR_SHARES=0)."""
        body = {"model": "cohort-mock", "max_tokens": 16}
        rows = []
        for fair in ("1", "0"):
            cluster = await self.mock_cluster(workers=2, **GPU_LIKE, COHORT_MAX_NUM_SEQS="8",
                                              MOCK_REPLY_LENGTH="max_tokens",
                                              COHORT_AUTH_DISABLED="0", COHORT_FAIR_SHARES=fair)
            tenant_a = {"Authorization": f"Bearer {cluster.add_user('tenant-a')}"}
            tenant_b = {"Authorization": f"Bearer {cluster.add_user('tenant-b')}"}
            url = cluster.url + "/v1/completions"
            # enough of B's requests for a p99 that is not just the slowest one; behind one
            # line each takes about 8 s, so there 40 make the point
            b_total = 200 if fair == "1" else 40
            try:
                alone = await self.load(f"B alone, fair={fair}", url, total=b_total, concurrency=8,
                                        headers=tenant_b, body=body)
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(partial(self.load, f"A, fair={fair}", url, total=4000,
                                               concurrency=640, headers=tenant_a, body=body))
                    await trio.sleep(2.0)  # A's 640 are in: queued in the front or the engines
                    behind = await self.load(f"B behind A, fair={fair}", url, total=b_total,
                                             concurrency=8, headers=tenant_b, body=body)
                    nursery.cancel_scope.cancel()  # A has made its point
            finally:
                cluster.stop()
            b_alone, b_behind = alone.summary(), behind.summary()
            rows.append({"queue": "fair shares" if fair == "1" else "one line (FIFO)",
                         "B_requests": b_total, "B_alone_p50_ms": b_alone["p50_ms"], "B_alone_p99_ms": b_alone["p99_ms"],
                         "B_behind_A_p50_ms": b_behind["p50_ms"],
                         "B_behind_A_p99_ms": b_behind["p99_ms"],
                         "p50_ratio": round(b_behind["p50_ms"] / b_alone["p50_ms"], 2),
                         "p99_ratio": round(b_behind["p99_ms"] / b_alone["p99_ms"], 2),
                         "errors": alone.errors + behind.errors})
        self.results["11 fair shares"] = {
            "rows": rows, "engine": "GPU-like mock, two workers, max_num_seqs 8 each, 16-token "
                                    "replies; A: 640 at a time, B: 8 at a time (200 requests "
                                    "with fair shares, 40 behind one line, where each takes 8 s)"}


    async def batch_api(self) -> None:
        """A Batch API batch of `--batch-lines` lines on the GPU-like mock (two workers) while an
        interactive user streams 4 at a time: the interactive TTFT with and without the batch,
        and the batch's lines/s alone and beside the interactive user."""
        lines = self.args.batch_lines
        cluster = await self.mock_cluster(workers=2, **GPU_LIKE, COHORT_MAX_NUM_SEQS="8",
                                          MOCK_REPLY_LENGTH="max_tokens", COHORT_AUTH_DISABLED="0")
        person = {"Authorization": f"Bearer {cluster.add_user('person')}"}
        offline = {"Authorization": f"Bearer {cluster.add_user('offline')}"}
        url = cluster.url + "/v1/completions"
        body = {"model": "cohort-mock", "max_tokens": 16}
        content = "".join(json.dumps({
            "custom_id": f"line-{i}", "method": "POST", "url": "/v1/completions",
            "body": {"model": "cohort-mock", "prompt": f"offline {i}", "max_tokens": 16}}) + "\n"
            for i in range(lines)).encode()

        async def run_batch(http: httpx.AsyncClient) -> float:
            """Upload, create, wait: the batch's lines per second from create to completed."""
            file = (await http.post("/v1/files", data={"purpose": "batch"}, headers=offline,
                                    files={"file": ("in.jsonl", content)})).json()
            start = trio.current_time()
            batch = (await http.post("/v1/batches", headers=offline, json={
                "input_file_id": file["id"], "endpoint": "/v1/completions",
                "completion_window": "24h"})).json()
            with trio.fail_after(600):
                while (batch := (await http.get(f"/v1/batches/{batch['id']}",
                                                headers=offline)).json())["status"] != "completed":
                    if batch["status"] in ("failed", "cancelled", "expired"):
                        raise RuntimeError(f"the bench batch ended {batch['status']}: "
                                           f"{batch.get('errors')}")
                    await trio.sleep(0.05)
            assert batch["request_counts"]["completed"] == lines
            return lines / (trio.current_time() - start)

        try:
            async with httpx.AsyncClient(base_url=cluster.url, timeout=600) as http:
                alone = await self.load("interactive alone", url, total=200, concurrency=4,
                                        stream=True, headers=person, body=body)
                batch_alone = await run_batch(http)
                beside: dict[str, float] = {}
                async with trio.open_nursery() as nursery:
                    async def batch_then_stop() -> None:
                        beside["lines_per_s"] = await run_batch(http)
                    nursery.start_soon(batch_then_stop)
                    await trio.sleep(1.0)  # the batch is validated and running
                    with_batch = await self.load("interactive beside the batch", url,
                                                 total=200, concurrency=4, stream=True,
                                                 headers=person, body=body)
        finally:
            cluster.stop()
        a, b = alone.summary(), with_batch.summary()
        self.results["12 Batch API"] = {"rows": [
            {"interactive": "alone", "ttft_p50_ms": a["ttft_p50_ms"], "ttft_p99_ms": a["ttft_p99_ms"],
             "p50_ms": a["p50_ms"], "errors": alone.errors},
            {"interactive": f"beside a {lines}-line batch", "ttft_p50_ms": b["ttft_p50_ms"],
             "ttft_p99_ms": b["ttft_p99_ms"], "p50_ms": b["p50_ms"], "errors": with_batch.errors},
            {"interactive": "ratio (beside / alone)",
             "ttft_p50_ms": round(b["ttft_p50_ms"] / a["ttft_p50_ms"], 2),
             "ttft_p99_ms": round(b["ttft_p99_ms"] / a["ttft_p99_ms"], 2),
             "p50_ms": round(b["p50_ms"] / a["p50_ms"], 2)},
        ], "batch_lines_per_s_alone": round(batch_alone, 1),
            "batch_lines_per_s_beside_interactive": round(beside["lines_per_s"], 1),
            "engine": "GPU-like mock, two workers, max_num_seqs 8 each, 16-token answers; the "
                      "interactive user streams 4 at a time (half the slots)"}
    async def real_engine(self) -> None:
        from worker.models import default_model_path, is_prepared
        path = os.environ.get("COHORT_MODEL") or default_model_path()
        try:
            import vllm  # noqa: F401
        except ImportError:
            self.results["5 real engine"] = {"skipped": "vLLM is not installed"}
            return
        if not is_prepared(path):
            self.results["5 real engine"] = {"skipped": f"{path} not prepared"}
            return
        self.results["5 real engine"] = await peer.run_peer(self)

    async def gateway_cost(self) -> None:
        self.results["8 gateway cost"] = await scheduling.gateway_cost(self)

    async def mixed_lengths(self) -> None:
        self.results["9 mixed lengths"] = await scheduling.mixed_lengths(self)

    async def prefix_affinity(self) -> None:
        self.results["10 prefix affinity"] = await scheduling.prefix_affinity(self)

    async def router_placement(self) -> None:
        self.results["13 placement against vLLM's router"] = await routers.run_routers(self)


async def wait_http(url: str, timeout_s: float = 60) -> None:
    with trio.fail_after(timeout_s):
        while True:
            try:
                async with httpx.AsyncClient() as http:
                    if (await http.get(url)).status_code == 200:
                        return
            except httpx.TransportError:
                pass
            await trio.sleep(0.1)


def print_table(results: dict[str, dict]) -> None:
    for name, section in results.items():
        print(f"\n## {name}")
        if "skipped" in section:
            print(f"skipped: {section['skipped']}")
            continue
        rows = section.get("rows", [])
        columns = list(dict.fromkeys(key for row in rows for key in row))
        print(" | ".join(columns))
        print(" | ".join("---" for _ in columns))
        for row in rows:
            print(" | ".join(str(row.get(column, "")) for column in columns))
        for key, value in section.items():
            if key != "rows":
                print(f"{key}: {value}")


def plot(bench: Bench, folder: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots()
    for name in ("bare c=64", f"cohort c=64 window {bench.args.batch_wait:g}"):
        if name in bench.raw:
            ax.hist([1000 * x for x in bench.raw[name].latencies_s], bins=50, alpha=0.6, label=name)
    ax.set(xlabel="latency (ms)", ylabel="requests", title="Latency distribution, concurrency 64")
    ax.legend()
    fig.savefig(folder / "latency.png")
    fig, ax = plt.subplots()
    # the figures scenario 2 printed (medians over its rounds), one line per path
    lines: dict[str, dict[int, float]] = {}
    for row in bench.results.get("2 gateway overhead", {}).get("rows", []):
        lines.setdefault("bare", {})[row["concurrency"]] = row["bare_rps"]
        lines.setdefault(f"cohort {row['path']}", {})[row["concurrency"]] = row["cohort_rps"]
    for label, points in lines.items():
        ax.plot(*zip(*sorted(points.items())), marker="o", label=label)
    ax.set(xlabel="concurrency", ylabel="requests/s", title="Throughput vs concurrency")
    ax.legend()
    fig.savefig(folder / "throughput.png")
    sizes = bench.results.get("1 sequential vs batched", {}).get("batch_sizes", {})
    distribution = sizes.get("size_distribution", {})
    if distribution:
        fig, ax = plt.subplots()
        ax.bar([int(k) for k in distribution], list(distribution.values()))
        ax.set(xlabel="batch size", ylabel="batches", title="Batch sizes (scenario 1)")
        fig.savefig(folder / "batch_sizes.png")
    print(f"\ncharts written to {folder}")


SCENARIOS = {1: "sequential_vs_batched", 2: "gateway_overhead", 3: "streaming", 4: "scaling",
             5: "real_engine", 6: "front_scale_out", 7: "store_writes", 8: "gateway_cost",
             9: "mixed_lengths", 10: "prefix_affinity", 11: "fair_shares", 12: "batch_api",
             13: "router_placement"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", type=int, nargs="*", choices=sorted(SCENARIOS),
                        help="run only these scenarios (default: all)")
    parser.add_argument("--n", type=int, nargs="*", default=[8, 64, 256],
                        help="request counts for scenario 1")
    parser.add_argument("--requests", type=int, default=2000, help="requests per load (2, 6)")
    parser.add_argument("--rounds", type=int, default=5,
                        help="alternating bare/Cohort rounds in scenario 2 (the median ratio counts)")
    parser.add_argument("--prompt-words", type=int, default=8)
    parser.add_argument("--output-tokens", type=int, default=16)
    parser.add_argument("--peer-rounds", type=int, default=3, help="rounds of scenario 5")
    parser.add_argument("--peer-concurrency", type=int, nargs="+", default=[1, 8, 32],
                        help="concurrencies of scenario 5")
    parser.add_argument("--tasks", type=int, default=2000, help="task lives in scenario 7")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--batch-lines", type=int, default=2000, help="lines of scenario 12's batch")
    parser.add_argument("--batch-wait", type=float, default=0.1)
    parser.add_argument("--json", type=Path, help="write the raw results here")
    parser.add_argument("--plot", type=Path, nargs="?", const=Path("bench/results"),
                        help="write PNG charts into this folder (default bench/results)")
    scheduling.add_arguments(parser)
    routers.add_arguments(parser)
    args = parser.parse_args()
    bench = Bench(args)
    print(f"# Cohort benchmarks on {platform.node()}: {os.cpu_count()} cores, "
          f"{platform.processor() or platform.machine()}, Python {platform.python_version()}")

    async def run_all():
        for number in args.only or sorted(SCENARIOS):
            await getattr(bench, SCENARIOS[number])()

    try:
        trio.run(run_all)
    finally:
        if bench._postgres is not None:
            bench._postgres.cleanup()
    print_table(bench.results)
    if args.json:
        args.json.write_text(json.dumps({"results": bench.results,
                                         "raw": {k: v.summary() for k, v in bench.raw.items()}}, indent=2))
    if args.plot:
        plot(bench, args.plot)
        if "rows" in bench.results.get("5 real engine", {}):
            peer.plot_peer(bench.results["5 real engine"], args.plot)


if __name__ == "__main__":
    main()
