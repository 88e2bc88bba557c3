"""One tree of errors, each mapped in one place to an HTTP status and an OpenAI-style error body."""

from __future__ import annotations

from typing import Any


class CohortError(Exception):
    """Base of every error a client may see; subclasses set status, type and code."""

    status = 500
    error_type = "server_error"
    code: str | None = None
    retry_after_s: int | None = None  # set: the client may retry, and the answer says when

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.headers = headers or {}
        if self.retry_after_s is not None:
            self.headers.setdefault("Retry-After", str(self.retry_after_s))

    def body(self) -> dict[str, Any]:
        """The OpenAI error shape: {"error": {"message", "type", "param", "code"}}."""
        return {"error": {"message": self.message, "type": self.error_type,
                          "param": self.param, "code": self.code}}


class BadRequest(CohortError):
    """The request is malformed or a parameter is out of range."""

    status = 400
    error_type = "invalid_request_error"


class Unauthorized(CohortError):
    """No credentials, or credentials we do not accept."""

    status = 401
    error_type = "authentication_error"
    code = "invalid_api_key"


class PermissionDenied(CohortError):
    """The caller is known but may not do this: an admin route, or a model its key may not use."""

    status = 403
    error_type = "invalid_request_error"
    code = "permission_denied"


class Conflict(CohortError):
    """The change clashes with what exists (a user of that name, the last admin)."""

    status = 409
    error_type = "invalid_request_error"
    code = "conflict"


class NotFound(CohortError):
    """An unknown model, task or route."""

    status = 404
    error_type = "invalid_request_error"
    code = "not_found"


class BodyTooLarge(CohortError):
    status = 413
    error_type = "invalid_request_error"
    code = "request_too_large"


class QueueFull(CohortError):
    """The model's queue is at its bound: the client should retry later."""

    status = 429
    error_type = "rate_limit_error"
    code = "queue_full"
    retry_after_s = 1


class RateLimited(CohortError):
    """Over a user's or key's requests, tokens or concurrency limit (OpenAI's code)."""

    status = 429
    error_type = "requests"
    code = "rate_limit_exceeded"


class QuotaExceeded(CohortError):
    """A user's or key's daily token quota is used up (OpenAI's code)."""

    status = 429
    error_type = "insufficient_quota"
    code = "insufficient_quota"

    def __init__(self, message: str, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        # the openai client retries a 429 unless told not to: a quota renews only at midnight
        self.headers.setdefault("x-should-retry", "false")


class LoginThrottled(CohortError):
    """Too many failed logins for a user or from an address: wait, whatever the password."""

    status = 429
    error_type = "rate_limit_error"
    code = "too_many_login_failures"


class NoWorkers(CohortError):
    """No ready worker serves the model (none registered, all loading, or all dead)."""

    status = 503
    error_type = "service_unavailable"
    code = "no_ready_worker"
    retry_after_s = 5


class Draining(CohortError):
    """The front is shutting down: it takes no new request (a 503), and cuts, with this error,
    what is still running when its drain time is up."""

    status = 503
    error_type = "service_unavailable"
    code = "draining"
    retry_after_s = 1


class EngineFailed(CohortError):
    """The worker or its engine failed this request; the message says how."""

    status = 502
    error_type = "engine_error"
    code = "engine_error"


class EngineRefused(CohortError):
    """The serving engine refused the request by its own rules (vLLM's validation, a prompt too long
    for the model): the client hears the engine's status and error body as `vllm serve` gives them."""

    error_type = "invalid_request_error"

    def __init__(self, status: int, body: Any) -> None:
        detail = body.get("error") if isinstance(body, dict) else None
        if not isinstance(detail, dict):
            detail = {"message": str(body)[:1000]}
        super().__init__(str(detail.get("message", "the engine refused the request")),
                         param=detail.get("param"))
        self.status = status if 400 <= status < 600 else 502
        self._body = {"error": dict(detail)} if isinstance(body, dict) else {"error": {
            "message": self.message, "type": self.error_type, "param": None, "code": self.status}}

    def body(self) -> dict[str, Any]:
        return self._body


class UpstreamUnavailable(CohortError):
    """The http engine's upstream server cannot be reached."""

    status = 503
    error_type = "service_unavailable"
    code = "upstream_unavailable"


class WorkerDied(EngineFailed):
    """The worker holding the request died after streaming part of it, or retries ran out."""

    code = "worker_died"


class SlowReader(CohortError):
    """A streaming client read too slowly: its events filled the front's buffer for it."""

    status = 408
    error_type = "timeout_error"
    code = "client_too_slow"


class DeadlineExceeded(CohortError):
    status = 504
    error_type = "timeout_error"
    code = "deadline_exceeded"
