"""The engine interface every worker engine implements: load once, then run requests concurrently."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from common import protocol
from common.config import WorkerSettings
from worker.residency import Residency

Emit = Callable[[protocol.OutItem], None]

GENERATE_ROUTES = frozenset({"chat", "completions", "tokenize", "detokenize"})
# Request features (server.openai_schema.FEATURES) that vLLM's OpenAI layer honours: a vLLM worker
# runs that layer, and the http engine forwards to `vllm serve`. Left out, so refused by the front:
# OpenAI's fields vLLM reads but ignores (best_of, store, metadata, service_tier, ...), and
# `priority`, which vLLM 0.32 ignores without a word under its default first-come scheduler.
VLLM_FEATURES = frozenset({
    "logprobs", "top_logprobs", "logit_bias", "response_format", "tools", "tool_choice",
    "parallel_tool_calls", "echo", "suffix", "min_tokens", "top_k", "min_p", "repetition_penalty",
    "stop_token_ids", "skip_special_tokens", "spaces_between_special_tokens",
    "include_stop_str_in_output", "truncate_prompt_tokens", "prompt_logprobs",
    "allowed_token_ids", "bad_words", "structured_outputs", "return_tokens_as_token_ids",
    "return_token_ids", "use_beam_search", "length_penalty", "cache_salt",
    "add_generation_prompt", "continue_final_message", "chat_template_kwargs", "dimensions",
    "return_token_strs", "continuous_usage_stats", "token_prompts"})


class EngineError(Exception):
    """One request failed in the engine; the worker reports it to the front as a per-request error."""

    kind = "engine"


class InvalidRequest(EngineError):
    """The engine cannot take this request as given (too long a prompt): the client's fault, a 400
    in vLLM's error shape, which the worker sends as the request's answer."""

    kind = "invalid"

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param

    def body(self) -> dict[str, Any]:
        return {"error": {"message": str(self), "type": "BadRequestError", "param": self.param,
                          "code": 400}}


class Engine:
    """Base of the engines: `generate` runs one request, calling `emit` with protocol out items."""

    name = "base"
    routes: frozenset[str] = GENERATE_ROUTES  # of common.protocol.ROUTES
    # Request features past the base (see server.openai_schema.FEATURES) this engine honours; the
    # front refuses the others with a 400 that names them, rather than have them dropped here.
    features: frozenset[str] = frozenset()
    # Which prompt prefixes its cache holds, for engines that can tell (see worker.residency):
    # the worker's links pass it on to the fronts, which place by it.
    residency: Residency | None = None

    def __init__(self, settings: WorkerSettings) -> None:
        self.settings = settings
        self.model = settings.served_model_name or settings.model
        self.device = "cpu"
        self.capacity = settings.capacity
        self.max_num_seqs = settings.max_num_seqs or settings.capacity
        self.active = 0

    async def load(self) -> None:
        """Load the model; raise with a clear cause if that cannot be done."""

    async def admit(self, batch_size: int) -> None:
        """Called once per batch before its requests start (the mock's per-batch cost)."""

    async def generate(self, request: protocol.RequestItem, emit: Emit) -> None:
        """Run one request (see protocol.request_item) to its end, emitting protocol out items (the
        last one `done`); cancellation (an abort) must stop it in the engine."""
        raise NotImplementedError

    def dead(self) -> str:
        """Why the engine can serve no more (its process died), or "" while it can."""
        return ""

    def unfinished(self) -> int:
        """How many requests the engine is running (heartbeats report it)."""
        return self.active

    def stats(self) -> protocol.EngineLoad:
        """What the engine is doing now, for placement; engines that know more say more."""
        return protocol.EngineLoad(running=self.unfinished(),
                                   max_num_seqs=self.max_num_seqs)

    async def close(self) -> None:
        """Free the engine (no stray processes once the worker exits)."""


def make_engine(settings: WorkerSettings) -> Engine:
    """The engine the settings ask for; heavy imports happen only for the one chosen."""
    if settings.engine_name == "vllm":
        from worker.engines.vllm import VllmEngine
        return VllmEngine(settings)
    if settings.engine_name == "http":
        from worker.engines.http import HttpEngine
        return HttpEngine(settings)
    from worker.engines.mock import MockEngine
    return MockEngine(settings)
