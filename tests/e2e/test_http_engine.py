"""The http engine: Cohort in front of another OpenAI-compatible server."""

import httpx
import openai

from harness.cluster import free_port

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


async def start(cluster):
    cluster.start_front()
    cluster.start_worker("worker1")
    cluster.api_key = cluster.add_user("alice")
    return await cluster.wait_ready(1)


async def test_a_down_upstream_is_a_clear_503(make_cluster):
    cluster = make_cluster(COHORT_ENGINE="http", REAL_VLLM_URL=f"http://127.0.0.1:{free_port()}",
                           REAL_VLLM_MODEL="upstream-model")
    await start(cluster)
    answer = httpx.post(cluster.url + "/v1/chat/completions", headers=cluster.headers(),
                        json={"model": "upstream-model", "messages": QUESTION})
    assert answer.status_code == 503
    assert answer.json()["error"]["code"] == "upstream_unavailable"
    assert "unreachable" in answer.json()["error"]["message"]


async def test_the_mock_fallback_says_so_in_every_reply_and_in_health(make_cluster):
    cluster = make_cluster(COHORT_ENGINE="http", REAL_VLLM_URL=f"http://127.0.0.1:{free_port()}",
                           REAL_VLLM_MODEL="upstream-model", COHORT_UPSTREAM_FALLBACK_TO_MOCK="1")
    health = await start(cluster)
    assert "mock fallback" in health["workers"][0]["engine"] and "mock fallback" in health["mode"]
    reply = openai.OpenAI(base_url=cluster.url + "/v1", api_key=cluster.api_key).chat.completions.create(
        model="upstream-model", messages=QUESTION, n=2)
    for choice in reply.choices:
        assert choice.message.content.startswith("[upstream unavailable: mock fallback] ")

# The http engine in front of a real `vllm serve`: tests/e2e/test_parity.py, which starts one.
