"""One request's answer in `vllm serve`'s shapes, built from per-choice tokens as an engine makes them.

The one routine that turns deltas into OpenAI responses and stream chunks, for the engines that do
not run vLLM's own serving layer (the mock, the http engine's mock fallback). Key sets and their
order are vLLM 0.32's, so a client, a test or a parser written against the mock reads `vllm serve`
the same way: a streamed chat opens each choice with a role chunk, each token is a chunk, tool
calls stream as a header delta then argument deltas, the last chunk before `[DONE]` carries the
system fingerprint, and usage comes as a chunk without choices when the client asked for it.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from common import protocol
from worker.engines import Emit
from worker.engines.usage_tap import counts

FINGERPRINT = "cohort-mock"


@dataclass
class Logprob:
    """One token's log probability and its best alternatives (the token itself among them)."""

    logprob: float
    top: list[tuple[str, float]] = field(default_factory=list)


@dataclass
class ChoiceOut:
    index: int
    text: str = ""
    tokens: int = 0
    finish: str | None = None
    stop_reason: str | None = None  # the stop string that ended it
    tool_name: str = ""  # set: the choice is a call of this tool, its tokens are the arguments
    tool_id: str = ""
    logprobs: list[tuple[str, Logprob | None]] = field(default_factory=list)
    offset: int = 0  # characters before this chunk's text (completions' text_offset)


def json_bytes(body: dict[str, Any]) -> bytes:
    """JSON as vLLM writes it: compact, non-ASCII as it is."""
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()


def _event(body: dict[str, Any]) -> bytes:
    return b"data: " + json_bytes(body) + b"\n\n"


