"""The real engine: front + two vLLM workers on SmolLM2 (CPU here), and the http engine in front of
`vllm serve`. Marked `vllm`: skipped with install steps where vLLM is absent, required in CI."""

import json
import os
import secrets
import signal
import time

import httpx
import openai
import pytest
import trio

from harness.cluster import Cluster, alive, descendants, engine_core
from harness.otlp import OtlpReceiver
from tests.e2e.deadline import deadline
from worker.models import default_model_path

pytestmark = pytest.mark.vllm
MODEL_PATH = os.environ.get("COHORT_MODEL") or default_model_path()
MODEL = os.path.basename(MODEL_PATH.rstrip("/"))
# Under pytest's `timeout` (300 s), which also counts the first test's setup: a wait it cuts
# short inside trio.run leaves the run behind. Two engines load in about 50 s on 2 CPU cores.
LOAD_TIMEOUT_S = 240
TEST_DEADLINE_S = 200  # each async test's, inside its trio run
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    receiver = OtlpReceiver()  # traced, as an operator with a collector runs it
    cluster = Cluster(tmp_path_factory.mktemp("vllm"), COHORT_ENGINE="vllm",
                      COHORT_MODEL=MODEL_PATH, COHORT_WORKER_TIMEOUT_S="10",
                      COHORT_OTLP_ENDPOINT=receiver.endpoint, OTEL_BSP_SCHEDULE_DELAY="100")
    cluster.otlp = receiver
    cluster.start_front()
    cluster.start_worker("worker1", VLLM_CPU_OMP_THREADS_BIND="0")
    cluster.start_worker("worker2", VLLM_CPU_OMP_THREADS_BIND="1")
    try:
        cluster.api_key = cluster.add_user("alice")
        health = trio.run(cluster.wait_workers_ready, ["worker1", "worker2"], LOAD_TIMEOUT_S)
        cluster.load_times = [w["load_time_s"] for w in health["workers"]]
        yield cluster
    finally:
        cluster.stop()
        receiver.close()


def client(cluster):
    return openai.OpenAI(base_url=cluster.url + "/v1", api_key=cluster.api_key, max_retries=0,
                         timeout=120)


def prompt_tokens(messages) -> int:
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(MODEL_PATH)
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return len(tokenizer.encode(text, add_special_tokens=False))


def test_two_real_workers_register_with_their_load_time(real):
    health = httpx.get(real.url + "/health", headers=real.headers()).json()
    assert health["mode"] == "vllm"
    assert sorted(w["id"] for w in health["workers"]) == ["worker1", "worker2"]
    assert all(w["load_time_s"] > 0 and w["model"] == MODEL for w in health["workers"])
    assert [m.id for m in client(real).models.list()] == [MODEL]


def test_chat_is_coherent_with_exact_usage(real):
    reply = client(real).chat.completions.create(model=MODEL, messages=QUESTION, temperature=0,
                                                 max_tokens=40)
    text = reply.choices[0].message.content
    assert "Paris" in text
    assert reply.usage.prompt_tokens == prompt_tokens(QUESTION)
    assert 0 < reply.usage.completion_tokens <= 40
    cut = client(real).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Write a long story about a dragon."}],
        max_tokens=8, temperature=0)
    assert cut.choices[0].finish_reason == "length" and cut.usage.completion_tokens == 8


