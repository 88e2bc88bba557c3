"""CURVE key files for the wire between fronts and workers (ZeroMQ's own certificate format).

In the data directory's `keys/` folder (0700):
- `front.key_secret` / `front.key`: the front's pair; workers need `front.key` (public) to connect.
- `local.key_secret` / `local.key`: the pair that workers on this machine share; they can read
  the data directory anyway, so they are trusted with any worker id.
- `workers/NAME.key`: the public keys the front accepts. `local.key` is there from the start;
  `python -m server.keys add NAME` adds one for workers on other hosts, whose ids must be NAME or
  begin with `NAME-` (a supervisor's `--gpus` hosts are `NAME-gpu0`, ...).

Fronts and workers on one machine may start in any order: whoever comes first makes the files,
under a lock, so `honcho start` needs no setup.
"""

from __future__ import annotations

import fcntl
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import zmq
import zmq.auth

from common.config import SettingError

FRONT = "front"
LOCAL = "local"


@dataclass(frozen=True)
class KeyFiles:
    """Where one data directory keeps its key files."""

    folder: Path

    @classmethod
    def of(cls, data_dir: str | os.PathLike) -> "KeyFiles":
        return cls(Path(data_dir) / "keys")

    @property
    def front_secret(self) -> Path:
        return self.folder / f"{FRONT}.key_secret"

    @property
    def front_public(self) -> Path:
        return self.folder / f"{FRONT}.key"

    @property
    def local_secret(self) -> Path:
        return self.folder / f"{LOCAL}.key_secret"

    @property
    def authorized(self) -> Path:
        return self.folder / "workers"

    def ensure(self) -> "KeyFiles":
        """Make the front's and the local workers' pairs once, whoever asks first."""
        self.authorized.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.folder, 0o700)
        with open(self.folder / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            for name in (FRONT, LOCAL):
                if not (self.folder / f"{name}.key_secret").exists():
                    zmq.auth.create_certificates(self.folder, name)
            authorized_local = self.authorized / f"{LOCAL}.key"
            if not authorized_local.exists():
                authorized_local.write_bytes((self.folder / f"{LOCAL}.key").read_bytes())
        return self

    def add_worker(self, name: str, out: Path) -> Path:
        """A new key pair for workers NAME[-*]: its secret to `out`, its public key authorized."""
        if not name.replace("-", "").replace("_", "").isalnum() or name in (FRONT, LOCAL):
            raise ValueError(f"{name!r}: a worker key name is letters, digits, - and _ "
                             f"(and not {FRONT!r} or {LOCAL!r})")
        self.ensure()
        out.mkdir(parents=True, exist_ok=True, mode=0o700)
        public, secret = zmq.auth.create_certificates(out, name)
        os.replace(public, self.authorized / f"{name}.key")
        (out / f"{FRONT}.key").write_bytes(self.front_public.read_bytes())
        return Path(secret)


def load_pair(path: str | os.PathLike) -> tuple[bytes, bytes]:
    """(public, secret) from a `.key_secret` file."""
    public, secret = zmq.auth.load_certificate(path)
    if secret is None:
        raise ValueError(f"{path} holds no secret key (a .key_secret file is needed)")
    return public, secret


def load_public(path: str | os.PathLike) -> bytes:
    return zmq.auth.load_certificate(path)[0]


def is_local(endpoint: str) -> bool:
    """Whether a ZeroMQ endpoint stays on this machine (loopback TCP, ipc, inproc)."""
    parts = urlsplit(endpoint)
    if parts.scheme in ("ipc", "inproc"):
        return True
    host = (parts.hostname or "").strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve_curve(sock: zmq.Socket, files: KeyFiles, domain: str) -> None:
    """Make `sock` a CURVE server whose clients the ZAP handler of `domain` checks."""
    public, secret = load_pair(files.front_secret)
    sock.curve_server = True
    sock.curve_publickey, sock.curve_secretkey = public, secret
    sock.zap_domain = domain.encode()


def connect_curve(sock: zmq.Socket, secret_file: str | os.PathLike,
                  front_public_file: str | os.PathLike) -> None:
    """Make `sock` a CURVE client with our pair, trusting only the front's public key."""
    sock.curve_publickey, sock.curve_secretkey = load_pair(secret_file)
    sock.curve_serverkey = load_public(front_public_file)


def worker_key_files(settings) -> tuple[Path, Path] | None:
    """A worker's (secret key file, front's public key file), or None without CURVE.

    Given COHORT_WORKER_KEY, that file (and COHORT_FRONT_KEY, or `front.key` beside it). Else
    the data directory's local key, made if need be, but only for fronts on this machine: a
    worker elsewhere would make keys no front knows and wait for a welcome that never comes.
    """
    if settings.zmq_insecure:
        return None
    if settings.worker_key:
        secret = Path(settings.worker_key)
        front = Path(settings.front_key) if settings.front_key else secret.with_name(f"{FRONT}.key")
    else:
        remote = [endpoint for endpoint in settings.connect if not is_local(endpoint)]
        if remote:
            raise SettingError(
                f"{', '.join(remote)} is on another machine: give this worker a key made there "
                "with `python -m server.keys add NAME` (COHORT_WORKER_KEY, COHORT_FRONT_KEY)")
        files = KeyFiles.of(settings.data_dir).ensure()
        secret, front = files.local_secret, files.front_public
    for path, setting in ((secret, "COHORT_WORKER_KEY"), (front, "COHORT_FRONT_KEY")):
        if not path.is_file():
            raise SettingError(f"{setting}: no key file at {path}")
    return secret, front
