"""`python bench/faults.py`: how Cohort recovers from faults, each case on a fresh cluster.

Cases (the e2e tests' own logic, tests/e2e, with figures instead of asserts): 1 an engine host
SIGKILLed under `honcho start`, 2 Ctrl-C on honcho with streams in flight, 3 SIGTERM to the front
with 30 long streams, 4 2,000 idle connections on 1,024 descriptors, 5 the idle keep-alive timeout,
6 random kills under load (chaos), 7 vLLM's EngineCore SIGKILLed (unless --skip-vllm).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import trio  # noqa: E402

from harness.cluster import Cluster, descendants, engine_host  # noqa: E402
from harness import chaos as chaos_env  # noqa: E402
from harness.connections import (hold_idle, one_health_request,  # noqa: E402
                                        start_short_of_descriptors, started)
from worker.models import default_model_path, is_prepared  # noqa: E402

SLOW = {"MOCK_TOKEN_S": "0.1", "MOCK_TTFT_S": "0"}  # 10 tokens a second per stream
RESTARTS = {"MOCK_TOKEN_S": "0.01", "MOCK_TTFT_S": "0.01", "COHORT_RESTART_BACKOFF_S": "0.2"}
DONE = "data: [DONE]\n\n"
MODEL = chaos_env.MODEL
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def s(seconds: float) -> str:
    return f"{seconds:.1f} s"


def new_cluster(**env: str) -> Cluster:
    """A cluster in a temp folder of its own: no case sees another's database, ports or logs."""
    return Cluster(Path(tempfile.mkdtemp(prefix="cohort-faults-")), **env)


def stop_honcho(honcho: subprocess.Popen, interrupt: bool = True) -> None:
    """Ctrl-C, as a user stops it, then wait; kill whatever is left if it hangs."""
    if interrupt and honcho.poll() is None:
        os.killpg(honcho.pid, signal.SIGINT)
    try:
        honcho.wait(30)
    except subprocess.TimeoutExpired:
        for pid in descendants(honcho.pid) | {honcho.pid}:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        honcho.wait()


def ready(health: dict | None, worker_id: str) -> dict | None:
    """That worker's /health entry if it takes requests (busy is a full but live worker)."""
    for worker in (health or {}).get("workers", []):
        if worker["id"] == worker_id and worker["state"] in ("ready", "busy"):
            return worker
    return None


def complete(body: str) -> bool:
    return body.endswith(DONE) and '"error"' not in body


async def stream_all(cluster: Cluster, count: int, tokens: int, begun: trio.Event) -> list[tuple[str, float]]:
    """test_drain.streams, but a cut is counted, not raised, and each stream's end time is kept;
    `begun` is set once every stream has its first event (or has ended)."""
    results: list[tuple[str, float]] = []
    seen: set[int] = set()

    def mark(i: int) -> None:
        seen.add(i)
        if len(seen) == count:
            begun.set()

    async with httpx.AsyncClient(timeout=60, headers=cluster.headers(),
                                 limits=httpx.Limits(max_connections=count)) as http:
        async def one(i: int) -> None:
            text = ""
            try:
                async with http.stream("POST", cluster.url + "/v1/completions", json={
                        "model": MODEL, "prompt": f"stream {i}", "max_tokens": tokens,
                        "ignore_eos": True, "stream": True}) as response:
                    async for chunk in response.aiter_text():
                        mark(i)
                        text += chunk
            except httpx.TransportError as error:
                text += f"[cut: {error!r}]"
            mark(i)
            results.append((text, trio.current_time()))

        with trio.move_on_after(120):
            async with trio.open_nursery() as nursery:
                for i in range(count):
                    nursery.start_soon(one, i)
    begun.set()
    return results


