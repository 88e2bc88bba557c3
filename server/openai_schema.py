"""Parse and validate OpenAI request bodies into JobSpecs, with a 400 that names the bad field."""

from __future__ import annotations

from typing import Any

from common.config import ServerSettings
from server.errors import BadRequest
from server.jobs import JobSpec

ROLES = {"system", "user", "assistant", "tool", "developer"}


def _number(body: dict, name: str, low: float, high: float, default: float | None = None):
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadRequest(f"{name} must be a number", param=name)
    if not low <= value <= high:
        raise BadRequest(f"{name} must be between {low:g} and {high:g} (got {value})", param=name)
    return float(value)


def _integer(body: dict, name: str, low: int, high: int, default: int | None = None):
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"{name} must be an integer", param=name)
    if not low <= value <= high:
        raise BadRequest(f"{name} must be between {low} and {high} (got {value})", param=name)
    return value


def _flag(body: dict, name: str) -> bool:
    value = body.get(name, False)
    if not isinstance(value, bool):
        raise BadRequest(f"{name} must be true or false", param=name)
    return value


def _stop(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if (not isinstance(stop, list) or len(stop) > 4
            or not all(isinstance(s, str) and s for s in stop)):
        raise BadRequest("stop must be a non-empty string or a list of up to 4 of them", param="stop")
    return stop


def _common(body: Any, settings: ServerSettings, default_max_tokens: int | None):
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("model is required and must be a string", param="model")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest("stream must be true or false", param="stream")
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
            raise BadRequest("stream_options must be an object like {\"include_usage\": true}",
                             param="stream_options")
        if not stream:
            raise BadRequest("stream_options is only allowed when stream is true",
                             param="stream_options")
        include_usage = options.get("include_usage", False)
    limit = settings.max_tokens_limit
    max_tokens = _integer(body, "max_completion_tokens", 1, limit)
    if max_tokens is None:
        max_tokens = _integer(body, "max_tokens", 1, limit, default_max_tokens)
    params: dict[str, Any] = {
        "max_tokens": max_tokens,
        "temperature": _number(body, "temperature", 0, 2, 1.0),
        "top_p": _number(body, "top_p", 0, 1, 1.0),
        "n": _integer(body, "n", 1, settings.max_n, 1),
        "stop": _stop(body),
        "seed": _integer(body, "seed", -(2**63), 2**63 - 1),
        "presence_penalty": _number(body, "presence_penalty", -2, 2, 0.0),
        "frequency_penalty": _number(body, "frequency_penalty", -2, 2, 0.0),
        "include_usage": include_usage,
        # vLLM's extension: generate max_tokens whatever the model says (its benchmark sets it)
        "ignore_eos": _flag(body, "ignore_eos"),
    }
    if params["top_p"] == 0:
        raise BadRequest("top_p must be greater than 0", param="top_p")
    return model, stream, params


def _text_of(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(
                    part.get("text"), str):
                raise BadRequest(f"{where}: only text content parts are supported",
                                 param="messages")
            parts.append(part["text"])
        return "".join(parts)
    raise BadRequest(f"{where}: content must be a string or a list of text parts",
                     param="messages")


def parse_chat(body: Any, settings: ServerSettings, trace_id: str = "") -> JobSpec:
    """A `/v1/chat/completions` body as a JobSpec."""
    model, stream, params = _common(body, settings, default_max_tokens=None)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages must be a non-empty list", param="messages")
    clean, size = [], 0
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise BadRequest(f"messages[{i}] needs a role, one of {sorted(ROLES)}",
                             param="messages")
        text = _text_of(message.get("content"), f"messages[{i}]")
        size += len(text)
        clean.append({"role": message["role"], "content": text})
    if size > settings.max_prompt_chars:
        raise BadRequest(f"the messages hold {size} characters; the limit is "
                         f"{settings.max_prompt_chars} (COHORT_MAX_PROMPT_CHARS)", param="messages")
    return JobSpec(model, "chat", params, messages=clean, stream=stream, trace_id=trace_id)


def parse_completion(body: Any, settings: ServerSettings, trace_id: str = "") -> JobSpec:
    """A `/v1/completions` body as a JobSpec (max_tokens defaults to 16, as OpenAI's does)."""
    model, stream, params = _common(body, settings, default_max_tokens=16)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise BadRequest("prompt must be a string (for many prompts at once, use "
                         "POST /inference/batch)", param="prompt")
    if len(prompt) > settings.max_prompt_chars:
        raise BadRequest(f"the prompt holds {len(prompt)} characters; the limit is "
                         f"{settings.max_prompt_chars} (COHORT_MAX_PROMPT_CHARS)", param="prompt")
    return JobSpec(model, "completion", params, prompt=prompt, stream=stream, trace_id=trace_id)
