"""A deadline for an async test inside its own trio run, under pytest's `timeout` (300 s in
setup.cfg): a test that overruns it fails with an AssertionError naming the deadline, and its run
ends as trio ends runs, rather than pytest-timeout's signal landing inside `trio.run` (which
leaves the run behind: tests/trio_runs.py). Not for tests on a mock clock (it jumps)."""

from __future__ import annotations

import functools

import trio


def deadline(seconds: float):
    """Decorate an async test: fail it after `seconds` of real time."""
    def bound(test):
        @functools.wraps(test)  # pytest reads the fixtures the test asks for through it
        async def bounded(*args, **kwargs):
            try:
                with trio.fail_after(seconds):
                    return await test(*args, **kwargs)
            except trio.TooSlowError as error:
                raise AssertionError(f"{test.__name__} overran its {seconds:g} s deadline "
                                     "(tests/e2e/deadline.py)") from error
        return bounded
    return bound
