"""The OpenAI routes, and vLLM's beside them: chat and completions (plain and SSE), embeddings,
`/tokenize` and `/detokenize`, `/v1/models`. The worker's engine writes the answer (vLLM's own
serving layer on a vLLM worker); the front relays it as it comes and writes only `[DONE]`."""

from __future__ import annotations

import json
import time
from functools import partial
from typing import Any

import trio
from quart import Blueprint, Response, g

from server.errors import CohortError
from server.jobs import Job, JobSpec
from server.limits import Ticket
from server.openai_schema import parse_chat, parse_completion, parse_embeddings, parse_tokens
from server.routes.context import caller, gateway, json_body
from server.store import utcnow

blueprint = Blueprint("openai", __name__)

DONE = b"data: [DONE]\n\n"


def sse_event(body: dict) -> bytes:
    return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"


async def _serve(spec: JobSpec, ticket: Ticket | None = None, principal=None) -> Response:
    """Run the job; when it ends, whichever way, its hold on the caller's limits (`ticket`) is
    settled and its row goes to the usage ledger."""
    cohort = gateway()

    def settle(job: Job | None, status: int = 200) -> None:
        now = trio.current_time()
        if ticket is not None:
            cohort.limiter.settle(ticket, job.used_tokens if job else None, now)
        if job is not None and principal is not None:
            prompt_tokens = job.usage.get("prompt_tokens", 0)
            completion_tokens = job.usage.get("completion_tokens", 0)
            cohort.metrics.user_request(principal.username, spec.model, status, prompt_tokens,
                                        completion_tokens)
            cohort.usage.record(
                user_id=principal.user_id, key_id=principal.key_id, model=spec.model,
                route=spec.route, status=status,
                prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                queue_s=(job.started_at or now) - job.enqueued_at,
                ttft_s=job.first_output_at - job.enqueued_at if job.first_output_at else None,
                total_s=now - job.enqueued_at)

    job = None
    try:
        job = cohort.submit(spec)
        if spec.stream:
            response = await _sse(job, settle)
        else:
            response = Response(await cohort.complete(job, spec.route), mimetype="application/json")
            settle(job)
    except CohortError as error:
        settle(job, error.status)
        raise
    except BaseException:
        settle(job, 499)  # the client left (nginx's code for it)
        raise
    if spec.dropped:  # COHORT_DROP_PARAMS: say what was dropped, never drop it silently
        response.headers["X-Cohort-Dropped-Params"] = ",".join(spec.dropped)
    if ticket is not None:
        response.headers.extend(ticket.headers)  # new names: no search for ones to replace
    return response


async def _sse(job, on_end=lambda job: None) -> Response:
    """The stream starts once its first event is there, so a request the engine refuses is an
    HTTP error with vLLM's status, as `vllm serve` answers it, not a 200 with an error event."""
    events = gateway().stream(job, job.spec.route)
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
            on_end(job)
        yield DONE

    response = Response(body(), mimetype="text/event-stream",
                        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    response.timeout = None  # the job's own deadline bounds it
    return response


async def _body() -> Any:
    """The JSON body; without a `model`, the one model served, as `vllm serve` takes it."""
    body = await json_body()
    if isinstance(body, dict) and "model" not in body:
        served = gateway().dispatcher.models()
        if len(served) == 1:
            body["model"] = served[0]
    return body


async def _answer(parse) -> Response:
    """A POST route: the caller checked, the body parsed into a job, the job served."""
    principal = await caller()
    cohort = gateway()
    spec = parse(await _body(), cohort.settings, g.request_id)
    principal.check_model(spec.model)
    spec.tenant = principal.tenant
    spec.weight, tier = principal.share()
    if tier == "batch":  # a key in the batch tier stays there; a request may only step down
        spec.tier = tier
    ticket = cohort.limiter.admit(list(principal.limits), spec.cost, trio.current_time(),
                                  utcnow().date())
    return await _serve(spec, ticket, principal)


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


@blueprint.get("/v1/models")
async def models():
    principal = await caller()
    now = int(time.time())
    data = [{"object": "model", "created": now, "owned_by": "cohort", **card}
            for card in gateway().dispatcher.registry.model_cards()
            if principal.models is None or card["id"] in principal.models]
    return {"object": "list", "data": data}
