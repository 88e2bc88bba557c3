"""The engine interface every worker engine implements: load once, then run requests concurrently."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from common import protocol
from common.config import WorkerSettings

Emit = Callable[[dict[str, Any]], None]

# Request features (server.openai_schema.FEATURES) an engine that samples real tokens takes as
# they are: vLLM's SamplingParams names, which the http engine forwards to its upstream too.
SAMPLING_EXTRAS = frozenset({"min_tokens", "top_k", "min_p", "repetition_penalty",
                             "stop_token_ids", "skip_special_tokens", "logit_bias",
                             "response_format"})


class EngineError(Exception):
    """One request failed in the engine; the worker reports it to the front as a per-request error."""

    kind = "engine"


class InvalidRequest(EngineError):
    """The engine cannot take this request as given (too long a prompt): the client's fault, a 400."""

    kind = "invalid"


class Engine:
    """Base of the engines: `generate` runs one request, calling `emit` with protocol out items."""

    name = "base"
    # Request features past the base (see server.openai_schema.FEATURES) this engine honours; the
    # front refuses the others with a 400 that names them, rather than have them dropped here.
    features: frozenset[str] = frozenset()

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

    async def generate(self, request: dict[str, Any], emit: Emit) -> None:
        """Run one request to its end; cancellation (an abort) must stop it in the engine."""
        raise NotImplementedError

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
