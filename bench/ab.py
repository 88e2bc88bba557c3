"""A/B of two trees of Cohort on one path: an API key with limits (never biting) and the usage
ledger, the zero-cost mock behind, both fronts up at once and loaded in alternating rounds, so a
slow moment of the machine hits both. Prints the median ratio (this tree over the other) and
its range, one request at a time and at concurrency 64.

    git worktree add /tmp/before <commit> && python bench/ab.py --before /tmp/before
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import harness.cluster as cluster_module  # noqa: E402
from harness.cluster import Cluster  # noqa: E402
from harness.load import run_load  # noqa: E402

ZERO_COST = {"MOCK_TTFT_S": "0", "MOCK_PREFILL_TOKEN_S": "0", "MOCK_TOKEN_S": "0",
             "MOCK_BATCH_GROWTH": "0", "COHORT_LOG_LEVEL": "WARNING"}
NEVER_BITING = ("--rpm", "1000000000", "--tpm", "1000000000000", "--concurrency", "100000",
                "--tokens-per-day", "1000000000000")


def in_tree(root: Path, step: Callable[[], Any]) -> Any:
    """Run a cluster step (a process start, the users CLI) from another tree's checkout."""
    kept, cluster_module.ROOT = cluster_module.ROOT, root
    try:
        return step()
    finally:
        cluster_module.ROOT = kept


async def started(root: Path, folder: Path) -> Cluster:
    folder.mkdir()
    cluster = Cluster(folder, **ZERO_COST)
    in_tree(root, cluster.start_front)
    in_tree(root, lambda: cluster.start_worker("worker1"))
    cluster.api_key = in_tree(root, lambda: cluster.add_user("bench"))
    in_tree(root, lambda: cluster.users("limit", "bench", *NEVER_BITING))
    await cluster.wait_ready(1)
    return cluster


async def main(args: argparse.Namespace) -> None:
    tmp = Path(tempfile.mkdtemp())
    trees = {"before": await started(Path(args.before).resolve(), tmp / "before"),
             "after": await started(ROOT, tmp / "after")}
    prompt = "word " * 32
    try:
        for concurrency, total in ((1, args.requests // 4), (64, args.requests)):
            rps: dict[str, list[float]] = {name: [] for name in trees}
            for round_ in range(args.rounds):
                for name in (list(trees) if round_ % 2 == 0 else list(trees)[::-1]):
                    target = trees[name]
                    result = await run_load(
                        target.url + "/v1/completions",
                        lambda i: {"model": "cohort-mock", "max_tokens": 16,
                                   "prompt": f"{i} {prompt}"},
                        total=total, concurrency=concurrency, headers=target.headers())
                    if result.errors:
                        raise SystemExit(f"{name}: {result.errors} errors")
                    rps[name].append(result.steady_rps)
            ratios = sorted(a / b for a, b in zip(rps["after"], rps["before"]))
            print(f"c={concurrency}: this tree / --before {statistics.median(ratios):.3f} "
                  f"(rounds {ratios[0]:.3f}-{ratios[-1]:.3f}); requests/s "
                  f"{statistics.median(rps['before']):.0f} -> {statistics.median(rps['after']):.0f}",
                  flush=True)
    finally:
        for target in trees.values():
            target.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", required=True, help="a checkout of the tree to compare with")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--requests", type=int, default=2000, help="per load at concurrency 64")
    trio.run(main, parser.parse_args())
