"""The http engine: forward each request to an existing OpenAI-compatible server (`REAL_VLLM_URL`).

The client's body goes upstream as it came (the front validated it), and the upstream's answer comes
back as it came: streams event by event, so an abort (closing the stream) reaches the upstream. Connections are pooled. When the upstream is down the request fails with a clear
503-class error, unless COHORT_UPSTREAM_FALLBACK_TO_MOCK is set: then the mock answers, and both
the reply and the worker's engine name (shown in `/health`) say so.
"""

from __future__ import annotations

import json
import logging

import httpx
import msgspec

from common import protocol
from worker.engines import VLLM_FEATURES, Emit, Engine, EngineError
from worker.engines.usage_tap import UsageTap, counts, sse
from worker.engines.mock import MockEngine

log = logging.getLogger("cohort.worker.http")
FALLBACK_NOTE = "[upstream unavailable: mock fallback] "
PATHS = {"chat": "/v1/chat/completions", "completions": "/v1/completions",
         "embeddings": "/v1/embeddings", "tokenize": "/tokenize", "detokenize": "/detokenize"}


class UpstreamUnavailable(EngineError):
    """The upstream server cannot be reached: a 503 for the client."""

    kind = "unavailable"


class HttpEngine(Engine):
    """A client of another OpenAI-compatible server, behind Cohort's batching front."""

    name = "http"
    # It forwards every request as the client sent it, so it honours what `vllm serve` honours.
    routes = frozenset({"chat", "completions", "embeddings", "tokenize", "detokenize"})
    features = VLLM_FEATURES

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

    async def generate(self, request: protocol.RequestItem, emit: Emit) -> None:
        self.active += 1
        try:
            await self._forward(request, emit)
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError) as error:
            if self.fallback is None:
                raise UpstreamUnavailable(f"the upstream {self.url} is unreachable ({error})") from None
            log.warning("upstream %s down (%s): answering %s from the mock", self.url, error,
                        request.id)
            # every fallback reply says what it is
            await self.fallback.generate(msgspec.structs.replace(request, note=FALLBACK_NOTE),
                                         emit)
        finally:
            self.active -= 1

    async def _forward(self, request: protocol.RequestItem, emit: Emit) -> None:
        """The body as the client sent it, to the same route upstream; its answer relayed as it
        comes, status and all (a 5xx is the engine failing: retried elsewhere or a 502). The
        request's trace goes along as a `traceparent` header, so the upstream's own spans (vLLM's
        `llm_request`, or another Cohort's) join it. The front's engine priority stays here: the
        upstream's scheduling policy is not ours to know."""
        tap = UsageTap(request.body, request.stream)
        traced = {"traceparent": request.traceparent} if request.traceparent else None
        async with self.client.stream("POST", PATHS[request.route], json=tap.body,
                                      headers=traced) as response:
            if response.status_code >= 500:
                detail = (await response.aread()).decode(errors="replace")[:500]
                raise EngineError(f"the upstream answered {response.status_code}: {detail}")
            if not request.stream or response.status_code >= 400:
                data = await response.aread()
                usage = None
                if response.status_code < 400:
                    try:
                        usage = counts(json.loads(data).get("usage"))
                    except (ValueError, AttributeError):
                        raise EngineError(f"the upstream answered with no JSON: {data[:200]!r}") \
                            from None
                emit(protocol.out_item(request.id, data, done=True,
                                       status=response.status_code, usage=usage))
                return
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                relayed = tap.relay(line[6:])
                if relayed:
                    emit(protocol.out_item(request.id, sse(relayed)))
        emit(protocol.out_item(request.id, sse(tap.rest()), done=True, usage=tap.usage))

    async def close(self) -> None:
        await self.client.aclose()
