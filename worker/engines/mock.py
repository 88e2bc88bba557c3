"""The mock engine: development and tests without a GPU, scheduling as vLLM's engine does.

One step loop serves every running sequence. Each step has a budget of `max_num_batched_tokens`:
every sequence that decodes takes one token of it, and what is left goes to prefill in chunks,
oldest request first, so a long prompt never stalls the running sequences for more than one
budget's worth (vLLM's chunked prefill). A request is admitted while fewer than `max_num_seqs`
sequences run and its KV need fits the KV budget; until then it waits in the engine, ordered as
vLLM's `priority` scheduling policy orders it (lower `priority` first, then arrival; the front sets
it for fair shares and tiers, and a vLLM worker runs that policy). A prefix cache
of 16-token blocks lets a prompt that starts like an earlier one skip that part of its prefill.

Its cache reports what it stores and evicts, block by block, as vLLM's KV events do, and links
each prefilled prompt to the fronts' fingerprints (worker.residency), so placement by what an
engine holds runs on the mock as it does on vLLM.

A step is one forward pass: it costs `mock_token_s * (1 + mock_batch_growth * (sequences - 1))`
for the sequences in it (decoding, or prefilling a chunk), plus `mock_prefill_token_s` per prompt
token prefilled and `mock_ttft_s` once when it prefills.
Replies keep the shape users of the old system know, `[Batched mock response <batch id>] Mock
response to: <prompt>`; with `MOCK_REPLY_LENGTH=max_tokens` (or a request's `ignore_eos`) they run
on to exactly `max_tokens` tokens. A token is a whitespace-led word. All costs 0 is the zero-cost mock.
"""

from __future__ import annotations

import collections
import heapq
import itertools
import os
import random
from dataclasses import dataclass, field

import trio

from common import protocol
from common.prefix import chained_hashes
from worker.residency import Residency
from worker.engines import Emit, Engine, EngineError, InvalidRequest
from worker.engines.mock_answers import (FILLER, PromptPlan, Vocabulary, echo_logprobs,
                                         embeddings_body, logprob, plan, tokenize_body)
from worker.engines.openai_output import Reply, json_bytes

BLOCK_TOKENS = 16  # vLLM's default KV block size: the prefix cache's unit


class PrefixCache:
    """Blocks of prompts prefilled before, least recently used dropped first; each block stored
    or evicted is told to `residency`, as vLLM's engine publishes its KV events."""

    def __init__(self, max_tokens: int, residency: Residency) -> None:
        self.max_blocks = max_tokens // BLOCK_TOKENS
        self.residency = residency
        self._blocks: collections.OrderedDict[int, None] = collections.OrderedDict()
        self.queries = 0
        self.hits = 0

    def match(self, blocks: tuple[int, ...], prompt_tokens: int) -> int:
        """Prompt tokens served from the cache (never the last one: it must be computed)."""
        found = 0
        for block in blocks:
            if block not in self._blocks:
                break
            found += 1
        self._touch(blocks[:found])
        cached = min(found * BLOCK_TOKENS, prompt_tokens - 1)
        self.queries += prompt_tokens
        self.hits += cached
        return cached

    def remember(self, blocks: tuple[int, ...], tokens: list[str]) -> None:
        parent = None
        for index, block in enumerate(blocks):
            if block not in self._blocks:
                self.residency.stored([block], parent, tokens[index * BLOCK_TOKENS:
                                                              (index + 1) * BLOCK_TOKENS],
                                      BLOCK_TOKENS)
                self._blocks[block] = None
            parent = block
        self._touch(blocks)
        while len(self._blocks) > self.max_blocks:
            self.residency.removed([self._blocks.popitem(last=False)[0]])

    def _touch(self, blocks: tuple[int, ...]) -> None:
        """Used now: last first, so a prompt's tail is evicted before its head, as vLLM frees a
        request's blocks in reverse and evicts the least recently freed."""
        for block in reversed(blocks):
            self._blocks.move_to_end(block)

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0


@dataclass
class Choice:
    """One sequence: a choice of a request, and what it will say."""

    index: int
    reply: list[str]
    position: int = 0
    text: str = ""
    done: bool = False


