"""The Grafana dashboard in ops/grafana/: importable as it is (a recent schema, its data source a
variable so one file serves import, provisioning and the API), filtered by model, and showing
what an operator looks at first."""

from tests.ops.queries import dashboard, panel_queries, panels, selectors

PANELS = {"Requests/s by route and status", "Tokens/s", "Time to first token (p50, p99)",
          "End-to-end latency (p50, p99)", "Queue length", "Queue wait by tier (p50, p99, mean)",
          "Batch size (mean, p99)", "Workers by state", "Ready workers per model",
          "Running sequences per worker", "Waiting sequences per worker",
          "KV cache use per worker", "Prefix cache hit rate per worker",
          "Retries, aborts, worker deaths", "Store rounds failing in a row",
          "Lease takeovers"}
DATASOURCE = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
PER_MODEL = {"cohort_workers_ready", "cohort_queue_length", "cohort_worker_state",
             "cohort_time_to_first_token_seconds_bucket", "cohort_worker_running",
             "cohort_worker_waiting", "cohort_worker_kv_usage", "cohort_worker_prefix_hit_rate",
             "cohort_worker_prefixes_held"}


def test_the_dashboard_has_a_recent_schema_and_its_variables():
    board = dashboard()
    assert board["schemaVersion"] >= 39 and board["uid"] == "cohort"
    variables = {variable["name"]: variable for variable in board["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    model = variables["model"]
    assert model["type"] == "query" and model["datasource"] == DATASOURCE
    assert model["includeAll"] and model["multi"]


def test_every_panel_reads_the_chosen_data_source_and_none_is_missing():
    shown = [panel for panel in panels(dashboard()) if panel["type"] != "row"]
    assert PANELS <= {panel["title"] for panel in shown}
    ids = [panel["id"] for panel in panels(dashboard())]
    assert len(ids) == len(set(ids))
    for panel in shown:
        assert panel["datasource"] == DATASOURCE, panel["title"]
        assert panel["targets"] and all(target["datasource"] == DATASOURCE
                                        for target in panel["targets"]), panel["title"]
        assert panel.get("description"), f"{panel['title']} does not say what it shows"


def test_panels_of_per_model_series_follow_the_model_variable():
    for where, expr in panel_queries():
        for name, labels in selectors(expr):
            if name in PER_MODEL:
                assert "model" in labels and 'model=~"$model"' in expr, where
