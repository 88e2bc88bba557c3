"""Request bodies against their declared models: every field known, typed, or a 400 naming it."""

import dataclasses

import pytest

from common.config import ServerSettings
from server.errors import BadRequest
from server.openai_schema import parse_chat, parse_completion, parse_embeddings, parse_tokens

SETTINGS = ServerSettings()
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def refused(parse, body, settings=SETTINGS) -> BadRequest:
    with pytest.raises(BadRequest) as error:
        parse(body, settings)
    return error.value


@pytest.mark.parametrize("extra, param", [
    ({"temperature": True}, "temperature"),        # a bool is not a number
    ({"temperature": "0.5"}, "temperature"),       # nor is a string
    ({"max_tokens": 1.5}, "max_tokens"),
    ({"n": "2"}, "n"),
    ({"stream": 1}, "stream"),
    ({"tools": "garbage"}, "tools"),
    ({"tool_choice": "sometimes"}, "tool_choice"),
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"logprobs": 3}, "logprobs"),                 # chat's logprobs is a flag
    ({"top_logprobs": 21}, "top_logprobs"),
    ({"messages": [{"role": ["user"], "content": "x"}]}, "messages.0.role"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages.0.content.str"),
    ({"stop": ["a", 5]}, "stop"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"id": "c", "function": {}}]}]},
     "messages.0.tool_calls"),
    ({"ignore_eos": "yes"}, "ignore_eos"),
])
def test_a_wrong_type_is_a_400_that_names_the_field(extra, param):
    error = refused(parse_chat, {**CHAT, **extra})
    assert error.param.startswith(param.split(".")[0]) and error.status == 400


def test_an_unknown_field_is_a_400_that_names_it():
    error = refused(parse_chat, {**CHAT, "temprature": 0.5})
    assert error.param == "temprature" and "COHORT_DROP_PARAMS" in error.message
    assert refused(parse_chat, {**CHAT, "messages": [{"role": "user", "content": "x",
                                                      "mood": "happy"}]}).param == "messages.0.mood"


def test_drop_params_drops_unknown_top_level_fields_and_says_which():
    settings = dataclasses.replace(SETTINGS, drop_params=True)
    spec = parse_chat({**CHAT, "temprature": 0.5, "frobnicate": {}}, settings)
    assert spec.dropped == ["frobnicate", "temprature"] and spec.body == CHAT
    assert refused(parse_chat, {**CHAT, "temperature": "hot"}, settings).param == "temperature"


def test_known_fields_nobody_serves_are_features_not_typos():
    spec = parse_chat({**CHAT, "store": True, "metadata": {"team": "a"}}, SETTINGS)
    assert spec.features == ["metadata", "store"]
    streamed = parse_chat({**CHAT, "stream": True, "stream_options": {
        "include_usage": True, "continuous_usage_stats": True}}, SETTINGS)
    assert streamed.features == ["continuous_usage_stats"]


def test_features_are_what_a_request_asks_beyond_the_base():
    assert parse_chat(CHAT, SETTINGS).features == []
    # vLLM's benchmark client sends these neutral values: they ask for nothing
    neutral = parse_completion({"model": "m", "prompt": "x", "logprobs": None,
                                "repetition_penalty": 1.0, "ignore_eos": True}, SETTINGS)
    assert neutral.features == [] and neutral.body["ignore_eos"] is True
    spec = parse_chat({**CHAT, "logprobs": True, "top_k": 5, "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}}, SETTINGS)
    assert spec.features == ["logprobs", "response_format", "top_k"]
    assert spec.body["response_format"] == {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object"}}}  # passed on as given
    assert parse_chat({**CHAT, "response_format": {"type": "text"}}, SETTINGS).features == []


@pytest.mark.parametrize("body, param", [
    ({**CHAT, "max_tokens": 10**6}, "max_tokens"),
    ({**CHAT, "n": 10**3}, "n"),
    ({**CHAT, "stream_options": {"include_usage": True}}, "stream_options"),
    ({**CHAT, "tool_choice": {"type": "function", "function": {"name": "f"}}}, "tool_choice"),
    ({**CHAT, "response_format": {"type": "json_schema"}}, "response_format"),
    ({**CHAT, "stop": [""]}, "stop"),
    ({**CHAT, "length_penalty": 0.5}, "length_penalty"),  # without beam search vLLM ignores it
])
def test_limits_and_combinations(body, param):
    assert refused(parse_chat, body).param == param


def test_completions_take_texts_or_token_ids_as_prompts_and_count_every_sequence():
    spec = parse_completion({"model": "m", "prompt": ["a", "b"], "n": 3}, SETTINGS)
    assert spec.seqs == 6 and spec.route == "completions"
    # placed by prefix: one text prompt only (the worker can say what its engine caches of it)
    assert spec.prompt_text == "" and parse_completion(
        {"model": "m", "prompt": ["a"]}, SETTINGS).prompt_text == "a"
    ids = parse_completion({"model": "m", "prompt": [[1, 2], [3]]}, SETTINGS)
    assert ids.seqs == 2 and ids.features == ["token_prompts"]
    assert parse_completion({"model": "m", "prompt": [1, 2]}, SETTINGS).seqs == 1
    for bad in ([], [[]], [1, "a"], [[1], "a"], [True]):
        assert refused(parse_completion, {"model": "m", "prompt": bad}).param.startswith("prompt")
    assert refused(parse_completion, {"model": "m", "prompt": ["x"] * 5, "n": 4}).param == "n"


def test_embeddings_and_tokens_are_declared_too():
    spec = parse_embeddings({"model": "m", "input": ["a", "b"], "dimensions": 8}, SETTINGS)
    assert spec.route == "embeddings" and spec.seqs == 2 and spec.features == ["dimensions"]
    assert refused(parse_embeddings, {"model": "m", "input": "a", "encoding_format": "hex"}
                   ).param == "encoding_format"
    tokens = parse_tokens("tokenize", {"model": "m", "messages": CHAT["messages"]}, SETTINGS)
    assert tokens.route == "tokenize" and not tokens.stream
    assert refused(lambda b, s: parse_tokens("tokenize", b, s), {"model": "m"}).param == "prompt"
    assert refused(lambda b, s: parse_tokens("detokenize", b, s),
                   {"model": "m", "tokens": ["x"]}).param.startswith("tokens")


def test_service_tier_flex_is_the_batch_tier_and_other_tiers_stay_features():
    flex = parse_chat({**CHAT, "service_tier": "flex"}, SETTINGS)
    assert flex.tier == "batch" and "service_tier" not in flex.features
    assert parse_chat({**CHAT, "service_tier": "auto"}, SETTINGS).tier == "interactive"
    assert "service_tier" in parse_chat({**CHAT, "service_tier": "priority"}, SETTINGS).features
