"""Cohort fronting one vLLM worker against `vllm serve` itself, measured with vLLM's own client.

Both servers run the same model with the same engine arguments (float32, eager, 2048 tokens, the
same memory share, vLLM's default batch limits) and stay loaded for the whole scenario, so the
loads interleave: each round runs, for each concurrency, vLLM's server and Cohort back to back
(which goes first alternates over rounds), each load a fresh `vllm bench serve` process
(`bench/vllm_bench.py`, vLLM's command line unchanged) on the random dataset with the same seed
for both, so both get the same prompts; every (round, concurrency) has its own seed, so no load
hits a prefix another left in the cache. A ratio is Cohort's figure over vLLM's from the same
round; the table gives the median over rounds and the range. The absolute figures beside them are
medians over rounds, for orientation only on a noisy machine.

`run_peer(bench)` returns a results section like the other scenarios of `bench/compare.py`;
`plot_peer(section, folder)` draws TTFT against concurrency for both.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import sys
import time
from pathlib import Path

import httpx
import trio

ROOT = Path(__file__).resolve().parents[1]
CLIENT = ROOT / "bench" / "vllm_bench.py"
SERVED = "smol"
SYSTEMS = ("vllm", "cohort")
# The targets: (row concurrency, figure, comparison, bound).
TARGETS = ((1, "ttft_p50_diff_ms", "<=", 10.0), (32, "ttft_p50_ratio", "<=", 1.05),
           (32, "tokens_per_s_ratio", ">=", 0.97))
# No hub, no proxy: everything is local and on loopback.
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "NO_PROXY": "127.0.0.1,localhost",
           "no_proxy": "127.0.0.1,localhost"}


class Knobs:
    """The scenario's settings, read from `bench.args` with these defaults."""

    def __init__(self, args) -> None:
        self.rounds = int(getattr(args, "peer_rounds", 3))
        self.concurrency = list(getattr(args, "peer_concurrency", None) or [1, 8, 32])
        # None: about 4 per concurrent caller, at least 8, at most `peer_max_prompts` (whole
        # waves of the largest concurrency); an int: that many for every concurrency.
        self.prompts = getattr(args, "peer_prompts", None)
        self.max_prompts = int(getattr(args, "peer_max_prompts", 64))
        self.input_len = int(getattr(args, "peer_input_len", 64))
        self.output_len = int(getattr(args, "peer_output_len", 64))
        self.seed = int(getattr(args, "peer_seed", 0))
        self.memory = float(getattr(args, "peer_gpu_memory_utilization", 0.2))
        self.max_model_len = int(getattr(args, "peer_max_model_len", 2048))
        self.load_timeout_s = float(getattr(args, "peer_load_timeout_s", 900))
        self.run_timeout_s = float(getattr(args, "peer_run_timeout_s", 600))
        # the client's own warm-up requests (`--num-warmups`), sent before each measured load; they
        # repeat the load's first prompt, so that one then hits the prefix cache (on both)
        self.client_warmups = int(getattr(args, "peer_client_warmups", 0))
        self.batch_wait = getattr(args, "peer_batch_wait", None)
        if self.batch_wait is None:
            self.batch_wait = getattr(args, "batch_wait", 0.1)

    def prompts_for(self, concurrency: int) -> int:
        if self.prompts:
            return int(self.prompts)
        return max(8, min(4 * concurrency, self.max_prompts))


def client_command(url: str, tokenizer: str, *, prompts: int | str, concurrency: int | str,
                   seed: int | str,
                   input_len: int, output_len: int, folder: Path | str, name: str,
                   warmups: int = 0) -> list[str]:
    """vLLM's benchmark client, as the issue names it, through the CPU-build shim."""
    extra = ["--num-warmups", str(warmups)] if warmups else []
    return [sys.executable, str(CLIENT), "bench", "serve", "--backend", "openai",
            "--base-url", url, "--endpoint", "/v1/completions", "--model", SERVED,
            "--tokenizer", tokenizer, "--dataset-name", "random",
            "--random-input-len", str(input_len), "--random-output-len", str(output_len),
            "--ignore-eos", "--num-prompts", str(prompts), "--max-concurrency", str(concurrency),
            "--seed", str(seed), "--percentile-metrics", "ttft,itl,e2el",
            "--metric-percentiles", "50,99", "--save-result", "--save-detailed",
            "--result-dir", str(folder), "--result-filename", f"{name}.json", "--disable-tqdm",
            *extra]


