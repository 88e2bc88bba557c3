"""Workers that die, vanish or never come; clients that leave; queues that fill. Nothing hangs."""

import os
import signal

import httpx
import pytest
import trio

from harness.cluster import engine_host, group_alive

MODEL = "cohort-mock"
SLOW = {"MOCK_TOKEN_S": "0.02", "MOCK_TTFT_S": "0.02"}  # replies take ~0.3 s: kills land mid-load


async def post_all(cluster, count: int, stream: bool = False, **body):
    """Send `count` concurrent completions; return (status, text or error) for each."""
    results = []
    async with httpx.AsyncClient(timeout=60, headers=cluster.headers(),
                                 limits=httpx.Limits(max_connections=count)) as http:
        async def one(i: int):
            payload = {"model": MODEL, "prompt": f"request {i}", "stream": stream, **body}
            answer = await http.post(cluster.url + "/v1/completions", json=payload)
            results.append((answer.status_code, answer.text))

        with trio.fail_after(90):  # a hung request fails the test here
            async with trio.open_nursery() as nursery:
                for i in range(count):
                    nursery.start_soon(one, i)
    return results


async def start(cluster, workers=("worker1", "worker2"), **worker_env):
    cluster.start_front()
    for name in workers:
        cluster.start_worker(name, **worker_env)
    cluster.api_key = cluster.add_user("ops")
    await cluster.wait_ready(len(workers))


async def test_sigkill_of_a_worker_mid_load_loses_no_request(make_cluster):
    cluster = make_cluster(**SLOW)
    await start(cluster)
    results = []

    async def load():
        results.extend(await post_all(cluster, 120))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(load)
        await cluster.wait_for(lambda h: any(w["id"] == "worker1" and w["jobs_in_flight"] > 0
                                             for w in h["workers"]), "worker1 busy")
        cluster.signal("worker1", signal.SIGKILL)
    assert len(results) == 120
    assert all(status == 200 for status, _ in results), [r for r in results if r[0] != 200][:3]
    health = await cluster.wait_for(
        lambda h: any(w["id"] == "worker1" and w["state"] == "dead" for w in h["workers"]),
        "worker1 marked dead", timeout_s=10)
    stats = httpx.get(cluster.url + "/stats", headers=cluster.headers()).json()
    assert stats["retries"] > 0 and stats["worker_deaths"] >= 1
    assert any(w["id"] == "worker2" and w["state"] == "ready" for w in health["workers"])


async def test_streams_cut_by_a_dying_worker_end_with_a_clear_error(make_cluster):
    cluster = make_cluster(MOCK_TOKEN_S="0.05")
    await start(cluster, workers=("worker1",))
    results = []

    async def load():
        results.extend(await post_all(cluster, 10, stream=True, max_tokens=40))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(load)
        await cluster.wait_for(lambda h: h["workers"][0]["jobs_in_flight"] >= 10, "all streaming")
        await trio.sleep(0.3)  # let tokens flow to the clients: these jobs can no longer be retried
        cluster.signal("worker1", signal.SIGKILL)
    assert len(results) == 10
    for status, text in results:
        assert status == 200 and text.rstrip().endswith("data: [DONE]")
        assert '"code":"worker_died"' in text  # the error travels as an SSE event


async def test_a_crashing_worker_is_retried_elsewhere(make_cluster):
    cluster = make_cluster()
    cluster.start_front()
    cluster.start_worker("worker1", MOCK_CRASH_AFTER="5", COHORT_RESTART_BACKOFF_S="0.1")
    cluster.start_worker("worker2")
    cluster.api_key = cluster.add_user("ops")
    await cluster.wait_ready(2)
    results = await post_all(cluster, 40)
    assert [status for status, _ in results] == [200] * 40
    # its engine host really died (os._exit(3), fault injection) and its supervisor restarted it
    assert "engine host exited with status 3; restart 1" in (cluster.tmp / "worker1.log").read_text()
    await cluster.wait_ready(2)


async def kill_host_until_restarting(make_cluster, backoff_s: str):
    """One ready worker whose engine host is SIGKILLed; returns once /health shows the worker
    `restarting` (its supervisor waiting out `backoff_s`): (cluster, health)."""
    cluster = make_cluster()
    cluster.start_front()
    cluster.start_worker("worker1", COHORT_RESTART_BACKOFF_S=backoff_s)
    cluster.api_key = cluster.add_user("ops")
    await cluster.wait_ready(1)
    os.kill(engine_host(cluster.procs["worker1"].pid, "worker1"), signal.SIGKILL)
    health = await cluster.wait_for(lambda h: h["workers"][0]["state"] == "restarting",
                                    "the worker shown restarting", timeout_s=10)
    return cluster, health


