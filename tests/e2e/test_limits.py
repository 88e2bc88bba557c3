"""Limits set with `python -m server.users limit`, through a real front: OpenAI's 429 codes,
Retry-After and x-ratelimit headers, per user and per key."""

import httpx
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
