"""Build the Quart-trio app: routes, one place that maps errors, and the services' nursery.

hypercorn runs it with `hypercorn --worker-class trio "server.app:create_app()"`; tests build as
many apps as they like with other settings.
"""

from __future__ import annotations

import logging
import os
import secrets

import trio
from quart import g, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from common.config import ServerSettings, load
from common.logs import setup_logging
from server import connections
from server.errors import BadRequest, BodyTooLarge, CohortError, Draining, NotFound
from server.routes import admin, batches, console, docs, ops, openai, tasks, tokens, usage
from server.services import assemble

log = logging.getLogger("cohort.app")


def _error_response(error: CohortError):
    return error.body(), error.status, error.headers


def create_app(settings: ServerSettings | None = None) -> QuartTrio:
    """A new app with its own gateway; nothing starts until hypercorn serves it."""
    settings = settings or load(ServerSettings)
    setup_logging(settings.log_level)
    connections.install(settings.max_connections, settings.keep_alive_s)
    app = QuartTrio("cohort")
    app.config.update(MAX_CONTENT_LENGTH=settings.max_body_bytes, RESPONSE_TIMEOUT=None,
                      BODY_TIMEOUT=60, JSON_SORT_KEYS=False)
    app.request_class = batches.with_upload_limit(  # type: ignore[assignment]
        app.request_class, settings.max_file_bytes)
    cohort = assemble(settings)
    app.services = cohort  # type: ignore[attr-defined]
    for module in (openai, ops, tasks, tokens, usage, admin, batches, docs, console):
        app.register_blueprint(module.blueprint)

    services = trio.CancelScope()

    @app.before_serving
    async def start_services() -> None:
        await cohort.store.run(cohort.store.create_schema)
        await cohort.auth.start()

        async def run_services(task_status=trio.TASK_STATUS_IGNORED):
            try:
                with services:
                    async with trio.open_nursery() as nursery:
                        await nursery.start(cohort.gateway.run)
                        await nursery.start(cohort.tasks.run)
                        await nursery.start(cohort.batches.run)
                        await nursery.start(cohort.usage.run)
                        await nursery.start(cohort.limit_sync.run)
                        nursery.start_soon(cohort.gateway.drain_on_signal)
                        cohort.gateway.services_up = True
                        task_status.started()
            except Exception:  # a service died: a front without it only seems to serve
                cohort.gateway.services_up = False
                log.critical("a service of the front failed; exiting so that its keeper restarts "
                             "it", exc_info=True)
                logging.shutdown()
                os._exit(70)  # EX_SOFTWARE; not a cancellation (stop_services) or a shutdown

        await app.nursery.start(run_services)
        log.info("serving on http://%s:%s", settings.host, settings.port)

    @app.after_serving
    async def stop_services() -> None:
        services.cancel()
        await trio.to_thread.run_sync(cohort.gateway.tracing.shutdown)  # the last spans out

    @app.before_request
    async def tag_request():
        g.request_id = request.headers.get("X-Request-Id", "")[:64] or secrets.token_hex(8)
        if cohort.gateway.draining and request.path not in ("/health", "/ready"):
            error = Draining("the front is shutting down and takes no new request; retry on "
                             "another front")
            return error.body(), error.status, {**error.headers, "Connection": "close"}
        return None

    @app.after_request
    async def count_request(response):
        response.headers["X-Request-Id"] = g.get("request_id", "")
        rule = request.url_rule.rule if request.url_rule else "unmatched"
        cohort.metrics.requests.labels(rule, str(response.status_code)).inc()
        return response

    @app.errorhandler(CohortError)
    async def cohort_error(error: CohortError):
        if error.status >= 500:
            log.warning("request %s failed: %s", g.get("request_id", "-"), error.message)
        return _error_response(error)

    @app.errorhandler(HTTPException)
    async def http_error(error: HTTPException):
        if error.code == 413:  # the body is left unread: the connection cannot serve another
            limit, name = ((settings.max_file_bytes, "COHORT_MAX_FILE_BYTES")
                           if request.path == "/v1/files"
                           else (settings.max_body_bytes, "COHORT_MAX_BODY_BYTES"))
            mapped: CohortError = BodyTooLarge(f"the body is over {limit} bytes ({name})",
                                               headers={"Connection": "close"})
        elif error.code == 404:
            mapped = NotFound(f"no route {request.method} {request.path}")
        elif error.code == 405:
            mapped = BadRequest(f"{request.method} is not allowed on {request.path}")
            mapped.status = 405
        else:
            mapped = BadRequest(error.description or "bad request")
            mapped.status = error.code or 400
        return _error_response(mapped)

    @app.errorhandler(Exception)
    async def unexpected(error: Exception):
        log.exception("request %s: unexpected error", g.get("request_id", "-"))
        return _error_response(CohortError(f"internal error ({type(error).__name__}); "
                                           f"request id {g.get('request_id', '-')}"))

    return app