async def honcho_kill(args) -> tuple[str, dict]:
    """test_honcho: a killed engine host must cost no request and must not end the deployment."""
    cluster = new_cluster(**RESTARTS, COHORT_WORKER_TIMEOUT_S="10")
    honcho = cluster.start_honcho()
    try:
        await cluster.wait_ready(2)
        host, todo, ok, at, killed = engine_host(honcho.pid, "worker1"), iter(range(300)), [], {}, trio.Event()
        first = ready(await cluster.health(), "worker1")["pid"]  # the host's own pid, as /health shows it

        async def client(http: httpx.AsyncClient) -> None:
            for i in todo:  # one shared iterator: 32 clients, 300 requests in order
                if i == 100:
                    at["kill"] = trio.current_time()
                    os.kill(host, signal.SIGKILL)
                    killed.set()
                try:
                    r = await http.post(cluster.url + "/v1/completions", json={
                        "model": MODEL, "prompt": f"question {i}", "max_tokens": 16})
                    ok.append(r.status_code == 200 and r.json()["usage"]["completion_tokens"] > 0)
                except (httpx.TransportError, ValueError, KeyError):
                    ok.append(False)

        async def watch() -> None:  # back = a new host of worker1 ready, and worker2 too
            await killed.wait()
            await cluster.wait_for(lambda h: ready(h, "worker2") and (ready(h, "worker1") or {}).get(
                "pid", first) != first, "worker1's new host", 60)
            at["back"] = trio.current_time()

        async with httpx.AsyncClient(timeout=60, headers=cluster.headers()) as http:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(watch)
                for _ in range(32):
                    nursery.start_soon(client, http)
        running = honcho.poll() is None
    finally:
        stop_honcho(honcho)
    back = at["back"] - at["kill"]
    return (f"{sum(ok)}/300 succeeded; honcho still running: {'yes' if running else 'no'}; "
            f"2 ready workers again {s(back)} after the kill",
            {"succeeded": sum(ok), "honcho_running": running, "back_s": back})


async def honcho_ctrl_c(args) -> tuple[str, dict]:
    """test_drain: Ctrl-C signals every process at once; the streams in flight must still end whole."""
    cluster = new_cluster(**SLOW)
    honcho = cluster.start_honcho()
    try:
        await cluster.wait_ready(2)
        begun, results = trio.Event(), []

        async def run() -> None:
            results.extend(await stream_all(cluster, 20, 10, begun))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(run)
            await begun.wait()
            pressed = trio.current_time()
            os.killpg(honcho.pid, signal.SIGINT)
        while honcho.poll() is None and trio.current_time() - pressed < 30:
            await trio.sleep(0.05)
        exited = trio.current_time() - pressed
    finally:
        stop_honcho(honcho, interrupt=False)
    whole = sum(complete(body) for body, _ in results)
    return (f"{whole}/20 streams end with [DONE] and no error; honcho exited {s(exited)} after Ctrl-C",
            {"complete": whole, "honcho_exit_s": exited})


async def front_sigterm(args) -> tuple[str, dict]:
    """test_drain: the front's drain must outlast hypercorn's 3 s so 12 s streams finish."""
    from harness.cluster import alive
    cluster = new_cluster(**SLOW)
    try:
        cluster.start_front()
        cluster.start_worker("worker1")
        cluster.api_key = cluster.add_user("ops")
        await cluster.wait_ready(1)
        begun, results, at = trio.Event(), [], {}

        async def run() -> None:
            results.extend(await stream_all(cluster, 30, 120, begun))

        async def exit_watch() -> None:  # hypercorn, not its `sh -c` (gone at once on SIGTERM)
            with trio.move_on_after(120):
                while any(alive(pid) for pid in front):
                    await trio.sleep(0.05)
                at["exit"] = trio.current_time()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(run)
            await begun.wait()
            front = descendants(cluster.procs["front"].pid)
            at["term"] = trio.current_time()
            cluster.signal("front", signal.SIGTERM)
            nursery.start_soon(exit_watch)
    finally:
        cluster.stop()
    whole = sum(complete(body) and body.count('"text":') == 120 for body, _ in results)
    last = max(end for _, end in results) - at["term"]
    exit_s = at["exit"] - at["term"] if "exit" in at else float("nan")
    return (f"{whole}/30 complete (all 120 tokens, [DONE]); last stream ended {s(last)} after "
            f"SIGTERM; front (hypercorn) exited {s(exit_s)} after SIGTERM",
            {"complete": whole, "last_stream_s": last, "front_exit_s": exit_s})