def serve_command(path: str, port: int, knobs, log_stats: bool = False) -> str:
    """`vllm serve` with the engine arguments the Cohort worker gives AsyncEngineArgs
    (worker/engines/vllm.py: float32 on CPU, eager, disable_log_stats unless `log_stats`).
    `knobs`: any with `max_model_len` and `memory` (this module's, or bench.routers')."""
    return (f"{sys.executable} -m vllm.entrypoints.openai.api_server --model {path} "
            f"--served-model-name {SERVED} --host 127.0.0.1 --port {port} "
            f"--max-model-len {knobs.max_model_len} --enforce-eager --dtype float32 "
            f"--gpu-memory-utilization {knobs.memory:g}"
            + ("" if log_stats else " --disable-log-stats"))


async def wait_models(url: str, proc, log: Path, timeout_s: float) -> None:
    """Until `url`/v1/models answers 200; fails at once if the server exits."""
    with trio.fail_after(timeout_s):
        async with httpx.AsyncClient(timeout=5) as http:
            while True:
                if proc.poll() is not None:
                    # the root cause is an "...Error: ..." line, usually above the last traceback
                    causes = [found.group(0)[:400] for line in log.read_text(errors="replace").splitlines()
                              if " WARNING " not in line
                              and (found := re.search(r"\w+(Error|Exception): .*", line))]
                    raise RuntimeError(f"vllm serve exited with {proc.returncode} (log: {log}): "
                                       + " / ".join(dict.fromkeys(causes[-4:])))
                try:
                    if (await http.get(url + "/v1/models")).status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                await trio.sleep(0.25)


async def wait_cohort(cluster, timeout_s: float) -> dict:
    """Until the front's /health shows a ready worker, as `Cluster.wait_ready` does, but failing at
    once if the worker exits or reports itself failed (its engine did not load)."""
    with trio.fail_after(timeout_s):
        while True:
            health = await cluster.health() or {}
            workers = health.get("workers", [])
            if any(w.get("state") in ("ready", "busy") for w in workers):
                return health
            failed = [w.get("error") or "failed" for w in workers if w.get("state") == "failed"]
            for name in ("front", "worker1"):
                if cluster.procs[name].poll() is not None:
                    failed.append(f"{name} exited with {cluster.procs[name].returncode}")
            if failed:
                log = cluster.tmp / "worker1.log"
                causes = [found.group(0)[:400] for line in log.read_text(errors="replace").splitlines()
                          if " WARNING " not in line
                          and (found := re.search(r"\w+(Error|Exception): .*", line))]
                raise RuntimeError(f"Cohort's worker did not load (log: {log}): "
                                   + " / ".join(dict.fromkeys(failed + causes[-4:])))
            await trio.sleep(0.25)


async def warm_up(url: str, output_len: int = 16, parallel: int = 8) -> list[str]:
    """One request alone, then `parallel` at once, with the body vLLM's client sends; the answers'
    problems (which the client reports only as an HTTP reason) are returned."""
    body = {"model": SERVED, "repetition_penalty": 1.0, "max_tokens": output_len,
            "logprobs": None, "stream": True, "stream_options": {"include_usage": True},
            "ignore_eos": True}
    problems: list[str] = []

    async def one(i: int, http: httpx.AsyncClient) -> None:
        tokens = None
        try:
            async with http.stream("POST", url + "/v1/completions",
                                   json=dict(body, prompt=f"Warm-up number {i}: tell a story.")) as reply:
                if reply.status_code != 200:
                    problems.append(f"HTTP {reply.status_code}: {(await reply.aread())[:300]!r}")
                    return
                async for line in reply.aiter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]":
                        usage = json.loads(line[6:]).get("usage")
                        if usage:
                            tokens = usage.get("completion_tokens")
        except (httpx.HTTPError, ValueError) as error:
            problems.append(f"{type(error).__name__}: {error}")
            return
        if tokens != output_len:
            problems.append(f"asked {output_len} tokens with ignore_eos, usage says {tokens}")

    with trio.fail_after(300):
        async with httpx.AsyncClient(timeout=120) as http:
            await one(0, http)
            async with trio.open_nursery() as nursery:
                for i in range(1, parallel + 1):
                    nursery.start_soon(one, i, http)
    return sorted(set(problems))


