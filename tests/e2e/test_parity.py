"""Parity with `vllm serve`: the same requests to vLLM's own server and to Cohort with a vLLM worker,
on the same SmolLM2 folder, with the same tool parser, at temperature 0. Every answer must match
field for field (ids and timestamps aside, floats within a tolerance), streams event for event,
and where vLLM refuses a request, Cohort refuses it too."""

import json
import os

import httpx
import openai
import pytest
import trio

from harness.cluster import Cluster
from tests.e2e.vllm_serve import VllmServe
from worker.models import default_model_path

pytestmark = pytest.mark.vllm
MODEL_PATH = os.environ.get("COHORT_MODEL") or default_model_path()
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
HELLO = [{"role": "user", "content": "Say hello in one short sentence."}]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}
PERSON = {"type": "object", "required": ["name", "age"], "properties": {
    "name": {"type": "string"}, "age": {"type": "integer"}}}
HISTORY = ASK + [
    {"role": "assistant", "content": "", "tool_calls": [{"id": "call1", "type": "function",
     "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
    {"role": "tool", "tool_call_id": "call1", "content": "Sunny, 21 C"}]


def chat(**body):
    return "/v1/chat/completions", {"model": "smol", "temperature": 0, "max_tokens": 12, **body}


def completion(**body):
    return "/v1/completions", {"model": "smol", "temperature": 0, "max_tokens": 8, **body}


REQUESTS = {
    "chat": chat(messages=HELLO),
    "chat stream": chat(messages=HELLO, stream=True),
    "chat stream usage": chat(messages=HELLO, stream=True, stream_options={"include_usage": True}),
    "chat continuous usage": chat(messages=HELLO, stream=True, stream_options={
        "include_usage": True, "continuous_usage_stats": True}),
    "chat logprobs": chat(messages=HELLO, logprobs=True, top_logprobs=2, max_tokens=4),
    "chat logprobs stream": chat(messages=HELLO, logprobs=True, top_logprobs=2, max_tokens=4,
                                 stream=True),
    "chat n=2": chat(messages=HELLO, n=2, max_tokens=6),
    "json_object": chat(messages=HELLO, response_format={"type": "json_object"}, max_tokens=20),
    "json_schema": chat(messages=[{"role": "user", "content": "Describe a person as JSON."}],
                        max_tokens=40, response_format={"type": "json_schema", "json_schema": {
                            "name": "person", "schema": PERSON}}),
    "tools required": chat(messages=ASK, tools=[WEATHER], tool_choice="required", max_tokens=60),
    "tools named stream": chat(messages=ASK, tools=[WEATHER], stream=True, max_tokens=60,
                               tool_choice={"type": "function", "function": {"name": "get_weather"}}),
    "tools auto": chat(messages=ASK, tools=[WEATHER], tool_choice="auto", max_tokens=20),
    "tools none": chat(messages=ASK, tools=[WEATHER], tool_choice="none"),
    "tool history": chat(messages=HISTORY, tools=[WEATHER]),
    "logit_bias": chat(messages=HELLO, logit_bias={"28": -100}),
    "min_tokens, stop_token_ids": chat(messages=HELLO, min_tokens=5, stop_token_ids=[2]),
    "ignore_eos": chat(messages=HELLO, ignore_eos=True, max_tokens=10),
    "top_k, min_p, repetition_penalty": chat(messages=HELLO, top_k=5, min_p=0.1,
                                             repetition_penalty=1.2),
    "stop string stream": chat(messages=HELLO, stop=[" glad"], stream=True),
    "skip_special_tokens false": chat(messages=HELLO, skip_special_tokens=False),
    "completion": completion(prompt="The capital of France is"),
    "completion stream usage": completion(prompt="The capital of France is", stream=True,
                                          stream_options={"include_usage": True}),
    "completion logprobs echo": completion(prompt="The capital of France is", logprobs=2,
                                           echo=True, max_tokens=3),
    "prompts": completion(prompt=["The capital of France is", "Two plus two is"], n=2),
    "prompts stream": completion(prompt=["The capital of France is", "Zero is"], stream=True),
    "token prompts": completion(prompt=[[1, 2, 3], [4, 5]]),
    "suffix (vLLM refuses)": completion(prompt="x", suffix="y"),
    "too long (both refuse)": chat(messages=[{"role": "user", "content": "word " * 3000}]),
    "tokenize": ("/tokenize", {"model": "smol", "prompt": "Hello world"}),
    "tokenize chat": ("/tokenize", {"model": "smol", "messages": HELLO, "return_token_strs": True}),
    "detokenize": ("/detokenize", {"model": "smol", "tokens": [19556, 905]}),
}
VARYING = {"id", "created"}  # per request in vLLM too
TOLERANCE = 1e-3  # logprobs: the same forward pass, but batches may differ in shape
# Under pytest's `timeout` (300 s), which also counts the first test's setup: a wait it cuts
# short inside trio.run leaves the run behind. The three engines load in about 100 s on 2 cores.
LOAD_TIMEOUT_S = 240


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """`vllm serve` and Cohort (front + one vLLM worker, and an embedding worker), loading side by
    side: three engines, so each takes a fifth of the memory (vLLM reserves its KV cache at start).
    Yielded once both serve and both workers are ready; a load that fails ends it at once."""
    serve = VllmServe(tmp_path_factory.mktemp("serve"), MODEL_PATH, "--served-model-name", "smol",
                      "--enable-auto-tool-choice", "--tool-call-parser", "hermes").start()
    cohort = Cluster(tmp_path_factory.mktemp("cohort"), COHORT_ENGINE="vllm",
                     COHORT_MODEL=MODEL_PATH, COHORT_SERVED_MODEL_NAME="smol",
                     COHORT_TOOL_CALL_PARSER="hermes", COHORT_ENABLE_AUTO_TOOL_CHOICE="1",
                     COHORT_WORKER_TIMEOUT_S="10", COHORT_GPU_MEMORY_UTILIZATION="0.2")
    cohort.start_front()
    cohort.start_worker("worker1")
    # and an embedding model: SmolLM2 through vLLM's conversion, as `--runner pooling --convert
    # embed` makes it, under a name of its own
    cohort.start_worker("embedder", COHORT_RUNNER="pooling", COHORT_CONVERT="embed",
                        COHORT_SERVED_MODEL_NAME="smol-embed", COHORT_GPU_MEMORY_UTILIZATION="0.1")

    async def both_up():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve.wait_up, LOAD_TIMEOUT_S)
            nursery.start_soon(cohort.wait_workers_ready, ["worker1", "embedder"], LOAD_TIMEOUT_S)

    try:
        cohort.api_key = cohort.add_user("alice")
        trio.run(both_up)
        yield serve, cohort
    finally:
        cohort.stop()
        serve.stop()


def answer(base: str, path: str, body: dict, headers: dict | None = None):
    """(status, the JSON body or the list of SSE events as JSON)."""
    with httpx.Client(timeout=180, headers=headers) as http:
        response = http.post(base + path, json=body)
    if response.headers.get("content-type", "").startswith("text/event-stream"):
        events = [line[6:] for line in response.text.split("\n\n") if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        chunks = [json.loads(event) for event in events[:-1]]
        # choices of several prompts are engine requests of their own, interleaved as they come
        # (in vLLM too): compare each choice's events in order
        return response.status_code, sorted(chunks, key=lambda c: c["choices"][0]["index"]
                                            if c.get("choices") else float("inf"))
    return response.status_code, response.json()


def same(ours, theirs, where: str = "") -> None:
    """Equal, bar what varies per request in vLLM itself; floats within TOLERANCE."""
    if isinstance(theirs, dict):
        assert isinstance(ours, dict) and list(ours) == list(theirs), f"{where}: keys differ"
        for key, value in theirs.items():
            if key in VARYING or (key == "id" or where.endswith("tool_calls")):
                continue
            same(ours[key], value, f"{where}.{key}")
    elif isinstance(theirs, list):
        assert isinstance(ours, list) and len(ours) == len(theirs), f"{where}: lengths differ"
        for i, (a, b) in enumerate(zip(ours, theirs)):
            same(a, b, f"{where}[{i}]" if not where.endswith("tool_calls") else where)
    elif isinstance(theirs, float) and not isinstance(theirs, bool):
        assert ours == pytest.approx(theirs, abs=TOLERANCE), where
    else:
        assert ours == theirs, where


@pytest.mark.parametrize("name", list(REQUESTS))
def test_cohort_answers_as_vllm_serve_does(pair, name):
    serve, cohort = pair
    path, body = REQUESTS[name]
    theirs_status, theirs = answer(serve.url, path, body)
    ours_status, ours = answer(cohort.url, path, body, cohort.headers())
    assert ours_status == theirs_status, (ours, theirs)
    if theirs_status >= 400:  # refused by both, in OpenAI's error shape
        assert ours["error"]["message"] and theirs["error"]["message"]
        return
    same(ours, theirs, name)


def test_the_official_client_gets_tool_calls_json_and_logprobs_from_cohort(pair):
    _, cohort = pair
    api = openai.OpenAI(base_url=cohort.url + "/v1", api_key=cohort.api_key, max_retries=0,
                        timeout=180)
    named = api.chat.completions.create(model="smol", messages=ASK, tools=[WEATHER], max_tokens=60,
                                        temperature=0, tool_choice={"type": "function", "function": {
                                            "name": "get_weather"}})
    assert named.choices[0].message.tool_calls[0].function.name == "get_weather"
    person = api.chat.completions.create(
        model="smol", messages=[{"role": "user", "content": "Describe a person as JSON."}],
        max_tokens=40, temperature=0, response_format={"type": "json_schema", "json_schema": {
            "name": "person", "schema": PERSON}})
    value = json.loads(person.choices[0].message.content)
    assert isinstance(value["name"], str) and isinstance(value["age"], int)
    with pytest.raises(openai.BadRequestError) as refused:  # vLLM would ignore it; we say so
        api.chat.completions.create(model="smol", messages=HELLO, extra_body={"frobnicate": 1})
    assert refused.value.code == "unknown_parameter"


def test_the_http_engine_relays_vllm_serve(pair, make_cluster):
    """The http engine in front of the same `vllm serve`: its answers, event for event."""
    serve, _ = pair
    cluster = make_cluster(COHORT_ENGINE="http", REAL_VLLM_URL=serve.url)
    cluster.start_front()
    cluster.start_worker("worker1")
    cluster.api_key = cluster.add_user("alice")
    health = trio.run(cluster.wait_ready, 1)
    assert health["workers"][0]["model"] == "smol"  # learnt from the upstream's /v1/models
    for name in ("chat", "chat logprobs stream", "tools required", "completion stream usage",
                 "tokenize"):
        path, body = REQUESTS[name]
        theirs_status, theirs = answer(serve.url, path, body)
        ours_status, ours = answer(cluster.url, path, body, cluster.headers())
        assert ours_status == theirs_status == 200
        same(ours, theirs, name)


def test_a_pooling_worker_serves_embeddings_and_only_them(pair):
    _, cohort = pair
    api = openai.OpenAI(base_url=cohort.url + "/v1", api_key=cohort.api_key, max_retries=0,
                        timeout=180)
    reply = api.embeddings.create(model="smol-embed", input=["a cat", "a dog", "a cat"],
                                  encoding_format="float")
    vectors = [item.embedding for item in reply.data]
    assert len(vectors[0]) == 576 and vectors[0] == vectors[2] and vectors[0] != vectors[1]
    assert abs(sum(v * v for v in vectors[0]) - 1) < 1e-4  # vLLM normalizes embeddings
    counted = httpx.post(cohort.url + "/tokenize", headers=cohort.headers(), json={
        "model": "smol-embed", "prompt": "a cat"}).json()["count"]
    assert reply.usage.prompt_tokens == 3 * counted
    with pytest.raises(openai.BadRequestError) as refused:  # routes follow what a worker serves
        api.chat.completions.create(model="smol-embed", messages=HELLO)
    assert refused.value.code == "unsupported_route"
    with pytest.raises(openai.BadRequestError) as refused:
        api.embeddings.create(model="smol", input="a cat")
    assert refused.value.code == "unsupported_route"
    cards = {card.id: card.model_extra for card in api.models.list().data}
    assert cards["smol-embed"]["routes"] == ["embeddings", "tokenize", "detokenize"]
    assert cards["smol"]["routes"] == ["chat", "completions", "tokenize", "detokenize"]
    assert cards["smol"]["max_model_len"] == 2048
