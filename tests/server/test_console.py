"""The console's policy without a browser: the last hour's percentiles, the CSRF rule, the
session cookie's attributes, and the vendored chart library as npm published it."""

import hashlib
from pathlib import Path

import pytest

from server.console_session import check_csrf, cookie, csrf_token
from server.errors import PermissionDenied
from server.live_window import LiveWindow, quantile
from server.metrics import LATENCY_BUCKETS

VENDOR = Path(__file__).resolve().parents[2] / "server" / "console" / "vendor" / "uplot"


def test_each_minute_keeps_its_own_percentiles_and_the_window_keeps_an_hour():
    window = LiveWindow()
    for i in range(98):
        window.observe(60.0 * 10 + i * 0.1, 0.02, 0.004, 200)  # minute 10: fast
    for _ in range(2):
        window.observe(60.0 * 10 + 20, 3.0, 2.0, 200)  # and two slow requests: its last 2%
    window.observe(60.0 * 11, 0.2, None, 503)  # minute 11: a refusal after its worker took it
    [ten, eleven] = window.report(now_s=60.0 * 11 + 30)
    assert (ten["requests"], ten["errors"], eleven["errors"]) == (100, 0, 1)
    assert 0.0025 < ten["ttft_p50_s"] <= 0.005 and 1.0 < ten["ttft_p99_s"] <= 2.5
    assert eleven["ttft_p50_s"] is None and 0.1 < eleven["e2e_p50_s"] <= 0.25
    assert [m["minute"] for m in window.report(now_s=60.0 * 70)] == [660]  # 10 is an hour old
    assert window.report(now_s=60.0 * 71) == []
    assert quantile(0.5, [0] * (len(LATENCY_BUCKETS) + 1)) is None


def test_a_change_on_the_cookie_needs_the_sessions_own_csrf_token():
    check_csrf("GET", "secret", None)  # reading needs none
    check_csrf("POST", "secret", csrf_token("secret"))
    for sent in (None, "", csrf_token("another session")):
        with pytest.raises(PermissionDenied, match="X-CSRF-Token"):
            check_csrf("DELETE", "secret", sent)
    assert "secret" not in csrf_token("secret")


def test_the_session_cookie_is_out_of_scripts_and_other_sites_reach():
    attributes = [part.strip() for part in cookie("tok", 3600).split(";")]
    assert attributes[0] == "cohort_session=tok"
    assert {"HttpOnly", "Secure", "SameSite=Strict", "Max-Age=3600", "Path=/"} <= set(attributes)


def test_the_chart_library_is_the_one_npm_published():
    source = (VENDOR / "SOURCE.md").read_text()
    for name in ("uPlot.iife.min.js", "uPlot.min.css"):
        assert hashlib.sha256((VENDOR / name).read_bytes()).hexdigest() in source, name
    assert "MIT License" in (VENDOR / "LICENSE").read_text()
