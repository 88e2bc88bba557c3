"""Each engine's share of a load and its prefix-cache hit rate over it, for scenario 13.

vLLM's /metrics gives counters per engine (`vllm:prefix_cache_hits_total`, `..._queries_total`,
`vllm:request_success_total`, labelled by engine), so a load's figures are their deltas. Cohort's
/health gives, per worker, the requests it finished (`jobs_done`, as that front counts them) and
its engine's hit rate since the engine started (hits over queries, both summed; not a rolling
rate). The load's own hits are then worked out from the two rates, with each worker's queries
(prompt tokens) estimated as its requests times the load's mean prompt length: exact when every
prompt has one length (prefix_repetition), an estimate for growing chats.
"""

from __future__ import annotations

import re

import httpx


async def engine_counters(url: str) -> dict[str, dict[str, float]]:
    """vLLM's /metrics counters per engine label: prefix-cache hits, queries, finished requests."""
    async with httpx.AsyncClient(timeout=10) as http:
        text = (await http.get(url + "/metrics")).text
    found: dict[str, dict[str, float]] = {}
    for name, key in (("prefix_cache_hits", "hits"), ("prefix_cache_queries", "queries"),
                      ("request_success", "requests")):
        for labels, value in re.findall(rf"^vllm:{name}_total{{(.*?)}} (\S+)$", text, re.M):
            engine = re.search(r'engine="(\d+)"', labels)
            counters = found.setdefault(engine.group(1) if engine else "0", {})
            counters[key] = counters.get(key, 0.0) + float(value)
    return found


class CohortHits:
    """Each Cohort engine's prefix-cache queries and hits, as /health lets one estimate them."""

    def __init__(self) -> None:
        self.queries: dict[str, float] = {}

    def over_load(self, before: dict, after: dict, mean_prompt: float) -> dict[str, dict]:
        """Per worker: requests, estimated queries and hits, from two /health snapshots."""
        result = {}
        start = {w["id"]: w for w in before.get("workers", [])}
        for worker in after.get("workers", []):
            was = start.get(worker["id"], {"jobs_done": 0, "prefix_hit_rate": 0.0})
            jobs = worker["jobs_done"] - was["jobs_done"]
            old = self.queries.get(worker["id"], 0.0)
            new = self.queries[worker["id"]] = old + jobs * mean_prompt
            hits = worker["prefix_hit_rate"] * new - was["prefix_hit_rate"] * old
            result[worker["id"]] = {"requests": jobs, "queries": jobs * mean_prompt, "hits": hits}
        return result


def per_engine(before: dict, after: dict) -> dict[str, dict]:
    """vLLM counters' deltas over a load, per engine label."""
    return {engine: {key: value - before.get(engine, {}).get(key, 0.0)
                     for key, value in counters.items()} for engine, counters in after.items()}


def engine_line(engines: dict[str, dict]) -> dict:
    """Per engine (A, B): its share of the requests and its prefix-cache hit rate."""
    total = sum(e["requests"] for e in engines.values()) or 1
    line = {}
    for label, (_, counts) in zip("AB", sorted(engines.items())):
        line[f"share_{label}"] = round(counts["requests"] / total, 3)
        line[f"hit_{label}"] = round(counts["hits"] / counts["queries"], 3) if counts["queries"] else None
    return line
