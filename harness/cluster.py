"""Front and workers as real processes, started from the Procfile's own lines as honcho starts them
(`sh -c LINE` with the environment), on free loopback ports, with a real SQLite file."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import trio

from harness.readiness import LOG_LINES, doomed, exit_cause, honcho_lines, serving, tail

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def procfile() -> dict[str, str]:
    lines = {}
    for line in (ROOT / "Procfile").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, _, command = line.partition(":")
            lines[name.strip()] = command.strip()
    return lines


# A mock that costs nothing, unless a test says otherwise (other engines refuse the mock's settings)
FREE_MOCK = {"MOCK_TTFT_S": "0", "MOCK_TOKEN_S": "0", "MOCK_BATCH_GROWTH": "0"}


class Cluster:
    """A front and its workers; every process is in its own group so a kill takes all of it."""

    def __init__(self, tmp: Path, **env: str) -> None:
        self.tmp = tmp
        self.port = free_port()
        self.zmq_port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {
            **os.environ,
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            "PYTHONPATH": str(ROOT),
            "COHORT_PORT": str(self.port),
            "COHORT_ZMQ_BIND": f"tcp://127.0.0.1:{self.zmq_port}",
            "COHORT_CONNECT": f"tcp://127.0.0.1:{self.zmq_port}",
            "COHORT_DATA_DIR": str(tmp / "data"),
            "COHORT_WORKER_TIMEOUT_S": "2",
            "COHORT_HEARTBEAT_INTERVAL_S": "0.25",
            **(FREE_MOCK if env.get("COHORT_ENGINE", "mock") == "mock" else {}),
            **env,
        }
        self.procs: dict[str, subprocess.Popen] = {}
        self.api_key = ""
        self._health_key = ""
        self._honcho: subprocess.Popen | None = None
        self._expected_exits: set[int] = set()  # pids of processes the test signalled or waited
        self._seen_serving: set[str] = set()  # worker ids /health ever showed loaded

    def _spawn(self, name: str, command: str, **env: str) -> subprocess.Popen:
        log = open(self.tmp / f"{name}.log", "ab")
        proc = subprocess.Popen(["sh", "-c", command], cwd=ROOT, env={**self.env, **env},
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs[name] = proc
        return proc

    def start_honcho(self) -> subprocess.Popen:
        """`honcho start` on the Procfile, as the README runs it, with a user `alice` whose key
        is `api_key`; its log is honcho.log."""
        self.api_key = self.add_user("alice")
        log = open(self.tmp / "honcho.log", "wb")
        # the harness's settings, not a `.env` a developer keeps in the checkout (honcho reads it)
        (self.tmp / "empty.env").touch()
        self._honcho = subprocess.Popen([sys.executable, "-m", "honcho", "start", "--env",
                                         str(self.tmp / "empty.env")], cwd=ROOT, env=self.env,
                                        stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        return self._honcho

    def start_front(self, **env: str) -> None:
        self._spawn("front", procfile()["front"], **env)

    def start_second_front(self) -> str:
        """A second front (`front_b`) on the same store, with the workers started after this
        told to connect to both fronts; its URL."""
        port_b, zmq_b = free_port(), free_port()
        self.env["COHORT_CONNECT"] = f"tcp://127.0.0.1:{self.zmq_port},tcp://127.0.0.1:{zmq_b}"
        self._spawn("front_b", procfile()["front"], COHORT_PORT=str(port_b),
                    COHORT_ZMQ_BIND=f"tcp://127.0.0.1:{zmq_b}")
        return f"http://127.0.0.1:{port_b}"

    def start_worker(self, name: str, **env: str) -> None:
        command = procfile()["worker1"].replace("worker1", name)
        self._spawn(name, command, **env)

    def signal(self, name: str, signum: int = signal.SIGKILL) -> None:
        self._expected_exits.add(self.procs[name].pid)
        os.killpg(self.procs[name].pid, signum)

    def wait_exit(self, name: str, timeout_s: float = 30) -> int:
        self._expected_exits.add(self.procs[name].pid)
        return self.procs[name].wait(timeout_s)

    def log(self, name: str) -> str:
        """A process's log (honcho's, `honcho`, holds every process it started)."""
        path = self.tmp / f"{name}.log"
        if not path.exists() and name == "front" and (self.tmp / "honcho.log").exists():
            path = self.tmp / "honcho.log"  # under honcho the front logs there
        return path.read_text(errors="replace") if path.exists() else f"(no {path.name})"

    def log_tail(self, name: str, lines: int = LOG_LINES) -> str:
        """The last lines of a process's log (under honcho: of its lines in honcho.log)."""
        path, honcho = self.tmp / f"{name}.log", self.tmp / "honcho.log"
        if not path.exists() and honcho.exists():
            return tail(honcho_lines(honcho.read_text(errors="replace"), name), lines) \
                or tail(honcho.read_text(errors="replace"), lines)
        return tail(self.log(name), lines)

    def users(self, *args: str, stdin: str = "") -> str:
        done = subprocess.run([sys.executable, "-m", "server.users", *args], cwd=ROOT, env=self.env,
                              input=stdin, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    def add_user(self, username: str, password: str = "correct-horse") -> str:
        """Add a user and return a fresh API key of theirs."""
        self.users("add", username, "--password-stdin", stdin=password + "\n")
        return self.users("key", username)

    def headers(self, key: str | None = None) -> dict[str, str]:
        key = key or self.api_key
        return {"Authorization": f"Bearer {key}"} if key else {}

    async def health(self, url: str | None = None) -> dict | None:
        """/health of the front (or of another front of the cluster, at `url`) with its details:
        with the cluster's key, or once the front answers without them (anonymous callers get
        the status only), with a key of the harness's own."""
        key = self.api_key or self._health_key
        try:
            async with httpx.AsyncClient(timeout=5) as client:
                health = (await client.get((url or self.url) + "/health",
                                           headers=self.headers(key) if key else {})).json()
        except (httpx.TransportError, ValueError):
            return None
        if "workers" not in health and not key:
            self._health_key = await trio.to_thread.run_sync(self.add_user, "cluster-health")
            return await self.health(url)
        return health

    async def wait_for(self, predicate, what: str, timeout_s: float = 60) -> dict:
        """Wait until /health satisfies `predicate` (it is the readiness signal orchestrators use)."""
        return await self._wait(predicate, what, timeout_s, self._front_exit)

    async def wait_ready(self, workers: int, timeout_s: float = 60) -> dict:
        """Wait for `workers` ready workers; a worker whose load will not succeed, or a process
        of ours that exited unasked, ends the wait at once with the cause and its log's tail."""
        return await self._wait(
            lambda h: sum(w["state"] in ("ready", "busy") for w in h["workers"]) >= workers,
            f"{workers} ready worker(s)", timeout_s, self._load_failure)

    async def wait_workers_ready(self, ids: list[str], timeout_s: float = 60,
                                 url: str | None = None) -> dict:
        """Wait until each of these workers is ready (as the front at `url` sees them, by
        default the first), failing at once as `wait_ready` does."""
        return await self._wait(
            lambda h: set(ids) <= {w["id"] for w in h["workers"] if w["state"] in ("ready", "busy")},
            f"workers {', '.join(ids)} ready", timeout_s, self._load_failure, url)

    async def _wait(self, predicate, what: str, timeout_s: float, failure,
                    url: str | None = None) -> dict:
        """Poll /health until `predicate` holds; `failure(health)` names a reason to stop now."""
        health = None
        with trio.move_on_after(timeout_s):
            while True:
                health = await self.health(url)
                self._seen_serving |= serving(health)
                if health is not None and predicate(health):
                    return health
                reason = failure(health)
                if reason:
                    raise AssertionError(f"while waiting for {what}: {reason}")
                await trio.sleep(0.05)
        states = "; ".join(f"{w['id']} {w['state']} {w['error']}".strip()
                           for w in (health or {}).get("workers", [])) or "none"
        raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}; workers: "
                             f"{states}; front log:\n{self.log_tail('front')}")

    def _front_exit(self, health: dict | None) -> str:
        proc = self.procs.get("front")
        if proc is None or proc.poll() is None:
            return ""
        return f"the front {exit_cause(proc.returncode)}; its log:\n{self.log_tail('front')}"

    def _load_failure(self, health: dict | None) -> str:
        """Why a wait for workers cannot succeed: a worker's load failed, or a process of ours
        exited that the test did not stop; "" while it still can."""
        for worker_id, why in doomed(health, self._seen_serving).items():
            return f"worker {worker_id}: {why}; its log:\n{self.log_tail(worker_id)}"
        exited = [(name, proc) for name, proc in self.procs.items()
                  if proc.poll() is not None and proc.pid not in self._expected_exits]
        if self._honcho is not None and self._honcho.poll() is not None:
            exited.append(("honcho", self._honcho))
        for name, proc in exited:
            return f"{name} {exit_cause(proc.returncode)}; its log:\n{self.log_tail(name)}"
        return ""

    def stop(self) -> None:
        """SIGTERM to every process group (honcho's too, if it was started), then SIGKILL to what
        is left of them after 20 s (the `sh` at the head of a group may be gone while the
        processes it started still run)."""
        procs = [*self.procs.values(), *([self._honcho] if self._honcho else [])]
        groups = [proc.pid for proc in procs]
        for group in groups:
            _signal_group(group, signal.SIGTERM)
        deadline = time.monotonic() + 20
        while any(group_alive(group) for group in groups) and time.monotonic() < deadline:
            time.sleep(0.05)  # bounded: processes outside our children cannot be waited on
        for group in groups:
            _signal_group(group, signal.SIGKILL)
        for proc in procs:
            proc.wait()


def _signal_group(group: int, signum: int) -> None:
    try:
        os.killpg(group, signum)
    except ProcessLookupError:
        pass


def group_alive(group: int) -> bool:
    """Whether any process of the group still runs (zombies do not count)."""
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    fields = stat.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == group and fields[0] != "Z":
                return True
    return False


def descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    parent = int(stat.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def engine_host(pid: int, worker_id: str) -> int:
    """The engine host (`python -m worker.host`) of worker `worker_id`, somewhere under pid."""
    for child in sorted(descendants(pid)):
        try:
            with open(f"/proc/{child}/cmdline", "rb") as cmdline:
                words = cmdline.read().split(b"\0")
        except OSError:
            continue
        if b"worker.host" in words and worker_id.encode() in words:
            return child
    raise LookupError(f"no engine host under {pid}")


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def engine_core(pid: int) -> int:
    """vLLM's EngineCore process under a worker (vLLM names it `VLLM::EngineCore`)."""
    for child in sorted(descendants(pid)):
        try:
            with open(f"/proc/{child}/cmdline", "rb") as cmdline:
                if b"EngineCore" in cmdline.read():
                    return child
        except OSError:
            continue
    raise LookupError(f"no EngineCore under {pid}")
