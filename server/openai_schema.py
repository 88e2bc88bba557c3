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
Stop = str | list[str]
TokenIds = Annotated[list[StrictInt], Field(min_length=1)]
# `prompt` and `input`: one text, texts, one prompt's token ids, or several prompts' token ids
Prompts = str | Annotated[list[str], Field(min_length=1)] | TokenIds | Annotated[
    list[TokenIds], Field(min_length=1)]


class Strict(BaseModel):
    """Strict types (no "5" for 5, no true for 1) and no unknown fields."""

    model_config = ConfigDict(extra="forbid", strict=True)


class TextPart(Strict):
    type: Literal["text"]
    text: str


class FunctionCall(Strict):
    name: str
    arguments: str


class ToolCall(Strict):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(Strict):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
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
    """What chat and completions share: the model, the sampling and vLLM's extensions. Ranges are
    vLLM's where they are wider than OpenAI's: what `vllm serve` answers, Cohort answers."""

    model: str = Field(min_length=1)
    max_tokens: StrictInt | None = Field(None, ge=1)
    temperature: Number | None = Field(None, ge=0)
    top_p: Number | None = Field(None, gt=0, le=1)
    n: StrictInt = Field(1, ge=1)
    stop: Stop | None = None
    seed: StrictInt | None = Field(None, ge=-(2**63), le=2**63 - 1)
    presence_penalty: Number | None = Field(None, ge=-2, le=2)
    frequency_penalty: Number | None = Field(None, ge=-2, le=2)
    stream: StrictBool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # an end-user id for the operator's logs; no effect on generation
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = None
    response_format: ResponseFormat | None = None
    # vLLM's sampling extensions
    ignore_eos: StrictBool = False
    min_tokens: StrictInt = Field(0, ge=0)
    top_k: StrictInt | None = Field(None, ge=-1)
    min_p: Number | None = Field(None, ge=0, le=1)
    repetition_penalty: Number | None = Field(None, gt=0)
    stop_token_ids: list[StrictInt] | None = None
    skip_special_tokens: StrictBool = True
    spaces_between_special_tokens: StrictBool = True
    include_stop_str_in_output: StrictBool = False
    truncate_prompt_tokens: StrictInt | None = Field(None, ge=-1)
    prompt_logprobs: StrictInt | None = Field(None, ge=-1)
    allowed_token_ids: list[StrictInt] | None = None
    bad_words: list[str] | None = None
    structured_outputs: dict[str, Any] | None = None
    return_tokens_as_token_ids: StrictBool | None = None
    return_token_ids: StrictBool | None = None
    use_beam_search: StrictBool = False
    length_penalty: Number = 1.0
    priority: StrictInt = 0
    cache_salt: str | None = None


class ChatRequest(Sampling):
    """`POST /v1/chat/completions`."""

    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    logprobs: StrictBool | None = False
    top_logprobs: StrictInt | None = Field(None, ge=0, le=20)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | ToolChoice | None = None
    parallel_tool_calls: StrictBool | None = None
    # vLLM's chat extensions
    echo: StrictBool = False
    add_generation_prompt: StrictBool = True
    continue_final_message: StrictBool = False
    add_special_tokens: StrictBool = False
    chat_template_kwargs: dict[str, Any] | None = None
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

    prompt: Prompts
    logprobs: StrictInt | None = Field(None, ge=0, le=20)
    echo: StrictBool | None = False
    best_of: StrictInt | None = Field(None, ge=1)
    suffix: str | None = None
    add_special_tokens: StrictBool = True


class EmbeddingRequest(Strict):
    """`POST /v1/embeddings`."""

    model: str = Field(min_length=1)
    input: Prompts
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: StrictInt | None = Field(None, ge=1)
    user: str | None = None
    truncate_prompt_tokens: StrictInt | None = Field(None, ge=-1)
    add_special_tokens: StrictBool = True
    priority: StrictInt = 0


class TokenizeRequest(Strict):
    """`POST /tokenize` (vLLM's): a prompt, or chat messages through the chat template."""

    model: str = Field(min_length=1)
    prompt: str | None = None
    messages: list[Message] | None = None
    add_special_tokens: StrictBool | None = None
    add_generation_prompt: StrictBool = True
    continue_final_message: StrictBool = False
    return_token_strs: StrictBool | None = False
    tools: list[Tool] | None = None
    chat_template_kwargs: dict[str, Any] | None = None


class DetokenizeRequest(Strict):
    """`POST /detokenize` (vLLM's)."""

    model: str = Field(min_length=1)
    tokens: list[StrictInt]


