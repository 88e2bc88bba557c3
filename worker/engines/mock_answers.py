"""What the mock says, apart from when it says it (the step loop in mock.py).

Deterministic throughout, so tests of the front and of clients can assert on it: the reply is the
old system's echo `[Batched mock response <batch>] Mock response to: <prompt>`, or JSON valid under
a requested schema, or a call of a requested tool with arguments valid under its parameters.
A token is a whitespace-led word; its id is a CRC of it; its log probability comes from that CRC,
with the filler words as the alternatives. Choices past the first differ at a temperature above 0
(drawn from the seed); the first is always the greedy reply.
"""

from __future__ import annotations

import base64
import hashlib
import json
import random
import re
import struct
import time
import zlib
from dataclasses import dataclass, field
from typing import Any

from common import protocol
from worker.engines import InvalidRequest
from worker.engines.openai_output import Logprob
from worker.engines.schema_sample import sample

TOKEN = re.compile(r"\s*\S+")
FILLER = (" and", " so", " the", " mock", " goes", " on")
EMBEDDING_DIMS = 64
KEEP = 4  # the reply's leading words, `[Batched mock response <batch>]`, never vary


def tokenize(text: str) -> list[str]:
    """Whitespace-led word pieces: joining them gives back the text (bar trailing spaces)."""
    return TOKEN.findall(text)


SHORT = 6  # bytes: a word this short is its own id, so any worker reads it back


def token_id(token: str) -> int:
    """A word's id: its UTF-8 bytes as a number when it has at most 6 (below 2**48, safe in
    JSON), else 2**48 plus a CRC of it."""
    data = token.encode()
    if len(data) <= SHORT:
        return int.from_bytes(data, "big")
    return (1 << 8 * SHORT) + zlib.crc32(data)


