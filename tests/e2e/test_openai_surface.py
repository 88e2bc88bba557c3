"""The OpenAI surface beyond plain text, on the mock, through the official `openai` client: what a
client or agent written against `vllm serve` relies on (tools, JSON output, logprobs, embeddings,
several prompts, tokenization), deterministic so the assertions are exact."""

import base64
import json
import struct

import httpx
import openai
import pytest

MODEL = "cohort-mock"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "required": ["city", "days"], "properties": {
        "city": {"type": "string"}, "days": {"type": "integer", "minimum": 1}}}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"]}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def client(cluster) -> openai.OpenAI:
    return openai.OpenAI(base_url=cluster.url + "/v1", api_key=cluster.api_key, max_retries=0)


@pytest.mark.parametrize("tool_choice, name, finish", [
    ("required", "get_weather", "tool_calls"),
    ({"type": "function", "function": {"name": "get_time"}}, "get_time", "stop"),
])
def test_tool_calls_required_and_named_as_vllm_answers_them(shared, tool_choice, name, finish):
    reply = client(shared).chat.completions.create(
        model=MODEL, messages=ASK, tools=[WEATHER, TIME], tool_choice=tool_choice, max_tokens=200)
    choice = reply.choices[0]
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.function.name == name and call.id.startswith(
        "chatcmpl-tool-")
    arguments = json.loads(call.function.arguments)  # valid under the tool's parameters
    if name == "get_weather":
        assert isinstance(arguments["city"], str) and arguments["days"] >= 1
    else:
        assert arguments["zone"] in ("UTC", "CET")
    assert choice.finish_reason == finish and choice.message.content == ""


def test_tool_call_deltas_stream_as_vllm_streams_them(shared):
    stream = client(shared).chat.completions.create(
        model=MODEL, messages=ASK, tools=[WEATHER], tool_choice="required", stream=True,
        max_tokens=200)
    calls = [call for chunk in stream for choice in chunk.choices
             for call in (choice.delta.tool_calls or [])]
    assert calls[0].function.name == "get_weather" and calls[0].id.startswith("chatcmpl-tool-")
    arguments = "".join(call.function.arguments or "" for call in calls[1:])
    assert json.loads(arguments)["days"] >= 1 and all(call.index == 0 for call in calls)


def test_auto_calls_a_tool_the_prompt_names_and_none_never_does(shared):
    api = client(shared)
    ask = [{"role": "user", "content": "call get_time please"}]
    auto = api.chat.completions.create(model=MODEL, messages=ask, tools=[WEATHER, TIME],
                                       tool_choice="auto")
    assert auto.choices[0].message.tool_calls[0].function.name == "get_time"
    plain = api.chat.completions.create(model=MODEL, messages=ask, tools=[TIME], tool_choice="none")
    assert not plain.choices[0].message.tool_calls and plain.choices[0].message.content
    # the answer goes back as a tool message, and the conversation goes on
    follow = ask + [{"role": "assistant", "content": "", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "12:00"}]
    assert api.chat.completions.create(model=MODEL, messages=follow).choices[0].message.content


def test_logprobs_for_chat_and_completions(shared):
    api = client(shared)
    chat = api.chat.completions.create(model=MODEL, messages=ASK, logprobs=True, top_logprobs=3,
                                       max_tokens=5)
    entries = chat.choices[0].logprobs.content
    assert "".join(entry.token for entry in entries) == chat.choices[0].message.content
    for entry in entries:
        assert len(entry.top_logprobs) == 3 and entry.top_logprobs[0].token == entry.token
        assert entry.logprob < 0 and bytes(entry.bytes).decode() == entry.token
        assert [t.logprob for t in entry.top_logprobs] == sorted(
            (t.logprob for t in entry.top_logprobs), reverse=True)
    text = api.completions.create(model=MODEL, prompt="one two", logprobs=2, echo=True,
                                  max_tokens=3)
    scores = text.choices[0].logprobs
    assert text.choices[0].text.startswith("one two") and scores.tokens[:2] == ["one", " two"]
    assert scores.token_logprobs[0] is None and len(scores.tokens) == 2 + 3
    assert scores.text_offset[:3] == [0, 3, 7]


