"""The http engine: forward each request to an existing OpenAI-compatible server (`REAL_VLLM_URL`).

Streaming upstream, always, so deltas flow on as they come and an abort (closing the stream) reaches
the upstream. Connections are pooled. When the upstream is down the request fails with a clear
503-class error, unless COHORT_UPSTREAM_FALLBACK_TO_MOCK is set: then the mock answers, and both
the reply and the worker's engine name (shown in `/health`) say so.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import httpx

from common import protocol
from worker.engines import SAMPLING_EXTRAS, Emit, Engine, EngineError
from worker.engines.mock import MockEngine

log = logging.getLogger("cohort.worker.http")
FALLBACK_NOTE = "[upstream unavailable: mock fallback] "


class UpstreamUnavailable(EngineError):
    """The upstream server cannot be reached: a 503 for the client."""

    kind = "unavailable"


class HttpEngine(Engine):
    """A client of another OpenAI-compatible server, behind Cohort's batching front."""

    name = "http"
    # what it forwards to the upstream as it stands (it reads back text only: no logprobs, no tools)
    features = SAMPLING_EXTRAS

    def __init__(self, settings) -> None:
        super().__init__(settings)
        self.url = settings.upstream_url.rstrip("/")
        if self.url.endswith("/v1"):
            self.url = self.url[:-3]
        self.device = f"upstream {self.url}"
        self.fallback = MockEngine(settings) if settings.upstream_fallback_to_mock else None
        if self.fallback is not None:
            self.name = "http (mock fallback when the upstream is down)"
        headers = {"Authorization": f"Bearer {settings.upstream_api_key}"} if settings.upstream_api_key else {}
        self.client = httpx.AsyncClient(
            base_url=self.url, headers=headers,
            timeout=httpx.Timeout(settings.upstream_timeout_s, connect=5.0),
            limits=httpx.Limits(max_connections=settings.capacity,
                                max_keepalive_connections=settings.capacity))

    async def load(self) -> None:
        """Learn the served model from the upstream, unless REAL_VLLM_MODEL names it already."""
        if self.model:
            return
        try:
            listed = (await self.client.get("/v1/models")).raise_for_status().json()
            self.model = listed["data"][0]["id"]
        except (httpx.HTTPError, KeyError, IndexError, ValueError) as error:
            raise RuntimeError(f"cannot list the models of {self.url} ({error}); set "
                               "REAL_VLLM_MODEL to start without the upstream") from error

    async def run(self) -> None:
        if self.fallback is not None:
            await self.fallback.run()

    def _body(self, request: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        params = request["params"]
        body: dict[str, Any] = {
            "model": self.model, "stream": True, "stream_options": {"include_usage": True},
            "n": params.get("n", 1), "temperature": params.get("temperature", 1.0),
            "top_p": params.get("top_p", 1.0), "presence_penalty": params.get("presence_penalty", 0.0),
            "frequency_penalty": params.get("frequency_penalty", 0.0)}
        for name in ("max_tokens", "seed"):
            if params.get(name) is not None:
                body[name] = params[name]
        if params.get("stop"):
            body["stop"] = params["stop"]
        if params.get("ignore_eos"):
            body["ignore_eos"] = True
        body.update((name, params[name]) for name in self.features if name in params)
        if request["kind"] == "chat":
            return "/v1/chat/completions", dict(body, messages=request["messages"])
        return "/v1/completions", dict(body, prompt=request["prompt"])

    async def generate(self, request: dict[str, Any], emit: Emit) -> None:
        self.active += 1
        try:
            await self._forward(request, emit)
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError) as error:
            if self.fallback is None:
                raise UpstreamUnavailable(f"the upstream {self.url} is unreachable ({error})") from None
            log.warning("upstream %s down (%s): answering %s from the mock", self.url, error,
                        request["id"])
            noted: set[int] = set()

            def emit_noted(item: dict[str, Any]) -> None:  # every fallback reply says what it is
                if item["index"] not in noted:
                    noted.add(item["index"])
                    item = dict(item, text=FALLBACK_NOTE + item["text"])
                emit(item)

            await self.fallback.generate(request, emit_noted)
        finally:
            self.active -= 1

    async def _forward(self, request: dict[str, Any], emit: Emit) -> None:
        path, body = self._body(request)
        held: dict[int, dict[str, Any]] = {}  # each choice's last delta, until usage tells the count
        counted: dict[int, int] = {}
        async with self.client.stream("POST", path, json=body) as response:
            if response.status_code >= 400:
                detail = (await response.aread()).decode(errors="replace")[:500]
                raise EngineError(f"the upstream answered {response.status_code}: {detail}")
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("error"):
                    raise EngineError(f"the upstream failed: {chunk['error']}")
                usage = chunk.get("usage")
                for choice in chunk.get("choices") or []:
                    index = choice["index"]
                    text = choice.get("text") or (choice.get("delta") or {}).get("content") or ""
                    if index in held:
                        emit(held.pop(index))
                    counted[index] = counted.get(index, 0) + (1 if text else 0)
                    held[index] = protocol.out_item(request["id"], index, text, 1 if text else 0,
                                                    choice.get("finish_reason"))
                if usage:
                    # Chunk counts are a guess (a chunk may hold several tokens): the upstream's
                    # usage is the truth, so the last delta carries the difference.
                    extra = usage["completion_tokens"] - sum(counted.values())
                    for index, item in sorted(held.items()):
                        item["tokens"] += extra
                        item["prompt_tokens"] = usage["prompt_tokens"]
                        extra = 0
                        emit(item)
                    held.clear()
        for item in held.values():  # an upstream that sent no usage
            emit(item)

    async def close(self) -> None:
        await self.client.aclose()
