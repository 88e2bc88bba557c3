"""Operations: `/health` (open; details for a token), `/ready` (a probe for orchestrators),
`/stats`, `/metrics`."""

from __future__ import annotations

from quart import Blueprint, Response, request

from common.config import describe
from server import connections
from server.errors import Unauthorized
from server.routes.context import caller, services

blueprint = Blueprint("ops", __name__)


@blueprint.get("/health")
async def health():
    """Anyone may ask whether the service is up; only a caller with a token sees its workers and
    settings (an anonymous answer must not map the deployment for a stranger)."""
    cohort = services()
    status = ("failing" if not cohort.gateway.services_up else "draining" if cohort.gateway.draining else "ok")
    try:
        await caller()
    except Unauthorized:
        return {"status": status}
    workers = cohort.dispatcher.describe_workers()
    engines = sorted({w["engine"] for w in workers if w["state"] not in ("dead", "restarting", "failed")})
    return {"status": status, "front_id": cohort.dispatcher.front_id,
            "zmq_endpoint": cohort.dispatcher.endpoint,
            "mode": "+".join(engines) or "no workers",
            "auth": "disabled" if cohort.settings.auth_disabled else "required",
            "config": describe(cohort.settings), "workers": workers,
            "limit_sync": {"syncs": cohort.limit_sync.syncs,
                           "failures": cohort.limit_sync.streak.failures}}


@blueprint.get("/ready")
async def ready():
    """Ready when the front's services run and some model has a ready worker. Which models
    are served is the deployment's business: a stranger sees them only with
    COHORT_PUBLIC_MODELS=1, a caller with a token always."""
    cohort = services()
    models = cohort.dispatcher.models()
    up = cohort.gateway.services_up and not cohort.gateway.draining and bool(models)
    answer: dict[str, object] = {"ready": up}
    if cohort.settings.public_models or await _known_caller():
        answer["models"] = models
    return answer, 200 if up else 503


async def _known_caller() -> bool:
    """Whether the request carries a valid token (an anonymous probe is no error)."""
    if "Authorization" not in request.headers and not services().settings.auth_disabled:
        return False
    try:
        await caller()
    except Unauthorized:
        return False
    return True


@blueprint.get("/stats")
async def stats():
    await caller()
    cohort = services()
    summary = cohort.metrics.summary()
    summary["queue"]["length"] = cohort.scheduler.queued()
    summary["workers"] = cohort.dispatcher.describe_workers()
    return summary


@blueprint.get("/metrics")
async def metrics():
    await caller()
    cohort = services()
    cohort.dispatcher.refresh_gauges()
    for model, length in cohort.scheduler.queued().items():
        cohort.metrics.queue_length.labels(model).set(length)
    for state, count in connections.counts().items():
        cohort.metrics.connections.labels(state).set(count)
    return Response(cohort.metrics.render(), content_type="text/plain; version=0.0.4")
