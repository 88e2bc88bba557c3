"""vLLM's own OpenAI serving layer over the worker's AsyncLLM: what `vllm serve` runs, minus FastAPI.

Chat templates, tool parsers, logprob formatting, structured outputs and the response shapes are
vLLM's code, so a Cohort answer is `vllm serve`'s answer. `build_serving` mirrors what vLLM's
`init_app_state` builds, with `vllm serve`'s defaults; `handle` mirrors its route handlers and
exception handlers. Everything here runs on the engine's asyncio loop (AsyncLLM's queues and
sockets are bound to it).
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

from worker.engines.openai_output import json_bytes
from worker.engines.usage_tap import counts

log = logging.getLogger("cohort.worker.vllm")


@dataclass
class Answer:
    """What a route gave: a JSON body, an SSE stream of `data: ...` strings, or an error."""

    status: int = 200
    body: Any = None  # a pydantic response, or a dict (errors, embeddings)
    stream: AsyncIterator[str] | None = None

    def json_bytes(self) -> bytes:
        if hasattr(self.body, "model_dump_json"):
            return self.body.model_dump_json().encode()
        return json_bytes(self.body)

    def usage(self) -> dict[str, int] | None:
        usage = getattr(self.body, "usage", None)
        if usage is None and isinstance(self.body, dict):
            usage = self.body.get("usage")
        if usage is not None and hasattr(usage, "model_dump"):
            usage = usage.model_dump()
        return counts(usage)


@dataclass
class Serving:
    """The serving objects `vllm serve` would build for this engine."""

    tokenization: Any
    chat: Any = None
    completion: Any = None
    embedding: Any = None

    @property
    def routes(self) -> frozenset[str]:
        routes = {"tokenize", "detokenize"}
        if self.chat is not None:
            routes |= {"chat", "completions"}
        if self.embedding is not None:
            routes.add("embeddings")
        return frozenset(routes)


async def build_serving(engine, served_model_name: str, model_path: str, *, chat_template: str,
                        tool_call_parser: str, enable_auto_tool_choice: bool) -> Serving:
    """vLLM's init_app_state for one model, with `vllm serve`'s defaults."""
    from vllm.entrypoints.openai.chat_completion.serving import OpenAIServingChat
    from vllm.entrypoints.openai.completion.serving import OpenAIServingCompletion
    from vllm.entrypoints.openai.models.protocol import BaseModelPath
    from vllm.entrypoints.openai.models.serving import OpenAIServingModels
    from vllm.entrypoints.serve.tokenize.serving import ServingTokenization
    from vllm.renderers.chat_utils import ChatTemplateConfig, load_chat_template
    from vllm.renderers.online_renderer import OnlineRenderer
    from vllm.tasks import POOLING_TASKS

    supported_tasks = await engine.get_supported_tasks()
    template = load_chat_template(chat_template or None)
    template_kwargs: dict[str, Any] = {"cohere_format": "cmd4"}  # vllm serve's default
    reasoning_parser = engine.vllm_config.structured_outputs_config.reasoning_parser
    tool_parser = tool_call_parser or None
    models = OpenAIServingModels(engine_client=engine, base_model_paths=[
        BaseModelPath(name=served_model_name, model_path=model_path)], lora_modules=None)
    await models.init_static_loras()
    renderer = OnlineRenderer(
        model_config=engine.model_config, renderer=engine.renderer, request_logger=None,
        chat_template=template, chat_template_content_format="auto",
        trust_request_chat_template=False, trust_request_mm_kwargs=False,
        enable_auto_tools=enable_auto_tool_choice, exclude_tools_when_tool_choice_none=False,
        tool_parser=tool_parser, tool_strict_level="auto", reasoning_parser=reasoning_parser,
        default_chat_template_kwargs=template_kwargs, log_error_stack=False)
    renderer.warmup()
    serving = Serving(ServingTokenization(
        models, renderer, request_logger=None, chat_template=template,
        chat_template_content_format="auto", default_chat_template_kwargs=template_kwargs,
        trust_request_chat_template=False))
    if "generate" in supported_tasks:
        serving.chat = OpenAIServingChat(
            engine_client=engine, models=models, response_role="assistant",
            online_renderer=renderer, request_logger=None, chat_template=template,
            chat_template_content_format="auto", default_chat_template_kwargs=template_kwargs,
            trust_request_chat_template=False, return_tokens_as_token_ids=False,
            enable_auto_tools=enable_auto_tool_choice, exclude_tools_when_tool_choice_none=False,
            tool_parser=tool_parser, tool_strict_level="auto", reasoning_parser=reasoning_parser,
            enable_prompt_tokens_details=False, enable_force_include_usage=False,
            enable_log_outputs=False, enable_log_deltas=True, enable_per_request_metrics=False)
        serving.completion = OpenAIServingCompletion(
            engine, models, online_renderer=renderer, request_logger=None,
            return_tokens_as_token_ids=False, enable_prompt_tokens_details=False,
            enable_force_include_usage=False, enable_per_request_metrics=False)
    if any(task in POOLING_TASKS for task in supported_tasks) and \
            engine.model_config.get_pooling_task(supported_tasks) == "embed":
        from vllm.entrypoints.pooling.embed.serving import ServingEmbedding
        serving.embedding = ServingEmbedding(
            engine, models, request_logger=None, chat_template_config=ChatTemplateConfig(
                chat_template=template, chat_template_content_format="auto",
                trust_request_chat_template=False, trust_request_mm_kwargs=False))
    return serving


# vLLM's exception handlers read only these of the FastAPI request
_FAKE_REQUEST = SimpleNamespace(app=SimpleNamespace(state=SimpleNamespace(
    args=SimpleNamespace(log_error_stack=False))), state=SimpleNamespace())
_ADAPTERS: dict[str, Any] = {}


def _request_models() -> dict[str, Any]:
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest
    from vllm.entrypoints.pooling.embed.protocol import EmbeddingRequest
    from vllm.entrypoints.serve.tokenize.protocol import DetokenizeRequest, TokenizeRequest

    return {"chat": ChatCompletionRequest, "completions": CompletionRequest,
            "embeddings": EmbeddingRequest, "tokenize": TokenizeRequest,
            "detokenize": DetokenizeRequest}


def _adapter(route: str):
    """FastAPI's validation of a body: TypeAdapter(T).validate_python (unions need the adapter)."""
    if not _ADAPTERS:
        import pydantic
        _ADAPTERS.update((name, pydantic.TypeAdapter(model))
                         for name, model in _request_models().items())
    return _ADAPTERS[route]


