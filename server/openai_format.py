"""Turn a job's out items into OpenAI responses: whole completions, or SSE chunks as they come."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from server.jobs import JobSpec


@dataclass
class Choice:
    text: str = ""
    tokens: int = 0
    finish: str | None = None


@dataclass
class Collector:
    """Accumulates a job's outputs per choice, and the usage counts the worker reported."""

    n: int
    choices: list[Choice] = field(default_factory=list)
    prompt_tokens: int = 0

    def __post_init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.choices = [Choice() for _ in range(self.n)]
        self.prompt_tokens = 0

    def add(self, item: dict[str, Any]) -> None:
        choice = self.choices[item["index"]] if 0 <= item["index"] < self.n else None
        if choice is None:
            return
        choice.text += item["text"]
        choice.tokens += item["tokens"]
        if item.get("finish") is not None:
            choice.finish = item["finish"]
        self.prompt_tokens = max(self.prompt_tokens, item.get("prompt_tokens") or 0)

    @property
    def done(self) -> bool:
        return all(choice.finish is not None for choice in self.choices)

    def usage(self) -> dict[str, int]:
        completion = sum(choice.tokens for choice in self.choices)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
                "total_tokens": self.prompt_tokens + completion}


def response_id(spec: JobSpec, job_id: str) -> str:
    return ("chatcmpl-" if spec.kind == "chat" else "cmpl-") + job_id.removeprefix("job-")


def completion_body(spec: JobSpec, job_id: str, collected: Collector) -> dict[str, Any]:
    """The non-streaming response body."""
    if spec.kind == "chat":
        choices = [{"index": i, "message": {"role": "assistant", "content": c.text},
                    "logprobs": None, "finish_reason": c.finish}
                   for i, c in enumerate(collected.choices)]
        obj = "chat.completion"
    else:
        choices = [{"index": i, "text": c.text, "logprobs": None, "finish_reason": c.finish}
                   for i, c in enumerate(collected.choices)]
        obj = "text_completion"
    return {"id": response_id(spec, job_id), "object": obj, "created": int(time.time()),
            "model": spec.model, "choices": choices, "usage": collected.usage(),
            "system_fingerprint": None}


class ChunkWriter:
    """Formats SSE events in OpenAI's chunk format; several ready deltas become one event."""

    def __init__(self, spec: JobSpec, job_id: str) -> None:
        self.spec = spec
        self.include_usage = bool(spec.params.get("include_usage"))
        self._base = {"id": response_id(spec, job_id),
                      "object": "chat.completion.chunk" if spec.kind == "chat" else "text_completion",
                      "created": int(time.time()), "model": spec.model,
                      "system_fingerprint": None}
        self._started: set[int] = set()

    def _event(self, choices: list[dict[str, Any]], usage: dict | None = None) -> bytes:
        body = dict(self._base, choices=choices)
        if self.include_usage:
            body["usage"] = usage
        return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"

    def deltas(self, items: list[dict[str, Any]]) -> bytes:
        """One event for every item ready now, merged per choice."""
        merged: dict[int, dict[str, Any]] = {}
        for item in items:
            entry = merged.setdefault(item["index"], {"text": "", "finish": None})
            entry["text"] += item["text"]
            entry["finish"] = item.get("finish") or entry["finish"]
        choices = []
        for index, entry in sorted(merged.items()):
            if self.spec.kind == "chat":
                delta: dict[str, Any] = {}
                if index not in self._started:
                    delta["role"] = "assistant"
                    self._started.add(index)
                if entry["text"] or not entry["finish"]:
                    delta["content"] = entry["text"]
                choices.append({"index": index, "delta": delta, "logprobs": None,
                                "finish_reason": entry["finish"]})
            else:
                choices.append({"index": index, "text": entry["text"], "logprobs": None,
                                "finish_reason": entry["finish"]})
        return self._event(choices)

    def usage(self, collected: Collector) -> bytes:
        """The last chunk when stream_options.include_usage is set: no choices, the usage."""
        return self._event([], collected.usage())

    @staticmethod
    def error(body: dict[str, Any]) -> bytes:
        return b"data: " + json.dumps(body).encode() + b"\n\n"

    DONE = b"data: [DONE]\n\n"
