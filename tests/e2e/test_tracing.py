"""Traces end to end: a front and a mock worker export by OTLP/HTTP to a real receiver, and one
streamed request's spans, front and worker, form the client's trace."""

import secrets

import httpx
import trio

from harness.otlp import OtlpReceiver
from tests.e2e.deadline import deadline

FRONT_SPANS = {"POST /v1/chat/completions", "auth", "limits", "queue", "placement", "worker"}


async def traced(make_cluster, receiver: OtlpReceiver, **env: str):
    """A front and one worker that trace to `receiver`, and a user of it."""
    # spans leave every 100 ms rather than the SDK's 5 s, so the test waits less
    cluster = make_cluster(COHORT_OTLP_ENDPOINT=receiver.endpoint, OTEL_BSP_SCHEDULE_DELAY="100",
                           **env)
    cluster.start_front()
    cluster.start_worker("worker1")
    cluster.api_key = cluster.add_user("alice")
    await cluster.wait_workers_ready(["worker1"], 30)
    return cluster


@deadline(60)
async def test_a_request_is_one_trace_from_the_client_through_the_worker(make_cluster):
    receiver = OtlpReceiver()
    try:
        cluster = await traced(make_cluster, receiver)
        trace_id, client_span = secrets.token_hex(16), secrets.token_hex(8)
        async with httpx.AsyncClient(timeout=30, headers=cluster.headers()) as http:
            async with http.stream("POST", cluster.url + "/v1/chat/completions", json={
                    "model": "cohort-mock", "stream": True, "max_tokens": 8,
                    "messages": [{"role": "user", "content": "trace me"}]},
                    headers={"traceparent": f"00-{trace_id}-{client_span}-01"}) as response:
                assert response.status_code == 200
                body = "".join([chunk async for chunk in response.aiter_text()])
        assert body.endswith("data: [DONE]\n\n")
        with trio.fail_after(10):
            while not ({"engine"} | FRONT_SPANS) <= {s.name for s in receiver.of_trace(trace_id)}:
                await trio.sleep(0.05)
        spans = {span.name: span for span in receiver.of_trace(trace_id)}
        root = spans["POST /v1/chat/completions"]
        assert root.parent_id == client_span and root.service == "cohort-front"
        assert root.attributes["http.response.status_code"] == 200
        assert all(spans[name].parent_id == root.span_id for name in FRONT_SPANS - {root.name})
        engine = spans["engine"]  # the worker's, under the front's span for the wire
        assert engine.service == "cohort-worker" and engine.parent_id == spans["worker"].span_id
        assert "first output" in engine.events and "first output" in spans["worker"].events
        assert engine.attributes["gen_ai.usage.output_tokens"] == 8
    finally:
        receiver.close()


@deadline(60)
async def test_an_http_worker_carries_the_trace_to_its_upstream(make_cluster):
    """Cohort's http engine in front of another Cohort: the upstream's spans join the client's
    trace under the http worker's engine span, as vLLM's would under `vllm serve`."""
    receiver = OtlpReceiver()
    try:
        upstream = await traced(make_cluster, receiver)
        relay = await traced(make_cluster, receiver, COHORT_ENGINE="http",
                             REAL_VLLM_URL=upstream.url, COHORT_UPSTREAM_API_KEY=upstream.api_key)
        trace_id, client_span = secrets.token_hex(16), secrets.token_hex(8)
        async with httpx.AsyncClient(timeout=30, headers=relay.headers()) as http:
            response = await http.post(relay.url + "/v1/chat/completions", json={
                "model": "cohort-mock", "max_tokens": 4,
                "messages": [{"role": "user", "content": "trace me twice"}]},
                headers={"traceparent": f"00-{trace_id}-{client_span}-01"})
        assert response.status_code == 200
        with trio.fail_after(10):  # both fronts' routes and both workers' engine spans
            while len([s for s in receiver.of_trace(trace_id)
                       if s.name in ("POST /v1/chat/completions", "engine")]) < 4:
                await trio.sleep(0.05)
        spans = receiver.of_trace(trace_id)
        relay_root, upstream_root = sorted(
            (s for s in spans if s.name == "POST /v1/chat/completions"),
            key=lambda s: s.parent_id != client_span)
        assert relay_root.parent_id == client_span
        http_engine = next(s for s in spans if s.name == "engine"
                           and s.attributes["cohort.engine"] == "http")
        assert upstream_root.parent_id == http_engine.span_id
    finally:
        receiver.close()
