"""The OpenAI routes, and vLLM's beside them: chat and completions (plain and SSE), embeddings,
`/tokenize` and `/detokenize`, `/v1/models`. The worker's engine writes the answer (vLLM's own
serving layer on a vLLM worker); the front relays it as it comes and writes only `[DONE]`."""

from __future__ import annotations

import json
import time
from functools import partial
from typing import Any

from quart import Blueprint, Response, g, request

from server.errors import CohortError, NotFound
from server.lifecycle import Run
from server.openai_schema import parse_chat, parse_completion, parse_embeddings, parse_tokens
from server.routes.context import caller, json_body, services
from server.tracing import phase

blueprint = Blueprint("openai", __name__)

DONE = b"data: [DONE]\n\n"


def sse_event(body: dict) -> bytes:
    return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"


async def _serve(run: Run) -> Response:
    """Run the request through the lifecycle: whole, or as a stream that starts once its first
    event is there (so a request the engine refuses is an HTTP error with vLLM's status, as
    `vllm serve` answers it, not a 200 with an error event)."""
    lifecycle = services().lifecycle
    if run.spec.stream:
        lifecycle.start(run)
        response = await _sse(run)
    else:
        response = Response(await lifecycle.complete(run), mimetype="application/json")
    if run.spec.dropped:  # COHORT_DROP_PARAMS: say what was dropped, never drop it silently
        response.headers["X-Cohort-Dropped-Params"] = ",".join(run.spec.dropped)
    if run.ticket is not None:
        response.headers.extend(run.ticket.headers)  # new names: no search for ones to replace
    return response


async def _sse(run: Run) -> Response:
    lifecycle = services().lifecycle
    events = lifecycle.stream(run)
    try:
        first = await anext(events)
    except BaseException:
        await events.aclose()
        raise

    async def body():
        try:
            yield first
            async for data in events:
                yield data
        except CohortError as error:  # headers are gone: the error travels as an event
            yield sse_event(error.body())
        finally:
            await events.aclose()  # a client that left: the job is aborted on its worker
        yield DONE

    response = Response(body(), mimetype="text/event-stream",
                        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    response.timeout = None  # the job's own deadline bounds it
    return response


async def _body() -> Any:
    """The JSON body; without a `model`, the one model served, as `vllm serve` takes it."""
    body = await json_body()
    if isinstance(body, dict) and "model" not in body:
        served = services().dispatcher.models()
        if len(served) == 1:
            body["model"] = served[0]
    return body


async def _answer(parse) -> Response:
    """A POST route: the caller checked, the body parsed into a job, the job served."""
    cohort = services()
    trace = cohort.gateway.tracing.begin(f"{request.method} {request.path}",
                                         request.headers.get("traceparent", ""))
    try:
        with phase(trace, "auth"):
            principal = await caller()
        spec = parse(await _body(), cohort.settings, g.request_id)
        principal.check_model(spec.model)
        spec.tenant = principal.tenant
        spec.weight, tier = principal.share()
        if tier == "batch":  # a key in the batch tier stays there; a request may only step down
            spec.tier = tier
        with phase(trace, "limits"):
            [ticket] = cohort.lifecycle.admit(principal, [spec])
    except CohortError as error:  # refused before it was a request: its trace ends here
        if trace is not None:
            trace.end(error.status)
        raise
    return await _serve(Run(principal, spec, spec.route, ticket, trace=trace))


@blueprint.post("/v1/chat/completions")
async def chat_completions():
    return await _answer(parse_chat)


@blueprint.post("/v1/completions")
async def completions():
    return await _answer(parse_completion)


@blueprint.post("/v1/embeddings")
async def embeddings():
    return await _answer(parse_embeddings)


@blueprint.post("/tokenize")
async def tokenize():
    return await _answer(partial(parse_tokens, "tokenize"))


@blueprint.post("/detokenize")
async def detokenize():
    return await _answer(partial(parse_tokens, "detokenize"))


async def _model_cards() -> list[dict]:
    """The models the caller may use, as OpenAI's model objects (a key limited to some models
    sees only those)."""
    principal = await caller()
    now = int(time.time())
    return [{"object": "model", "created": now, "owned_by": "cohort", **card}
            for card in services().dispatcher.registry.model_cards()
            if principal.models is None or card["id"] in principal.models]


@blueprint.get("/v1/models")
async def models():
    return {"object": "list", "data": await _model_cards()}


@blueprint.get("/v1/models/<path:model_id>")
async def model(model_id: str):
    """OpenAI's retrieve: one model, or a 404 `model_not_found` as OpenAI answers (a model the
    caller's key may not use does not exist to it)."""
    for card in await _model_cards():
        if card["id"] == model_id:
            return card
    raise NotFound(f"The model {model_id!r} does not exist", param="model",
                   code="model_not_found")