def render_chat(messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
    """A plain chat template: what the mock counts as prompt tokens for a chat request."""
    def content(message: dict[str, Any]) -> str:
        value = message.get("content") or ""
        if isinstance(value, list):
            value = "".join(part.get("text", "") for part in value)
        calls = message.get("tool_calls") or []
        return value + "".join(json.dumps(call.get("function")) for call in calls)
    text = "".join(f"<|{m['role']}|> {content(m)}\n" for m in messages)
    return text + ("<|assistant|>" if add_generation_prompt else "")


def reply_text(batch_id: str, prompt: str, response_format: dict[str, Any] | None) -> str:
    """The old system's echo, or JSON that satisfies the format asked for."""
    if response_format is None or response_format["type"] == "text":
        return f"[Batched mock response {batch_id}] Mock response to: {prompt}"
    if response_format["type"] == "json_object":
        return json.dumps({"response": f"Mock response to: {prompt}"})
    return json.dumps(sample((response_format.get("json_schema") or {}).get("schema")
                             or {"type": "object"}))


def logprob(token: str, top: int) -> Logprob:
    """The token's log probability, and the `top` best tokens (the token itself first)."""
    value = -0.01 - (token_id(token) % 1000) / 500
    others = [word for word in FILLER if word != token]
    return Logprob(value, [(token, value)] + [(word, value - 1 - k)
                                              for k, word in enumerate(others[:max(0, top - 1)])])


@dataclass
class ChoicePlan:
    """What one choice will say: its tokens, and the tool it calls (its tokens are then the
    call's arguments)."""

    index: int
    reply: list[str]
    tool: str = ""


@dataclass
class PromptPlan:
    """One prompt of a request, the tokens counted for it and its choices."""

    text: str  # what the reply echoes
    tokens: list[str]
    choices: list[ChoicePlan] = field(default_factory=list)
    echo: str = ""  # what the choices start with, not generated (completions' echo)
    end_reason: str = "stop"  # a call of a required or auto-chosen tool ends with "tool_calls"


def _tool_called(body: dict[str, Any], prompt: str) -> str:
    """The tool a chat calls: the named one, or for `required` (and for `auto`, when the prompt
    names one) the first tool the prompt names, else the first tool."""
    tools = [tool["function"]["name"] for tool in body.get("tools") or []]
    choice = body.get("tool_choice")
    if not tools or choice == "none":
        return ""
    if isinstance(choice, dict):
        return choice["function"]["name"]
    named = [name for name in tools if name in prompt]
    if choice == "required":
        return (named or tools)[0]
    return named[0] if named and choice in (None, "auto") else ""


def _arguments(body: dict[str, Any], name: str) -> str:
    for tool in body.get("tools") or []:
        if tool["function"]["name"] == name:
            return json.dumps(sample(tool["function"].get("parameters") or {"type": "object"}))
    raise InvalidRequest(f"tool_choice names {name!r}, which is not among the tools",
                         param="tool_choice")


def _vary(reply: list[str], temperature: float, seed: Any, index: int) -> list[str]:
    """Choice `index` of a sampled request: some words swapped for filler, drawn from the seed."""
    if index == 0 or temperature <= 0:
        return reply
    draw = random.Random(f"{seed}-{index}")
    share = min(0.5, temperature / 2)
    return [word if i < KEEP or draw.random() >= share else draw.choice(FILLER)
            for i, word in enumerate(reply)]


def plan(request: protocol.RequestItem) -> list[PromptPlan]:
    """The prompts of a chat or completions request and what each of their choices says."""
    body, batch_id = request.body, request.batch_id
    n = body.get("n") or 1
    if request.route == "chat":
        messages = body["messages"]
        users = [m.get("content") for m in messages if m["role"] == "user"]
        shown = users[-1] if users and isinstance(users[-1], str) else ""
        prompts = [(shown, render_chat(messages, body.get("add_generation_prompt", True)))]
    else:
        given = body["prompt"]
        texts = [given] if isinstance(given, str) else list(given)
        if any(not isinstance(text, str) for text in texts):
            raise InvalidRequest("the mock reads text prompts only", param="prompt")
        prompts = [(text, text) for text in texts]
    temperature = 1.0 if body.get("temperature") is None else body["temperature"]
    seed = body.get("seed", request.id)
    plans = []
    for number, (shown, counted) in enumerate(prompts):
        tool = _tool_called(body, shown) if request.route == "chat" else ""
        text = _arguments(body, tool) if tool else request.note + reply_text(
            batch_id, shown, body.get("response_format"))
        words = tokenize(text)
        prompt = PromptPlan(shown, tokenize(counted) or [""])
        if tool and not isinstance(body.get("tool_choice"), dict):  # vLLM: a named call "stop"s
            prompt.end_reason = "tool_calls"
        if body.get("echo"):
            prompt.echo = _echo(request.route, body, counted)
        for j in range(n):
            index = number * n + j
            prompt.choices.append(ChoicePlan(index, _vary(words, temperature, seed, index), tool))
        plans.append(prompt)
    return plans


def _echo(route: str, body: dict[str, Any], prompt: str) -> str:
    if route != "chat":
        return prompt
    last = body["messages"][-1]  # vLLM's chat echo: the last message, when it is the assistant's
    content = last.get("content")
    return content if last["role"] == "assistant" and isinstance(content, str) else ""


def echo_logprobs(text: str, top: int) -> list[tuple[str, Logprob | None]]:
    """Prompt tokens as completions' echo shows them: the first has no log probability."""
    words = tokenize(text)
    return [(word, None if i == 0 else logprob(word, top)) for i, word in enumerate(words)]


# --- tokenize, detokenize, embeddings -------------------------------------------------------------


class Vocabulary:
    """Token ids back to words: short words from the id itself, longer ones from what this worker
    has seen (another worker may not have seen them: a 400 that says so)."""

    LIMIT = 1 << 20

    def __init__(self) -> None:
        self.words: dict[int, str] = {}

    def ids(self, text: str) -> tuple[list[int], list[str]]:
        words = tokenize(text)
        ids = [token_id(word) for word in words]
        if len(self.words) < self.LIMIT:
            self.words.update((i, w) for i, w in zip(ids, words) if i >> 8 * SHORT)
        return ids, words

    def word(self, token: int) -> str:
        if 0 < token < 1 << 8 * SHORT:
            try:
                return token.to_bytes(SHORT, "big").lstrip(b"\0").decode()
            except UnicodeDecodeError:
                pass
        elif token in self.words:
            return self.words[token]
        raise InvalidRequest(f"token id {token} is not one the mock can read back (ids of words "
                             "over 6 bytes only on the worker that made them)", param="tokens")

    def text(self, ids: list[int]) -> str:
        return "".join(self.word(token) for token in ids)


def tokenize_body(body: dict[str, Any], vocabulary: Vocabulary, max_model_len: int) -> dict:
    if body.get("messages") is not None:
        text = render_chat(body["messages"], body.get("add_generation_prompt", True))
    else:
        text = body.get("prompt") or ""
    ids, words = vocabulary.ids(text)
    return {"count": len(ids), "max_model_len": max_model_len, "tokens": ids,
            "token_strs": words if body.get("return_token_strs") else None}


def embedding(text: str, dims: int) -> list[float]:
    """A stable hash embedding: the same text, the same unit vector, on every run and worker."""
    draw = random.Random(hashlib.sha256(text.encode()).digest())
    vector = [draw.gauss(0.0, 1.0) for _ in range(dims)]
    norm = sum(v * v for v in vector) ** 0.5 or 1.0
    return [v / norm for v in vector]


def embeddings_body(request: protocol.RequestItem, model: str) -> tuple[dict[str, Any], int]:
    """The `/v1/embeddings` answer in vLLM's shape, and the prompt tokens it counts."""
    body = request.body
    given = body["input"]
    texts = [given] if isinstance(given, str) else list(given)
    if any(not isinstance(text, str) for text in texts):
        raise InvalidRequest("the mock reads text inputs only", param="input")
    dims = body.get("dimensions") or EMBEDDING_DIMS
    data, tokens = [], 0
    for index, text in enumerate(texts):
        vector: list[float] | str = embedding(text, dims)
        tokens += len(tokenize(text))
        if body.get("encoding_format") == "base64":
            vector = base64.b64encode(struct.pack(f"<{dims}f", *vector)).decode()
        data.append({"index": index, "object": "embedding", "embedding": vector})
    return {"id": "embd-" + request.id.removeprefix("job-"), "object": "list",
            "created": int(time.time()), "model": model, "data": data,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0,
                      "prompt_tokens_details": None}}, tokens
