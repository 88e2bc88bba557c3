"""A soak of the HTTP edge (issue 23): mixed traffic for a bounded time against a front with the
mock engine, on loopback, reporting the front's memory and descriptors over time, the p99 of a
well-behaved client beside the others, and the tracebacks in the front's log.

    python bench/soak.py --seconds 600
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import trio

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from harness.cluster import Cluster  # noqa: E402
from harness.soak import soak  # noqa: E402


async def main(args: argparse.Namespace) -> None:
    cluster = Cluster(Path(tempfile.mkdtemp()), MOCK_TOKEN_S="0.002", MOCK_TTFT_S="0",
                      COHORT_LOG_LEVEL="WARNING", **dict(kv.split("=", 1) for kv in args.env))
    cluster.start_front()
    cluster.start_worker("worker1")
    try:
        cluster.api_key = cluster.add_user("soak")
        await cluster.wait_ready(1)
        report = await soak(cluster, args.seconds, sample_every_s=args.sample_every_s)
    finally:
        cluster.stop()
    print("| t (s) | front RSS (MB) | descriptors |\n| --- | --- | --- |")
    step = max(1, len(report.samples) // 12)
    for sample in report.samples[::step] + report.samples[-1:]:
        print(f"| {sample.at_s:g} | {sample.rss_mb:g} | {sample.descriptors} |")
    print(json.dumps(report.summary(), indent=1))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=600.0)
    parser.add_argument("--sample-every-s", type=float, default=10.0)
    parser.add_argument("--env", nargs="*", default=[], metavar="NAME=VALUE",
                        help="settings for the front and worker (e.g. COHORT_USAGE_LEDGER=0)")
    trio.run(main, parser.parse_args())
