"""The front's metrics that are read, not pushed: periodic store work's failures in a row, and
counters that exist at 0 before their first event (so Prometheus's increase() sees it)."""

from server.metrics import Metrics
from server.periodic import Streak


def test_a_streak_followed_is_read_when_scraped():
    metrics, streak = Metrics(), Streak()
    metrics.follow_streak("limit_sync", streak)
    labels = {"what": "limit_sync"}
    assert metrics.registry.get_sample_value("cohort_store_round_failure_streak", labels) == 0
    streak.failures = 3
    assert metrics.registry.get_sample_value("cohort_store_round_failure_streak", labels) == 3
    assert b'cohort_store_round_failure_streak{what="limit_sync"} 3.0' in metrics.render()


def test_takeovers_are_exported_at_zero_before_the_first():
    text = Metrics().render().decode()
    for what in ("task", "batch"):
        for cause in ("lease_lapsed", "handed_back"):
            assert f'cohort_lease_takeovers_total{{cause="{cause}",what="{what}"}} 0.0' in text
