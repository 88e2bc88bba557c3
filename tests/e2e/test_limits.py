"""Limits set with `python -m server.users limit`, through a real front: OpenAI's 429 codes,
Retry-After and x-ratelimit headers, per user and per key; on async tasks and batches; and one
limit held by two fronts on one store."""

import math

import httpx
import pytest
import trio


MODEL = "cohort-mock"
BODY = {"model": MODEL, "prompt": "count me", "max_tokens": 4}


async def test_requests_per_minute_per_key_with_openais_headers_and_codes(make_cluster):
    cluster = make_cluster()
    cluster.start_front()
    cluster.start_worker("worker1")
    limited = cluster.add_user("alice")
    cluster.users("key", "alice", "--name", "ci")  # a second key of alice's: limited alone
    ci_key = cluster.users("key", "alice", "--name", "ci2")
    cluster.users("limit", "alice", "--key", "ci2", "--rpm", "2")
    cluster.api_key = limited
    await cluster.wait_ready(1)
    async with httpx.AsyncClient(timeout=30) as http:
        answers = [await http.post(cluster.url + "/v1/completions", json=BODY,
                                   headers=cluster.headers(ci_key)) for _ in range(3)]
        other = await http.post(cluster.url + "/v1/completions", json=BODY,
                                headers=cluster.headers(limited))
    assert [a.status_code for a in answers] == [200, 200, 429]
    assert answers[0].headers["x-ratelimit-limit-requests"] == "2"
    assert answers[1].headers["x-ratelimit-remaining-requests"] == "0"
    refused = answers[2]
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert int(refused.headers["Retry-After"]) >= 1 and "x-ratelimit-reset-requests" in refused.headers
    assert other.status_code == 200 and "x-ratelimit-limit-requests" not in other.headers


async def test_a_daily_token_quota_is_insufficient_quota(make_cluster):
    cluster = make_cluster()
    cluster.start_front()
    cluster.start_worker("worker1")
    cluster.api_key = cluster.add_user("bob")
    cluster.users("limit", "bob", "--tokens-per-day", "30")
    await cluster.wait_ready(1)
    async with httpx.AsyncClient(timeout=30, headers=cluster.headers()) as http:
        statuses = []
        for _ in range(6):
            answer = await http.post(cluster.url + "/v1/completions", json=BODY)
            statuses.append(answer.status_code)
            if answer.status_code == 429:
                assert answer.json()["error"]["code"] == "insufficient_quota"
                assert answer.headers["x-should-retry"] == "false"  # the openai client gives up
                break
    assert statuses[0] == 200 and statuses[-1] == 429
    listed = cluster.users("limits")
    assert "bob" in listed and "tokens_per_day=30" in listed


async def test_every_finished_request_lands_in_the_usage_ledger(make_cluster):
    cluster = make_cluster()
    cluster.start_front()
    cluster.start_worker("worker1")
    cluster.api_key = cluster.add_user("carol")
    other = cluster.add_user("dave")
    await cluster.wait_ready(1)
    async with httpx.AsyncClient(timeout=30, headers=cluster.headers()) as http:
        for stream in (False, False, True):
            answer = await http.post(cluster.url + "/v1/completions", json={**BODY, "stream": stream})
            assert answer.status_code == 200
        await http.post(cluster.url + "/v1/completions", json=BODY, headers=cluster.headers(other))
        with trio.fail_after(10):  # the ledger is written in batches, about once a second
            while (usage := (await http.get(cluster.url + "/v1/usage", params={
                    "group_by": "model"})).json())["requests"] < 3:
                await trio.sleep(0.1)
        bad = await http.get(cluster.url + "/v1/usage", params={"group_by": "color"})
    assert usage["requests"] == 3  # carol's own, not dave's
    assert usage["prompt_tokens"] > 0 and usage["completion_tokens"] == 3 * 4
    assert usage["buckets"] == [{"model": MODEL, "requests": 3,
                                 "prompt_tokens": usage["prompt_tokens"],
                                 "completion_tokens": 12}]
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "group_by"


async def test_async_tasks_and_batches_count_against_the_rate_all_or_none(make_cluster):
    cluster = make_cluster()
    cluster.start_front()
    cluster.start_worker("worker1")
    cluster.api_key = cluster.add_user("erin")
    cluster.users("limit", "erin", "--rpm", "3", "--concurrency", "1")
    await cluster.wait_ready(1)
    async with httpx.AsyncClient(timeout=30, headers=cluster.headers()) as http:
        one = await http.post(cluster.url + "/inference/async", json=BODY)
        three = await http.post(cluster.url + "/inference/batch", json={
            "model": MODEL, "max_tokens": 4, "prompts": ["a", "b", "c"], "wait": False})
        stored = (await http.get(cluster.url + "/tasks")).json()["total"]
        two = await http.post(cluster.url + "/inference/batch", json={
            "model": MODEL, "max_tokens": 4, "prompts": ["a", "b"], "wait": False})
        waited = await http.post(cluster.url + "/inference/batch", json={
            "model": MODEL, "max_tokens": 4, "prompts": ["a"]})
        plain = await http.post(cluster.url + "/v1/completions", json=BODY)
    # concurrency 1 did not refuse the batch of two: stored tasks hold no slot
    assert one.status_code == 202 and one.headers["x-ratelimit-remaining-requests"] == "2"
    assert three.status_code == 429 and three.json()["error"]["code"] == "rate_limit_exceeded"
    assert "this batch counts 3" in three.json()["error"]["message"]
    assert int(three.headers["Retry-After"]) >= 1
    assert stored == 1  # the refused batch stored nothing
    assert two.status_code == 202 and two.headers["x-ratelimit-remaining-requests"] == "0"
    assert waited.status_code == 429 and plain.status_code == 429