async def test_health_says_restarting_while_the_supervisor_waits_to_restart_a_host(make_cluster):
    cluster, health = await kill_host_until_restarting(make_cluster, "3")
    assert "restart 1 in 3 s" in health["workers"][0]["error"]
    assert httpx.get(cluster.url + "/ready").status_code == 503  # its only worker is out
    await cluster.wait_ready(1, timeout_s=30)


async def test_a_sigterm_while_the_supervisor_waits_to_restart_stops_it_without_a_new_host(
        make_cluster):
    """A stop during the restart backoff ends the wait: the supervisor exits at once and starts no
    host that would outlive it (before, it slept out the backoff and then started one)."""
    cluster, _ = await kill_host_until_restarting(make_cluster, "60")
    group = cluster.procs["worker1"].pid
    cluster.signal("worker1", signal.SIGTERM)
    with trio.fail_after(10):  # the backoff is 60 s
        while group_alive(group):
            await trio.sleep(0.05)
    assert "restart 1 in 60 s" in cluster.log("worker1")
    assert cluster.log("worker1").count("engine ready") == 1  # no second host came up


async def test_injected_engine_errors_fail_only_their_requests(make_cluster):
    cluster = make_cluster()
    # a failure comes back at once, a success after its tokens: the failures of a batch overtake
    # its successes, and the worker's breaker must not take them for a worker that fails everything
    await start(cluster, workers=("worker1",), MOCK_ERROR_RATE="0.3", MOCK_TOKEN_S="0.02")
    results = await post_all(cluster, 40)
    codes = [status for status, _ in results]
    assert codes.count(502) > 0 and codes.count(200) > 0 and set(codes) == {200, 502}
    failed = next(text for status, text in results if status == 502)
    assert "injected failure" in failed and '"type": "engine_error"' in failed.replace('":"', '": "')
    worker = (await cluster.health())["workers"][0]  # still ready, but not plainly so
    assert worker["state"] == "ready" and worker["jobs_failed"] == codes.count(502)
    assert "injected failure" in worker["last_failure"]


async def test_a_worker_that_fails_every_request_is_paused_and_its_requests_run_elsewhere(
        make_cluster):
    cluster = make_cluster()
    cluster.start_front()
    cluster.start_worker("broken", MOCK_ERROR_RATE="1")
    cluster.start_worker("sound")
    cluster.api_key = cluster.add_user("ops")
    await cluster.wait_ready(2)
    results = await post_all(cluster, 40)
    assert [status for status, _ in results] == [200] * 40
    health = await cluster.health()
    broken = next(w for w in health["workers"] if w["id"] == "broken")
    assert broken["state"] == "failing" and "injected failure" in broken["error"]
    assert next(w for w in health["workers"] if w["id"] == "sound")["jobs_done"] >= 40


async def test_a_lone_worker_that_fails_every_request_gives_a_503_that_says_why(make_cluster):
    cluster = make_cluster()
    await start(cluster, workers=("worker1",), MOCK_ERROR_RATE="1")
    first = [status for status, _ in await post_all(cluster, 5)]
    assert first == [502] * 5  # the engine's own failure, as it happened
    status, text = (await post_all(cluster, 1))[0]
    assert status == 503 and "fail every request" in text and "injected failure" in text


async def test_no_ready_worker_is_a_fast_503_and_a_late_worker_joins(make_cluster):
    cluster = make_cluster()
    cluster.start_front()
    cluster.api_key = cluster.add_user("ops")
    await cluster.wait_for(lambda h: h["status"] == "ok", "front up")
    answer = httpx.post(cluster.url + "/v1/completions", headers=cluster.headers(),
                        json={"model": MODEL, "prompt": "anyone?"})
    assert answer.status_code == 503 and "no worker" in answer.json()["error"]["message"]
    assert answer.headers["Retry-After"]
    assert httpx.get(cluster.url + "/ready").status_code == 503
    cluster.start_worker("late", MOCK_LOAD_S="0.5")
    health = await cluster.wait_for(lambda h: h["workers"], "the late worker registers")
    assert health["workers"][0]["state"] in ("loading", "ready")
    await cluster.wait_ready(1)
    answer = httpx.post(cluster.url + "/v1/completions", headers=cluster.headers(),
                        json={"model": MODEL, "prompt": "now?"})
    assert answer.status_code == 200


