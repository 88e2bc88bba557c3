"""What a readiness wait judges besides readiness: a worker whose load will not succeed. Its load
failed (state `failed`), or its engine host died before the worker was ever ready (state
`restarting`: on a full machine, the kernel's OOM killer). A wait that sees either ends at once
with the cause and the worker's last log lines, rather than at its deadline. No sockets here."""

from __future__ import annotations

import re
import signal

LOG_LINES = 40  # what a failure shows of a process's log
SERVING = ("ready", "busy", "draining", "failing")  # states only a worker whose load ended reaches
OOM_HINT = ("SIGKILL: if nobody sent it, the kernel's OOM killer (see `dmesg`); the real-engine "
            "tests need the memory tests/conftest.py checks for")


def serving(health: dict | None) -> set[str]:
    """The ids of the workers /health shows loaded (serving, or paused after serving)."""
    return {w["id"] for w in (health or {}).get("workers", []) if w["state"] in SERVING}


def doomed(health: dict | None, seen_serving: set[str]) -> dict[str, str]:
    """Worker id -> why its load will not succeed, for the workers of a /health answer.

    A host that dies after its worker served (a test killed its engine) is restarted and waited
    for; one that dies before is a load that failed, and its restart would most likely fail the
    same way (the memory it lacked is still taken)."""
    found = {}
    for worker in (health or {}).get("workers", []):
        if worker["state"] == "failed":
            found[worker["id"]] = f"its load failed: {worker['error']}"
        elif worker["state"] == "restarting" and worker["id"] not in seen_serving:
            found[worker["id"]] = f"its engine host died while loading ({worker['error']})" + (
                f"; {OOM_HINT}" if re.search(r"status -9\b", worker["error"]) else "")
    return found


def exit_cause(code: int) -> str:
    """A process's exit status in words (Popen's negative codes are signals)."""
    if code >= 0:
        return f"exited with status {code}"
    name = signal.Signals(-code).name if -code in signal.Signals._value2member_map_ else -code
    return f"was killed by {name}" + (f" ({OOM_HINT})" if code == -signal.SIGKILL else "")


def tail(text: str, lines: int = LOG_LINES) -> str:
    return "\n".join(text.splitlines()[-lines:])


def honcho_lines(text: str, name: str) -> str:
    """The lines of one process in honcho's log (`12:00:01 worker1.1 | ...`)."""
    prefix = re.compile(rf"^\S+ {re.escape(name)}\.\d+\s+\|")
    return "\n".join(line for line in text.splitlines() if prefix.match(line))