async def test_a_task_gives_back_the_tokens_it_did_not_use(make_cluster):
    cluster = make_cluster()
    cluster.start_front()
    cluster.start_worker("worker1")
    cluster.api_key = cluster.add_user("frank")
    cluster.users("limit", "frank", "--tokens-per-day", "300")
    await cluster.wait_ready(1)
    long = {**BODY, "max_tokens": 200}  # costs 202 up front; the mock's echo uses a few
    async with httpx.AsyncClient(timeout=30, headers=cluster.headers()) as http:
        both = await http.post(cluster.url + "/inference/batch", json={
            "requests": [long, long], "wait": False})
        waited = await http.post(cluster.url + "/inference/batch", json={"requests": [long]})
        first = await http.post(cluster.url + "/inference/async", json=long)
        with trio.fail_after(30):
            while (task := (await http.get(cluster.url + "/tasks/" + first.json()["id"])).json())[
                    "status"] in ("queued", "running"):
                await trio.sleep(0.05)
        second = await http.post(cluster.url + "/inference/async", json=long)
    assert both.status_code == 429 and both.json()["error"]["code"] == "insufficient_quota"
    assert waited.status_code == 200 and waited.json()["data"][0]["status"] == "completed"
    assert first.status_code == 202 and task["status"] == "completed"
    assert second.status_code == 202  # 202 + 202 > 300: it fits only with the first's refund


async def health_syncs(http: httpx.AsyncClient, url: str) -> int:
    return (await http.get(url + "/health")).json()["limit_sync"]["syncs"]


async def synced(http: httpx.AsyncClient, *urls: str) -> None:
    """Wait until each front in turn has run two whole syncs from now: what the one before it
    wrote is then read by it (a signal, not a guess at the time it takes)."""
    for url in urls:
        start = await health_syncs(http, url)
        with trio.fail_after(30):
            while await health_syncs(http, url) < start + 2:
                await trio.sleep(0.02)


@pytest.mark.parametrize("store", ["sqlite", "postgres"])
async def test_a_keys_rate_holds_across_two_fronts_on_one_store(make_cluster, store, request):
    """A key with rpm N gets N requests through the two fronts together, plus what refills
    while the test runs (N/60 a second); each phase waits for the sync, so the overshoot a
    sync window allows ((N-1) x what was left, for N fronts) does not arise here."""
    rpm = 12
    env = {"COHORT_LIMIT_SYNC_S": "0.1"}
    if store == "postgres":
        env["DATABASE_URL"] = request.getfixturevalue("database_url_postgres")
    cluster = make_cluster(**env)
    cluster.start_front()
    url_a, url_b = cluster.url, cluster.start_second_front()
    cluster.start_worker("worker1")
    cluster.api_key = cluster.add_user("alice")
    limited = cluster.users("key", "alice", "--name", "ci")
    cluster.users("limit", "alice", "--key", "ci", "--rpm", str(rpm))
    await cluster.wait_ready(1)
    async with httpx.AsyncClient(timeout=30, headers=cluster.headers()) as http:
        with trio.fail_after(60):
            while (await http.get(url_b + "/ready")).status_code != 200:
                await trio.sleep(0.05)
        started = trio.current_time()

        async def complete(url: str) -> httpx.Response:
            return await http.post(url + "/v1/completions", json=BODY,
                                   headers=cluster.headers(limited))

        through = 0
        for url in (url_a, url_b):  # each front begins to count the key
            assert (await complete(url)).status_code == 200
            through += 1
        await synced(http, url_a, url_b, url_a)
        while (await complete(url_a)).status_code == 200:  # A takes what is left
            through += 1
            assert through <= 2 * rpm, "front A never refused: the fronts do not share counts"
        await synced(http, url_a, url_b)
        on_b = [await complete(url_b) for _ in range(3)]
        refill = math.floor((trio.current_time() - started) * rpm / 60)
    assert rpm <= through <= rpm + refill, (through, refill)
    assert [answer.status_code for answer in on_b] == [429] * 3
    assert on_b[0].json()["error"]["code"] == "rate_limit_exceeded"
    assert on_b[0].headers["x-ratelimit-remaining-requests"] == "0"