async def test_workers_reconnect_to_a_restarted_front(make_cluster):
    cluster = make_cluster()
    await start(cluster, workers=("worker1",))
    cluster.signal("front", signal.SIGKILL)
    cluster.wait_exit("front")
    cluster.start_front()
    await cluster.wait_ready(1)  # the worker said hello again, unasked
    answer = httpx.post(cluster.url + "/v1/completions", headers=cluster.headers(),
                        json={"model": MODEL, "prompt": "again"})
    assert answer.status_code == 200


async def test_a_client_that_leaves_aborts_its_job_on_the_worker(make_cluster):
    cluster = make_cluster(MOCK_TOKEN_S="0.05")
    await start(cluster, workers=("worker1",))
    async with httpx.AsyncClient(timeout=30, headers=cluster.headers()) as http:
        with trio.move_on_after(1):  # leave after a second of a ~25 s reply
            async with http.stream("POST", cluster.url + "/v1/completions", json={
                    "model": MODEL, "prompt": "word " * 500, "max_tokens": 1000,
                    "stream": True}) as r:
                async for _ in r.aiter_bytes():
                    pass
    health = await cluster.wait_for(
        lambda h: h["workers"][0]["engine_active"] == 0 and h["workers"][0]["jobs_in_flight"] == 0,
        "the worker stops spending on it", timeout_s=10)
    assert health["workers"][0]["state"] == "ready"
    stats = httpx.get(cluster.url + "/stats", headers=cluster.headers()).json()
    assert stats["aborts"] == 1


async def test_a_full_queue_answers_429_with_retry_after(make_cluster):
    cluster = make_cluster(COHORT_MAX_QUEUE="5", COHORT_MAX_CONCURRENT_BATCHES="1",
                           COHORT_MAX_BATCH_SIZE="1", MOCK_TOKEN_S="0.05")
    await start(cluster, workers=("worker1",))
    results = await post_all(cluster, 30, max_tokens=5)
    codes = [status for status, _ in results]
    assert 429 in codes and 200 in codes and set(codes) == {200, 429}
    refused = next(text for status, text in results if status == 429)
    assert "COHORT_MAX_QUEUE" in refused


async def test_one_supervisor_keeps_one_engine_host_per_gpu(make_cluster):
    """`--gpus 0,1`: two hosts, each a worker of its own, each restarted alone when it dies."""
    cluster = make_cluster(COHORT_RESTART_BACKOFF_S="0.1")
    cluster.start_front()
    machine = cluster._spawn("machine", "python -m worker --worker-id box --gpus 0,1")
    cluster.api_key = cluster.add_user("ops")
    health = await cluster.wait_ready(2)
    assert sorted(w["id"] for w in health["workers"]) == ["box-gpu0", "box-gpu1"]
    first = engine_host(machine.pid, "box-gpu1")
    with open(f"/proc/{first}/environ", "rb") as environ:
        assert b"CUDA_VISIBLE_DEVICES=1" in environ.read().split(b"\0")
    os.kill(first, signal.SIGKILL)
    await cluster.wait_for(lambda h: any(w["id"] == "box-gpu1" and w["state"] == "restarting"
                                         for w in h["workers"]), "box-gpu1 gone", 10)
    results = await post_all(cluster, 10)  # box-gpu0 serves on meanwhile
    assert [status for status, _ in results] == [200] * 10
    await cluster.wait_ready(2)
    assert engine_host(machine.pid, "box-gpu1") != first
    assert engine_host(machine.pid, "box-gpu0")


def test_a_setting_its_engine_does_not_read_stops_the_worker_at_start(make_cluster):
    """As honcho starts it: a mock's cost on a vLLM worker would change nothing, so it stops at
    once, with the configuration error's status (its supervisor does not restart it)."""
    cluster = make_cluster(COHORT_ENGINE="vllm", MOCK_TOKEN_S="0.01")
    cluster.start_worker("worker1")
    assert cluster.wait_exit("worker1") == 2
    assert "MOCK_TOKEN_S: not read by engine vllm" in cluster.log("worker1")
