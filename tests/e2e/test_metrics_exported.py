"""Every series the Grafana dashboard and the alert rules read is one a real front's `/metrics`
exports, with the labels they match on: a metric or label renamed in the code fails here, not
silently on an empty panel or an alert that can never fire."""

import httpx

from tests.ops.queries import exported, unexported

MODEL = "cohort-mock"
REQUESTS = (("/v1/chat/completions", {"messages": [{"role": "user", "content": "hello"}]}),
            ("/v1/completions", {"prompt": "hello"}))


def test_every_series_a_panel_or_an_alert_reads_is_exported(shared):
    with httpx.Client(base_url=shared.url, headers=shared.headers(), timeout=30) as http:
        for stream in (False, True):  # so that every histogram has samples
            for route, body in REQUESTS:
                answer = http.post(route, json={"model": MODEL, "max_tokens": 4,
                                                "stream": stream, **body})
                assert answer.status_code == 200, answer.text
        metrics = http.get("/metrics")
    assert metrics.status_code == 200
    series = exported(metrics.text)
    assert unexported(series) == []
    assert series["cohort_store_round_failure_streak"]["what"] == {
        "task_leases", "batch_leases", "limit_sync", "housekeeping"}
    assert series["cohort_workers_ready"]["model"] == {MODEL}
    assert series["cohort_worker_running"]["worker"] == {"worker1", "worker2"}
    assert series["cohort_time_to_first_token_seconds_bucket"]["tier"] == {"interactive"}
    assert series["cohort_queue_wait_seconds_bucket"]["tier"] == {"interactive"}

