"""The free-memory check before the real-engine tests, and when it speaks."""

import pytest

from tests import conftest, free_memory

MEMINFO = "MemTotal:       24683792 kB\nMemFree:  1000 kB\nMemAvailable:   {available} kB\n"
GIB_KB = 1024 * 1024


def meminfo(available_gib: float) -> str:
    return MEMINFO.format(available=int(available_gib * GIB_KB))


def test_the_need_is_the_engines_share_of_the_memory_and_the_overhead_measured():
    total, _ = free_memory.meminfo_gb(meminfo(1))
    assert total == pytest.approx(25.28, abs=0.01)
    assert free_memory.needed_gb(total, "cpu", {}) == pytest.approx(0.6 * 25.28 + 4, abs=0.01)
    assert free_memory.needed_gb(total, "cuda", {}) == 4  # the KV cache is on the GPU
    assert free_memory.needed_gb(total, "cpu", {"COHORT_TEST_MIN_FREE_GB": "7.5"}) == 7.5


def test_less_free_than_needed_says_how_much_and_what_to_do():
    message = free_memory.shortfall(meminfo(9.3132), "cpu", {})  # 10.0 GB
    assert message.startswith("the real-engine tests need 19.2 GB free, 10.0 are: close other")
    assert "-m 'not vllm'" in message and "COHORT_TEST_MIN_FREE_GB" in message
    assert free_memory.shortfall(meminfo(20), "cpu", {}) == ""
    assert free_memory.shortfall(meminfo(9.3132), "cpu", {"COHORT_TEST_MIN_FREE_GB": "0"}) == ""


class Item:
    def __init__(self, *keywords: str) -> None:
        self.keywords, self.markers = set(keywords), []

    def add_marker(self, marker) -> None:
        self.markers.append(marker)


def test_the_check_stops_the_run_only_where_the_real_engine_tests_would_run(monkeypatch):
    monkeypatch.setattr(free_memory, "check", lambda: "the real-engine tests need 19.2 GB free, 3.0 are")
    monkeypatch.delenv("COHORT_REQUIRE_VLLM", raising=False)
    monkeypatch.setattr(conftest, "vllm_missing", lambda: "")
    with pytest.raises(pytest.UsageError, match="need 19.2 GB free, 3.0 are"):
        conftest.pytest_collection_modifyitems(None, [Item("vllm"), Item()])
    conftest.pytest_collection_modifyitems(None, [Item()])  # none selected: no check
    monkeypatch.setattr(conftest, "vllm_missing", lambda: "vLLM is not installed")
    skipped = Item("vllm")
    conftest.pytest_collection_modifyitems(None, [skipped])  # skipped: no check either
    assert skipped.markers[0].kwargs["reason"] == "vLLM is not installed"