class Reply:
    """The answer to one chat or completions request, from per-choice tokens: SSE events as they
    come (`flush` sends what is ready as one out item), or the whole body once every choice ends."""

    def __init__(self, request: protocol.RequestItem, emit: Emit, choices: int) -> None:
        body = request.body
        self.request_id = request.id
        self.chat = request.route == "chat"
        self.stream = request.stream
        self.emit = emit
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + request.id.removeprefix("job-")
        self.model = body["model"]
        self.created = int(time.time())
        self.include_usage = bool(self.stream and (body.get("stream_options") or {}).get(
            "include_usage"))
        if self.chat:
            self.top_logprobs = (body.get("top_logprobs") or 0) if body.get("logprobs") else None
        else:
            self.top_logprobs = body.get("logprobs")
        self.choices = [ChoiceOut(index) for index in range(choices)]
        self.prompt_tokens = 0
        self._events: list[bytes] = []
        if self.chat and self.stream:  # vLLM opens every choice with the role, before any token
            for choice in self.choices:
                self._events.append(_event(self._chunk([{
                    "index": choice.index, "delta": {"role": "assistant", "content": ""},
                    "logprobs": None, "finish_reason": None}], prompt_token_ids=None,
                    prompt_text=None)))

    @property
    def wants_logprobs(self) -> bool:
        return self.top_logprobs is not None

    @property
    def done(self) -> bool:
        return all(choice.finish is not None for choice in self.choices)

    def call_tool(self, index: int, name: str) -> None:
        """Choice `index` calls tool `name`: its tokens from now on are the call's arguments."""
        choice = self.choices[index]
        choice.tool_name, choice.tool_id = name, f"chatcmpl-tool-{self.id[-16:]}{index}"

    def prefix(self, index: int, text: str, logprobs: list[tuple[str, Logprob | None]]) -> None:
        """Text the choice starts with that the engine did not generate (completions' echo)."""
        choice = self.choices[index]
        choice.text += text
        choice.logprobs.extend(logprobs)
        if self.stream:
            self._events.append(self._token_event(choice, text, logprobs, None))

    def add(self, index: int, token: str, finish: str | None, logprob: Logprob | None = None,
            stop_reason: str | None = None) -> None:
        """The next token of choice `index` (`finish` set: its last; `stop_reason`: the stop
        string that ended it)."""
        choice = self.choices[index]
        start = len(choice.text)
        choice.text += token
        choice.tokens += 1
        choice.finish, choice.stop_reason = finish, stop_reason
        entries = [(token, logprob)] if self.wants_logprobs else []
        choice.logprobs.extend(entries)
        if self.stream:
            if choice.tool_name and choice.tokens == 1:
                self._events.append(self._event_of(choice, {"content": None, "tool_calls": [{
                    "id": choice.tool_id, "type": "function", "index": 0,
                    "function": {"name": choice.tool_name}}]}, None, None))
            choice.offset = start
            if choice.tool_name and finish is not None and token:  # vLLM ends a call apart
                self._events.append(self._token_event(choice, token, entries, None))
                self._events.append(self._event_of(choice, {}, None, finish))
            else:
                self._events.append(self._token_event(choice, token, entries, finish))

    def flush(self) -> None:
        """Send what is ready: the stream's events, or the whole body at the end."""
        if self.stream:
            done = self.done
            if done and self.include_usage:
                self._events.append(_event(self._chunk([], usage=self._usage(False),
                                                       system_fingerprint=FINGERPRINT)))
            if self._events:
                self.emit(protocol.out_item(self.request_id, b"".join(self._events)))
                self._events = []
            if done:
                self.emit(protocol.out_item(self.request_id, b"", done=True,
                                            usage=counts(self._usage(False))))
        elif self.done:
            self.emit(protocol.out_item(self.request_id, json_bytes(self.body()), done=True,
                                        usage=counts(self._usage(False))))

    # --- shapes --------------------------------------------------------------------------------

    def _chunk(self, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": choices, **extra}

    def _usage(self, details: bool) -> dict[str, Any]:
        completion = sum(choice.tokens for choice in self.choices)
        usage: dict[str, Any] = {"prompt_tokens": self.prompt_tokens,
                                 "total_tokens": self.prompt_tokens + completion,
                                 "completion_tokens": completion}
        if details:
            usage.update(prompt_tokens_details=None, completion_tokens_details=None)
        return usage

    def _logprobs(self, choice: ChoiceOut, entries: list[tuple[str, Logprob | None]]) -> Any:
        if not self.wants_logprobs:
            return None
        if self.chat:
            return {"content": [
                {"token": token, "logprob": lp.logprob, "bytes": list(token.encode()),
                 "top_logprobs": [{"token": t, "logprob": v, "bytes": list(t.encode())}
                                  for t, v in lp.top]}
                for token, lp in entries if lp is not None]}
        offsets, offset = [], choice.offset
        for token, _ in entries:
            offsets.append(offset)
            offset += len(token)
        return {"text_offset": offsets,
                "token_logprobs": [lp.logprob if lp else None for _, lp in entries],
                "tokens": [token for token, _ in entries],
                "top_logprobs": [dict(lp.top) if lp else None for _, lp in entries]}

    def _event_of(self, choice: ChoiceOut, delta: dict[str, Any], logprobs: Any,
                  finish: str | None) -> bytes:
        entry: dict[str, Any] = {"index": choice.index, "delta": delta, "logprobs": logprobs,
                                 "finish_reason": finish}
        if finish is not None:
            entry["stop_reason"] = choice.stop_reason
        entry["token_ids"] = None
        last = finish is not None and not self.include_usage
        return _event(self._chunk([entry], **({"system_fingerprint": FINGERPRINT} if last else {})))

    def _token_event(self, choice: ChoiceOut, token: str, entries: list, finish: str | None
                     ) -> bytes:
        logprobs = self._logprobs(choice, entries)
        if not self.chat:
            last = finish is not None and not self.include_usage
            return _event(self._chunk([{
                "index": choice.index, "text": token, "logprobs": logprobs,
                "finish_reason": finish, "stop_reason": None, "prompt_token_ids": None,
                "token_ids": None}], **({"system_fingerprint": FINGERPRINT} if last else {})))
        delta: dict[str, Any]
        if choice.tool_name:
            delta = {} if finish is not None and not token else {"content": None, "tool_calls": [
                {"index": 0, "function": {"arguments": token}}]}
        else:
            delta = {"content": token}
        return self._event_of(choice, delta, logprobs, finish)

    def body(self) -> dict[str, Any]:
        """The whole response, as vLLM's `model_dump()` of it."""
        choices = []
        for choice in self.choices:
            choice.offset = 0
            logprobs = self._logprobs(choice, choice.logprobs)
            if not self.chat:
                choices.append({"index": choice.index, "text": choice.text, "logprobs": logprobs,
                                "finish_reason": choice.finish, "stop_reason": choice.stop_reason,
                                "token_ids": None, "prompt_logprobs": None,
                                "prompt_token_ids": None, "routed_experts": None})
                continue
            message: dict[str, Any] = {"role": "assistant", "content": choice.text, "refusal": None,
                                       "annotations": None, "audio": None, "function_call": None}
            if choice.tool_name:
                message["content"] = ""
                message["tool_calls"] = [{"id": choice.tool_id, "type": "function", "function": {
                    "name": choice.tool_name, "arguments": choice.text}}]
            message["reasoning"] = None
            choices.append({"index": choice.index, "message": message, "logprobs": logprobs,
                            "finish_reason": choice.finish, "stop_reason": choice.stop_reason,
                            "token_ids": None, "routed_experts": None})
        body: dict[str, Any] = {
            "id": self.id, "object": "chat.completion" if self.chat else "text_completion",
            "created": self.created, "model": self.model, "choices": choices,
            "service_tier": None, "system_fingerprint": FINGERPRINT, "usage": self._usage(True)}
        if self.chat:
            body.update(prompt_logprobs=None, prompt_token_ids=None, prompt_text=None)
        body.update(kv_transfer_params=None, ec_transfer_params=None, metrics=None)
        return body