async def idle_connections(args) -> tuple[str, dict]:
    """test_connections: a front out of descriptors must still take a new client."""
    cluster, idle = new_cluster(COHORT_KEEP_ALIVE_S="600"), []
    try:
        await start_short_of_descriptors(cluster)
        idle.extend(await hold_idle(cluster, 2000))
        began = trio.current_time()
        async with httpx.AsyncClient(timeout=10, headers=cluster.headers()) as http:
            response = await http.post(cluster.url + "/v1/completions", json={
                "model": MODEL, "prompt": "still here", "max_tokens": 4})
        ms = 1000 * (trio.current_time() - began)
        closed = []

        async def probe(stream: trio.SocketStream) -> None:  # b"" (or a reset): the front closed it
            with trio.move_on_after(0.5):
                try:
                    closed.append(await stream.receive_some(100) == b"")
                except trio.BrokenResourceError:
                    closed.append(True)

        async with trio.open_nursery() as nursery:
            for stream in idle:
                nursery.start_soon(probe, stream)
    finally:
        for stream in idle:
            await stream.aclose()
        cluster.stop()
    return (f"new completion: {response.status_code} in {ms:.0f} ms with {len(idle)} idle "
            f"connections opened ({sum(closed)} of them closed by the front)",
            {"status": response.status_code, "latency_ms": ms, "idle": len(idle), "closed": sum(closed)})


async def keep_alive(args) -> tuple[str, dict]:
    """test_connections: an idle keep-alive connection must not hold a descriptor for good."""
    cluster = new_cluster(COHORT_KEEP_ALIVE_S="5")
    try:
        await started(cluster)
        stream = await one_health_request(cluster.port)
        began, data = trio.current_time(), None
        with trio.move_on_after(60):
            try:
                data = await stream.receive_some(100)
            except trio.BrokenResourceError:
                data = b""
        waited = trio.current_time() - began
        await stream.aclose()
    finally:
        cluster.stop()
    text = f"closed {s(waited)} after the answer" if data == b"" else f"still open after {s(waited)}: {data!r}"
    return text, {"closed": data == b"", "after_s": waited}


async def chaos(args) -> tuple[str, dict]:
    """test_chaos: every request must end as an answer, a clear error, or a cut by a front kill."""
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    cluster = new_cluster(**chaos_env.ENV)
    try:
        await chaos_env.start(cluster)
        run = await chaos_env.run_chaos(cluster, seed, args.chaos_s)
    finally:
        cluster.stop()
    kinds = {kind: run.count(kind) for kind in ("answer", "error", "cut", "bad")}
    ended = {status: sum(t["status"] == status for t in run.finals.values())
             for status in chaos_env.FINAL}
    stuck, unexplained = len(run.tasks) - len(run.finals), len(run.unexplained_cuts())
    print(run.story(), file=sys.stderr)
    return (f"seed {seed}, {len(run.actions)} kills ({run.actions.count('front')} of the front); "
            f"{kinds['answer']} answers / {kinds['error']} clear errors / {kinds['cut']} cut by a "
            f"front kill; unexplained cuts {unexplained}, neither {kinds['bad']}; "
            f"{len(run.tasks)} tasks: {ended['completed']} completed / {ended['failed']} failed / "
            f"{ended['cancelled']} cancelled / {stuck} stuck; request after the storm: "
            f"{run.after_status}",
            {"seed": seed, "actions": run.actions, **kinds, "unexplained": unexplained,
             "tasks": len(run.tasks), **ended, "stuck": stuck, "after": run.after_status})


