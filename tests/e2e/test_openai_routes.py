"""The OpenAI routes through real processes, driven by the official `openai` client and by raw HTTP."""

import json

import httpx
import openai
import pytest
import trio

MODEL = "cohort-mock"


def client(cluster) -> openai.OpenAI:
    return openai.OpenAI(base_url=cluster.url + "/v1", api_key=cluster.api_key, max_retries=0)


def test_openai_chat_plain(shared):
    reply = client(shared).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hello there"}])
    text = reply.choices[0].message.content
    assert text.startswith("[Batched mock response ") and text.endswith("Mock response to: hello there")
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage.completion_tokens == len(text.split())
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_openai_chat_streamed_with_usage(shared):
    stream = client(shared).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "stream me"}], stream=True,
        stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.endswith("Mock response to: stream me")
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(text.split())


def test_openai_completions_max_tokens_stop_n(shared):
    api = client(shared)
    cut = api.completions.create(model=MODEL, prompt="one two three", max_tokens=3)
    assert cut.choices[0].finish_reason == "length" and cut.usage.completion_tokens == 3
    stopped = api.completions.create(model=MODEL, prompt="alpha beta", stop=["Mock"])
    assert stopped.choices[0].text.rstrip().endswith("]") and stopped.choices[0].finish_reason == "stop"
    several = api.completions.create(model=MODEL, prompt="x", n=3, seed=7, temperature=0.5, top_p=0.9)
    assert sorted(c.index for c in several.choices) == [0, 1, 2]
    streamed = list(api.completions.create(model=MODEL, prompt="streamed", stream=True, n=2,
                                           temperature=0))
    joined = {0: "", 1: ""}
    for chunk in streamed:
        for choice in chunk.choices:
            joined[choice.index] += choice.text
    assert all(text.endswith("Mock response to: streamed") for text in joined.values())


def test_ignore_eos_generates_exactly_max_tokens(shared):
    body = {"model": MODEL, "prompt": "short", "max_tokens": 40}
    api = client(shared)
    free = api.completions.create(**body)
    forced = api.completions.create(**body, extra_body={"ignore_eos": True})
    assert free.choices[0].finish_reason == "stop" and free.usage.completion_tokens < 40
    assert forced.choices[0].finish_reason == "length" and forced.usage.completion_tokens == 40


def test_models_lists_what_ready_workers_serve(shared):
    cards = client(shared).models.list().data
    assert [m.id for m in cards] == [MODEL]
    assert cards[0].max_model_len == 2048 and "response_format" in cards[0].features


def test_a_model_is_retrieved_by_its_id_and_an_unknown_one_is_a_404_in_openais_shape(shared):
    api = client(shared)
    card = api.models.retrieve(MODEL)
    assert card.id == MODEL and card.object == "model" and card.max_model_len == 2048
    with pytest.raises(openai.NotFoundError) as missing:
        api.models.retrieve("no-such-model")
    assert missing.value.body["code"] == "model_not_found"
    assert missing.value.body["param"] == "model" and "no-such-model" in missing.value.body["message"]


def test_what_the_engine_cannot_honour_is_a_400_that_names_it(shared):
    api = client(shared)
    question = [{"role": "user", "content": "x"}]
    with pytest.raises(openai.BadRequestError) as refused:  # the mock has no token ids
        api.chat.completions.create(model=MODEL, messages=question, logit_bias={"5": 10})
    assert refused.value.param == "logit_bias" and refused.value.code == "unsupported_parameter"
    with pytest.raises(openai.BadRequestError) as refused:  # OpenAI's, which no engine here keeps
        api.chat.completions.create(model=MODEL, messages=question, store=True,
                                    metadata={"team": "a"})
    assert refused.value.param == "metadata" and "store" in refused.value.message
    with pytest.raises(openai.BadRequestError) as refused:
        api.chat.completions.create(model=MODEL, messages=question, extra_body={"temprature": 0})
    assert refused.value.param == "temprature" and refused.value.code == "unknown_parameter"


def test_json_schema_output_satisfies_the_schema(shared):
    schema = {"type": "object", "required": ["city", "population"], "properties": {
        "city": {"type": "string"}, "population": {"type": "integer", "minimum": 1},
        "tags": {"type": "array", "items": {"enum": ["old", "new"]}, "minItems": 2}}}
    reply = client(shared).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "a city as JSON"}], max_tokens=200,
        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": schema}})
    value = json.loads(reply.choices[0].message.content)
    assert isinstance(value["city"], str) and isinstance(value["population"], int)
    assert value["population"] >= 1 and len(value["tags"]) >= 2 and set(value["tags"]) <= {"old", "new"}
    plain = client(shared).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "x"}], response_format={"type": "json_object"})
    assert isinstance(json.loads(plain.choices[0].message.content), dict)


def test_drop_params_drops_unknown_fields_and_says_so(make_cluster):
    cluster = make_cluster(COHORT_DROP_PARAMS="1", COHORT_AUTH_DISABLED="1")
    cluster.start_front()
    cluster.start_worker("worker1")
    trio.run(cluster.wait_ready, 1)
    answer = httpx.post(cluster.url + "/v1/completions", json={
        "model": MODEL, "prompt": "x", "temprature": 0, "frobnicate": 1})
    assert answer.status_code == 200
    assert answer.headers["X-Cohort-Dropped-Params"] == "frobnicate,temprature"
    wrong = httpx.post(cluster.url + "/v1/completions", json={"model": MODEL, "prompt": 5})
    assert wrong.status_code == 400  # a wrong type is never dropped


