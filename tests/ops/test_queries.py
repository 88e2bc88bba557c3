"""The check that holds the dashboard and the rules against `/metrics` (its live run is in
tests/e2e/test_metrics_exported.py): it finds the series a query reads, and names what is missing."""

from tests.ops.queries import exported, selectors, unexported


def test_the_series_a_query_reads_are_found_with_the_labels_it_matches_on():
    assert selectors('sum by (le) (rate(cohort_ttft_bucket{route="x", status=~"5.."}[5m]))'
                     ' / on() cohort_up') == [
        ("cohort_ttft_bucket", frozenset({"route", "status"})), ("cohort_up", frozenset())]
    assert selectors('label_values(cohort_workers_ready, model)') == [
        ("cohort_workers_ready", frozenset())]
    assert selectors('label_replace(up, "x", "cohort_not_a_series", "", "")') == []


def test_a_series_or_label_not_exported_is_named_with_its_reader():
    series = exported('# TYPE cohort_prompt_tokens counter\ncohort_prompt_tokens_total 3.0\n'
                      '# TYPE cohort_queue_length gauge\ncohort_queue_length{model="m"} 1.0\n')
    assert series["cohort_prompt_tokens_total"] == {}
    assert series["cohort_queue_length"] == {"model": {"m"}}
    wrong = unexported(series)
    assert "panel 'Tokens/s' reads cohort_completion_tokens_total, which /metrics does not " \
           "export" in wrong
    assert not any("cohort_prompt_tokens_total" in line for line in wrong)
    assert not any("reads cohort_queue_length" in line for line in wrong)