@dataclass
class MockRequest:
    """A request as the step loop sees it: waiting, prefilling, then decoding its choices."""

    id: str
    fill: bool
    max_tokens: int
    stop: list[str]
    output: Reply
    tokens: list[str]
    blocks: tuple[int, ...]
    choices: list[Choice]
    min_tokens: int = 0
    include_stop: bool = False  # include_stop_str_in_output
    end_reason: str = "stop"  # a call of a required tool ends with "tool_calls", as in vLLM
    prefill_left: int = 0
    last_chunk: int = 0
    kv_tokens: int = 0  # reserved while running
    finished: trio.Event = field(default_factory=trio.Event)
    fingerprinted: protocol.RequestItem | None = None  # the front's prefix is this prompt's

    @property
    def prompt_tokens(self) -> int:
        return len(self.tokens)

    @property
    def live(self) -> list[Choice]:
        return [choice for choice in self.choices if not choice.done]


class MockEngine(Engine):
    """A faithful stand-in for vLLM where scheduling is concerned; fault injection beside."""

    name = "mock"
    routes = frozenset({"chat", "completions", "embeddings", "tokenize", "detokenize"})
    # Its words are the most likely tokens, so top_k, min_p and repetition_penalty change nothing
    # it says; it has no special tokens to skip or space. Its ids are hashes of words, not a
    # vocabulary, so logit_bias, stop_token_ids, token-id prompts and the like it cannot honour.
    features = frozenset({
        "logprobs", "top_logprobs", "response_format", "tools", "tool_choice",
        "parallel_tool_calls", "echo", "min_tokens", "top_k", "min_p", "repetition_penalty",
        "skip_special_tokens", "spaces_between_special_tokens", "include_stop_str_in_output",
        "add_generation_prompt", "return_token_strs", "dimensions"})

    def __init__(self, settings) -> None:
        super().__init__(settings)
        self.model = settings.served_model_name or settings.model or "cohort-mock"
        self.device = "cpu (mock)"
        self.max_num_batched_tokens = settings.max_num_batched_tokens or 2048
        self.cache = PrefixCache(settings.mock_prefix_cache_tokens, Residency())
        # COHORT_KV_EVENTS=0: the cache keeps count for itself, and the fronts estimate, as
        # they do for a vLLM worker without KV events
        self.residency = self.cache.residency if settings.kv_events else None
        # (priority, arrival, request): vLLM's priority queue, a heap
        self._waiting: list[tuple[int, int, MockRequest]] = []
        self._arrivals = itertools.count()
        self._running: list[MockRequest] = []
        self._kv_reserved = 0
        self._wake = trio.Event()
        self._batch_lock = trio.Lock()
        self._requests_seen = 0
        self._random = random.Random(0)
        self.vocabulary = Vocabulary()

    async def load(self) -> None:
        await trio.sleep(self.settings.mock_load_s)

    async def admit(self, batch_size: int) -> None:
        if self.settings.mock_batch_cost_s:
            async with self._batch_lock:  # batches pay their fixed cost one after another
                await trio.sleep(self.settings.mock_batch_cost_s)

    # --- what the worker reports ---------------------------------------------------------------

    def unfinished(self) -> int:
        return sum(len(r.live) for r in self._running) + sum(len(r.live) for *_, r in self._waiting)

    def stats(self) -> protocol.EngineLoad:
        kv_used = sum(r.prompt_tokens - r.prefill_left + sum(c.position for c in r.choices)
                      for r in self._running)
        return protocol.EngineLoad(
            running=sum(len(r.live) for r in self._running),
            waiting=sum(len(r.live) for *_, r in self._waiting),
            kv_usage=min(1.0, kv_used / self.settings.mock_kv_tokens),
            prefix_hit_rate=self.cache.hit_rate, max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=self.max_num_batched_tokens,
            prefixes_held=self.residency.held() if self.residency is not None else 0)

    # --- the step loop --------------------------------------------------------------------------

    async def run(self) -> None:
        """The step loop; the worker runs it in its nursery."""
        s = self.settings
        while True:
            self._drop_finished()
            if not self._running and not self._waiting:
                await self._wake.wait()
                self._wake = trio.Event()
                continue
            decoding = [r for r in self._running if not r.prefill_left]
            active = sum(len(r.live) for r in decoding)
            prefilled, chunks = self._prefill(self.max_num_batched_tokens - active)
            sequences = active + chunks
            cost = prefilled * s.mock_prefill_token_s + (s.mock_ttft_s if prefilled else 0.0)
            if sequences:  # a forward pass costs at least one decode step, as on a GPU
                cost += s.mock_token_s * (1 + s.mock_batch_growth * (sequences - 1))
            await trio.sleep(cost)
            # a request whose prefill ended this step samples its first token now, as vLLM does
            stepped = {id(r) for r in decoding}
            for request in decoding + [r for r in self._running if id(r) not in stepped]:
                if not request.prefill_left and not request.finished.is_set():
                    for choice in request.live:
                        self._step(request, choice)
                    request.output.flush()
                    if not request.live:
                        request.finished.set()

    def _prefill(self, budget: int) -> tuple[int, int]:
        """Spend what the decodes left of the step's token budget on prompts, admitting waiting
        requests while sequences and KV allow. Returns (tokens prefilled, requests prefilled)."""
        prefilled = chunks = 0
        for request in self._running:
            if budget <= 0:
                return prefilled, chunks
            if request.prefill_left:
                budget -= self._prefill_chunk(request, budget)
                prefilled, chunks = prefilled + request.last_chunk, chunks + 1
        running = sum(len(r.live) for r in self._running)
        while self._waiting and budget > 0:
            request = self._waiting[0][2]
            if request.finished.is_set():
                heapq.heappop(self._waiting)
                continue
            if (running + len(request.choices) > self.max_num_seqs
                    or self._kv_reserved + request.kv_tokens > self.settings.mock_kv_tokens):
                break  # it waits in the engine, as vLLM's scheduler would keep it
            heapq.heappop(self._waiting)
            self._running.append(request)
            running += len(request.choices)
            self._kv_reserved += request.kv_tokens
            request.prefill_left = request.prompt_tokens - self.cache.match(request.blocks,
                                                                            request.prompt_tokens)
            budget -= self._prefill_chunk(request, budget)
            prefilled, chunks = prefilled + request.last_chunk, chunks + 1
        return prefilled, chunks

    def _prefill_chunk(self, request: MockRequest, budget: int) -> int:
        """Prefill as much of the request's prompt as the budget allows; its blocks are cached
        once the whole prompt is in."""
        request.last_chunk = min(request.prefill_left, budget)
        request.prefill_left -= request.last_chunk
        if not request.prefill_left:
            self.cache.remember(request.blocks, request.tokens)
            linked = request.fingerprinted
            if linked is not None and self.residency is not None:
                self.residency.link(linked.id, linked.prefix, linked.prompt_chars, request.tokens)
        return request.last_chunk

    def _drop_finished(self) -> None:
        for request in [r for r in self._running if r.finished.is_set()]:
            self._running.remove(request)
            self._kv_reserved -= request.kv_tokens

    def _step(self, request: MockRequest, choice: Choice) -> None:
        if choice.position < len(choice.reply):
            token = choice.reply[choice.position]
        elif request.fill or choice.position < request.min_tokens:
            token = FILLER[choice.position % len(FILLER)]
        else:
            token = ""
        choice.position += 1
        finish = stop_reason = None
        candidate = choice.text + token
        for stop in request.stop:
            cut = candidate.find(stop)
            if cut != -1:
                kept = cut + len(stop) if request.include_stop else cut
                token, finish, stop_reason = candidate[:kept][len(choice.text):], "stop", stop
                break
        if (finish is None and not request.fill and choice.position >= len(choice.reply)
                and choice.position >= request.min_tokens):
            finish = request.end_reason
        if finish is None and choice.position >= request.max_tokens:
            finish = "length"
        choice.text += token
        output = request.output
        output.add(choice.index, token, finish,
                   logprob(token, output.top_logprobs) if output.top_logprobs is not None else None,
                   stop_reason)
        choice.done = finish is not None

    # --- requests --------------------------------------------------------------------------------

    async def generate(self, request: protocol.RequestItem, emit: Emit) -> None:
        s = self.settings
        self._requests_seen += 1
        if s.mock_crash_after and self._requests_seen >= s.mock_crash_after:
            os._exit(3)  # fault injection: die like a crashed GPU process, mid-batch
        if s.mock_error_rate and self._random.random() < s.mock_error_rate:
            raise EngineError("injected failure (MOCK_ERROR_RATE)")
        route, body = request.route, request.body
        if route == "tokenize":
            answer = tokenize_body(body, self.vocabulary, s.max_model_len)
            emit(protocol.out_item(request.id, json_bytes(answer), done=True))
        elif route == "detokenize":
            answer = {"prompt": self.vocabulary.text(body["tokens"])}
            emit(protocol.out_item(request.id, json_bytes(answer), done=True))
        elif route == "embeddings":
            answer, tokens = embeddings_body(request, self.model)
            await trio.sleep(tokens * s.mock_prefill_token_s)  # one prefill, no decoding
            emit(protocol.out_item(request.id, json_bytes(answer), done=True,
                                   usage={"prompt_tokens": tokens, "completion_tokens": 0}))
        else:
            await self._generate(request, emit)

    def _max_tokens(self, request: protocol.RequestItem) -> int:
        body, s = request.body, self.settings
        if request.route == "chat":
            asked = body.get("max_completion_tokens") or body.get("max_tokens")
        else:
            asked = body.get("max_tokens", 16)  # vLLM's completions default
        return min(asked or s.mock_max_tokens, s.max_model_len)

    def _admit(self, request: protocol.RequestItem, prompt: PromptPlan, output: Reply) -> MockRequest:
        s, body = self.settings, request.body
        stop = body.get("stop") or []
        max_tokens = self._max_tokens(request)
        choices = [Choice(c.index, c.reply) for c in prompt.choices]
        mock_request = MockRequest(
            request.id, s.mock_reply_length == "max_tokens" or bool(body.get("ignore_eos")),
            max_tokens, [stop] if isinstance(stop, str) else stop, output, prompt.tokens,
            chained_hashes(prompt.tokens, BLOCK_TOKENS), choices, body.get("min_tokens") or 0,
            bool(body.get("include_stop_str_in_output")), prompt.end_reason)
        mock_request.kv_tokens = len(prompt.tokens) + len(choices) * max_tokens
        if len(choices) > self.max_num_seqs:
            raise InvalidRequest(f"n={len(choices)} is more than the {self.max_num_seqs} sequences "
                                 "this engine runs at once (COHORT_MAX_NUM_SEQS)", param="n")
        if mock_request.kv_tokens > s.mock_kv_tokens:
            raise InvalidRequest(f"the prompt ({len(prompt.tokens)} tokens) and {len(choices)} x "
                                 f"max_tokens ({max_tokens}) do not fit the KV cache of "
                                 f"{s.mock_kv_tokens} tokens (MOCK_KV_TOKENS)", param="max_tokens")
        return mock_request

    async def _generate(self, request: protocol.RequestItem, emit: Emit) -> None:
        """Chat and completions: every prompt of the request runs as its own engine request,
        their choices numbered prompt by prompt, as vLLM does."""
        plans = plan(request)
        output = Reply(request, emit, sum(len(p.choices) for p in plans))
        requests = [self._admit(request, prompt, output) for prompt in plans]
        if request.prefix:  # the front fingerprints a request of one prompt only
            requests[0].fingerprinted = request
        for prompt in plans:
            output.prompt_tokens += len(prompt.tokens)
            for choice in prompt.choices:
                if prompt.echo:
                    output.prefix(choice.index, prompt.echo, echo_logprobs(
                        prompt.echo, output.top_logprobs) if output.top_logprobs is not None else [])
                if choice.tool:
                    output.call_tool(choice.index, choice.tool)
        output.flush()  # a streamed chat's role chunks go at once, as vLLM's do
        priority = request.priority
        for mock_request in requests:
            heapq.heappush(self._waiting, (priority, next(self._arrivals), mock_request))
        self._wake.set()
        try:
            for mock_request in requests:
                await mock_request.finished.wait()
        finally:  # an abort cancels us: the step loop must stop spending on these requests
            for mock_request in requests:
                mock_request.finished.set()
                for running in mock_request.choices:
                    running.done = True

