"""Token usage out of a stream of vLLM's SSE events, whether or not the client asked to see it.

The front counts every request's tokens, so a stream always asks the engine for its usage chunk
(`stream_options.include_usage`); that chunk reaches the client only if the client asked for it.
Asking changes one more thing in vLLM's stream: the system fingerprint moves from each choice's
finish chunk to the usage chunk. For a client that did not ask, the tap puts it back, so the
stream is byte for byte what `vllm serve` would have sent. vLLM writes chunks compactly; its usage
chunk is the one without choices, and a finish chunk is one with a finish reason.
"""

from __future__ import annotations

import json
from typing import Any

FINISHED = '"finish_reason":"'  # a finish reason that is not null (content escapes its quotes)


class UsageTap:
    def __init__(self, body: dict[str, Any], stream: bool, fingerprint: str | None = None) -> None:
        options = dict(body.get("stream_options") or {})
        self.client_wants_it = bool(options.get("include_usage"))
        # usage in every chunk only if the client asked for it with include_usage, as in vLLM
        forced = dict(options, include_usage=True, continuous_usage_stats=bool(
            self.client_wants_it and options.get("continuous_usage_stats")))
        self.body = dict(body, stream_options=forced) if stream else body
        self.usage: dict[str, int] | None = None
        self.fingerprint = fingerprint  # known up front (vLLM's worker), or read from the usage
        self._held: list[str] = []

    def relay(self, chunk: str) -> list[str]:
        """One chunk's JSON in; the chunks to send the client now."""
        if self.usage is None and '"choices":[]' in chunk and '"usage":{' in chunk:
            parsed = json.loads(chunk)
            self.usage = counts(parsed.get("usage"))
            self.fingerprint = self.fingerprint or parsed.get("system_fingerprint")
            held = [self._signed(c) for c in self._held]
            self._held = []
            return held + ([chunk] if self.client_wants_it else [])
        if self.client_wants_it or FINISHED not in chunk:
            return [chunk]
        if self.fingerprint is None:  # until the usage chunk says it (the http engine)
            self._held.append(chunk)
            return []
        return [self._signed(chunk)]

    def rest(self) -> list[str]:
        """What is still held when the stream ends without a usage chunk."""
        held, self._held = self._held, []
        return held

    def _signed(self, chunk: str) -> str:
        if self.fingerprint is None or '"system_fingerprint"' in chunk:
            return chunk
        return chunk[:-1] + ',"system_fingerprint":' + json.dumps(self.fingerprint) + "}"


def counts(usage: Any) -> dict[str, int] | None:
    """The counts the front keeps, from an OpenAI usage map."""
    if not isinstance(usage, dict):
        return None
    return {"prompt_tokens": int(usage.get("prompt_tokens") or 0),
            "completion_tokens": int(usage.get("completion_tokens") or 0)}


def sse(chunks: list[str]) -> bytes:
    """Chunks' JSON as SSE events."""
    return "".join(f"data: {chunk}\n\n" for chunk in chunks).encode()
