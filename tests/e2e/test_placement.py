"""Placement by what the engines' caches hold, through real processes: two mock workers whose
caches report every block stored and evicted, and a front that places by those reports.

The invariant: once traffic settles, the front counts for each worker exactly the prefixes its
engine says it holds, evictions included, and a prompt goes where its prefix is."""

import httpx
import trio

from tests.e2e.deadline import deadline

MODEL = "cohort-mock"
# 40 blocks of 16 tokens per engine: a prompt below is 25 blocks, so each evicts the one before
SMALL_CACHE = {"MOCK_PREFIX_CACHE_TOKENS": "640", "MOCK_TOKEN_S": "0", "MOCK_TTFT_S": "0",
               "MOCK_PREFILL_TOKEN_S": "0"}


def prompt(topic: str) -> str:
    """About 3,600 characters and 401 words (tokens, to the mock), its own from the first."""
    return f"{topic}: " + " ".join(f"{topic}{i}" for i in range(400))


async def workers(cluster, http: httpx.AsyncClient) -> dict[str, dict]:
    body = (await http.get(cluster.url + "/health")).json()
    return {w["id"]: w for w in body["workers"]}


async def settled(cluster, http: httpx.AsyncClient) -> dict[str, dict]:
    """/health's workers once each one's reports have reached the front (heartbeats, 1 s):
    the front counts what the engine holds."""
    with trio.fail_after(10):
        while True:
            seen = await workers(cluster, http)
            if all(w["prefixes_counted"] == w["prefixes_held"] for w in seen.values()):
                return seen
            await trio.sleep(0.1)


async def complete(cluster, http: httpx.AsyncClient, text: str) -> str:
    """One completion; the worker that ran it (its jobs_done went up)."""
    before = await workers(cluster, http)
    r = await http.post(cluster.url + "/v1/completions",
                        json={"model": MODEL, "prompt": text, "max_tokens": 2})
    assert r.status_code == 200, r.text
    after = await workers(cluster, http)
    [ran] = [name for name in after if after[name]["jobs_done"] > before[name]["jobs_done"]]
    return ran


@deadline(90)
async def test_the_front_counts_what_each_engine_holds_and_places_by_it(make_cluster):
    cluster = make_cluster(**SMALL_CACHE)
    cluster.start_front()
    cluster.start_worker("worker1")
    cluster.start_worker("worker2")
    cluster.api_key = cluster.add_user("alice")
    await cluster.wait_workers_ready(["worker1", "worker2"], 60)
    async with httpx.AsyncClient(timeout=30, headers=cluster.headers()) as http:
        assert {w["prefixes"] for w in (await workers(cluster, http)).values()} == {"reported"}
        first = await complete(cluster, http, prompt("alpha"))
        held = await settled(cluster, http)
        assert held[first]["prefixes_held"] > 0  # the engine said so, and the front counts it
        for question in ("why", "how", "when"):  # the prefix goes back where it is held
            assert await complete(cluster, http, prompt("alpha") + question) == first
        # Six other prompts, three a worker: a cache holds one and a half prompts, so each
        # evicts what came before, and the front hears of every eviction.
        per_prompt = len(prompt("alpha")) // 256  # fingerprints, every one held once prefilled
        for topic in ("beta", "gamma", "delta", "epsilon", "zeta", "eta"):
            await complete(cluster, http, prompt(topic))
        after = await settled(cluster, http)
        assert all(0 < w["prefixes_held"] <= 2 * per_prompt for w in after.values()), after
        assert sum(w["jobs_done"] for w in after.values()) == 10