async def run_client(command: list[str], result: Path, log: Path, timeout_s: float) -> dict:
    env = {**os.environ, **OFFLINE}
    env.pop("OPENAI_API_KEY", None)  # auth is off on both; the client would send it to both
    with open(log, "wb") as out, trio.fail_after(timeout_s):
        done = await trio.run_process(command, cwd=ROOT, env=env, stdout=out,
                                      stderr=out, check=False)
    if done.returncode != 0 or not result.exists():
        tail = log.read_text(errors="replace")[-1500:]
        raise RuntimeError(f"the client exited with {done.returncode}:\n{tail}")
    return json.loads(result.read_text())


def figures(raw: dict, expected_tokens: int) -> dict:
    """What one load's saved JSON says, in the units of the table."""
    errors = [e for e in raw.get("errors", []) if e]

    def number(key: str, digits: int = 2) -> float | None:
        value = raw.get(key)
        return None if value is None else round(float(value), digits)

    return {"ttft_p50_ms": number("p50_ttft_ms"), "ttft_p99_ms": number("p99_ttft_ms"),
            "itl_p50_ms": number("p50_itl_ms"), "e2el_p50_ms": number("p50_e2el_ms", 1),
            "tokens_per_s": number("output_throughput"), "duration_s": number("duration"),
            "completed": raw.get("completed", 0), "failed": raw.get("failed", 0),
            "output_tokens": raw.get("total_output_tokens", 0), "expected_tokens": expected_tokens,
            "output_lens": sorted(set(raw.get("output_lens", []))),
            "first_error": errors[0][-300:] if errors else ""}


def engine_config(log: str) -> str:
    """The engine's configuration as vLLM logs it when it starts ("Initializing a V1 LLM engine
    (...) with config: ..."): everything but the batch limits, which are not in it."""
    found = re.findall(r"with config: (.*)", log)
    return found[-1].strip() if found else ""


def engine_facts(log: str) -> dict:
    """The engine's own account of itself in a log: arguments, KV cache, batch limits."""
    facts = {}
    patterns = {"non_default_args": r"non-default args: (\{.*\})",
                "kv_cache_tokens": r"KV cache size: ([\d,]+) tokens",
                "max_concurrency_at_max_len": r"Maximum concurrency for [\d,]+ tokens per request: ([\d.]+)x",
                "kv_cache_gib": r"Auto set \(([\d.]+)/[\d.]+\) GiB for KV cache",
                "max_num_seqs": r"max_num_seqs=(\d+)",
                "max_num_batched_tokens": r"max_num_batched_tokens=(\d+)",
                "prefix_caching": r"enable_prefix_caching=(\w+)",
                "chunked_prefill": r"enable_chunked_prefill=(\w+)"}
    for name, pattern in patterns.items():
        found = re.findall(pattern, log)
        if found:
            facts[name] = found[-1]
    return facts


def spread(values: list[float], digits: int = 3) -> tuple[float | None, str]:
    values = sorted(v for v in values if v is not None)
    if not values:
        return None, ""
    middle = round(statistics.median(values), digits)
    if len(values) < 2:
        return middle, ""
    joint = " to " if values[0] < 0 else "-"  # "lo-hi", unless a negative would make it unreadable
    return middle, f"{values[0]:.{digits}f}{joint}{values[-1]:.{digits}f}"


