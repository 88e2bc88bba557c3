"""The vLLM engine: vLLM's v1 `AsyncLLM` hosted in the worker process.

AsyncLLM lives on asyncio, the worker on trio, so the engine gets an asyncio loop of its own on one
thread. Requests run through vLLM's own OpenAI serving layer (see vllm_serving), so the answer is
`vllm serve`'s, byte for byte. Every request of a batch is submitted at once, so vLLM's continuous
batching spans batches; each SSE event crosses back to trio through `run_sync_soon` (thread-safe,
never blocking), where the worker's link sends all events that arrived together as one `out`.
Cancelling a request in trio cancels its asyncio task, and vLLM aborts it on that cancellation.
The engine's load comes from vLLM's own scheduler statistics, through a stat logger of ours.
Which prompt prefixes its cache holds comes from vLLM's KV cache events, which its EngineCore
publishes on a private ipc socket this worker subscribes to, joined with each request's prompt
tokens as vLLM returns them (see worker.residency).
It runs vLLM's `priority` scheduling policy: the front gives each request the priority that keeps
fair shares and tiers in the engine's own queue (server.scheduling.engine_priority).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import os
import shutil
import tempfile
import threading
from typing import Any

import msgspec
import trio
import zmq

from common import protocol
from common.tracing import traces_url
from common.zmqtrio import TrioSocket
from worker.engines import VLLM_FEATURES, Emit, Engine, EngineError
from worker.residency import Residency
from worker.engines.usage_tap import UsageTap, sse
from worker.engines.vllm_serving import Serving, build_serving, handle

log = logging.getLogger("cohort.worker.vllm")
PRIORITISED = frozenset({"chat", "completions", "embeddings"})  # the routes vLLM queues
ENGINE_CACHE = (None, "GPU")  # events of the engine's own KV cache (not of blocks offloaded)
# the request a coroutine on the engine's loop serves: the serving layer calls AsyncLLM.generate
# from the request's own task, so the call knows whose request it runs
_serving: contextvars.ContextVar[protocol.RequestItem | None] = contextvars.ContextVar(
    "cohort_serving", default=None)


def pick_device(wanted: str) -> str:
    if wanted != "auto":
        return wanted
    try:
        import torch
        return "cuda" if torch.cuda.is_available() else "cpu"
    except ImportError:
        return "cpu"


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
    features = VLLM_FEATURES

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
        self._serving: Serving | None = None
        if settings.runner == "pooling":
            self.routes = frozenset({"embeddings", "tokenize", "detokenize"})
        self._figures = SchedulerFigures()
        self._token: trio.lowlevel.TrioToken | None = None
        self._events_dir = ""
        if settings.kv_events and settings.runner != "pooling":
            self.residency = Residency()
            self._events_dir = tempfile.mkdtemp(prefix="cohort-kv-")  # private: mode 0700

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
        extra: dict[str, Any] = dict(limits)
        if s.kv_cache_memory_bytes:
            extra["kv_cache_memory_bytes"] = s.kv_cache_memory_bytes
        if s.otlp_endpoint:  # vLLM's own request spans, under the worker's (see load)
            extra["otlp_traces_endpoint"] = traces_url(s.otlp_endpoint)
        if self.residency is not None:
            from vllm.config import KVEventsConfig
            extra["kv_events_config"] = KVEventsConfig(
                enable_kv_cache_events=True, publisher="zmq", endpoint=self.events_endpoint,
                topic="kv")
        return AsyncEngineArgs(
            model=self.path, served_model_name=[self.model], max_model_len=s.max_model_len,
            quantization=quantization, trust_remote_code=s.trust_remote_code,
            gpu_memory_utilization=share, enforce_eager=s.enforce_eager,
            dtype="float32" if self.device == "cpu" else "auto", disable_log_stats=True,
            runner=s.runner, convert=s.convert, scheduling_policy="priority", **extra)

    @property
    def events_endpoint(self) -> str:
        """Where EngineCore publishes its KV events: an ipc socket in a directory only we read."""
        return f"ipc://{self._events_dir}/events"

    async def load(self) -> None:
        if self.settings.hf_token:
            os.environ.setdefault("HF_TOKEN", self.settings.hf_token)
        if self.settings.otlp_endpoint:  # vLLM exports by gRPC unless told otherwise
            os.environ.setdefault("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/protobuf")
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
            s = self.settings
            return engine, await build_serving(
                engine, self.model, self.path, chat_template=s.chat_template,
                tool_call_parser=s.tool_call_parser,
                enable_auto_tool_choice=s.enable_auto_tool_choice)

        self._engine, self._serving = await self._on_loop(create())
        self.routes = self._serving.routes
        self._wrap_generate(self._engine)

    def _wrap_generate(self, engine) -> None:
        """Wrap AsyncLLM.generate, which vLLM's serving layer calls for each prompt: it hands
        vLLM the request's trace context (vLLM's own `llm_request` span joins the trace), and
        the first output of a fingerprinted request, which carries the prompt's token ids,
        links its fingerprints to the engine's blocks (on trio's side)."""
        original, residency, token = engine.generate, self.residency, self._token
        traced = bool(self.settings.otlp_endpoint)  # else vLLM has no tracer to take them
        assert token is not None

        async def generate(*args, **kwargs):
            request = _serving.get()
            if traced and request is not None and request.traceparent:
                kwargs["trace_headers"] = {"traceparent": request.traceparent}
            # the front fingerprints a request of one prompt only: its tokens are the first output's
            link = residency is not None and request is not None and bool(request.prefix)
            async for output in original(*args, **kwargs):
                if link and output.prompt_token_ids:
                    assert residency is not None and request is not None
                    token.run_sync_soon(residency.link, request.id, request.prefix,
                                        request.prompt_chars, list(output.prompt_token_ids))
                    link = False
                yield output

        engine.generate = generate

    async def run(self) -> None:
        """Read EngineCore's KV events into the residency (the worker runs this once loaded)."""
        if self.residency is None:
            return
        from vllm.distributed.kv_events import (AllBlocksCleared, BlockRemoved, BlockStored,
                                                KVEventBatch)
        residency, decoder = self.residency, msgspec.msgpack.Decoder(KVEventBatch)
        context: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        raw = context.socket(zmq.SUB)
        raw.setsockopt(zmq.SUBSCRIBE, b"")
        raw.setsockopt(zmq.RCVHWM, 100_000)  # as vLLM's publisher keeps: a busy loop drops none
        raw.connect(self.events_endpoint)
        refused, last_seq = 0, None
        with TrioSocket(raw) as sock:
            while True:
                frames = await sock.recv_multipart()
                seq = int.from_bytes(frames[-2], "big", signed=True)
                if last_seq is not None and seq != last_seq + 1:
                    # events were lost: what is held can no longer be told, so nothing is
                    log.warning("KV events %d to %d from vLLM were lost; the fronts are told this "
                                "engine holds no prefix until new events say otherwise",
                                last_seq + 1, seq - 1)
                    residency.cleared()
                last_seq = seq
                try:
                    batch = decoder.decode(frames[-1])
                except msgspec.DecodeError as error:  # a vLLM of another event format
                    refused += 1
                    if refused == 1 or refused % 1000 == 0:
                        log.warning("could not read %d KV event batch(es) from vLLM: %s",
                                    refused, error)
                    continue
                for event in batch.events:
                    if getattr(event, "medium", None) not in ENGINE_CACHE:
                        continue
                    if isinstance(event, BlockStored):
                        residency.stored(event.block_hashes, event.parent_block_hash,
                                         event.token_ids, event.block_size)
                    elif isinstance(event, BlockRemoved):
                        residency.removed(event.block_hashes)
                    elif isinstance(event, AllBlocksCleared):
                        residency.cleared()
                residency.settle()

    def dead(self) -> str:
        """vLLM marks its client errored once its EngineCore process is gone (EngineDeadError)."""
        if self._engine is not None and self._engine.errored:
            return "vLLM's EngineCore is gone (EngineDeadError)"
        return ""

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
            max_num_seqs=config.max_num_seqs, max_num_batched_tokens=config.max_num_batched_tokens,
            prefixes_held=self.residency.held() if self.residency is not None else 0)

    async def _produce(self, request: protocol.RequestItem, emit_soon) -> None:
        """The asyncio side of one request: vLLM's answer, its SSE events passed on as they come.

        Streams always ask vLLM for the usage chunk: see UsageTap."""
        body = dict(request.body, request_id=request.id.removeprefix("job-"))
        if request.route in PRIORITISED:  # the front's fair shares and tiers, in vLLM's queue
            body["priority"] = request.priority
        assert self._serving is not None  # loaded before any request reaches it
        _serving.set(request)
        serving = self._serving.chat or self._serving.completion
        tap = UsageTap(body, request.stream, getattr(serving, "system_fingerprint", None))
        answer = await handle(self._serving, request.route, tap.body)
        if answer.status >= 500:
            raise EngineError(f"vLLM failed the request ({answer.status}): "
                              f"{answer.json_bytes().decode(errors='replace')[:500]}")
        if answer.stream is None:
            emit_soon(protocol.out_item(request.id, answer.json_bytes(), done=True,
                                        status=answer.status, usage=answer.usage()))
            return
        async for event in answer.stream:
            if event.startswith("data: [DONE]"):
                break
            relayed = tap.relay(event[6:].rstrip("\n"))
            if relayed:
                emit_soon(protocol.out_item(request.id, sse(relayed)))
        emit_soon(protocol.out_item(request.id, sse(tap.rest()), done=True, usage=tap.usage))

    async def generate(self, request: protocol.RequestItem, emit: Emit) -> None:
        self.active += 1

        token = self._token
        assert token is not None  # set when the model loaded

        def emit_soon(item: protocol.OutItem) -> None:
            token.run_sync_soon(emit, item)

        future = asyncio.run_coroutine_threadsafe(self._produce(request, emit_soon), self._loop)
        done = trio.Event()
        future.add_done_callback(lambda _: token.run_sync_soon(done.set))
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
        if self._events_dir:
            shutil.rmtree(self._events_dir, ignore_errors=True)
