"""`python bench/kv_host.py --worker-id ID`: Cohort's engine host with a KV cache of exact size.

Scenario 13 gives every engine the same KV cache, a few thousand tokens, so that one engine cannot
hold every prefix of its load but two can. `vllm serve` takes that as `--kv-cache-memory-bytes`;
on CPU the only other ways are `VLLM_CPU_KVCACHE_SPACE` (whole GiB: some 23,000 tokens of this
model) and `--gpu-memory-utilization`, which on CPU is a share of the node's memory minus the
engine process's resident size, so it differs from process to process. Cohort's worker has no
setting for it, so this runs the engine host (`python -m worker.host`, without the supervisor's
restarts, which a bounded benchmark does not need) with `kv_cache_memory_bytes` added to the
engine arguments the worker builds, from `BENCH_KV_CACHE_MEMORY_BYTES`. Nothing else changes.
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from worker import host  # noqa: E402
from worker.engines.vllm import VllmEngine  # noqa: E402

_engine_args = VllmEngine.engine_args


def engine_args(self):
    """The worker's own engine arguments, with the benchmark's KV cache size."""
    args = _engine_args(self)
    args.kv_cache_memory_bytes = int(os.environ["BENCH_KV_CACHE_MEMORY_BYTES"])
    return args


VllmEngine.engine_args = engine_args

if __name__ == "__main__":  # vLLM's spawned processes re-import this module
    host.main()
