"""The placement scenario's CPU accounting: a process group's time, engines apart, from /proc."""

import subprocess
import sys

import pytest

from bench import cpu

# the name vLLM gives its engine process (prctl PR_SET_NAME, as setproctitle does)
NAME = "import ctypes\nctypes.CDLL(None).prctl(15, b'VLLM::EngineCore', 0, 0, 0)\n"
BURN = ("import time\nend = time.process_time() + 0.3\nwhile time.process_time() < end: pass\n"
        "print('burnt', flush=True)\ntime.sleep(60)\n")


def test_a_groups_cpu_time_is_counted_with_a_vllm_engine_core_apart():
    started = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                                start_new_session=True) for code in (BURN, NAME + BURN)]
    try:
        for proc in started:  # each says when it has burnt its 0.3 s, then sleeps
            assert proc.stdout.readline() == "burnt\n", proc.poll()
        spent = cpu.cpu_seconds([proc.pid for proc in started])
        assert spent["engine"] == pytest.approx(0.3, abs=0.2)  # what the renamed one burnt
        assert spent["serving"] == pytest.approx(0.3, abs=0.2)  # ... and the other
        assert cpu.cpu_seconds([]) == {"engine": 0.0, "serving": 0.0}
    finally:
        for proc in started:
            proc.kill()
            proc.wait()


def test_the_figures_are_per_thousand_output_tokens():
    assert cpu.over_load({"engine": 0.0, "serving": 0.5}, {"engine": 2.0, "serving": 1.0},
                         500) == {"engine_cpu_s_per_1k_tokens": 4.0,
                                  "serving_cpu_s_per_1k_tokens": 1.0}
    assert cpu.over_load({"engine": 0.0, "serving": 0.0}, {"engine": 1.0, "serving": 1.0},
                         0) == {"engine_cpu_s_per_1k_tokens": None,
                                "serving_cpu_s_per_1k_tokens": None}
