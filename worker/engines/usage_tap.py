"""Token usage out of a stream of vLLM's SSE events, whether or not the client asked to see it.

The front counts every request's tokens, so a stream always asks the engine for its usage chunk
(`stream_options.include_usage`); that chunk reaches the client only if the client asked for it.
vLLM writes chunks compactly, and its usage chunk is the one without choices.
"""

from __future__ import annotations

import json
from typing import Any


class UsageTap:
    def __init__(self, body: dict[str, Any], stream: bool) -> None:
        options = dict(body.get("stream_options") or {})
        self.client_wants_it = bool(options.get("include_usage"))
        self.body = dict(body, stream_options=dict(options, include_usage=True)) if stream else body
        self.usage: dict[str, int] | None = None

    def passes(self, event: str) -> bool:
        """Read one `data: ...` event; False when it is the usage chunk the client did not ask for."""
        if self.usage is None and '"choices":[]' in event and '"usage":{' in event:
            self.usage = counts(json.loads(event[6:]).get("usage"))
            return self.client_wants_it
        return True


def counts(usage: Any) -> dict[str, int] | None:
    """The counts the front keeps, from an OpenAI usage map."""
    if not isinstance(usage, dict):
        return None
    return {"prompt_tokens": int(usage.get("prompt_tokens") or 0),
            "completion_tokens": int(usage.get("completion_tokens") or 0)}
