"""OpenTelemetry for the front and the workers: a tracer when COHORT_OTLP_ENDPOINT is set, and
nothing at all when it is not.

A request's trace starts from the client's W3C `traceparent` (or a new trace), and its context
crosses the wire as a `traceparent` string in the request item, so the worker's spans, and vLLM's
own `llm_request` span under them, join the client's trace. Spans leave in batches by OTLP/HTTP
(protobuf) to `{endpoint}/v1/traces`, from a thread of the SDK's, never from the trio loop.
Without an endpoint `make_tracer` returns None and every caller skips its tracing on that one
check: no span objects, no clock reads, no context to carry.
"""

from __future__ import annotations

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.trace import Span, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

_propagator = TraceContextTextMapPropagator()


def traces_url(endpoint: str) -> str:
    """OTLP/HTTP's traces path under the collector's base URL (as OTEL_EXPORTER_OTLP_ENDPOINT)."""
    return endpoint.rstrip("/") + "/v1/traces"


def make_tracer(endpoint: str, service: str,
                processor: SpanProcessor | None = None) -> TracerProvider | None:
    """A tracer provider exporting to `endpoint` (or into `processor`, for tests); None without
    either. Its `get_tracer("cohort")` makes the spans; its `shutdown()` sends the last ones."""
    if not endpoint and processor is None:
        return None
    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    if processor is None:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        processor = BatchSpanProcessor(OTLPSpanExporter(endpoint=traces_url(endpoint)))
    provider.add_span_processor(processor)
    return provider


def context_of(traceparent: str | None) -> Context | None:
    """The remote parent a `traceparent` names (None: a trace of its own). A malformed one is
    ignored, as the W3C spec says a receiver must."""
    if not traceparent:
        return None
    return _propagator.extract({"traceparent": traceparent})


def failed(span: Span | None, error: BaseException) -> None:
    """Mark a span failed with the error that ended it (nothing for an untraced request)."""
    if span is not None:
        span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))


def traceparent_of(span: Span) -> str:
    """The `traceparent` that makes `span` the parent of what the next hop records."""
    carrier: dict[str, str] = {}
    _propagator.inject(carrier, context=trace.set_span_in_context(span))
    return carrier.get("traceparent", "")