# The features a request may use, each with the neutral values that do not use it. Everything
# else in the models above every engine honours. The routes are features too: a worker serves
# the routes its engine names.
FEATURES: dict[str, Any] = {
    "logprobs": (None, False, 0), "top_logprobs": (None, 0), "logit_bias": (None, {}),
    "response_format": (None,), "tools": (None, []), "tool_choice": (None, "none"),
    "parallel_tool_calls": (None, True), "echo": (None, False), "best_of": (None, 1),
    "suffix": (None, ""), "min_tokens": (0,), "top_k": (None, -1, 0), "min_p": (None, 0.0),
    "repetition_penalty": (None, 1.0), "stop_token_ids": (None, []),
    "skip_special_tokens": (True,), "spaces_between_special_tokens": (True,),
    "include_stop_str_in_output": (False,), "truncate_prompt_tokens": (None,),
    "prompt_logprobs": (None,), "allowed_token_ids": (None,), "bad_words": (None, []),
    "structured_outputs": (None,), "return_tokens_as_token_ids": (None, False),
    "return_token_ids": (None, False), "use_beam_search": (False,), "length_penalty": (1.0,),
    "priority": (0,), "cache_salt": (None,), "add_generation_prompt": (True,),
    "continue_final_message": (False,), "chat_template_kwargs": (None, {}),
    "dimensions": (None,), "return_token_strs": (None, False),
    "functions": (None,), "function_call": (None,), "metadata": (None,), "store": (None, False),
    "service_tier": (None, "auto", "default", "flex"),  # flex: the front's batch tier "reasoning_effort": (None,),
    "modalities": (None, ["text"]), "audio": (None,), "prediction": (None,),
    "web_search_options": (None,),
}
# The other features a request can use: "continuous_usage_stats" (stream_options), and
# "token_prompts" (token ids as the prompt: the mock has no vocabulary of ids to read them by)
MODELS = (ChatRequest, CompletionRequest, EmbeddingRequest, TokenizeRequest, DetokenizeRequest,
          Message, TextPart, ToolCall, FunctionCall, StreamOptions, ResponseFormat, JsonSchema, Tool,
          Function, ToolChoice)
FIELD_NAMES = {name for cls in MODELS for name in cls.model_fields} | {"schema"}
# For fair shares only (what a request may cost before it runs): vLLM's completion default is 16
# tokens; a chat without max_tokens may run to the context's end, guessed here as 256.
COMPLETION_TOKENS_DEFAULT = 16
CHAT_TOKENS_GUESS = 256


def features_used(request: BaseModel) -> list[str]:
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
    options = getattr(request, "stream_options", None)
    if options is not None and options.continuous_usage_stats:
        used.append("continuous_usage_stats")  # vLLM's: usage in every chunk
    prompts = getattr(request, "prompt", None) or getattr(request, "input", None)
    if isinstance(prompts, list) and not all(isinstance(p, str) for p in prompts):
        used.append("token_prompts")
    return used


def _param(location: tuple) -> str:
    """The field's path, without the union branch names pydantic puts in it (`stop.str`)."""
    parts = [str(p) for p in location if isinstance(p, int) or p in FIELD_NAMES]
    return ".".join(parts)


def _validate(cls: type[Strict], body: Any, settings: ServerSettings
              ) -> tuple[Any, dict[str, Any], list[str]]:
    """The body as `cls`, the body to pass on, and the unknown fields dropped (only with
    COHORT_DROP_PARAMS)."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    dropped: list[str] = []
    if settings.drop_params:
        known = {field.alias or name for name, field in cls.model_fields.items()}
        dropped = sorted(str(key) for key in body if key not in known)
        body = {key: value for key, value in body.items() if key in known}
    try:
        return cls.model_validate(body), body, dropped
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


def _prompts(prompts: Any) -> list[Any]:
    """A `prompt` or `input` as a list of prompts, each a text or a list of token ids."""
    if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
        return [prompts]
    return list(prompts)


def _check_sampling(request: Sampling, settings: ServerSettings, max_tokens: int | None,
                    seqs: int) -> None:
    if max_tokens is not None and max_tokens > settings.max_tokens_limit:
        raise BadRequest(f"max_tokens must be at most {settings.max_tokens_limit} "
                         f"(got {max_tokens}; COHORT_MAX_TOKENS_LIMIT)", param="max_tokens")
    if seqs > settings.max_n:
        raise BadRequest(f"n times the prompts must be at most {settings.max_n} (got {seqs}; "
                         "COHORT_MAX_N)", param="n")
    if not all(_stops(request)):
        raise BadRequest("stop must be a non-empty string or a list of them", param="stop")
    if request.length_penalty != 1.0 and not request.use_beam_search:  # vLLM would ignore it
        raise BadRequest("length_penalty applies only with use_beam_search", param="length_penalty")
    if request.stream_options is not None and not request.stream:
        raise BadRequest("stream_options is only allowed when stream is true", param="stream_options")
    format_ = request.response_format
    if format_ is not None and format_.type == "json_schema" and format_.json_schema is None:
        raise BadRequest("response_format of type json_schema needs json_schema",
                         param="response_format")


def _check_size(size: int, settings: ServerSettings, param: str) -> None:
    if size > settings.max_prompt_chars:
        raise BadRequest(f"the {param} hold {size} characters; the limit is "
                         f"{settings.max_prompt_chars} (COHORT_MAX_PROMPT_CHARS)", param=param)


def _text_of(content: str | list[TextPart] | None) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    return "".join(part.text for part in content)


def chat_prompt_text(messages: list[Message]) -> str:
    """The text a chat's prefix is read from: the messages with their roles, in order."""
    return "".join(f"\x1e{m.role}\x1f{_text_of(m.content)}" for m in messages)


