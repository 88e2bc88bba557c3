"""A store that goes away for a while costs the front its durable bookkeeping for that while,
not its life: the lease and housekeeping rounds fail, say so, and resume when the store is back."""

import re

import httpx
import trio

BODY = {"model": "cohort-mock", "prompt": "still there?", "max_tokens": 4}


async def wait_in_log(cluster, text: str, timeout_s: float = 30) -> None:
    with trio.fail_after(timeout_s):
        while text not in cluster.log("front"):
            assert cluster.procs["front"].poll() is None, cluster.log("front")[-3000:]
            await trio.sleep(0.1)


async def failing_rounds(http: httpx.AsyncClient, what: str) -> float:
    """A store round's failures in a row, as `/metrics` exports them (the dashboard, the alert)."""
    metrics = (await http.get("/metrics")).text
    found = re.search(rf'^cohort_store_round_failure_streak\{{what="{what}"\}} (\S+)$', metrics,
                      re.MULTILINE)
    assert found, metrics
    return float(found.group(1))


async def test_the_front_serves_through_a_postgresql_outage_and_its_lease_rounds_resume(
        make_cluster, tmp_path):
    import pgserver

    data = tmp_path / "pg"
    server = pgserver.get_server(data, cleanup_mode="stop")
    try:
        cluster = make_cluster(DATABASE_URL=server.get_uri(), COHORT_TASK_LEASE_S="1.5",
                               COHORT_AUTH_CACHE_S="600")
        cluster.start_front()
        cluster.start_worker("worker1")
        cluster.api_key = cluster.add_user("ops")
        await cluster.wait_ready(1)
        async with httpx.AsyncClient(base_url=cluster.url, headers=cluster.headers(),
                                     timeout=30) as http:
            assert (await http.post("/v1/completions", json=BODY)).status_code == 200

            server.cleanup()  # PostgreSQL stops
            await wait_in_log(cluster, "renewing task leases failed")
            answer = await http.post("/v1/completions", json=BODY)  # the key is in the cache
            assert answer.status_code == 200, answer.text
            assert await failing_rounds(http, "task_leases") >= 1

            server = pgserver.get_server(data, cleanup_mode="stop")  # and comes back
            await wait_in_log(cluster, "renewing task leases works again")
            assert cluster.procs["front"].poll() is None
            assert await failing_rounds(http, "task_leases") == 0
            task = (await http.post("/inference/async", json=BODY)).json()
            with trio.fail_after(30):
                while (await http.get(f"/tasks/{task['id']}")).json()["status"] != "completed":
                    await trio.sleep(0.1)
    finally:
        server.cleanup()
