"""The vLLM engine: vLLM's v1 `AsyncLLM` hosted in the worker process.

AsyncLLM lives on asyncio, the worker on trio, so the engine gets an asyncio loop of its own on one
thread. Every request of a batch is submitted at once, so vLLM's continuous batching spans
batches; each engine step's deltas cross back to trio through `run_sync_soon` (thread-safe, never
blocking), where the worker's link sends all deltas that arrived together as one `out` message.
Cancelling a request in trio cancels its asyncio task, and vLLM aborts it on that cancellation.
The engine's load comes from vLLM's own scheduler statistics, through a stat logger of ours.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from typing import Any

import trio

from common import protocol
from worker.engines import SAMPLING_EXTRAS, Emit, Engine, EngineError, InvalidRequest

log = logging.getLogger("cohort.worker.vllm")


def pick_device(wanted: str) -> str:
    if wanted != "auto":
        return wanted
    try:
        import torch
        return "cuda" if torch.cuda.is_available() else "cpu"
    except ImportError:
        return "cpu"


def structured_outputs(response_format: dict[str, Any]):
    """OpenAI's response_format as vLLM's structured-output constraint (what vllm serve does)."""
    from vllm.sampling_params import StructuredOutputsParams

    if response_format["type"] == "json_object":
        return StructuredOutputsParams(json_object=True)
    schema = response_format["json_schema"].get("schema") or {"type": "object"}
    return StructuredOutputsParams(json=schema)


async def _chain(first, rest):
    yield first
    async for item in rest:
        yield item


class SchedulerFigures:
    """The last scheduler statistics vLLM reported (once per engine step), and the prefix cache's
    hits summed over steps. vLLM writes it on the engine's asyncio thread; trio reads plain numbers."""

    def __init__(self) -> None:
        self.waiting = 0
        self.kv_usage = 0.0
        self.queries = 0
        self.hits = 0

    def logger_factory(self):
        """A factory in the shape `AsyncLLM(stat_loggers=[...])` takes: (vllm_config, index)."""
        from vllm.v1.metrics.loggers import StatLoggerBase

        figures = self

        class Recorder(StatLoggerBase):
            def __init__(self, vllm_config, engine_index: int = 0) -> None:
                pass

            def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None,
                       engine_idx: int = 0) -> None:
                if scheduler_stats is None:
                    return
                figures.waiting = scheduler_stats.num_waiting_reqs
                figures.kv_usage = scheduler_stats.kv_cache_usage
                prefix = scheduler_stats.prefix_cache_stats
                if prefix is not None:  # deltas since the last step
                    figures.queries += prefix.queries
                    figures.hits += prefix.hits

            def log_engine_initialized(self) -> None:
                pass

        return lambda vllm_config, engine_index=0: Recorder(vllm_config, engine_index)