def parse_chat(body: Any, settings: ServerSettings, trace_id: str = "") -> JobSpec:
    """A `/v1/chat/completions` body as a JobSpec."""
    request, body, dropped = _validate(ChatRequest, body, settings)
    _check_sampling(request, settings, request.max_completion_tokens or request.max_tokens,
                    request.n)
    if isinstance(request.tool_choice, ToolChoice) and not request.tools:
        raise BadRequest("tool_choice names a function but no tools are given", param="tool_choice")
    chars = sum(len(_text_of(m.content)) for m in request.messages)
    _check_size(chars, settings, "messages")
    asked = request.max_completion_tokens or request.max_tokens or CHAT_TOKENS_GUESS
    return JobSpec(request.model, "chat", body, stream=bool(request.stream), trace_id=trace_id,
                   features=features_used(request), dropped=dropped, seqs=request.n,
                   prompt_text=chat_prompt_text(request.messages),
                   cost=chars // 4 + request.n * asked,
                   # OpenAI's flex processing: slower and cheaper, here the idle-capacity tier
                   tier="batch" if request.service_tier == "flex" else "interactive")


def parse_completion(body: Any, settings: ServerSettings, trace_id: str = "") -> JobSpec:
    """A `/v1/completions` body as a JobSpec (vLLM's max_tokens default, 16, is the worker's)."""
    request, body, dropped = _validate(CompletionRequest, body, settings)
    prompts = _prompts(request.prompt)
    _check_sampling(request, settings, request.max_tokens, request.n * len(prompts))
    chars = sum(len(p) if isinstance(p, str) else 4 * len(p) for p in prompts)
    _check_size(chars, settings, "prompt")
    # One prompt of text is placed by its prefix; a list of prompts (or of token ids) by load:
    # its engine runs each prompt apart, so the worker could not tell which one its cache holds
    one_text = prompts[0] if len(prompts) == 1 and isinstance(prompts[0], str) else ""
    seqs = request.n * len(prompts)
    return JobSpec(request.model, "completions", body, stream=bool(request.stream),
                   trace_id=trace_id, features=features_used(request), dropped=dropped,
                   seqs=seqs, prompt_text=one_text,
                   cost=chars // 4 + seqs * (request.max_tokens or COMPLETION_TOKENS_DEFAULT))


def parse_embeddings(body: Any, settings: ServerSettings, trace_id: str = "") -> JobSpec:
    """A `/v1/embeddings` body as a JobSpec."""
    request, body, dropped = _validate(EmbeddingRequest, body, settings)
    inputs = _prompts(request.input)
    if len(inputs) > settings.max_n * 64:
        raise BadRequest(f"input holds {len(inputs)} items; the limit is {settings.max_n * 64} "
                         "(64 x COHORT_MAX_N)", param="input")
    chars = sum(len(p) if isinstance(p, str) else 4 * len(p) for p in inputs)
    _check_size(chars, settings, "input")
    return JobSpec(request.model, "embeddings", body, trace_id=trace_id,
                   features=features_used(request), dropped=dropped, seqs=len(inputs),
                   cost=1 + chars // 4)


def parse_tokens(route: str, body: Any, settings: ServerSettings, trace_id: str = "") -> JobSpec:
    """A `/tokenize` or `/detokenize` body as a JobSpec."""
    cls = TokenizeRequest if route == "tokenize" else DetokenizeRequest
    request, body, dropped = _validate(cls, body, settings)
    if route == "tokenize":
        if (request.prompt is None) == (request.messages is None):
            raise BadRequest("give either prompt or messages", param="prompt")
        _check_size(len(request.prompt or "") + len(chat_prompt_text(request.messages or [])),
                    settings, "prompt")
    return JobSpec(request.model, route, body, trace_id=trace_id, features=features_used(request),
                   dropped=dropped)
