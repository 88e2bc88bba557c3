"""`python -m worker`: the supervisor, a small process that keeps its engine host(s) running.

It starts the engine host (`python -m worker.host`, the part that loads the model) as its child
and starts it again when it dies, after a wait that doubles from `COHORT_RESTART_BACKOFF_S` up
to a minute (back to the start once a host has lived a minute). It exits only on SIGTERM/SIGINT,
which it passes on and waits out, or on a configuration error: so honcho, systemd or Kubernetes
see an engine crash as a restart, not as the end of the deployment. The host keeps the worker id
across restarts, and when it dies without a word the supervisor says bye for it, so the front
re-runs its requests elsewhere at once instead of after a timeout. Processes the host leaves
behind (vLLM's EngineCore) are re-parented here, as a Linux child subreaper, and killed. With
`--gpus 0,1` (or `auto`) it keeps one host per GPU, each a worker of its own (`<id>-gpu<n>`), so
one Procfile line serves a whole machine.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys

import trio
import zmq

from common import protocol
from common.config import WorkerSettings
from common.logs import setup_logging
from worker import host
from worker.link import dealer

log = logging.getLogger("cohort.worker.supervisor")
MAX_BACKOFF_S = 60.0
PR_SET_CHILD_SUBREAPER = 36


class HostSlot:
    """One engine host the supervisor keeps running: its worker id, command and environment."""

    def __init__(self, worker_id: str, command: list[str], env: dict[str, str]) -> None:
        self.worker_id = worker_id
        self.command = command
        self.env = env
        self.proc: trio.Process | None = None
        self.restarts = 0


class Supervisor:
    """Keeps one engine host per slot running: one, or one per GPU (`--gpus`)."""

    def __init__(self, settings: WorkerSettings, argv: list[str], gpus: list[str]) -> None:
        self.settings = settings
        base = settings.worker_id or host.default_worker_id()
        command = [sys.executable, "-m", "worker.host", *argv, "--worker-id"]
        if gpus:  # one host per GPU, each seeing only its own, each a worker of its own
            self.slots = [HostSlot(f"{base}-gpu{gpu}", command + [f"{base}-gpu{gpu}"],
                                   dict(os.environ, CUDA_VISIBLE_DEVICES=gpu)) for gpu in gpus]
        else:
            self.slots = [HostSlot(base, command + [base], dict(os.environ))]
        self.stopping = trio.Event()  # SIGTERM or SIGINT came; it also cuts a restart's backoff

    async def run(self) -> int:
        _become_subreaper()
        host.ignore_after_receiving()
        codes: list[int] = []
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._pass_on, signals)
                async with trio.open_nursery() as hosts:
                    for slot in self.slots:
                        hosts.start_soon(self._keep_running, slot, codes)
                nursery.cancel_scope.cancel()
        return max(codes, default=0)

    async def _keep_running(self, slot: HostSlot, codes: list[int]) -> None:
        backoff = self.settings.restart_backoff_s
        while True:
            started = trio.current_time()
            slot.proc = await trio.lowlevel.open_process(slot.command, env=slot.env)
            code = await slot.proc.wait()
            self._kill_orphans()
            if self.stopping.is_set() or code in (0, host.CONFIG_ERROR):
                codes.append(code)
                return
            if trio.current_time() - started > MAX_BACKOFF_S:
                backoff = self.settings.restart_backoff_s
            slot.restarts += 1
            reason = (f"engine host exited with status {code}; restart {slot.restarts} "
                      f"in {backoff:g} s")
            log.error("worker %s: %s", slot.worker_id, reason)
            await trio.to_thread.run_sync(self._say_bye, slot.worker_id, reason)
            with trio.move_on_after(backoff):
                await self.stopping.wait()
            if self.stopping.is_set():  # a SIGTERM in the backoff: no new host to outlive the stop
                codes.append(code)
                return
            backoff = min(backoff * 2, MAX_BACKOFF_S)

    async def _pass_on(self, signals) -> None:
        """SIGTERM or SIGINT: stop restarting, and let the hosts finish (honcho signals the whole
        group, so they may have the signal already; they take a second one calmly)."""
        async for signum in signals:
            self.stopping.set()
            log.info("supervisor: %s, stopping the engine host(s)", signal.Signals(signum).name)
            for slot in self.slots:
                if slot.proc is not None and slot.proc.returncode is None:
                    slot.proc.send_signal(signum)

    def _kill_orphans(self) -> None:
        """End what dead hosts left behind: every child of ours that is not a running host."""
        live = {slot.proc.pid for slot in self.slots
                if slot.proc is not None and slot.proc.returncode is None}
        _kill_orphans(live)

    def _say_bye(self, worker_id: str, reason: str) -> None:
        """Speak for a host that died without a word, under its id, to every front."""
        for endpoint in self.settings.connect:
            with dealer(self.settings, worker_id) as sock:
                sock.setsockopt(zmq.LINGER, 1000)
                sock.connect(endpoint)
                sock.send(protocol.Bye(reason, restarting=True).encode())


def _become_subreaper() -> None:
    """Orphans of the host (vLLM's engine processes) become our children, so we can end them."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the engine's own parent checks must do
        pass


def _kill_orphans(keep: set[int]) -> None:
    """End and reap the children of ours that are not in `keep` (orphans of dead hosts, re-parented
    here; we start nothing else). Reaped by pid, so no other host's exit status is taken."""
    me = os.getpid()
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not entry.isdigit() or int(entry) in keep:
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                parent = int(stat.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if parent != me:
            continue
        try:
            os.kill(int(entry), signal.SIGKILL)
            os.waitpid(int(entry), 0)
        except (ProcessLookupError, ChildProcessError):
            pass


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = host.parse_args(argv)
    if args.no_supervisor:
        host.main([a for a in argv if a != "--no-supervisor"])
        return
    settings = host.settings_from(args)
    setup_logging(settings.log_level)
    passed = [word for name in ("connect", "engine", "model") if getattr(args, name)
              for word in (f"--{name}", getattr(args, name))]
    sys.exit(trio.run(Supervisor(settings, passed, visible_gpus(args.gpus)).run))


def visible_gpus(wanted: str | None) -> list[str]:
    """`--gpus 0,1` as given; `--gpus auto`: each GPU `nvidia-smi -L` lists (none: one host)."""
    if not wanted:
        return []
    if wanted != "auto":
        return [gpu.strip() for gpu in wanted.split(",") if gpu.strip()]
    try:
        listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [str(i) for i, line in enumerate(listed.stdout.splitlines()) if line.startswith("GPU ")]


if __name__ == "__main__":
    main()
