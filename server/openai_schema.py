"""OpenAI request bodies, declared once as models: validated from them, documented from them.

Every field OpenAI or vLLM's server knows is declared with its type and range. A wrong type is a
400 that names the field; an unknown field is a 400 that names it too (OpenAI's behaviour), unless
the operator set `COHORT_DROP_PARAMS`, in which case it is dropped and the response says so in a
header. Fields past the base every engine honours are *features*: a request that uses one (with
a value other than its neutral default) goes only where the serving engine says it can honour it;
otherwise it is a 400 naming it (see `Gateway.submit`). Nothing is dropped silently.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, ValidationError

from common.config import ServerSettings
from server.errors import BadRequest
from server.jobs import JobSpec

Number = float  # strict: ints are numbers too, bools and strings are not
Stop = str | Annotated[list[str], Field(max_length=4)]


class Strict(BaseModel):
    """Strict types (no "5" for 5, no true for 1) and no unknown fields."""

    model_config = ConfigDict(extra="forbid", strict=True)


class TextPart(Strict):
    type: Literal["text"]
    text: str


class Message(Strict):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None


class StreamOptions(Strict):
    include_usage: StrictBool = False
    continuous_usage_stats: StrictBool = False


class JsonSchema(Strict):
    name: str
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: StrictBool | None = None


class ResponseFormat(Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchema | None = None


class Function(Strict):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: StrictBool | None = None


class Tool(Strict):
    type: Literal["function"]
    function: Function


class NamedFunction(Strict):
    name: str


class ToolChoice(Strict):
    type: Literal["function"]
    function: NamedFunction


class Sampling(Strict):
    """What chat and completions share: the model, the sampling and vLLM's extensions."""

    model: str = Field(min_length=1)
    max_tokens: StrictInt | None = Field(None, ge=1)
    temperature: Number = Field(1.0, ge=0, le=2)
    top_p: Number = Field(1.0, gt=0, le=1)
    n: StrictInt = Field(1, ge=1)
    stop: Stop | None = None
    seed: StrictInt | None = Field(None, ge=-(2**63), le=2**63 - 1)
    presence_penalty: Number = Field(0.0, ge=-2, le=2)
    frequency_penalty: Number = Field(0.0, ge=-2, le=2)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # an end-user id for the operator's logs; no effect on generation
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = None
    response_format: ResponseFormat | None = None
    # vLLM's extensions
    ignore_eos: StrictBool = False
    min_tokens: StrictInt = Field(0, ge=0)
    top_k: StrictInt | None = Field(None, ge=-1)
    min_p: Number = Field(0.0, ge=0, le=1)
    repetition_penalty: Number = Field(1.0, gt=0, le=2)
    stop_token_ids: list[StrictInt] | None = None
    skip_special_tokens: StrictBool = True


class ChatRequest(Sampling):
    """`POST /v1/chat/completions`."""

    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = Field(None, ge=0, le=20)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | ToolChoice | None = None
    parallel_tool_calls: StrictBool | None = None
    # OpenAI's, known and declared so that using them is a clear 400, not a typo's "unknown field"
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None
    metadata: dict[str, str] | None = None
    store: StrictBool | None = None
    service_tier: str | None = None
    reasoning_effort: str | None = None
    modalities: list[str] | None = None
    audio: dict[str, Any] | None = None
    prediction: dict[str, Any] | None = None
    web_search_options: dict[str, Any] | None = None


class CompletionRequest(Sampling):
    """`POST /v1/completions`."""

    prompt: str | Annotated[list[str], Field(min_length=1, max_length=1)]
    logprobs: StrictInt | None = Field(None, ge=0, le=5)
    echo: StrictBool = False
    best_of: StrictInt | None = Field(None, ge=1)
    suffix: str | None = None


# The features a request may use, each with the neutral value that does not use it. Everything
# else in the models above every engine honours.
FEATURES: dict[str, Any] = {
    "logprobs": (None, False, 0), "top_logprobs": (None, 0), "logit_bias": (None, {}),
    "response_format": (None,), "tools": (None, []), "tool_choice": (None, "none"),
    "parallel_tool_calls": (None, True), "echo": (False,), "best_of": (None, 1),
    "suffix": (None, ""), "min_tokens": (0,), "top_k": (None, -1, 0), "min_p": (0.0,),
    "repetition_penalty": (1.0,), "stop_token_ids": (None, []), "skip_special_tokens": (True,),
    "functions": (None,), "function_call": (None,), "metadata": (None,), "store": (None, False),
    "service_tier": (None, "auto", "default"), "reasoning_effort": (None,),
    "modalities": (None, ["text"]), "audio": (None,), "prediction": (None,),
    "web_search_options": (None,),
}


FIELD_NAMES = {name for cls in (ChatRequest, CompletionRequest, Message, TextPart, StreamOptions,
                                 ResponseFormat, JsonSchema, Tool, Function, ToolChoice)
               for name in cls.model_fields} | {"schema"}


def features_used(request: Sampling) -> list[str]:
    """The features this request asks for: fields set to something other than their neutral
    value (vLLM's benchmark client sends `repetition_penalty: 1.0`, which asks for nothing)."""
    used = []
    for name, neutral in FEATURES.items():
        if name not in type(request).model_fields:
            continue
        value = getattr(request, name)
        if name == "response_format" and value is not None and value.type == "text":
            continue
        if value not in neutral:
            used.append(name)
    if request.stream_options is not None and request.stream_options.continuous_usage_stats:
        used.append("continuous_usage_stats")  # vLLM's: usage in every chunk
    return used


