"""`python -m worker`: the supervisor, a small process that keeps one engine host running.

It starts the engine host (`python -m worker.host`, the part that loads the model) as its child
and starts it again when it dies, after a wait that doubles from `COHORT_RESTART_BACKOFF_S` up
to a minute (back to the start once a host has lived a minute). It exits only on SIGTERM/SIGINT,
which it passes on and waits out, or on a configuration error: so honcho, systemd or Kubernetes
see an engine crash as a restart, not as the end of the deployment. The host keeps the worker id
across restarts, and when it dies without a word the supervisor says bye for it, so the front
re-runs its requests elsewhere at once instead of after a timeout. Processes the host leaves
behind (vLLM's EngineCore) are re-parented here, as a Linux child subreaper, and killed.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys

import trio
import zmq

from common import protocol
from common.config import WorkerSettings
from common.logs import setup_logging
from worker import host

log = logging.getLogger("cohort.worker.supervisor")
MAX_BACKOFF_S = 60.0
PR_SET_CHILD_SUBREAPER = 36


class Supervisor:
    def __init__(self, settings: WorkerSettings, argv: list[str]) -> None:
        self.settings = settings
        self.worker_id = settings.worker_id or host.default_worker_id()
        self.command = [sys.executable, "-m", "worker.host", *argv, "--worker-id", self.worker_id]
        self.stopping = False
        self.proc: trio.Process | None = None
        self.restarts = 0

    async def run(self) -> int:
        _become_subreaper()
        backoff = self.settings.restart_backoff_s
        host.ignore_after_receiving()
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._pass_on, signals)
                while True:
                    started = trio.current_time()
                    self.proc = await trio.lowlevel.open_process(self.command)
                    code = await self.proc.wait()
                    _kill_orphans()
                    if self.stopping or code in (0, host.CONFIG_ERROR):
                        nursery.cancel_scope.cancel()
                        return code
                    if trio.current_time() - started > MAX_BACKOFF_S:
                        backoff = self.settings.restart_backoff_s
                    self.restarts += 1
                    reason = (f"engine host exited with status {code}; restart {self.restarts} "
                              f"in {backoff:g} s")
                    log.error("worker %s: %s", self.worker_id, reason)
                    await trio.to_thread.run_sync(self._say_bye, reason)
                    await trio.sleep(backoff)
                    backoff = min(backoff * 2, MAX_BACKOFF_S)
        return 0

    async def _pass_on(self, signals) -> None:
        """SIGTERM or SIGINT: stop restarting, and let the host finish (honcho signals the whole
        group, so it may have the signal already; it takes a second one calmly)."""
        async for signum in signals:
            self.stopping = True
            log.info("supervisor: %s, stopping the engine host", signal.Signals(signum).name)
            if self.proc is not None and self.proc.returncode is None:
                self.proc.send_signal(signum)

    def _say_bye(self, reason: str) -> None:
        """Speak for a host that died without a word, under its id, to every front."""
        context = zmq.Context.instance()
        for endpoint in self.settings.connect:
            with context.socket(zmq.DEALER) as sock:
                sock.setsockopt(zmq.IDENTITY, self.worker_id.encode())
                sock.setsockopt(zmq.LINGER, 1000)
                sock.connect(endpoint)
                sock.send(protocol.Bye(reason).encode())


def _become_subreaper() -> None:
    """Orphans of the host (vLLM's engine processes) become our children, so we can end them."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the engine's own parent checks must do
        pass


def _kill_orphans() -> None:
    """End and reap what the dead host left behind (it is all ours: we start nothing else)."""
    me = os.getpid()
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                parent = int(stat.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if parent == me:
            try:
                os.kill(int(entry), signal.SIGKILL)
            except ProcessLookupError:
                pass
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


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
    sys.exit(trio.run(Supervisor(settings, passed).run))


if __name__ == "__main__":
    main()
