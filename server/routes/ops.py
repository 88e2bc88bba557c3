"""Operations: `/health` (open; details for a token), `/ready` (a probe for orchestrators),
`/stats`, `/metrics`."""

from __future__ import annotations

from quart import Blueprint, Response

from common.config import describe
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
                           "failures": cohort.limit_sync.failures}}


@blueprint.get("/ready")
async def ready():
    """Ready when the front's services run and some model has a ready worker."""
    cohort = services()
    models = cohort.dispatcher.models()
    up = cohort.gateway.services_up and not cohort.gateway.draining and bool(models)
    return {"ready": up, "models": models}, 200 if up else 503


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
    return Response(cohort.metrics.render(), content_type="text/plain; version=0.0.4")
