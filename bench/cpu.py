"""CPU time spent by a system's processes over a load, split into its engines and the rest.

On a 2-core machine every core a gateway's processes take is a core the engines do not get, so a
placement scenario reports, beside latency, what each stack's serving processes cost: the vLLM
EngineCores (named `VLLM::...` by vLLM) apart from everything else in the same process groups
(Cohort's fronts and workers; `vllm serve`'s API servers and the router). Read from /proc, by
process group (the bench starts every process in a group of its own).
"""

from __future__ import annotations

import os
from collections.abc import Iterable

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(groups: Iterable[int]) -> dict[str, float]:
    """CPU seconds (user + system) so far of every live process in `groups`: {"engine": ...,
    "serving": ...}. A process that exited since is not counted: compare over a load during which
    none does."""
    wanted, spent = set(groups), {"engine": 0.0, "serving": 0.0}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                text = stat.read()
        except OSError:
            continue
        name, fields = text[text.index("(") + 1:text.rindex(")")], text.rsplit(")", 1)[1].split()
        if int(fields[2]) not in wanted:  # the process group
            continue
        seconds = (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime
        spent["engine" if name.startswith("VLLM::") else "serving"] += seconds
    return spent


def over_load(before: dict[str, float], after: dict[str, float],
              output_tokens: int) -> dict[str, float | None]:
    """CPU seconds per 1,000 output tokens of the load, engines and the serving rest apart."""
    per = 1000 / output_tokens if output_tokens else None
    return {f"{part}_cpu_s_per_1k_tokens": round((after[part] - before[part]) * per, 3)
            if per else None for part in ("engine", "serving")}
