"""Chat sessions whose history grows turn by turn, measured on streamed /v1/chat/completions.

vLLM 0.32's `vllm bench serve` has no multi-turn workload (its datasets are single requests, and
the CLI has no `multi-turn` subcommand), so this is the smallest client that measures one: each
session is a user who sends a first message, waits for the whole answer, appends it to the
history and sends the next message with the whole conversation so far, `turns` times. A session
holds one of `concurrency` slots for all its turns, as a user would. The messages are random
tokens of the model's own vocabulary (as vLLM's random datasets are), decoded to text, from a
seed: the same seed gives the same sessions to every system. Answers are greedy, `ignore_eos`,
`output_len` tokens each. TTFT is the time to the first streamed chunk carrying content, as vLLM's
client measures it; tokens/s is the completion tokens over the load's wall time.
"""

from __future__ import annotations

import json
import time

import httpx
import numpy as np
import trio

FIRST_TOKEN_ID = 1000  # below: special tokens and bytes, which would change the template's shape


def sessions(tokenizer, seed: int, count: int, turns: int, first_len: int,
             turn_len: int) -> list[list[str]]:
    """Each session's user messages: a first one of `first_len` tokens, then `turn_len` each."""
    rng = np.random.default_rng(seed)

    def text(length: int) -> str:
        return tokenizer.decode(rng.integers(FIRST_TOKEN_ID, tokenizer.vocab_size, length).tolist())

    return [[text(first_len if turn == 0 else turn_len) for turn in range(turns)]
            for _ in range(count)]


async def _turn(http: httpx.AsyncClient, body: dict) -> dict:
    """One streamed chat request: its TTFT, answer text and usage, or its error."""
    began = time.perf_counter()
    ttft, parts, usage = None, [], {}
    async with http.stream("POST", "/v1/chat/completions", json=body) as reply:
        if reply.status_code != 200:
            return {"error": f"HTTP {reply.status_code}: {(await reply.aread())[:300]!r}"}
        async for line in reply.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            usage = chunk.get("usage") or usage
            for choice in chunk.get("choices", []):
                content = choice.get("delta", {}).get("content")
                if content:
                    if ttft is None:
                        ttft = time.perf_counter() - began
                    parts.append(content)
    return {"ttft_s": ttft, "text": "".join(parts), "usage": usage,
            "latency_s": time.perf_counter() - began}


async def run_sessions(url: str, model: str, conversations: list[list[str]], *, concurrency: int,
                       output_len: int, timeout_s: float) -> dict:
    """All sessions, `concurrency` at a time; the load's figures in vLLM's client's units."""
    turns: list[dict] = []
    limiter = trio.CapacityLimiter(concurrency)

    async def session(messages: list[str], http: httpx.AsyncClient) -> None:
        history: list[dict] = []
        async with limiter:
            for message in messages:
                history.append({"role": "user", "content": message})
                body = {"model": model, "messages": history, "max_tokens": output_len,
                        "temperature": 0, "ignore_eos": True, "stream": True,
                        "stream_options": {"include_usage": True}}
                try:
                    turn = await _turn(http, body)
                except (httpx.HTTPError, ValueError) as error:
                    turn = {"error": f"{type(error).__name__}: {error}"}
                turns.append(turn)
                if "error" in turn:
                    return  # the rest of this conversation would not be the same one
                history.append({"role": "assistant", "content": turn["text"]})

    began = time.perf_counter()
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    with trio.fail_after(timeout_s):
        async with httpx.AsyncClient(base_url=url, timeout=timeout_s, limits=limits) as http:
            async with trio.open_nursery() as nursery:
                for messages in conversations:
                    nursery.start_soon(session, messages, http)
    duration = time.perf_counter() - began
    done = [t for t in turns if "error" not in t and t["ttft_s"] is not None]
    ttfts = [1000 * t["ttft_s"] for t in done]
    output = sum(t["usage"].get("completion_tokens", 0) for t in done)
    errors = [t["error"] for t in turns if "error" in t]
    requests = sum(len(c) for c in conversations)

    def pct(q: float) -> float | None:
        return round(float(np.percentile(ttfts, q)), 2) if ttfts else None

    return {"ttft_p50_ms": pct(50), "ttft_p99_ms": pct(99), "itl_p50_ms": None,
            "e2el_p50_ms": round(1000 * float(np.median([t["latency_s"] for t in done])), 1)
            if done else None,
            "tokens_per_s": round(output / duration, 2), "duration_s": round(duration, 2),
            "completed": len(done), "failed": requests - len(done),  # turns not sent count too
            "output_tokens": output,
            "expected_tokens": output_len * requests,
            "input_tokens": sum(t["usage"].get("prompt_tokens", 0) for t in done),
            "output_lens": sorted({t["usage"].get("completion_tokens", 0) for t in done}),
            "first_error": errors[0][-300:] if errors else ""}
