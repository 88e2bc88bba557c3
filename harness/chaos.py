"""Random SIGKILLs under load, for the chaos test and bench/faults.py: engine hosts, whole workers
(started again by the harness, as their keeper would) and the front, while clients send
completions, streams and async tasks. What each request and task came to is kept for judging."""

from __future__ import annotations

import json
import os
import random
import signal
from dataclasses import dataclass, field

import httpx
import trio

from harness.cluster import Cluster, engine_host

MODEL = "cohort-mock"
WORKERS = ("worker1", "worker2")
FINAL = ("completed", "failed", "cancelled")
ENV = {"MOCK_TOKEN_S": "0.01", "MOCK_TTFT_S": "0.01", "COHORT_RESTART_BACKOFF_S": "0.2",
       "COHORT_WORKER_TIMEOUT_S": "2", "COHORT_TASK_LEASE_S": "3"}


@dataclass
class Outcome:
    kind: str  # answer | error (a clear one) | cut (the connection broke) | bad (none of these)
    started: float
    ended: float
    detail: str = ""


@dataclass
class ChaosRun:
    seed: int
    actions: list[str] = field(default_factory=list)
    outcomes: list[Outcome] = field(default_factory=list)
    front_down: list[tuple[float, float]] = field(default_factory=list)  # kill .. up again
    tasks: list[str] = field(default_factory=list)
    finals: dict[str, dict] = field(default_factory=dict)
    after_status: int = 0

    def count(self, kind: str) -> int:
        return sum(outcome.kind == kind for outcome in self.outcomes)

    def unexplained_cuts(self) -> list[Outcome]:
        """Broken connections of requests that no front kill overlapped."""
        return [o for o in self.outcomes if o.kind == "cut" and not any(
            o.started <= up and o.ended >= killed for killed, up in self.front_down)]

    def story(self) -> str:
        return f"seed {self.seed}, actions {self.actions}"


def classify(status: int, text: str, stream: bool) -> tuple[str, str]:
    """answer, error (a clear one) or bad (neither), with a detail to show."""
    if status != 200:
        try:
            error = json.loads(text)["error"]
            return ("error", error["message"]) if error.get("message") else ("bad", text)
        except (ValueError, KeyError, TypeError):
            return "bad", f"{status}: {text[:300]}"
    if stream:
        if not text.endswith("data: [DONE]\n\n"):
            return "bad", text[-300:]
        return ("error", text[-300:]) if '"error"' in text else ("answer", "")
    choices = json.loads(text).get("choices") or []
    return ("answer", "") if choices and choices[0].get("text") else ("bad", text[:300])


async def start(cluster: Cluster) -> None:
    cluster.start_front()
    for name in WORKERS:
        cluster.start_worker(name)
    cluster.api_key = cluster.add_user("alice")
    await cluster.wait_ready(len(WORKERS))


async def run_chaos(cluster: Cluster, seed: int, seconds: float, clients: int = 8) -> ChaosRun:
    """Kill something every 1-2.5 s for `seconds` under load from `clients` clients; then wait
    for the workers, send one more request, and poll every accepted task (60 s at most)."""
    rng, run, stop = random.Random(seed), ChaosRun(seed), trio.Event()

    async def client(number: int, http: httpx.AsyncClient) -> None:
        sent = 0
        while not stop.is_set():
            sent += 1
            stream, is_task = sent % 2 == 0, sent % 5 == 0
            body = {"model": MODEL, "prompt": f"client {number} request {sent}", "max_tokens": 12,
                    "stream": stream and not is_task}
            began = trio.current_time()
            try:
                response = await http.post(
                    cluster.url + ("/inference/async" if is_task else "/v1/completions"), json=body)
            except httpx.TransportError as error:
                run.outcomes.append(Outcome("cut", began, trio.current_time(), repr(error)))
                await trio.sleep(0.05)
                continue
            if is_task:
                if response.status_code == 202:
                    run.tasks.append(response.json()["id"])
                continue
            kind, detail = classify(response.status_code, response.text, stream and not is_task)
            run.outcomes.append(Outcome(kind, began, trio.current_time(), detail))

    async def storm() -> None:
        deadline = trio.current_time() + seconds
        while trio.current_time() < deadline:
            await trio.sleep(rng.uniform(1.0, 2.5))
            action, name = rng.choice(("engine", "worker", "front")), rng.choice(WORKERS)
            run.actions.append(action if action == "front" else f"{action} {name}")
            if action == "engine":
                try:
                    os.kill(engine_host(cluster.procs[name].pid, name), signal.SIGKILL)
                except LookupError:  # between two hosts: its supervisor is restarting it
                    pass
            elif action == "worker":  # the supervisor too; its keeper starts it again
                cluster.signal(name)
                cluster.wait_exit(name)
                cluster.start_worker(name)
            else:
                killed = trio.current_time()
                cluster.signal("front")
                cluster.wait_exit("front")
                cluster.start_front()
                await cluster.wait_for(lambda health: True, "the front again")
                run.front_down.append((killed, trio.current_time()))
        stop.set()

    async with httpx.AsyncClient(timeout=60, headers=cluster.headers()) as http:
        async with trio.open_nursery() as nursery:
            for number in range(clients):
                nursery.start_soon(client, number, http)
            nursery.start_soon(storm)
        await cluster.wait_ready(len(WORKERS))
        after = await http.post(cluster.url + "/v1/completions",
                                json={"model": MODEL, "prompt": "after the storm"})
        run.after_status = after.status_code
        with trio.move_on_after(60):  # what is not final by then is stuck
            for task_id in run.tasks:
                while (task := (await http.get(f"{cluster.url}/tasks/{task_id}")).json())[
                        "status"] not in FINAL:
                    await trio.sleep(0.05)
                run.finals[task_id] = task
    return run
