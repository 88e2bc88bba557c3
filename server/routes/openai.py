"""The OpenAI routes: `/v1/chat/completions`, `/v1/completions` (plain and SSE), `/v1/models`."""

from __future__ import annotations

import time

from quart import Blueprint, Response, g, make_response

from server.errors import CohortError
from server.openai_format import ChunkWriter, Collector, completion_body
from server.openai_schema import parse_chat, parse_completion
from server.routes.context import caller, gateway, json_body

blueprint = Blueprint("openai", __name__)


async def _serve(spec, route: str):
    cohort = gateway()
    job = cohort.submit(spec)
    if spec.stream:
        response = _sse(job, route)
    else:
        response = await make_response(completion_body(spec, job.id, await cohort.complete(job, route)))
    if spec.dropped:  # COHORT_DROP_PARAMS: say what was dropped, never drop it silently
        response.headers["X-Cohort-Dropped-Params"] = ",".join(spec.dropped)
    return response


def _sse(job, route: str) -> Response:
    cohort = gateway()
    writer = ChunkWriter(job.spec, job.id)
    collected = Collector(job.spec.n)

    async def events():
        try:
            async for ready in cohort.stream(job, collected, route):
                yield writer.deltas(ready)
            if writer.include_usage:
                yield writer.usage(collected)
        except CohortError as error:  # headers are gone: the error travels as an event
            yield writer.error(error.body())
        yield writer.DONE

    response = Response(events(), mimetype="text/event-stream",
                        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    response.timeout = None  # the job's own deadline bounds it
    return response


@blueprint.post("/v1/chat/completions")
async def chat_completions():
    await caller()
    spec = parse_chat(await json_body(), gateway().settings, g.request_id)
    return await _serve(spec, "chat")


@blueprint.post("/v1/completions")
async def completions():
    await caller()
    spec = parse_completion(await json_body(), gateway().settings, g.request_id)
    return await _serve(spec, "completions")


@blueprint.get("/v1/models")
async def models():
    await caller()
    now = int(time.time())
    data = [{"object": "model", "created": now, "owned_by": "cohort", **card}
            for card in gateway().dispatcher.registry.model_cards()]
    return {"object": "list", "data": data}
