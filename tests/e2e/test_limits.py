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