class VllmEngine(Engine):
    """AsyncLLM on a private asyncio thread, driven from trio."""

    name = "vllm"
    features = SAMPLING_EXTRAS

    def __init__(self, settings) -> None:
        super().__init__(settings)
        from worker.models import default_model_path

        self.path = settings.model or default_model_path()
        self.model = settings.served_model_name or os.path.basename(self.path.rstrip("/"))
        self.device = pick_device(settings.device)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="vllm-asyncio",
                                        daemon=True)
        self._engine: Any = None
        self._tokenizer: Any = None
        self._figures = SchedulerFigures()
        self._token: trio.lowlevel.TrioToken | None = None

    async def _on_loop(self, coro) -> Any:
        """Run a coroutine on the engine's asyncio loop and wait for it without blocking trio."""
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        return await trio.to_thread.run_sync(future.result, abandon_on_cancel=True)

    def engine_args(self):
        from vllm.engine.arg_utils import AsyncEngineArgs

        s = self.settings
        share = s.gpu_memory_utilization or (0.9 if self.device == "cuda" else 0.3)
        quantization = None if s.quantization in ("", "auto") else s.quantization
        limits = {name: value for name, value in (("max_num_seqs", s.max_num_seqs),
                                                   ("max_num_batched_tokens", s.max_num_batched_tokens))
                  if value}
        # disable_log_stats: no periodic log lines; our stat logger still gets every step's figures
        return AsyncEngineArgs(
            model=self.path, served_model_name=[self.model], max_model_len=s.max_model_len,
            quantization=quantization, trust_remote_code=s.trust_remote_code,
            gpu_memory_utilization=share, enforce_eager=s.enforce_eager,
            dtype="float32" if self.device == "cpu" else "auto", disable_log_stats=True, **limits)

    async def load(self) -> None:
        if self.settings.hf_token:
            os.environ.setdefault("HF_TOKEN", self.settings.hf_token)
        self._token = trio.lowlevel.current_trio_token()
        self._thread.start()

        async def create():
            from vllm.usage.usage_lib import UsageContext
            from vllm.v1.engine.async_llm import AsyncLLM
            # vllm serve's usage context: the same default batch limits as `vllm serve` picks
            # (on a GPU they are larger than the engine context's 128 sequences)
            engine = AsyncLLM.from_engine_args(self.engine_args(),
                                               usage_context=UsageContext.OPENAI_API_SERVER,
                                               stat_loggers=[self._figures.logger_factory()])
            return engine, engine.get_tokenizer()

        self._engine, self._tokenizer = await self._on_loop(create())

    def unfinished(self) -> int:
        """Requests vLLM itself still runs (what heartbeats report: proof an abort landed)."""
        try:
            return self._engine.output_processor.get_num_unfinished_requests()
        except AttributeError:
            return self.active

    def stats(self) -> protocol.EngineLoad:
        """Running + waiting is exact (vLLM's unfinished requests, those submitted since its last
        step included); how they split, the KV use and the cache hits are its scheduler's figures."""
        if self._engine is None:
            return super().stats()
        figures, config = self._figures, self._engine.vllm_config.scheduler_config
        total = self.unfinished()
        waiting = min(figures.waiting, total)
        return protocol.EngineLoad(
            running=total - waiting, waiting=waiting, kv_usage=figures.kv_usage,
            prefix_hit_rate=figures.hits / figures.queries if figures.queries else 0.0,
            max_num_seqs=config.max_num_seqs, max_num_batched_tokens=config.max_num_batched_tokens)

    def _prompt_ids(self, request: dict[str, Any]) -> list[int]:
        if request["kind"] == "chat":
            text = self._tokenizer.apply_chat_template(request["messages"], tokenize=False,
                                                       add_generation_prompt=True)
            return self._tokenizer.encode(text, add_special_tokens=False)
        return self._tokenizer.encode(request["prompt"])

    def _sampling(self, params: dict[str, Any], prompt_len: int, stream: bool):
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        room = self.settings.max_model_len - prompt_len
        if room < 1:
            raise InvalidRequest(f"the prompt has {prompt_len} tokens; this model takes at most "
                              f"{self.settings.max_model_len} (COHORT_MAX_MODEL_LEN)")
        max_tokens = min(params.get("max_tokens") or room, room)
        extras: dict[str, Any] = {name: params[name] for name in self.features if name in params}
        if "logit_bias" in extras:  # JSON keys are strings; vLLM's are token ids
            extras["logit_bias"] = {int(token): bias for token, bias in extras["logit_bias"].items()}
        if "response_format" in extras:
            extras["structured_outputs"] = structured_outputs(extras.pop("response_format"))
        return SamplingParams(**extras,
            n=params.get("n", 1), temperature=params.get("temperature", 1.0),
            top_p=params.get("top_p", 1.0), max_tokens=max_tokens, stop=params.get("stop") or None,
            seed=params.get("seed"), presence_penalty=params.get("presence_penalty", 0.0),
            frequency_penalty=params.get("frequency_penalty", 0.0),
            ignore_eos=bool(params.get("ignore_eos")),
            # not streaming: vLLM sends only the final output, sparing its per-step work too
            output_kind=RequestOutputKind.DELTA if stream else RequestOutputKind.FINAL_ONLY)

    async def _produce(self, request: dict[str, Any], emit_many) -> None:
        """The asyncio side of one request: feed vLLM's deltas to trio as they come."""
        from vllm.exceptions import VLLMClientError

        ids = self._prompt_ids(request)
        try:
            sampling = self._sampling(request["params"], len(ids), request.get("stream", True))
            outputs = self._engine.generate({"prompt_token_ids": ids}, sampling,
                                            request_id=request["id"])
            first = await anext(outputs)
        except (ValueError, TypeError, VLLMClientError) as error:  # vLLM refuses the request
            raise InvalidRequest(str(error)) from None
        async for output in _chain(first, outputs):
            items = []
            for choice in output.outputs:
                finish = choice.finish_reason
                if finish == "abort":
                    raise EngineError("vLLM aborted the request")
                items.append(protocol.out_item(request["id"], choice.index, choice.text,
                                               len(choice.token_ids),
                                               finish if finish in ("stop", "length") else None,
                                               len(ids)))
            self._token.run_sync_soon(emit_many, items)

    async def generate(self, request: dict[str, Any], emit: Emit) -> None:
        self.active += 1

        def emit_many(items: list[dict[str, Any]]) -> None:
            for item in items:
                emit(item)

        future = asyncio.run_coroutine_threadsafe(self._produce(request, emit_many), self._loop)
        done = trio.Event()
        future.add_done_callback(lambda _: self._token.run_sync_soon(done.set))
        try:
            await done.wait()
            error = future.exception()
            if isinstance(error, EngineError):
                raise error
            if error is not None:
                raise EngineError(f"{type(error).__name__}: {error}")
        finally:
            self.active -= 1
            if not future.done():
                future.cancel()  # cancels the asyncio task; vLLM aborts the request on that

    async def close(self) -> None:
        if self._engine is not None:
            engine, self._engine = self._engine, None
            await trio.to_thread.run_sync(engine.shutdown)
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
