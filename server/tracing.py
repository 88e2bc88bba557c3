"""A request's trace in the front: the request's span, and one span per phase under it.

    POST /v1/chat/completions            (the client's traceparent is its parent)
      auth      who is calling
      limits    admitted against the payer's limits
      queue     from submit to the batch that carries it
      placement the choice of worker, with what that worker's cache holds of the prompt
      worker    from the send to the last output: the wire and the engine; the worker's own
                spans (and vLLM's `llm_request`) hang under it, through the traceparent the
                request item carries. Its event `first output` marks time to first token.

Every way in goes through server.lifecycle, which ends the trace when it settles the request;
stored work (tasks, Batch API lines) has no auth or limits phase and no client parent. Without
COHORT_OTLP_ENDPOINT `Tracing.begin` returns None and nothing here runs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from opentelemetry import trace
from opentelemetry.sdk.trace import SpanProcessor
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer

from common import tracing


class RequestTrace:
    """The spans of one request, opened and closed as it moves through the front."""

    def __init__(self, tracer: Tracer, name: str, traceparent: str = "",
                 kind: SpanKind = SpanKind.SERVER) -> None:
        self.tracer = tracer
        self.root = tracer.start_span(name, context=tracing.context_of(traceparent), kind=kind)
        self._under_root = trace.set_span_in_context(self.root)
        self._queue: Span | None = None
        self._worker: Span | None = None
        self.traceparent = ""  # for the wire: the worker span's, once sent

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[Span]:
        """A span around a step of the request; an error leaving it marks it failed."""
        span = self.tracer.start_span(name, context=self._under_root)
        try:
            yield span
        except BaseException as error:
            tracing.failed(span, error)
            raise
        finally:
            span.end()

    def queued(self) -> None:
        self._queue = self.tracer.start_span("queue", context=self._under_root)

    def placed(self, worker_id: str, batch_id: str, began_ns: int, attempt: int,
               prefix_blocks: int, prefix_held: int) -> None:
        """Sent to `worker_id` in `batch_id`: the queue wait ends, the placement (which began
        at `began_ns`) is recorded, and the worker's part begins (again, on a retry)."""
        if self._queue is not None:
            self._queue.end()
            self._queue = None
        if self._worker is not None:  # its first worker died: this is the re-run
            self._worker.add_event("re-run elsewhere")
            self._worker.end()
        placement = self.tracer.start_span("placement", context=self._under_root,
                                           start_time=began_ns, attributes={
                                               "cohort.worker": worker_id,
                                               "cohort.prefix_blocks": prefix_blocks,
                                               "cohort.prefix_blocks_held": prefix_held})
        placement.end()
        self._worker = self.tracer.start_span("worker", context=self._under_root,
                                              kind=SpanKind.CLIENT, attributes={
                                                  "cohort.worker": worker_id,
                                                  "cohort.batch": batch_id,
                                                  "cohort.attempt": attempt})
        self.traceparent = tracing.traceparent_of(self._worker)

    def first_output(self) -> None:
        if self._worker is not None:
            self._worker.add_event("first output")

    def end(self, status: int, *, model: str = "", user_id: int = 0, prompt_tokens: int = 0,
            completion_tokens: int = 0) -> None:
        """The request was settled with HTTP `status` (or refused before it ran, with only its
        status known): close whatever is open."""
        for span in (self._queue, self._worker):
            if span is not None:
                span.end()
        self._queue = self._worker = None
        self.root.set_attribute("http.response.status_code", status)
        if model:
            self.root.set_attributes({
                "gen_ai.request.model": model, "cohort.user_id": user_id,
                "gen_ai.usage.input_tokens": prompt_tokens,
                "gen_ai.usage.output_tokens": completion_tokens})
        if status >= 400:
            self.root.set_status(Status(StatusCode.ERROR, f"HTTP {status}"))
        self.root.end()


def phase(trace: RequestTrace | None, name: str) -> contextlib.AbstractContextManager:
    """`trace.phase(name)`, or nothing for a request that is not traced."""
    return trace.phase(name) if trace is not None else contextlib.nullcontext()


class Tracing:
    """The front's tracer, or none: `begin` is the one question every request asks."""

    def __init__(self, endpoint: str, processor: SpanProcessor | None = None,
                 service: str = "cohort-front") -> None:
        self.provider = tracing.make_tracer(endpoint, service, processor)
        self.tracer: Tracer | None = self.provider.get_tracer("cohort") if self.provider else None

    def begin(self, name: str, traceparent: str = "", *,
              kind: SpanKind = SpanKind.SERVER) -> RequestTrace | None:
        if self.tracer is None:
            return None
        return RequestTrace(self.tracer, name, traceparent, kind)

    def shutdown(self) -> None:
        """Send what is still buffered (the front is stopping)."""
        if self.provider is not None:
            self.provider.shutdown()
