"""The PromQL in ops/: every expression a Grafana panel or variable or a Prometheus rule runs,
and the cohort_* series each reads, for the tests to hold against promtool and `/metrics`."""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "ops" / "grafana" / "cohort.json"
RULES = ROOT / "ops" / "prometheus" / "cohort-alerts.yml"
RULE_TESTS = ROOT / "ops" / "prometheus" / "cohort-alerts.test.yml"

STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
SELECTOR = re.compile(r"\b(cohort_\w+)(?:\s*\{([^}]*)\})?")
MATCHER = re.compile(r"(\w+)\s*(?:=~|!~|!=|=)")
# Grafana's variables, as a query of a panel can hold them, made plain PromQL for promtool
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$model": ".*"}


def promtool() -> str:
    """promtool's path; the README's test command installs it (from Debian's `prometheus`)."""
    found = shutil.which("promtool", path=f"{Path(sys.executable).parent}{os.pathsep}"
                                          f"{os.environ.get('PATH', '')}")
    if found is None:
        pytest.fail("promtool is not installed: the README's test command puts it in the "
                    "virtualenv, taken from Debian's `prometheus` package (or `apt-get install "
                    "prometheus`); the alert rules cannot be checked without it")
    return found


def panels(container: dict) -> Iterator[dict]:
    """Every panel of a dashboard, those inside collapsed rows too."""
    for panel in container.get("panels", []):
        yield panel
        yield from panels(panel)


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def panel_queries() -> list[tuple[str, str]]:
    """(where, PromQL) of each panel's targets."""
    return [(f"panel {panel['title']!r}", target["expr"])
            for panel in panels(dashboard()) for target in panel.get("targets", [])]


def variable_queries() -> list[tuple[str, str]]:
    """(where, query) of each query variable: Grafana's label_values(), not PromQL."""
    return [(f"variable {variable['name']!r}", variable["definition"])
            for variable in dashboard()["templating"]["list"] if variable["type"] == "query"]


def alert_rules() -> list[dict]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"]
            for rule in group["rules"]]


def rule_queries() -> list[tuple[str, str]]:
    return [(f"alert {rule['alert']}", rule["expr"]) for rule in alert_rules()]


def plain(expr: str) -> str:
    """A panel's query with Grafana's variables replaced, as Prometheus would receive it."""
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    return expr


def selectors(expr: str) -> list[tuple[str, frozenset[str]]]:
    """The cohort_* series an expression reads, each with the label names its matchers use
    (string literals blanked first: a label's value names no series)."""
    bare = STRING.sub('""', expr)
    return [(match.group(1), frozenset(MATCHER.findall(match.group(2) or "")))
            for match in SELECTOR.finditer(bare)]


def exported(text: str) -> dict[str, dict[str, set[str]]]:
    """Each series `/metrics` exports (bucket, sum, count and total suffixes included, as
    PromQL names them), with the values of each label its samples carry."""
    series: dict[str, dict[str, set[str]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = series.setdefault(sample.name, {})
            for label, value in sample.labels.items():
                labels.setdefault(label, set()).add(value)
    return series


def unexported(series: dict[str, dict[str, set[str]]]) -> list[str]:
    """What the panels, variables and rules read that `series` lacks, each naming its reader."""
    wrong = []
    for where, expr in panel_queries() + variable_queries() + rule_queries():
        for name, labels in selectors(expr):
            if name not in series:
                near = sorted(known for known in series if known.startswith(name))
                wrong.append(f"{where} reads {name}, which /metrics does not export"
                             + (f" (it exports {', '.join(near)})" if near else ""))
            elif labels - set(series[name]):
                wrong.append(f"{where} matches {name} on {sorted(labels - set(series[name]))}, "
                             "labels it does not have")
    return wrong
