"""Every ```python and ```bash block in README.md and docs/ runs as written, in order, page by page,
against `honcho start` on the mock engine (the README's first command), so no example can rot.

A block sees what a reader who followed the README has: the Procfile's deployment, its data
directory beside them (`data/`, where the CLI finds the store), the virtualenv at `.venv`, and
only `COHORT_KEY` in the environment. The one liberty taken: `localhost:8001` becomes the port
this test's deployment got. A block that cannot run here (a long-running server, several
machines) says why in a `<!-- not run: ... -->` comment on the line before it; one that fails,
or a `curl` that prints an error in OpenAI's shape, fails its page, naming the block's line.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from harness.cluster import ROOT, Cluster

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SKIP = re.compile(r"<!-- not run: (?P<why>.*\S.*) -->")
ERROR_SHAPE = re.compile(r'"error":\s*\{')


@dataclass(frozen=True)
class Block:
    page: Path
    line: int
    language: str
    code: str
    not_run: str  # why, for a block the test cannot run; "" for one it runs

    def __str__(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line} ({self.language})"


def blocks(page: Path) -> list[Block]:
    """The page's fenced ```python and ```bash blocks, each with the reason it is not run."""
    found, lines = [], page.read_text().splitlines()
    index = 0
    while index < len(lines):
        fence = re.fullmatch(r"```(\w*)", lines[index])
        if not fence:
            index += 1
            continue
        end = lines.index("```", index + 1)
        before = next((line for line in reversed(lines[:index]) if line.strip()), "")
        skip = SKIP.fullmatch(before.strip())
        if fence.group(1) in ("python", "bash"):
            found.append(Block(page, index + 1, fence.group(1), "\n".join(lines[index + 1:end]),
                               skip.group("why") if skip else ""))
        index = end + 1
    return found


def test_the_pages_have_blocks_that_run_and_every_skipped_one_says_why():
    every = [block for page in PAGES for block in blocks(page)]
    assert sum(not block.not_run for block in every) >= 25
    readme = [block for block in blocks(ROOT / "README.md") if not block.not_run]
    assert any("from openai import OpenAI" in block.code for block in readme)


def test_links_from_the_readme_reach_pages_that_exist():
    readme = (ROOT / "README.md").read_text()
    targets = re.findall(r"\]\((docs/[^)#]+)(?:#[^)]*)?\)", readme)
    assert targets, "the README links into docs/"
    assert [t for t in targets if not (ROOT / t).exists()] == []


def test_the_site_builds_with_no_broken_link_anchor_or_page(tmp_path):
    """`mkdocs build --strict` (not `--quiet`: it hides the warnings that strict mode counts)."""
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir",
                           str(tmp_path / "site")], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert done.returncode == 0, done.stderr[-5000:]
    assert (tmp_path / "site" / "settings" / "index.html").exists()
    listed = (ROOT / "mkdocs.yml").read_text()
    assert [p.name for p in ROOT.joinpath("docs").glob("*.md") if f": {p.name}" not in listed] == []


def run(block: Block, workdir: Path, env: dict[str, str], port: int) -> str:
    """Run one block as a reader would; the reason it failed, or ""."""
    code = block.code.replace("localhost:8001", f"localhost:{port}")
    if block.language == "python":
        command = [sys.executable, "-c", code]
    else:
        command = ["bash", "-euo", "pipefail", "-c", code]
    try:
        done = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True,
                              timeout=120)
    except subprocess.TimeoutExpired:
        return f"{block} ran for more than 120 s"
    if done.returncode != 0:
        return f"{block} exited {done.returncode}:\n{done.stdout[-1500:]}\n{done.stderr[-3000:]}"
    if block.language == "bash" and ERROR_SHAPE.search(done.stdout):
        return f"{block} printed an error:\n{done.stdout[-1500:]}"
    return ""


WITH_EXAMPLES = [page for page in PAGES if any(not block.not_run for block in blocks(page))]


@pytest.mark.parametrize("page", WITH_EXAMPLES, ids=[p.name for p in WITH_EXAMPLES])
def test_every_block_of_the_page_runs_as_written(page, tmp_path):
    runnable = [block for block in blocks(page) if not block.not_run]
    cluster = Cluster(tmp_path)
    cluster.start_honcho()
    try:
        trio.run(cluster.wait_ready, 2)
        (tmp_path / ".venv").symlink_to(sys.prefix)
        env = {name: value for name, value in os.environ.items()
               if not name.startswith(("COHORT_", "MOCK_", "VLLM_", "DATABASE_URL"))}
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        env["COHORT_KEY"] = cluster.api_key
        failures = [why for block in runnable
                    if (why := run(block, tmp_path, env, cluster.port))]
    finally:
        cluster.stop()
    assert failures == [], "\n\n".join(failures)
