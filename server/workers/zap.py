"""Who may connect to the front's ZeroMQ port: the ZAP handler for CURVE (pyzmq's `zmq.auth`).

pyzmq's authenticator checks a key against a folder of certificates; this one also names the
key (its file name), which ZeroMQ then attaches to every message of the connection as its
User-Id. The dispatcher binds a worker id to that name (`may_use`): a key named NAME registers
only ids NAME or NAME-* (the local key any). The handler cannot do it itself: the ZAP request
carries the front's own routing id, not the peer's. The folder is read again when it changes,
so a key added or removed with `python -m server.keys` counts for the next connection.

One handler serves the whole process (it binds ZeroMQ's fixed inproc address); each front in it
registers its key folder under a ZAP domain of its own.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85

from common.keys import LOCAL

log = logging.getLogger("cohort.zap")


def may_use(key_name: str, worker_id: bytes) -> bool:
    """Whether the holder of key `key_name` may register as `worker_id`."""
    wanted = worker_id.decode("utf-8", "replace")
    return key_name == LOCAL or wanted == key_name or wanted.startswith(key_name + "-")


class WorkerAuthenticator(ThreadAuthenticator):
    """CURVE only, and only the keys in the domain's folder; the User-Id is the key's name."""

    def __init__(self) -> None:
        super().__init__(zmq.Context.instance(), log=logging.getLogger("cohort.zap.pyzmq"))
        self.folders: dict[str, Path] = {}
        self._names: dict[str, tuple[float, dict[bytes, str]]] = {}
        self.refused = 0

    def serve(self, domain: str, folder: Path) -> None:
        self.folders[domain] = folder

    def names(self, domain: str) -> dict[bytes, str]:
        """{z85 public key: key name} for a domain, read again when its folder changed."""
        folder = self.folders.get(domain)
        if folder is None:
            return {}
        try:
            mtime = folder.stat().st_mtime
        except OSError:
            return {}
        cached = self._names.get(domain)
        if cached is None or cached[0] != mtime:
            names = {}
            for path in sorted(folder.glob("*.key")):
                try:
                    names[zmq.auth.load_certificate(path)[0]] = path.stem  # z85 already
                except (OSError, ValueError) as error:
                    log.error("cannot read worker key %s: %s", path, error)
            cached = self._names[domain] = (mtime, names)
        return cached[1]

    async def handle_zap_message(self, msg: list[bytes]) -> None:
        if len(msg) != 7 or msg[5] != b"CURVE":
            return self._refuse(msg, b"CURVE required")
        domain, key = msg[2], msg[6]
        name = self.names(domain.decode("utf-8", "replace")).get(z85.encode(key))
        if name is None:
            return self._refuse(msg, b"unknown key")
        self._send_zap_reply(msg[1], b"200", b"OK", name)

    def _refuse(self, msg: list[bytes], reason: bytes) -> None:
        self.refused += 1
        if self.refused == 1 or self.refused % 100 == 0:  # a flood must not flood the log too
            address = msg[3].decode("utf-8", "replace") if len(msg) > 3 else "?"
            log.warning("refused a worker connection from %s: %s (%d refused so far)",
                        address, reason.decode(), self.refused)
        if len(msg) > 1:
            self._send_zap_reply(msg[1], b"400", reason)


_lock = threading.Lock()
_authenticator: WorkerAuthenticator | None = None


def authenticator() -> WorkerAuthenticator:
    """The process's ZAP handler, started on first use."""
    global _authenticator
    with _lock:
        if _authenticator is None:
            _authenticator = WorkerAuthenticator()
            _authenticator.start()
        return _authenticator
