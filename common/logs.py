"""One log format for every process: key=value lines that carry the request id where known."""

from __future__ import annotations

import logging

FORMAT = "%(asctime)s level=%(levelname)s proc=%(process)d logger=%(name)s %(message)s"


def setup_logging(level: str = "INFO") -> None:
    """Configure the root logger once per process (a second call only changes the level)."""
    root = logging.getLogger()
    if not getattr(root, "_cohort", False):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(FORMAT))
        root.addHandler(handler)
        root._cohort = True  # type: ignore[attr-defined]
    root.setLevel(level.upper())