async def in_flight(cluster: Cluster, worker_id: str, timeout_s: float = 5) -> int:
    """Wait (bounded) until the worker holds jobs, so a kill hits requests in flight on it."""
    with trio.move_on_after(timeout_s):
        while True:
            jobs = (ready(await cluster.health(), worker_id) or {}).get("jobs_in_flight")
            if jobs:
                return jobs
            await trio.sleep(0.01)
    return 0


async def vllm_core(args) -> tuple[str, dict]:
    """test_vllm: a dead EngineCore must be noticed, its requests re-run, nothing routed into it."""
    from harness.cluster import engine_core
    path = default_model_path()
    cluster = new_cluster(COHORT_ENGINE="vllm", COHORT_MODEL=path, COHORT_WORKER_TIMEOUT_S="10")
    body = {"model": os.path.basename(path.rstrip("/")), "messages": QUESTION, "max_tokens": 8,
            "temperature": 0}
    try:
        cluster.start_front()
        cluster.start_worker("worker1", VLLM_CPU_OMP_THREADS_BIND="0")
        cluster.start_worker("worker2", VLLM_CPU_OMP_THREADS_BIND="1")
        cluster.api_key = cluster.add_user("alice")
        health = await cluster.wait_ready(2, 600)
        load = ready(health, "worker1")["load_time_s"]
        core, answers, at, noticed = engine_core(cluster.procs["worker1"].pid), [], {}, trio.Event()
        async with httpx.AsyncClient(timeout=120, headers=cluster.headers()) as http:
            async def ask() -> None:
                try:
                    answers.append((await http.post(cluster.url + "/v1/chat/completions", json=body)).status_code)
                except httpx.TransportError:
                    answers.append(0)

            async def watch() -> None:  # out: worker1 not ready; back: ready again
                with trio.move_on_after(load + 300):
                    while "back" not in at:
                        health, now = await cluster.health(), trio.current_time()
                        if health and not ready(health, "worker1") and "out" not in at:
                            at["out"], at["why"] = now, next(f'{w["state"]}: {w["error"]}'
                                                             for w in health["workers"] if w["id"] == "worker1")
                            noticed.set()
                        elif "out" in at and ready(health, "worker1"):
                            at["back"] = now
                        await trio.sleep(0.05)
                noticed.set()

            async with trio.open_nursery() as outer:
                async with trio.open_nursery() as nursery:
                    for _ in range(6):
                        nursery.start_soon(ask)
                    at["held"] = await in_flight(cluster, "worker1")
                    at["kill"] = trio.current_time()
                    os.kill(core, signal.SIGKILL)
                    outer.start_soon(watch)
                await noticed.wait()
                during = [(await http.post(cluster.url + "/v1/chat/completions", json=body)).status_code
                          for _ in range(20)]
                still_down = not ready(await cluster.health(), "worker1")
    finally:
        cluster.stop()
    out, back = (at.get(mark, float("nan")) - at["kill"] for mark in ("out", "back"))
    return (f"{answers.count(200)}/6 answered 200 ({at['held']} held by worker1 at the kill); worker1 "
            f"out {s(out)} after the kill ({at.get('why')}); "
            f"{sum(code != 200 for code in during)}/20 requests during the restart not 200 (worker1 still "
            f"down after them: {'yes' if still_down else 'no'}); load time {s(load)}, ready again "
            f"{s(back)} after the kill: {s(back - load)} more than the load time",
            {"answered": answers.count(200), "held": at["held"], "out_s": out, "still_down": still_down,
             "during_not_200": sum(c != 200 for c in during), "load_s": load, "back_s": back})


