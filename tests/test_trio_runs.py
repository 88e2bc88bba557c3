"""A test that pytest-timeout interrupts inside `trio.run` does not break the tests after it: a
child pytest with a 1 s timeout runs one test that sleeps in trio.run past it, then one that
needs trio.run, with and without the net of tests/trio_runs.py."""

import subprocess
import sys

from harness.cluster import ROOT

INTERRUPTED = """
import trio

async def sleep_and_note(path):
    try:
        await trio.sleep(60)  # pytest-timeout's SIGALRM lands in trio's wait for I/O
    finally:
        with open(path, "w") as note:  # a finally block of the interrupted run
            note.write("ran")

def test_interrupted_inside_trio_run(tmp_path_factory):
    trio.run(sleep_and_note, str(tmp_path_factory.getbasetemp() / "finally"))

def test_the_next_test_runs_trio(tmp_path_factory):
    async def double(x):
        await trio.sleep(0)
        return 2 * x
    assert trio.run(double, 21) == 42
    assert (tmp_path_factory.getbasetemp() / "finally").read_text() == "ran"
"""


def child_pytest(tmp_path, *plugins: str) -> str:
    (tmp_path / "test_interrupted.py").write_text(INTERRUPTED)
    (tmp_path / "pytest.ini").write_text("[pytest]\n")  # not the project's settings
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--timeout", "1",
         "--timeout-method", "signal", "-c", str(tmp_path / "pytest.ini"), "--rootdir",
         str(tmp_path), "--basetemp", str(tmp_path / "base"), *plugins, "test_interrupted.py"],
        cwd=tmp_path, env={"PYTHONPATH": str(ROOT), "PATH": ""}, capture_output=True, text=True,
        timeout=120)
    return done.stdout + done.stderr


def test_without_the_net_the_next_trio_run_fails(tmp_path):
    """The failure the net exists for, reproduced: so the test below can fail."""
    out = child_pytest(tmp_path)
    assert "Timeout" in out and "2 failed" in out, out
    assert "RuntimeError: Attempted to call run() from inside a run()" in out, out


def test_with_the_net_the_next_test_passes_and_the_left_run_was_finished(tmp_path):
    out = child_pytest(tmp_path, "-p", "tests.trio_runs")
    assert "1 failed, 1 passed" in out, out  # the interrupted one, then the next one
    assert "Timeout" in out and "from inside a run()" not in out, out
