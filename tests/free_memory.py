"""The memory the real-engine (`vllm`) tests need free, checked once before any of them runs.

vLLM's CPU backend reserves `gpu_memory_utilization` of the machine's memory for each engine when
it starts (weights and KV cache): test_vllm.py's two workers take 0.3 each, test_parity.py's three
engines 0.5 together; the processes around them (front, engine hosts, vLLM's API server) take the
rest. Measured on a 2-core machine with 25.3 GB (23.5 GiB), each file run alone
(`python -m pytest tests/e2e/<file> -m vllm`) while a loop summed the PSS of pytest's process tree
every second (MemAvailable dropped by as much): test_vllm.py peaked at 17.6 GB (0.6 of the memory,
15.2 GB, + 2.4 GB), test_parity.py at 15.8 GB (0.5, 12.6 GB, + 3.1 GB). The modules run one after
the other, so the need is the larger, with 1.5 GB to spare: 0.6 of the memory + 4 GB (19.2 GB on
that machine). On a GPU the engines reserve GPU memory instead: 4 GB. COHORT_TEST_MIN_FREE_GB
sets the figure instead of this estimate (0: no check), for a machine where it is wrong.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

CPU_SHARE = 0.6  # of the machine's memory: the largest sum of the fixtures' engine shares
OVERHEAD_GB = 4.0  # the processes around the engines: 3.1 GB measured at most, and a margin
GB = 1e9


def needed_gb(total_gb: float, device: str, env: Mapping[str, str]) -> float:
    """What must be free for the real-engine tests, in GB."""
    if env.get("COHORT_TEST_MIN_FREE_GB"):
        return float(env["COHORT_TEST_MIN_FREE_GB"])
    return (CPU_SHARE * total_gb if device == "cpu" else 0) + OVERHEAD_GB


def meminfo_gb(text: str) -> tuple[float, float]:
    """(MemTotal, MemAvailable) of a /proc/meminfo text, in GB."""
    fields = {line.split(":")[0]: int(line.split()[1]) * 1024 / GB
              for line in text.splitlines() if line.strip()}
    return fields["MemTotal"], fields["MemAvailable"]


def shortfall(meminfo: str, device: str, env: Mapping[str, str]) -> str:
    """What to tell the user when less memory is free than the tests need; "" when enough is."""
    total, available = meminfo_gb(meminfo)
    need = needed_gb(total, device, env)
    if available >= need:
        return ""
    return (f"the real-engine tests need {need:.1f} GB free, {available:.1f} are: close other "
            "programs (or wait for other test runs), or deselect these tests with -m 'not vllm' "
            "(COHORT_TEST_MIN_FREE_GB sets the figure; tests/free_memory.py says how it was "
            "measured)")


def check() -> str:
    """`shortfall` for this machine and the device its vLLM workers would pick."""
    if not os.path.exists("/proc/meminfo"):  # not Linux: nothing to read, nothing to say
        return ""
    from worker.engines.vllm import pick_device

    with open("/proc/meminfo") as meminfo:
        return shortfall(meminfo.read(), pick_device(os.environ.get("COHORT_DEVICE", "auto")),
                         os.environ)