CASES = {
    1: ("engine host SIGKILL under honcho start", honcho_kill,
        "honcho start, 2 mock workers (token 0.01 s, backoff 0.2 s, worker timeout 10 s); 300 "
        "completions of 16 tokens at concurrency 32 (httpx, trio); SIGKILL worker1's engine host at "
        "request 100; /health polled every 0.05 s until worker1 is ready with a new host pid"),
    2: ("Ctrl-C on honcho start, 20 streams in flight", honcho_ctrl_c,
        "honcho start, 2 mock workers (token 0.1 s); 20 streams of 10 tokens; SIGINT to honcho's "
        "group once every stream has its first event"),
    3: ("SIGTERM to the front, 30 streams of 12 s", front_sigterm,
        "front + 1 mock worker (token 0.1 s); 30 streams of 120 tokens; SIGTERM to the front's "
        "process group once all began; its exit polled every 0.05 s"),
    4: ("2,000 idle keep-alive connections, 1,024 descriptors", idle_connections,
        "front under `ulimit -n 1024`, keep-alive 600 s, 1 mock worker; 2,000 connections each with "
        "one GET /health left open (64 at a time); then one new completion (4 tokens) timed"),
    5: ("idle keep-alive timeout", keep_alive,
        "front with COHORT_KEEP_ALIVE_S=5; one GET /health on a raw socket, then time until EOF"),
    6: ("random kills under load (chaos)", chaos,
        "front + 2 mock workers; 8 clients (completions, streams, async tasks) while engine hosts, "
        "workers or the front are SIGKILLed every 1-2.5 s (--chaos-s); tasks polled 60 s after"),
    7: ("vLLM EngineCore SIGKILL", vllm_core,
        "front + 2 vLLM workers (SmolLM2-135M, CPU, one core each, worker timeout 10 s); 6 concurrent "
        "chats of 8 tokens, SIGKILL worker1's EngineCore once it holds some; /health polled every "
        "0.05 s; 20 sequential chats once worker1 is out"),
}


def vllm_missing() -> str:
    """Why case 7 cannot run here ("" if it can)."""
    if importlib.util.find_spec("vllm") is None:
        return "vLLM is not installed"
    if not is_prepared(default_model_path()):
        return f"{default_model_path()} is not prepared (python -m worker.models prepare)"
    return ""


async def run_cases(args) -> list[dict]:
    """Each case in turn; a crash becomes its row (with the traceback on stderr), not the end."""
    rows = []
    for number in args.only or sorted(CASES):
        name, case, how = CASES[number]
        why_not = "--skip-vllm" if args.skip_vllm else vllm_missing()
        if number == 7 and why_not:
            rows.append({"case": f"{number} {name}", "figure": f"skipped: {why_not}", "how": how})
            continue
        print(f"case {number}: {name}...", file=sys.stderr, flush=True)
        began = trio.current_time()
        try:
            figure, raw = await case(args)
        except Exception as error:  # noqa: BLE001
            traceback.print_exc()
            figure, raw = f"crashed: {error!r}"[:300], {"error": repr(error)}
        raw["case_s"] = trio.current_time() - began
        rows.append({"case": f"{number} {name}", "figure": figure, "how": how, "raw": raw})
        print(f"  {figure}", file=sys.stderr, flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", type=int, nargs="*", choices=sorted(CASES), help="run only these cases")
    parser.add_argument("--skip-vllm", action="store_true", help="skip case 7")
    parser.add_argument("--seed", type=int, help="the chaos seed (default: random, printed)")
    parser.add_argument("--chaos-s", type=float, default=20.0, help="how long the chaos lasts")
    parser.add_argument("--json", type=Path, help="write the rows and raw figures here")
    args = parser.parse_args()
    rows = trio.run(run_cases, args)
    print("case | figure | how")
    print("--- | --- | ---")
    for row in rows:
        print(" | ".join(row[key].replace("|", "/") for key in ("case", "figure", "how")))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2, default=str))


if __name__ == "__main__":
    main()
