"""Trio runs a test leaves behind, finished so the next test's `trio.run` works.

pytest-timeout (the `signal` method) raises from its SIGALRM handler wherever the main thread is.
Most often that is trio's wait for I/O, which `trio.run` does between two steps of its run loop,
outside the loop's own try/finally: the exception leaves `trio.run` with the loop suspended and
its runner still in trio's GLOBAL_RUN_CONTEXT, and every later `trio.run` in the session raises
"Attempted to call run() from inside a run()". The waits of the tests have deadlines of their own
under pytest's timeout; this is the net under them. A left run is finished as trio would have
finished it: its tasks cancelled and stepped to their end (their finally blocks run inside their
run, shutting down what they started), then its loop's own finally closes the runner.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Generator
from types import GeneratorType
from typing import Any

import pytest
import sniffio
from trio._core import _run

FINISH_S = 10.0  # for the left run's tasks to end once cancelled (a thread may hold one)


def leaked_runner() -> _run.Runner | None:
    """The runner of a trio run this thread is inside of; outside any test, one left behind."""
    return getattr(_run.GLOBAL_RUN_CONTEXT, "runner", None)


def finish_leaked_run() -> str:
    """Finish the run left behind, if any; what was done, in words ("" when nothing was left)."""
    runner = leaked_runner()
    if runner is None:
        return ""
    loop = _run_loop(runner)
    if loop is None:  # collected: nothing can step its tasks any more; free what it holds
        runner.close()
        _run.GLOBAL_RUN_CONTEXT.__dict__.clear()
        return "a trio run was left behind without its run loop: its runner was closed"
    previous, sniffio.thread_local.name = sniffio.thread_local.name, "trio"
    try:
        if runner.system_nursery is not None:  # the main task's nursery is inside it
            runner.system_nursery.cancel_scope.cancel()
        deadline = time.monotonic() + FINISH_S
        events = runner.io_manager.get_events(0)
        while time.monotonic() < deadline:
            timeout = loop.send(events)
            events = runner.io_manager.get_events(
                max(0.0, min(timeout, deadline - time.monotonic())))  # never a negative: no end
        outcome = f"its tasks did not end within {FINISH_S:g} s; its run loop was closed"
        try:
            loop.close()  # the loop exits where its tasks are (trio calls that an internal error)
        except BaseException:
            pass
    except StopIteration:
        outcome = "its tasks were cancelled and ran to their end"
    except BaseException as error:  # the run's own end failed: it is over all the same
        outcome = f"finishing it failed ({error!r})"
    finally:
        sniffio.thread_local.name = previous
        _run.GLOBAL_RUN_CONTEXT.__dict__.clear()  # done by the loop's finally; sure now
    return f"a trio run was left behind (interrupted inside trio.run): {outcome}"


def _run_loop(runner: _run.Runner) -> Generator[float, Any, None] | None:
    """The suspended run loop (trio's `unrolled_run` generator) driving `runner`."""
    for thing in gc.get_objects():
        if isinstance(thing, GeneratorType) and thing.gi_code.co_name == "unrolled_run" \
                and thing.gi_frame is not None and thing.gi_frame.f_locals.get("runner") is runner:
            return thing
    return None


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """After each phase of a test: a run it left behind is finished before the next phase runs,
    and its report says so."""
    report = yield
    done = finish_leaked_run()
    if done:
        report.sections.append(("trio", done))
    return report
