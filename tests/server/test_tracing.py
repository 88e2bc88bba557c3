"""A request's spans in the front, with the SDK's in-memory exporter: the phases under the
request, the client's trace continued, the traceparent for the wire, and nothing at all
without an endpoint."""

from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
import pytest

from common import tracing
from server.tracing import Tracing, phase

CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT = f"00-{CLIENT_TRACE}-00f067aa0ba902b7-01"


def traced() -> tuple[Tracing, InMemorySpanExporter]:
    spans = InMemorySpanExporter()
    return Tracing("", processor=SimpleSpanProcessor(spans)), spans


def test_a_request_continues_the_clients_trace_with_a_span_per_phase():
    tracer, spans = traced()
    trace = tracer.begin("POST /v1/chat/completions", CLIENT)
    with phase(trace, "auth"):
        pass
    with pytest.raises(ValueError), phase(trace, "limits"):
        raise ValueError("over the limit")
    trace.queued()
    trace.placed("worker1", "b1", began_ns=0, attempt=1, prefix_blocks=4, prefix_held=3)
    wire = trace.traceparent
    trace.first_output()
    trace.end(200, model="m", user_id=7, prompt_tokens=10, completion_tokens=5)
    by_name = {span.name: span for span in spans.get_finished_spans()}
    assert set(by_name) == {"auth", "limits", "queue", "placement", "worker",
                            "POST /v1/chat/completions"}
    root = by_name["POST /v1/chat/completions"]
    assert format(root.context.trace_id, "032x") == CLIENT_TRACE
    assert format(root.parent.span_id, "016x") == "00f067aa0ba902b7"  # the client's span
    assert all(span.parent.span_id == root.context.span_id
               for name, span in by_name.items() if span is not root)
    assert not by_name["limits"].status.is_ok and by_name["auth"].status.is_ok
    assert by_name["placement"].attributes["cohort.prefix_blocks_held"] == 3
    worker = by_name["worker"]
    assert [event.name for event in worker.events] == ["first output"]
    assert wire == f"00-{CLIENT_TRACE}-{worker.context.span_id:016x}-01"  # the worker's parent
    assert root.attributes["gen_ai.usage.output_tokens"] == 5


def test_a_re_run_closes_the_first_workers_span_and_opens_another():
    tracer, spans = traced()
    trace = tracer.begin("cohort async")  # stored work: a trace of its own
    trace.queued()
    trace.placed("worker1", "b1", began_ns=0, attempt=1, prefix_blocks=0, prefix_held=0)
    first = trace.traceparent
    trace.placed("worker2", "b2", began_ns=0, attempt=2, prefix_blocks=0, prefix_held=0)
    assert trace.traceparent != first
    trace.end(502)
    workers = [span for span in spans.get_finished_spans() if span.name == "worker"]
    assert [span.attributes["cohort.worker"] for span in workers] == ["worker1", "worker2"]
    assert [event.name for event in workers[0].events] == ["re-run elsewhere"]
    [root] = [span for span in spans.get_finished_spans() if span.name == "cohort async"]
    assert root.parent is None and not root.status.is_ok


def test_without_an_endpoint_nothing_is_traced_and_a_bad_traceparent_starts_a_new_trace():
    assert Tracing("").begin("POST /v1/completions", CLIENT) is None
    assert tracing.make_tracer("", "cohort-front") is None
    with phase(None, "auth"):
        pass
    tracer, spans = traced()
    tracer.begin("POST /v1/completions", "00-not-a-trace").end(200)
    [root] = spans.get_finished_spans()
    assert root.parent is None
