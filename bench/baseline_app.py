"""The baseline for gateway overhead: a bare Quart-trio route on hypercorn answering the same JSON
Cohort answers, with no validation, batching, ZeroMQ or worker behind it."""

from quart import request
from quart_trio import QuartTrio

REPLY = {"id": "cmpl-0", "object": "text_completion", "created": 0, "model": "cohort-mock",
         "choices": [{"index": 0, "text": "[Batched mock response b] Mock response to: x",
                      "logprobs": None, "finish_reason": "stop"}],
         "usage": {"prompt_tokens": 1, "completion_tokens": 8, "total_tokens": 9}}


def create_app() -> QuartTrio:
    app = QuartTrio("baseline")

    @app.post("/v1/completions")
    async def completions():
        await request.get_json(force=True)  # parse the body, as any real route must
        return REPLY

    @app.get("/ready")
    async def ready():
        return {"ready": True}

    return app
