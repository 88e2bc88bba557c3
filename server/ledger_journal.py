"""The ledger's journal: each interactive request's row, appended to a file before its answer
ends, so a front SIGKILLed before its next commit loses no row.

One append (`os.write` of one JSON line to the page cache, a few microseconds) per request, never
a commit. The front's writer commits the rows once a second and then drops the segment they were
appended to; each front appends to segments of its own, each held with an exclusive `flock` for
as long as the front lives. A segment whose lock can be taken was left by a front that died: any
front on the same data directory replays it into the store (rows are keyed by request id, so a
row replayed twice is one row) and removes it. The kernel keeps what was written through a kill
of the process; a power loss of the machine may lose the last seconds' rows.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import logging
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("cohort.usage")

SUFFIX = ".ledger.jsonl"


@dataclass
class Segment:
    """One journal file, open for appending and locked by this front."""

    path: Path
    fd: int


class Journal:
    """This front's journal segments in `folder` (created 0700, files 0600)."""

    def __init__(self, folder: str | Path, front_id: str) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        # the front's id and a token: a later process with the same pid never appends to a
        # segment its predecessor left
        self.name = f"{front_id.replace(os.sep, '_')}-{secrets.token_hex(4)}"
        self._seq = 0
        self.segment = self._open()

    def _open(self) -> Segment:
        path = self.folder / f"{self.name}.{self._seq:08d}{SUFFIX}"
        self._seq += 1
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        return Segment(path, fd)

    def append(self, row: dict[str, Any]) -> None:
        """One row, as one line, in one write (whole even if the process is killed)."""
        os.write(self.segment.fd, encode(row))

    def rotate(self) -> Segment:
        """Start a new segment; the old one is dropped once its rows are committed."""
        old, self.segment = self.segment, self._open()
        return old

    @staticmethod
    def drop(segment: Segment) -> None:
        """Its rows are in the store: remove it (unlinked while still locked, then closed)."""
        try:
            os.unlink(segment.path)
        finally:
            os.close(segment.fd)

    def close(self) -> None:
        """Stopping with nothing left to commit: the current segment goes too."""
        self.drop(self.segment)


def encode(row: dict[str, Any]) -> bytes:
    return (json.dumps(row, default=datetime.datetime.isoformat, separators=(",", ":"))
            + "\n").encode()


def orphans(folder: str | Path) -> list[tuple[Segment, list[dict[str, Any]]]]:
    """The segments in `folder` that no live front holds (their lock could be taken: it is held
    now, until `Journal.drop`), with their rows; a line that cannot be read is skipped."""
    found: list[tuple[Segment, list[dict[str, Any]]]] = []
    folder = Path(folder)
    if not folder.is_dir():
        return found
    for path in sorted(folder.glob("*" + SUFFIX)):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:  # its front committed and removed it meanwhile
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # a live front's
            os.close(fd)
            continue
        with os.fdopen(os.dup(fd), "rb") as data:
            rows = []
            for line in data:
                try:
                    row = json.loads(line)
                    row["at"] = datetime.datetime.fromisoformat(row["at"])
                    rows.append(row)
                except (ValueError, KeyError, TypeError):
                    log.warning("skipped an unreadable line of the ledger journal %s", path)
        found.append((Segment(path, fd), rows))
    return found
