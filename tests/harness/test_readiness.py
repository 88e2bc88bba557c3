"""What a readiness wait takes for a load that will not succeed, read from /health alone."""

import signal

from harness.readiness import doomed, exit_cause, honcho_lines, serving, tail


def health(*workers) -> dict:
    return {"workers": [{"id": id_, "state": state, "error": error}
                        for id_, state, error in workers]}


def test_a_failed_load_is_doomed_with_its_error():
    found = doomed(health(("worker1", "failed", "model load failed: ValueError: too long"),
                          ("worker2", "loading", "")), set())
    assert found == {"worker1": "its load failed: model load failed: ValueError: too long"}


def test_a_host_that_died_before_its_worker_served_is_doomed_and_a_sigkill_named():
    bye = "said bye: engine host exited with status -9; restart 1 in 1 s"
    found = doomed(health(("worker1", "restarting", bye)), set())
    assert "died while loading" in found["worker1"] and bye in found["worker1"]
    assert "OOM killer" in found["worker1"]
    crash = doomed(health(("worker1", "restarting", "said bye: engine host exited with status 3")),
                   set())
    assert "OOM" not in crash["worker1"]


def test_a_restart_after_the_worker_served_is_waited_for():
    seen = serving(health(("worker1", "ready", ""), ("worker2", "busy", "")))
    assert seen == {"worker1", "worker2"}
    assert doomed(health(("worker1", "restarting", "said bye: engine host exited"),
                         ("worker2", "loading", "")), seen) == {}


def test_silence_while_loading_is_not_doomed():
    """A host starved of CPU while loading goes silent (`dead`), and says hello again."""
    assert doomed(health(("worker1", "dead", "silent for over 10 s")), set()) == {}
    assert doomed(None, set()) == {}


def test_exit_causes_in_words():
    assert exit_cause(2) == "exited with status 2"
    assert exit_cause(-signal.SIGTERM) == "was killed by SIGTERM"
    assert exit_cause(-signal.SIGKILL).startswith("was killed by SIGKILL (") \
        and "OOM killer" in exit_cause(-signal.SIGKILL)


def test_a_tail_is_the_last_lines_and_honcho_lines_are_one_process_s():
    assert tail("\n".join(str(i) for i in range(100)), 3) == "97\n98\n99"
    log = ("12:00:00 system    | worker1.1 started (pid=7)\n"
           "12:00:01 front.1   | front up\n"
           "12:00:02 worker1.1 | loading\n"
           "12:00:03 worker10.1 | other\n"
           "12:00:04 worker1.1 | model load failed\n")
    assert honcho_lines(log, "worker1") == ("12:00:02 worker1.1 | loading\n"
                                            "12:00:04 worker1.1 | model load failed")
