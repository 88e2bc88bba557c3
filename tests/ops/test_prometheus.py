"""The alert rules in ops/prometheus/: valid for promtool, their unit tests pass, each says what to
check and links its section of docs/observability.md; and every dashboard query is valid PromQL."""

import re
import subprocess

import yaml

from tests.ops.queries import (RULE_TESTS, RULES, ROOT, alert_rules, panel_queries, plain,
                               promtool)

ALERTS = {"CohortNoReadyWorker", "CohortWorkerBreakerOpen", "CohortQueueGrowing",
          "CohortTimeToFirstTokenHigh", "CohortLimitSyncFailing", "CohortLeaseTakeover"}


def run_promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([promtool(), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)


def test_the_alert_rules_pass_promtool_check_rules():
    done = run_promtool("check", "rules", str(RULES))
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(ALERTS)} rules found" in done.stdout


def test_the_alert_rules_pass_their_unit_tests():
    done = run_promtool("test", "rules", str(RULE_TESTS))
    assert done.returncode == 0, done.stdout + done.stderr
    tested = {test["alertname"] for case in yaml.safe_load(RULE_TESTS.read_text())["tests"]
              for test in case["alert_rule_test"]}
    assert tested == ALERTS


def test_each_alert_has_a_severity_and_says_what_to_check_in_a_section_that_exists():
    page = (ROOT / "docs" / "observability.md").read_text()
    headings = {heading.lower() for heading in re.findall(r"^#+ (\S+)$", page, re.MULTILINE)}
    assert {rule["alert"] for rule in alert_rules()} == ALERTS
    for rule in alert_rules():
        assert rule["labels"]["severity"] in ("critical", "warning"), rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]
        anchor = rule["alert"].lower()
        assert f"docs/observability.md#{anchor}" in rule["annotations"]["description"]
        assert anchor in headings, f"docs/observability.md has no section {rule['alert']}"


def test_every_dashboard_query_is_valid_promql(tmp_path):
    """promtool parses each panel's query, its Grafana variables replaced, as a recording rule."""
    queries = panel_queries()
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query_{index}", "expr": plain(expr)}
        for index, (_, expr) in enumerate(queries)]}]}
    (tmp_path / "dashboard-rules.yml").write_text(yaml.safe_dump(rules))
    done = run_promtool("check", "rules", str(tmp_path / "dashboard-rules.yml"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(queries)} rules found" in done.stdout
