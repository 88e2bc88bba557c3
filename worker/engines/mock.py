"""The mock engine: development and tests without a GPU, behaving like a continuous-batching engine.

One step loop serves every active sequence, one token each per step, as vLLM does. A step costs
`mock_token_s * (1 + mock_batch_growth * (active - 1))`, plus `mock_ttft_s` when it admits new
requests (their prefill). Replies keep the shape users of the old system know:
`[Batched mock response <batch id>] Mock response to: <prompt>`. All costs 0 is the zero-cost mock.
"""

from __future__ import annotations

import os
import random
import re
from dataclasses import dataclass, field
from typing import Any

import trio

from common import protocol
from worker.engines import Emit, Engine, EngineError

TOKEN = re.compile(r"\s*\S+")


def tokenize(text: str) -> list[str]:
    """Whitespace-led word pieces: joining them gives back the text (bar trailing spaces)."""
    return TOKEN.findall(text)


def render_chat(messages: list[dict[str, Any]]) -> str:
    """A plain chat template: what the mock counts as prompt tokens for a chat request."""
    return "".join(f"<|{m['role']}|> {m['content']}\n" for m in messages) + "<|assistant|>"


@dataclass
class Sequence:
    """One choice of one request, as the step loop sees it."""

    request_id: str
    index: int
    tokens: list[str]
    max_tokens: int
    stop: list[str]
    emit: Emit
    prompt_tokens: int
    done: trio.Event = field(default_factory=trio.Event)
    position: int = 0
    text: str = ""
    admitted: bool = False


class MockEngine(Engine):
    """A faithful stand-in for vLLM: continuous batching, streaming, honest counts, fault injection."""

    name = "mock"

    def __init__(self, settings) -> None:
        super().__init__(settings)
        self.model = settings.served_model_name or settings.model or "cohort-mock"
        self.device = "cpu (mock)"
        self._sequences: list[Sequence] = []
        self._wake = trio.Event()
        self._batch_lock = trio.Lock()
        self._requests_seen = 0
        self._random = random.Random(0)

    async def load(self) -> None:
        await trio.sleep(self.settings.mock_load_s)

    async def admit(self, batch_size: int) -> None:
        if self.settings.mock_batch_cost_s:
            async with self._batch_lock:  # batches pay their fixed cost one after another
                await trio.sleep(self.settings.mock_batch_cost_s)

    async def run(self) -> None:
        """The step loop; the worker runs it in its nursery."""
        s = self.settings
        while True:
            if not self._sequences:
                await self._wake.wait()
                self._wake = trio.Event()
                continue
            batch = list(self._sequences)
            admitting = any(not seq.admitted for seq in batch)
            cost = s.mock_token_s * (1 + s.mock_batch_growth * (len(batch) - 1))
            await trio.sleep(cost + (s.mock_ttft_s if admitting else 0.0))
            for seq in batch:
                if seq.done.is_set():
                    continue
                seq.admitted = True
                self._step(seq)
            self._sequences = [seq for seq in self._sequences if not seq.done.is_set()]
            self.active = len({seq.request_id for seq in self._sequences})

    def _step(self, seq: Sequence) -> None:
        token = seq.tokens[seq.position] if seq.position < len(seq.tokens) else ""
        seq.position += 1
        finish = None
        candidate = seq.text + token
        for stop in seq.stop:
            cut = candidate.find(stop)
            if cut != -1:
                token, finish = candidate[:cut][len(seq.text):], "stop"
                break
        if finish is None and seq.position >= len(seq.tokens):
            finish = "stop"
        if finish is None and seq.position >= seq.max_tokens:
            finish = "length"
        seq.text += token
        first = seq.position == 1
        seq.emit(protocol.out_item(seq.request_id, seq.index, token, 1, finish,
                                   seq.prompt_tokens if first or finish else 0))
        if finish is not None:
            seq.done.set()

    async def generate(self, request: dict[str, Any], emit: Emit) -> None:
        s = self.settings
        self._requests_seen += 1
        if s.mock_crash_after and self._requests_seen >= s.mock_crash_after:
            os._exit(3)  # fault injection: die like a crashed GPU process, mid-batch
        if s.mock_error_rate and self._random.random() < s.mock_error_rate:
            raise EngineError("injected failure (MOCK_ERROR_RATE)")
        params = request["params"]
        if request["kind"] == "chat":
            users = [m["content"] for m in request["messages"] if m["role"] == "user"]
            prompt, counted = (users[-1] if users else ""), render_chat(request["messages"])
        else:
            prompt = counted = request["prompt"]
        reply = f"[Batched mock response {request.get('batch_id', '?')}] Mock response to: {prompt}"
        tokens = tokenize(reply)
        max_tokens = min(params.get("max_tokens") or s.mock_max_tokens, s.max_model_len)
        sequences = [Sequence(request["id"], index, tokens, max_tokens, params.get("stop") or [],
                              emit, len(tokenize(counted)))
                     for index in range(params.get("n", 1))]
        self._sequences.extend(sequences)
        self._wake.set()
        try:
            for seq in sequences:
                await seq.done.wait()
        finally:  # an abort cancels us: the step loop must stop spending on these sequences
            for seq in sequences:
                seq.done.set()