def test_streamed_chat_and_completion_are_coherent(real):
    chunks = list(client(real).chat.completions.create(
        model=MODEL, messages=QUESTION, temperature=0, max_tokens=40, stream=True,
        stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "Paris" in text and len(chunks) > 3  # it really streamed
    assert chunks[-1].usage.prompt_tokens == prompt_tokens(QUESTION)
    completion = client(real).completions.create(model=MODEL, prompt="The capital of France is",
                                                 max_tokens=5, temperature=0)
    assert completion.choices[0].text.strip() and completion.usage.completion_tokens <= 5


@deadline(TEST_DEADLINE_S)
async def test_concurrent_requests_spread_by_the_engines_own_load(real):
    seen: list[dict] = []
    async with httpx.AsyncClient(timeout=300, headers=real.headers()) as http:
        answers = []

        async def one(i):
            r = await http.post(real.url + "/v1/completions", json={
                # long enough that the 50 ms polls below see the engines mid-run (6 tokens
                # could end between two polls, and then no report showed a KV cache in use)
                "model": MODEL, "prompt": f"{i} plus {i} equals", "max_tokens": 24,
                "temperature": 0})
            answers.append(r)

        async def watch():
            while True:  # what vLLM's scheduler statistics say while the requests run
                seen.extend((await http.get(real.url + "/health")).json()["workers"])
                await trio.sleep(0.05)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch)
            async with trio.open_nursery() as requests:
                for i in range(16):
                    requests.start_soon(one, i)
            nursery.cancel_scope.cancel()
        stats = (await http.get(real.url + "/stats")).json()
    assert all(a.status_code == 200 and a.json()["choices"][0]["text"] for a in answers)
    assert all(w["jobs_done"] > 0 for w in stats["workers"])
    assert stats["queue"]["mean_wait_s"] < 0.05  # both engines had room: nothing waited a window
    assert max(w["running"] + w["waiting"] for w in seen) > 1
    assert max(w["kv_usage"] for w in seen) > 0
    # the limits come from vLLM's own scheduler config, not from our settings
    assert all(w["max_num_seqs"] > 0 and w["max_num_batched_tokens"] > 0 for w in seen)


def test_structured_output_and_sampling_extras_reach_vllm(real):
    schema = {"type": "object", "required": ["name", "age"], "additionalProperties": False,
              "properties": {"name": {"type": "string", "maxLength": 20},
                             "age": {"type": "integer", "minimum": 0, "maximum": 120}}}
    reply = client(real).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Describe a person as JSON."}],
        max_tokens=60, temperature=0, extra_body={"top_k": 5, "min_p": 0.05, "min_tokens": 2},
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema}})
    value = json.loads(reply.choices[0].message.content)  # vLLM's grammar made it valid JSON
    assert set(value) == {"name", "age"} and isinstance(value["age"], int)
    scored = client(real).chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=3,
                                                  logprobs=True, top_logprobs=2, temperature=0)
    entries = scored.choices[0].logprobs.content
    assert len(entries) == 3 and all(len(e.top_logprobs) == 2 and e.logprob <= 0 for e in entries)
    with pytest.raises(openai.BadRequestError) as refused:  # vLLM's own check, as a 400
        client(real).completions.create(model=MODEL, prompt="x", max_tokens=2,
                                        extra_body={"logit_bias": {"99999999": 5}})


@deadline(TEST_DEADLINE_S)
async def test_the_prefix_cache_and_what_it_holds_reach_the_front(real):
    """vLLM's KV events, joined in the worker with each prompt's tokens, tell the front which
    prefixes each engine holds; the front places the same prefix where it is held."""
    prompt = "The history of the city of Paris is long. " * 40  # ~400 tokens: whole blocks
    async with httpx.AsyncClient(timeout=120, headers=real.headers()) as http:
        async def done() -> dict[str, int]:
            workers = (await http.get(real.url + "/health")).json()["workers"]
            return {w["id"]: w["jobs_done"] for w in workers}

        before = await done()
        for _ in range(3):
            r = await http.post(real.url + "/v1/completions", json={
                "model": MODEL, "prompt": prompt, "max_tokens": 2, "temperature": 0})
            assert r.status_code == 200
        after = await done()
        assert sorted(after[w] - before[w] for w in after) == [0, 3]  # one engine: the holder
        with trio.fail_after(10):  # the next heartbeat carries them
            while True:
                workers = (await http.get(real.url + "/health")).json()["workers"]
                if any(w["prefix_hit_rate"] > 0 for w in workers) and \
                        any(w["prefixes_held"] > 0 for w in workers):
                    break
                await trio.sleep(0.1)
        assert {w["prefixes"] for w in workers} == {"reported"}