def test_health_shows_every_worker_to_a_token(shared):
    health = httpx.get(shared.url + "/health", headers=shared.headers()).json()
    assert health["mode"] == "mock" and health["auth"] == "required"
    assert sorted(w["id"] for w in health["workers"]) == ["worker1", "worker2"]
    assert {w["state"] for w in health["workers"]} <= {"ready", "busy"}
    assert httpx.get(shared.url + "/ready").status_code == 200


BAD_BODIES = [
    (b"{not json", 400, None),
    (b'["a list"]', 400, None),
    (json.dumps({"model": MODEL, "messages": "hi"}).encode(), 400, "messages"),
    (json.dumps({"model": MODEL, "messages": []}).encode(), 400, "messages"),
    (json.dumps({"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}).encode(), 400,
     "messages.0.role"),
    (json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                 "temprature": 0.2}).encode(), 400, "temprature"),
    (json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                 "tools": "garbage"}).encode(), 400, "tools"),
    (json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                 "temperature": -1}).encode(), 400, "temperature"),
    (json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                 "max_tokens": "many"}).encode(), 400, "max_tokens"),
    (json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                 "n": 0}).encode(), 400, "n"),
    (json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                 "stop": 5}).encode(), 400, "stop"),
    (json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                 "stream": "yes"}).encode(), 400, "stream"),
    (json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                 "ignore_eos": 1}).encode(), 400, "ignore_eos"),
    (json.dumps({"model": "no-such-model",
                 "messages": [{"role": "user", "content": "x"}]}).encode(), 404, "model"),
    (b'{"model": "' + b"x" * (2 << 20) + b'"}', 413, None),
    (b'{"model": "cohort-mock", "messages": [{"role": "user", "content": "\\ud800"}]}', 400, None),
    # an integer msgpack cannot carry, where any value is allowed: once it killed the scheduler
    (b'{"model": "cohort-mock", "messages": [{"role": "user", "content": "x"}], '
     b'"chat_template_kwargs": {"x": 1180591620717411303424}}', 400, None),
    ("{}".encode("utf-16"), 400, None),
    (b"\xff\xfe{", 400, None),
    (b"[" * 100_000 + b"]" * 100_000, 400, None),
]


@pytest.mark.parametrize("body, status, param", BAD_BODIES)
def test_bad_input_gets_a_4xx_in_openai_shape_and_the_server_keeps_serving(shared, body, status, param):
    answer = httpx.post(shared.url + "/v1/chat/completions", content=body, headers=shared.headers())
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert error["message"] and error["type"] and error["param"] == param
    still = client(shared).completions.create(model=MODEL, prompt="still there?")
    assert still.choices[0].text.endswith("still there?")


def test_the_openai_client_raises_its_own_errors_for_4xx(shared):
    with pytest.raises(openai.NotFoundError):
        client(shared).chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=shared.url + "/v1", api_key="wrong", max_retries=0).models.list()


def test_unknown_route_and_method(shared):
    assert httpx.get(shared.url + "/v2/nothing").json()["error"]["type"] == "invalid_request_error"
    assert httpx.get(shared.url + "/v1/chat/completions").status_code == 405


async def test_200_concurrent_requests_form_batches_larger_than_one(shared):
    async with httpx.AsyncClient(timeout=60, headers=shared.headers(),
                                 limits=httpx.Limits(max_connections=200)) as http:
        before = (await http.get(shared.url + "/stats")).json()["batches"]
        texts = []

        async def one(i: int):
            answer = await http.post(shared.url + "/v1/completions",
                                     json={"model": MODEL, "prompt": f"request {i}"})
            assert answer.status_code == 200, answer.text
            texts.append(answer.json()["choices"][0]["text"])

        with trio.fail_after(120):
            async with trio.open_nursery() as nursery:
                for i in range(200):
                    nursery.start_soon(one, i)
        after = (await http.get(shared.url + "/stats")).json()
    assert len(texts) == 200 and len({t.rsplit(":", 1)[1] for t in texts}) == 200
    formed = after["batches"]["formed"] - before["formed"]
    assert 0 < formed < 200  # 200 requests, fewer batches: some batch held more than one
    assert after["batches"]["mean_size"] > 1
    sizes = {int(k) for k in after["batches"]["size_distribution"]}
    assert max(sizes) > 1
    assert all(w["state"] in ("ready", "busy") for w in after["workers"])


def test_stats_needs_a_token_and_agrees_with_metrics(shared):
    assert httpx.get(shared.url + "/stats").status_code == 401
    client(shared).completions.create(model=MODEL, prompt="count me")
    stats = httpx.get(shared.url + "/stats", headers=shared.headers()).json()
    metrics = httpx.get(shared.url + "/metrics", headers=shared.headers()).text
    samples = {line.split(" ")[0]: float(line.split(" ")[1])
               for line in metrics.splitlines() if line and not line.startswith("#")}
    assert samples["cohort_batch_size_count"] == stats["batches"]["formed"]
    assert samples["cohort_completion_tokens_total"] == stats["tokens"]["completion"]
    assert 'cohort_workers{state="ready"}' in samples


def test_request_id_is_honoured_and_returned(shared):
    answer = httpx.post(shared.url + "/v1/completions", headers={**shared.headers(),
                        "X-Request-Id": "trace-123"}, json={"model": MODEL, "prompt": "x"})
    assert answer.headers["X-Request-Id"] == "trace-123"
    assert httpx.get(shared.url + "/health").headers["X-Request-Id"]


def test_a_413_closes_its_connection_so_the_next_request_is_not_stuck_behind_its_body(shared):
    with httpx.Client(timeout=10, headers=shared.headers()) as http:
        big = http.post(shared.url + "/v1/completions", content=b'{"model": "' + b"x" * (2 << 20))
        assert big.status_code == 413 and big.headers["connection"] == "close"
        after = http.post(shared.url + "/v1/completions", json={"model": MODEL, "prompt": "hi"})
        assert after.status_code == 200