def _param(location: tuple) -> str:
    """The field's path, without the union branch names pydantic puts in it (`stop.str`)."""
    parts = [str(p) for p in location if isinstance(p, int) or p in FIELD_NAMES]
    return ".".join(parts)


def _validate(cls: type[Sampling], body: Any, settings: ServerSettings) -> tuple[Sampling, list[str]]:
    """The body as `cls`, and the unknown fields dropped (only with COHORT_DROP_PARAMS)."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    dropped: list[str] = []
    if settings.drop_params:
        known = {field.alias or name for name, field in cls.model_fields.items()}
        dropped = sorted(str(key) for key in body if key not in known)
        body = {key: value for key, value in body.items() if key in known}
    try:
        return cls.model_validate(body), dropped
    except ValidationError as error:
        first = error.errors(include_url=False)[0]
        where = _param(first["loc"])
        if first["type"] == "extra_forbidden":
            where = ".".join(filter(None, (_param(first["loc"][:-1]), str(first["loc"][-1]))))
            raise BadRequest(f"unknown field {where!r}: Cohort does not know it (set "
                             "COHORT_DROP_PARAMS=1 to drop unknown fields instead)",
                             param=where, code="unknown_parameter") from None
        raise BadRequest(f"{where}: {first['msg']}", param=where) from None


def _stops(request: Sampling) -> list[str]:
    return [request.stop] if isinstance(request.stop, str) else request.stop or []


def _check_limits(request: Sampling, settings: ServerSettings, max_tokens: int | None) -> None:
    if max_tokens is not None and max_tokens > settings.max_tokens_limit:
        raise BadRequest(f"max_tokens must be at most {settings.max_tokens_limit} "
                         f"(got {max_tokens}; COHORT_MAX_TOKENS_LIMIT)", param="max_tokens")
    if request.n > settings.max_n:
        raise BadRequest(f"n must be between 1 and {settings.max_n} (got {request.n}; COHORT_MAX_N)",
                         param="n")
    if not all(_stops(request)):
        raise BadRequest("stop must be a non-empty string or a list of up to 4 of them", param="stop")
    if request.stream_options is not None and not request.stream:
        raise BadRequest("stream_options is only allowed when stream is true", param="stream_options")
    if isinstance(getattr(request, "tool_choice", None), ToolChoice) and not request.tools:
        raise BadRequest("tool_choice names a function but no tools are given", param="tool_choice")
    format_ = request.response_format
    if format_ is not None and format_.type == "json_schema" and format_.json_schema is None:
        raise BadRequest("response_format of type json_schema needs json_schema",
                         param="response_format")


def _params(request: Sampling, max_tokens: int | None, features: list[str]) -> dict[str, Any]:
    """What the worker needs to run the request: the sampling and the features it uses."""
    params: dict[str, Any] = {
        "max_tokens": max_tokens, "temperature": float(request.temperature),
        "top_p": float(request.top_p), "n": request.n, "stop": _stops(request), "seed": request.seed,
        "presence_penalty": float(request.presence_penalty),
        "frequency_penalty": float(request.frequency_penalty),
        "include_usage": bool(request.stream_options and request.stream_options.include_usage),
        "ignore_eos": request.ignore_eos,
    }
    for name in features:
        if name not in type(request).model_fields:
            continue  # tool_messages, continuous_usage_stats: refused, nothing to pass on
        value = getattr(request, name)
        params[name] = value.model_dump(by_alias=True, exclude_none=True) if isinstance(
            value, BaseModel) else value
    return params


def _text_of(content: str | list[TextPart] | None) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    return "".join(part.text for part in content)


def parse_chat(body: Any, settings: ServerSettings, trace_id: str = "") -> JobSpec:
    """A `/v1/chat/completions` body as a JobSpec."""
    request, dropped = _validate(ChatRequest, body, settings)
    max_tokens = request.max_completion_tokens or request.max_tokens
    _check_limits(request, settings, max_tokens)
    messages = [{"role": m.role, "content": _text_of(m.content)} for m in request.messages]
    size = sum(len(m["content"]) for m in messages)
    if size > settings.max_prompt_chars:
        raise BadRequest(f"the messages hold {size} characters; the limit is "
                         f"{settings.max_prompt_chars} (COHORT_MAX_PROMPT_CHARS)", param="messages")
    features = features_used(request)
    if any(m.tool_calls or m.tool_call_id or m.name for m in request.messages):
        features.append("tool_messages")
    return JobSpec(request.model, "chat", _params(request, max_tokens, features), messages=messages,
                   stream=request.stream, trace_id=trace_id, features=features, dropped=dropped)


def parse_completion(body: Any, settings: ServerSettings, trace_id: str = "") -> JobSpec:
    """A `/v1/completions` body as a JobSpec (max_tokens defaults to 16, as OpenAI's does)."""
    if isinstance(body, dict) and isinstance(body.get("prompt"), list) and len(body["prompt"]) > 1:
        raise BadRequest("prompt: one prompt per request here (for many prompts at once, use "
                         "POST /inference/batch)", param="prompt")
    request, dropped = _validate(CompletionRequest, body, settings)
    max_tokens = 16 if request.max_tokens is None else request.max_tokens
    _check_limits(request, settings, max_tokens)
    prompt = request.prompt if isinstance(request.prompt, str) else request.prompt[0]
    if len(prompt) > settings.max_prompt_chars:
        raise BadRequest(f"the prompt holds {len(prompt)} characters; the limit is "
                         f"{settings.max_prompt_chars} (COHORT_MAX_PROMPT_CHARS)", param="prompt")
    features = features_used(request)
    return JobSpec(request.model, "completion", _params(request, max_tokens, features),
                   prompt=prompt, stream=request.stream, trace_id=trace_id, features=features,
                   dropped=dropped)