def median(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return round(statistics.median(values), 1) if values else None


def summarize(runs: dict, knobs: Knobs) -> list[dict]:
    """One row per concurrency: medians over rounds, per-round ratios (Cohort / vLLM)."""
    rows = []
    for concurrency in knobs.concurrency:
        rounds = [r for r in range(knobs.rounds)
                  if all((s, concurrency, r) in runs for s in SYSTEMS)]
        mine = {s: [runs[(s, concurrency, r)] for r in rounds] for s in SYSTEMS}
        row: dict = {"concurrency": concurrency, "prompts": knobs.prompts_for(concurrency),
                     "rounds": len(rounds)}
        row["client_errors"] = sum((s, concurrency, r) not in runs
                                   for s in SYSTEMS for r in range(knobs.rounds))
        for metric, label in (("ttft_p50_ms", "ttft_p50"), ("ttft_p99_ms", "ttft_p99"),
                              ("itl_p50_ms", "itl_p50"), ("tokens_per_s", "tokens_per_s")):
            for system in SYSTEMS:
                row[f"{system}_{label}" + ("_ms" if metric.endswith("_ms") else "")] = median(
                    [f[metric] for f in mine[system]])
            ratios = [c[metric] / v[metric] for v, c in zip(mine["vllm"], mine["cohort"])
                      if c[metric] is not None and v[metric]]
            row[f"{label}_ratio"], row[f"{label}_ratio_range"] = spread(ratios)
        row["ttft_p50_diff_ms"], row["ttft_p50_diff_range"] = spread(
            [c["ttft_p50_ms"] - v["ttft_p50_ms"] for v, c in zip(mine["vllm"], mine["cohort"])
             if c["ttft_p50_ms"] is not None and v["ttft_p50_ms"] is not None], 1)
        for system in SYSTEMS:  # output tokens completed / asked for: a mismatch shows here
            got = sum(f["output_tokens"] for f in mine[system])
            row[f"{system}_output_tokens"] = f"{got}/{sum(f['expected_tokens'] for f in mine[system])}"
            row[f"{system}_failed"] = sum(f["failed"] for f in mine[system])
        rows.append(row)
    return rows


def check_targets(rows: list[dict]) -> list[dict]:
    checks = []
    for concurrency, figure, op, bound in TARGETS:
        row = next((r for r in rows if r["concurrency"] == concurrency), None)
        if row is None or row.get(figure) is None:
            continue
        value = row[figure]
        checks.append({"concurrency": concurrency, "figure": figure, "target": f"{op} {bound:g}",
                       "measured": value, "range": row.get(figure.replace("_ratio", "_ratio_range")
                                                           if figure.endswith("_ratio")
                                                           else "ttft_p50_diff_range", ""),
                       "met": value <= bound if op == "<=" else value >= bound})
    return checks


async def run_peer(bench) -> dict:
    """The scenario: both servers loaded once, rounds of interleaved loads, one results section."""
    from worker.models import default_model_path, is_prepared

    path = os.environ.get("COHORT_MODEL") or default_model_path()
    try:
        import vllm  # noqa: F401
    except ImportError:
        return {"skipped": "vLLM is not installed"}
    if not is_prepared(path):
        return {"skipped": f"{path} not prepared"}
    from harness.cluster import free_port

    knobs = Knobs(bench.args)
    cluster = bench.cluster(COHORT_ENGINE="vllm", COHORT_MODEL=path, COHORT_SERVED_MODEL_NAME=SERVED,
                            COHORT_WORKER_TIMEOUT_S="30",
                            COHORT_GPU_MEMORY_UTILIZATION=f"{knobs.memory:g}",
                            COHORT_MAX_MODEL_LEN=str(knobs.max_model_len),
                            COHORT_BATCH_WAIT_S=str(knobs.batch_wait), **OFFLINE)
    folder = cluster.tmp / "peer"
    folder.mkdir()
    runs: dict[tuple[str, int, int], dict] = {}
    problems: list[str] = []
    section: dict = {}
    round_times: list[float] = []
    began = time.monotonic()
    try:
        port = free_port()
        serve = cluster._spawn("serve", serve_command(path, port, knobs))
        cluster.start_front()
        cluster.start_worker("worker1")
        urls = {"vllm": f"http://127.0.0.1:{port}", "cohort": cluster.url}
        health: dict = {}
        load_errors: list[str] = []

        async def loaded(system: str, wait) -> None:
            try:
                result = await wait()
            except (RuntimeError, AssertionError, trio.TooSlowError) as error:
                load_errors.append(f"{system}: {type(error).__name__}: {str(error)[-1500:]}")
                nursery.cancel_scope.cancel()
            else:
                health.update(result or {})

        async with trio.open_nursery() as nursery:  # both load side by side
            nursery.start_soon(loaded, "vllm", lambda: wait_models(
                urls["vllm"], serve, cluster.tmp / "serve.log", knobs.load_timeout_s))
            nursery.start_soon(loaded, "cohort", lambda: wait_cohort(cluster, knobs.load_timeout_s))
        if load_errors:
            print(f"peer: a server did not load: {load_errors}", file=sys.stderr)
            return {"rows": [], "error": "a server did not load", "load_errors": load_errors,
                    "folder": str(cluster.tmp)}
        loaded_s = round(time.monotonic() - began, 1)
        warm = {}
        for system in SYSTEMS:
            try:
                warm[system] = await warm_up(urls[system], parallel=min(8, max(knobs.concurrency)))
            except trio.TooSlowError:
                warm[system] = ["no answer within 300 s"]
        health = await cluster.health() or health  # by now the engine has reported its limits
        worker = next((w for w in health.get("workers", []) if w.get("state") in ("ready", "busy")), {})
        configs = {s: engine_config(cluster.log(n)) for s, n in (("vllm", "serve"), ("cohort", "worker1"))}
        differ = [f"{a} | {b}" for a, b in zip(*(c.split(", ") for c in configs.values())) if a != b]
        engines = {"same_engine_config": bool(configs["vllm"]) and configs["vllm"] == configs["cohort"],
                   "engine_config_differences": differ,
                   "vllm": engine_facts(cluster.log("serve")),
                   "cohort": {**engine_facts(cluster.log("worker1")),
                              "reported_max_num_seqs": worker.get("max_num_seqs"),
                              "reported_max_num_batched_tokens": worker.get("max_num_batched_tokens")}}
        tokenizer = path
        for round_ in range(knobs.rounds):
            started = time.monotonic()
            order = SYSTEMS if round_ % 2 == 0 else SYSTEMS[::-1]
            for concurrency in knobs.concurrency:
                prompts = knobs.prompts_for(concurrency)
                seed = knobs.seed + 1000 * round_ + concurrency  # the same prompts for both
                for system in order:
                    name = f"{system}-c{concurrency}-r{round_}"
                    command = client_command(urls[system], tokenizer, prompts=prompts,
                                             concurrency=concurrency, seed=seed,
                                             input_len=knobs.input_len,
                                             output_len=knobs.output_len, folder=folder, name=name,
                                             warmups=knobs.client_warmups)
                    try:
                        raw = await run_client(command, folder / f"{name}.json",
                                               folder / f"{name}.log", knobs.run_timeout_s)
                    except (RuntimeError, trio.TooSlowError, OSError) as error:
                        problems.append(f"{name}: {str(error)[-600:]}")
                        print(f"peer: {name} failed: {str(error)[-300:]}", file=sys.stderr)
                        continue
                    runs[(system, concurrency, round_)] = figures(raw, prompts * knobs.output_len)
                    f = runs[(system, concurrency, round_)]
                    print(f"peer: {name}: TTFT p50 {f['ttft_p50_ms']} ms, {f['tokens_per_s']} "
                          f"tokens/s, {f['output_tokens']}/{f['expected_tokens']} tokens, "
                          f"{f['failed']} failed", file=sys.stderr)
            round_times.append(round(time.monotonic() - started, 1))
        rows = summarize(runs, knobs)
        section = {
            "rows": rows,
            "targets": check_targets(rows),
            "rounds": knobs.rounds, "round_wall_s": round_times, "load_s": loaded_s,
            "model": os.path.basename(path), "input_len": knobs.input_len,
            "output_len": knobs.output_len, "batch_wait_s": knobs.batch_wait,
            "gpu_memory_utilization": knobs.memory, "engines": engines,
            "warm_up_problems": {s: p for s, p in warm.items() if p},
            "run_errors": problems,
            "client": " ".join(client_command("URL", tokenizer, prompts="N", concurrency="C",
                                              seed="SEED", input_len=knobs.input_len,
                                              output_len=knobs.output_len, folder="DIR",
                                              name="NAME", warmups=knobs.client_warmups)),
            "serve": serve_command(path, port, knobs),
            "per_run": {f"{s} c={c} r={r}": f for (s, c, r), f in sorted(runs.items())},
            "folder": str(folder),
        }
    finally:
        cluster.stop()
    return section


def plot_peer(section: dict, folder: Path) -> Path | None:
    """`ttft_vs_concurrency.png`: TTFT p50 and p99 against concurrency, Cohort and `vllm serve`."""
    rows = section.get("rows") or []
    if not rows:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    styles = {"vllm": ("vllm serve", "tab:blue"), "cohort": ("Cohort + vLLM worker", "tab:orange")}
    concurrency = [r["concurrency"] for r in rows]
    for system, (label, color) in styles.items():
        for pct, line in (("p50", "-"), ("p99", "--")):
            values = [r.get(f"{system}_ttft_{pct}_ms") for r in rows]
            points = [(c, v) for c, v in zip(concurrency, values) if v is not None]
            if points:
                ax.plot(*zip(*points), line, marker="o", color=color, label=f"{label} {pct}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(concurrency, [str(c) for c in concurrency])
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.yaxis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set(xlabel="concurrency", ylabel="time to first token (ms)",
           title=f"TTFT vs concurrency: {section.get('model', '')}, "
                 f"{section.get('rounds', '?')} round(s)")
    ax.title.set_fontsize(10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = folder / "ttft_vs_concurrency.png"
    fig.savefig(out)
    plt.close(fig)
    return out
