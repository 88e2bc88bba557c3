"""Request bodies against their declared models: every field known, typed, or a 400 naming it."""

import dataclasses

import pytest

from common.config import ServerSettings
from server.errors import BadRequest
from server.openai_schema import parse_chat, parse_completion

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
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop.str"),
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
    assert spec.dropped == ["frobnicate", "temprature"] and spec.params["temperature"] == 1.0
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
    assert neutral.features == [] and neutral.params["ignore_eos"] is True
    spec = parse_chat({**CHAT, "logprobs": True, "top_k": 5, "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}}, SETTINGS)
    assert spec.features == ["logprobs", "response_format", "top_k"]
    assert spec.params["response_format"] == {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object"}}}
    assert parse_chat({**CHAT, "response_format": {"type": "text"}}, SETTINGS).features == []


@pytest.mark.parametrize("body, param", [
    ({**CHAT, "max_tokens": 10**6}, "max_tokens"),
    ({**CHAT, "n": 10**3}, "n"),
    ({**CHAT, "stream_options": {"include_usage": True}}, "stream_options"),
    ({**CHAT, "tool_choice": {"type": "function", "function": {"name": "f"}}}, "tool_choice"),
    ({**CHAT, "response_format": {"type": "json_schema"}}, "response_format"),
    ({**CHAT, "stop": [""]}, "stop"),
])
def test_limits_and_combinations(body, param):
    assert refused(parse_chat, body).param == param


def test_completions_take_one_prompt_and_default_to_16_tokens():
    spec = parse_completion({"model": "m", "prompt": ["only one"]}, SETTINGS)
    assert spec.prompt == "only one" and spec.params["max_tokens"] == 16
    assert refused(parse_completion, {"model": "m", "prompt": ["a", "b"]}).param == "prompt"
    assert refused(parse_completion, {"model": "m", "prompt": [1, 2]}).param.startswith("prompt")