@deadline(TEST_DEADLINE_S)
async def test_vllms_own_request_span_joins_the_clients_trace(real):
    trace_id, client_span = secrets.token_hex(16), secrets.token_hex(8)
    async with httpx.AsyncClient(timeout=120, headers=real.headers()) as http:
        r = await http.post(real.url + "/v1/chat/completions", json={
            "model": MODEL, "messages": QUESTION, "max_tokens": 4},
            headers={"traceparent": f"00-{trace_id}-{client_span}-01"})
        assert r.status_code == 200
    wanted = {"POST /v1/chat/completions", "worker", "engine", "llm_request"}
    with trio.fail_after(20):  # three processes export on their own schedules: wait for all
        while not wanted <= {span.name for span in real.otlp.of_trace(trace_id)}:
            await trio.sleep(0.1)
    spans = {span.name: span for span in real.otlp.of_trace(trace_id)}
    assert spans["POST /v1/chat/completions"].parent_id == client_span
    assert spans["engine"].parent_id == spans["worker"].span_id
    vllm_span = spans["llm_request"]  # vLLM's, with its own timings, under the worker's
    assert vllm_span.parent_id == spans["engine"].span_id
    assert 1 <= vllm_span.attributes["gen_ai.usage.completion_tokens"] <= 4
    assert vllm_span.attributes["gen_ai.latency.time_to_first_token"] > 0


@deadline(TEST_DEADLINE_S)
async def test_an_abort_reaches_vllm(real):
    async with httpx.AsyncClient(timeout=120, headers=real.headers()) as http:
        with trio.move_on_after(60):
            async with http.stream("POST", real.url + "/v1/chat/completions", json={
                    "model": MODEL, "stream": True, "max_tokens": 1500, "temperature": 1.0,
                    "messages": [{"role": "user", "content": "Tell a very long story."}]}) as r:
                seen = 0
                async for _ in r.aiter_lines():
                    seen += 1
                    if seen > 5:
                        break
        # vLLM's own count of unfinished requests (sent in heartbeats) drops back to zero long
        # before 1500 tokens could have been generated on this CPU
        with trio.fail_after(20):
            while True:
                health = (await http.get(real.url + "/health")).json()
                if all(w["engine_active"] == 0 and w["jobs_in_flight"] == 0 for w in health["workers"]):
                    break
                await trio.sleep(0.1)
        stats = (await http.get(real.url + "/stats")).json()
    assert stats["aborts"] >= 1


@deadline(TEST_DEADLINE_S)
async def test_a_dead_engine_core_is_noticed_its_requests_rerun_and_the_worker_restarted(real):
    """SIGKILL of vLLM's EngineCore: the host notices (vLLM's EngineDeadError), says bye, the
    front re-runs what it had on the other worker, and the supervisor starts a fresh host."""
    core = engine_core(real.procs["worker1"].pid)
    body = {"model": MODEL, "messages": QUESTION, "max_tokens": 8, "temperature": 0}
    async with httpx.AsyncClient(timeout=120, headers=real.headers()) as http:
        answers = []

        async def ask():
            answers.append((await http.post(real.url + "/v1/chat/completions", json=body)).status_code)

        async with trio.open_nursery() as nursery:
            for _ in range(6):
                nursery.start_soon(ask)
            await trio.sleep(0)
            os.kill(core, signal.SIGKILL)
        assert answers == [200] * 6  # none lost to the dead engine
        gone = await real.wait_for(lambda h: any(w["id"] == "worker1" and w["state"] != "ready"
                                                 for w in h["workers"]), "worker1 out", 30)
        assert "EngineCore is gone" in str(gone) or "engine host" in str(gone)
        after = [(await http.post(real.url + "/v1/chat/completions", json=body)).status_code
                 for _ in range(4)]  # while worker1 restarts: all to worker2
        assert after == [200] * 4
    # back within its load time plus 10 s (and the supervisor's first wait, 1 s)
    await real.wait_ready(2, max(real.load_times) + 11)
    assert "engine died" in real.log("worker1")


def test_stopping_a_worker_leaves_no_engine_process(real):
    """honcho stops a line with SIGTERM to its process group; vLLM's processes must go with it."""
    proc = real.procs["worker2"]
    engine_processes = descendants(proc.pid)
    assert len(engine_processes) >= 2  # python -m worker, vLLM's EngineCore and its workers
    real.signal("worker2", signal.SIGTERM)
    proc.wait(60)
    until = time.monotonic() + 30  # grandchildren cannot be waited on: bounded polling
    while any(alive(pid) for pid in engine_processes) and time.monotonic() < until:
        time.sleep(0.2)
    assert not [pid for pid in engine_processes if alive(pid)]
    assert "said bye" in real.log("front")