def test_n_choices_differ_when_sampled_and_agree_when_greedy(shared):
    api = client(shared)
    sampled = api.chat.completions.create(model=MODEL, messages=ASK, n=4, temperature=1.0, seed=3)
    assert len({choice.message.content for choice in sampled.choices}) == 4
    again = api.chat.completions.create(model=MODEL, messages=ASK, n=4, temperature=1.0, seed=3)
    assert [c.message.content for c in again.choices] != [] and [
        c.message.content.split("]", 1)[1] for c in again.choices] == [
        c.message.content.split("]", 1)[1] for c in sampled.choices]  # the seed decides
    greedy = api.chat.completions.create(model=MODEL, messages=ASK, n=3, temperature=0)
    assert len({choice.message.content for choice in greedy.choices}) == 1


def test_several_prompts_in_one_completion_request(shared):
    reply = client(shared).completions.create(model=MODEL, prompt=["first", "second"], n=2,
                                              temperature=0)
    assert [c.index for c in reply.choices] == [0, 1, 2, 3]
    assert [c.text.rsplit(" ", 1)[1] for c in reply.choices] == ["first"] * 2 + ["second"] * 2
    assert reply.usage.prompt_tokens == 2
    with pytest.raises(openai.BadRequestError) as refused:  # the mock has no vocabulary of ids
        client(shared).completions.create(model=MODEL, prompt=[[1, 2, 3]])
    assert refused.value.param == "token_prompts"


def test_embeddings_are_stable_unit_vectors(shared):
    api = client(shared)
    reply = api.embeddings.create(model=MODEL, input=["a cat", "a dog", "a cat"])
    vectors = [item.embedding for item in reply.data]
    assert [item.index for item in reply.data] == [0, 1, 2] and vectors[0] == vectors[2]
    assert vectors[0] != vectors[1] and abs(sum(v * v for v in vectors[0]) - 1) < 1e-6
    assert reply.usage.prompt_tokens == 6
    short = api.embeddings.create(model=MODEL, input="a cat", dimensions=8)
    assert len(short.data[0].embedding) == 8
    packed = httpx.post(shared.url + "/v1/embeddings", headers=shared.headers(), json={
        "model": MODEL, "input": "a cat", "encoding_format": "base64"}).json()
    raw = base64.b64decode(packed["data"][0]["embedding"])
    assert list(struct.unpack(f"<{len(raw) // 4}f", raw)) == pytest.approx(vectors[0], abs=1e-6)


def test_tokenize_and_detokenize_round_trip(shared):
    post = lambda path, body: httpx.post(shared.url + path, headers=shared.headers(), json=body)
    tokens = post("/tokenize", {"model": MODEL, "prompt": "Hello mock world",
                                "return_token_strs": True}).json()
    assert tokens["count"] == 3 and tokens["token_strs"] == ["Hello", " mock", " world"]
    assert tokens["max_model_len"] > 0
    assert post("/detokenize", {"tokens": tokens["tokens"]}).json() == {  # model: the only one
        "prompt": "Hello mock world"}
    chat = post("/tokenize", {"model": MODEL, "messages": ASK}).json()
    assert chat["count"] > 5 and chat["token_strs"] is None
    unknown = post("/detokenize", {"model": MODEL, "tokens": [2**48 + 5]})  # no word made it
    assert unknown.status_code == 400 and unknown.json()["error"]["param"] == "tokens"


def test_models_list_routes_features_and_context(shared):
    [card] = client(shared).models.list().data
    extra = card.model_extra
    assert card.id == MODEL and extra["max_model_len"] > 0
    assert extra["routes"] == ["chat", "completions", "embeddings", "tokenize", "detokenize"]
    assert "tools" in extra["features"] and "logit_bias" not in extra["features"]