async def _validation_error(error) -> Answer:
    from fastapi.exceptions import RequestValidationError
    from vllm.entrypoints.serve.exception_handling.handlers.validation import (
        validation_exception_handler)

    errors = [{**e, "loc": ("body", *e.get("loc", ()))} for e in error.errors(include_url=False)]
    response = await validation_exception_handler(_FAKE_REQUEST, RequestValidationError(errors))
    return Answer(response.status_code, json.loads(response.body))


def _error(response) -> Answer:
    return Answer(int(response.error.code), response.model_dump())


async def handle(serving: Serving, route: str, body: dict[str, Any]) -> Answer:
    """One request through vLLM's route handler for `route`, errors as vLLM's handlers give them."""
    import pydantic
    from vllm.entrypoints.serve import create_error_response
    from vllm.entrypoints.serve.engine.protocol import ErrorResponse

    try:
        try:
            request = _adapter(route).validate_python(body, from_attributes=True)
        except pydantic.ValidationError as error:
            return await _validation_error(error)
        if route == "chat":
            out = await serving.chat.create_chat_completion(request, None)
        elif route == "completions":
            out = await serving.completion.create_completion(request, None)
        elif route == "tokenize":
            out = await serving.tokenization.create_tokenize(request, None)
        elif route == "detokenize":
            out = await serving.tokenization.create_detokenize(request, None)
        else:
            response = await serving.embedding(request, None)  # a starlette response
            if not hasattr(response, "body"):
                raise NotImplementedError("streamed embeddings (encoding_format bytes)")
            return Answer(response.status_code, json.loads(response.body))
        if isinstance(out, ErrorResponse):
            return _error(out)
        if hasattr(out, "model_dump_json"):
            return Answer(200, out)
        return Answer(200, stream=out)
    except Exception as error:  # what vllm serve's app.exception_handler does
        log.debug("request failed in vLLM's serving layer", exc_info=True)
        return _error(create_error_response(error))
