"""Two fronts on one store (SQLite, and a real PostgreSQL), with workers connected to both: one
front SIGKILLed with 40 tasks running; the other finishes every one of them, once."""

import re
import signal

import httpx
import pytest
import trio


MODEL = "cohort-mock"
TASKS = 40


async def wait_ready_at(url: str, headers: dict, workers: int) -> None:
    with trio.fail_after(60):
        while True:
            try:
                health = httpx.get(url + "/health", headers=headers, timeout=5).json()
                if sum(w["state"] in ("ready", "busy") for w in health.get("workers", [])) >= workers:
                    return
            except httpx.TransportError:
                pass
            await trio.sleep(0.05)


async def stream_until_cut(url: str, headers: dict, started: trio.Event, ends: list) -> None:
    """A long stream on the front that will be killed; what its client saw in the end."""
    try:
        async with httpx.AsyncClient(timeout=30, headers=headers) as http:
            async with http.stream("POST", url + "/v1/completions", json={
                    "model": MODEL, "prompt": "in flight", "max_tokens": 400, "ignore_eos": True,
                    "stream": True}) as response:
                async for _ in response.aiter_text():
                    started.set()
        ends.append("finished")
    except httpx.TransportError as error:
        ends.append(type(error).__name__)


@pytest.mark.parametrize("store", ["sqlite", "postgres"])
async def test_a_killed_fronts_tasks_finish_once_on_the_other_front(make_cluster, store, request):
    env = {"COHORT_TASK_LEASE_S": "2", "MOCK_TOKEN_S": "0.05"}
    if store == "postgres":
        env["DATABASE_URL"] = request.getfixturevalue("database_url_postgres")
    cluster = make_cluster(**env)
    cluster.start_front()
    url_b = cluster.start_second_front()
    for name in ("worker1", "worker2"):
        cluster.start_worker(name)
    cluster.api_key = cluster.add_user("alice")
    headers = cluster.headers()
    await cluster.wait_ready(2)
    await wait_ready_at(url_b, headers, 2)

    async with httpx.AsyncClient(timeout=30, headers=headers) as http:
        ids = [(await http.post(cluster.url + "/inference/async", json={
            "model": MODEL, "prompt": f"task {i}", "max_tokens": 40, "ignore_eos": True})).json()["id"]
            for i in range(TASKS)]
        started, ends = trio.Event(), []
        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(stream_until_cut, cluster.url, headers, started, ends)
            await started.wait()
            with trio.fail_after(30):  # kill it while its tasks run
                while (await http.get(url_b + "/tasks", params={"status": "running"})).json()[
                        "total"] < 10:
                    await trio.sleep(0.02)
            cluster.signal("front", signal.SIGKILL)
            with trio.fail_after(10):  # the clients on the dead front hear it at once
                while len(ends) < 3:
                    await trio.sleep(0.02)
        assert ends and all(end != "finished" for end in ends), ends

        finals = {}
        with trio.fail_after(90):
            for task_id in ids:
                while (task := (await http.get(f"{url_b}/tasks/{task_id}")).json())["status"] in (
                        "queued", "running"):
                    await trio.sleep(0.05)
                finals[task_id] = task
    assert [task["status"] for task in finals.values()] == ["completed"] * TASKS
    assert all(task["result"]["choices"][0]["text"] for task in finals.values())
    assert any(task["attempts"] == 2 for task in finals.values())  # taken over mid-run
    assert max(task["attempts"] for task in finals.values()) <= 2
    assert "took over" in cluster.log("front_b")
    metrics = httpx.get(url_b + "/metrics", headers=headers, timeout=10).text
    taken = dict(re.findall(r'^cohort_lease_takeovers_total\{cause="(\w+)",what="task"\} (\S+)$',
                            metrics, re.MULTILINE))
    assert float(taken["lease_lapsed"]) >= 1 and float(taken["handed_back"]) == 0  # as alerted on


async def running_on_worker(url: str, headers: dict) -> int:
    health = httpx.get(url + "/health", headers=headers, timeout=5).json()
    return sum(worker["running"] for worker in health["workers"])


@pytest.mark.parametrize("how", ["gone", "restarted"])
async def test_a_dead_fronts_requests_stop_on_the_worker(make_cluster, how):
    """Streams of 20 s each on a front that is SIGKILLed: the worker stops decoding them once that
    front has been out of reach for its worker timeout, or at once when a front restarted in its
    place says it does not know the worker; the other front sees the engine empty."""
    cluster = make_cluster(MOCK_TOKEN_S="0.05",
                           COHORT_WORKER_TIMEOUT_S="2" if how == "gone" else "60")
    cluster.start_front()
    url_b = cluster.start_second_front()
    cluster.start_worker("worker1")
    cluster.api_key = cluster.add_user("alice")
    headers = cluster.headers()
    await cluster.wait_ready(1)
    await wait_ready_at(url_b, headers, 1)
    started, ends = trio.Event(), []
    async with trio.open_nursery() as nursery:
        for _ in range(3):
            nursery.start_soon(stream_until_cut, cluster.url, headers, started, ends)
        with trio.fail_after(10):
            while await running_on_worker(url_b, headers) < 3:
                await trio.sleep(0.05)
        cluster.signal("front", signal.SIGKILL)
    if how == "restarted":
        cluster.start_front()
    with trio.fail_after(10):  # not the 20 s the streams would still decode
        while await running_on_worker(url_b, headers):
            await trio.sleep(0.05)
    said = {"gone": "has been out of reach for over 2 s: aborting its 3 request(s)",
            "restarted": "does not know this worker"}[how]
    assert said in cluster.log("worker1")
    assert all(end != "finished" for end in ends), ends
