"""The worker lifecycle without sockets: messages and ticks in, actions out. A worker silent
past `worker_timeout_s` is dead, but not because the front itself stopped running for a while;
what becomes of a worker's jobs when it dies or fails them; registration and its refusals."""

from common import protocol
from common.config import ServerSettings
from server.errors import BadRequest, NoWorkers, SlowReader, WorkerDied
from server.jobs import Job, JobSpec, Restart
from server.metrics import Metrics
from server.scheduling.placement import Placement
from server.workers.lifecycle import FailQueued, Requeue, WorkerLifecycle
from server.workers.registry import WorkerHandle, WorkerRegistry

PERIOD = 0.5


def lifecycle(*workers: str, timeout_s: float = 2.0) -> WorkerLifecycle:
    registry = WorkerRegistry(Placement(max_unacked_batches=4), Metrics())
    cycle = WorkerLifecycle(ServerSettings(worker_timeout_s=timeout_s), Metrics(), registry,
                            "front-1")
    for name in workers:
        registry.workers[name.encode()] = WorkerHandle(name.encode(), name, "mock", "m", 8,
                                                       "cpu", 1, "ready", 0.0)
    return cycle


def running(cycle: WorkerLifecycle, worker: str, *, stream: bool = False,
            got_output: bool = False) -> Job:
    job = Job(JobSpec("m", "completions", {"prompt": "x"}, stream=stream), 0.0, 60.0)
    job.state, job.worker_id, job.got_output = "running", worker, got_output
    cycle.workers[worker.encode()].jobs[job.id] = job
    return job


def outputs(job: Job) -> list:
    seen = []
    while True:
        try:
            seen.append(job.outputs.receive_nowait())
        except Exception:
            return seen


def test_a_worker_silent_past_the_timeout_is_dead():
    cycle = lifecycle("w1")
    worker = cycle.workers[b"w1"]
    for now in (0.5, 1.0, 1.5, 2.0):
        assert not cycle.tick(now, PERIOD).changed
    assert worker.state == "ready"
    actions = cycle.tick(2.5, PERIOD)
    assert worker.state == "dead" and "silent" in worker.error and actions.changed
    assert actions.returned == [FailQueued("m", actions.returned[0].error)]
    assert isinstance(actions.returned[0].error, NoWorkers)


def test_a_front_that_stalled_reads_its_heartbeats_before_it_judges():
    cycle = lifecycle("w1")
    worker = cycle.workers[b"w1"]
    cycle.tick(0.5, PERIOD)
    cycle.tick(5.5, PERIOD)  # the front did not run for 5 s (blocked, or no CPU)
    assert worker.state == "ready"  # the heartbeats of that time are still unread
    worker.last_seen = 5.5  # the receive loop reads them
    cycle.tick(6.0, PERIOD)
    assert worker.state == "ready"
    worker.last_seen = -10  # now really silent: judged at the next round
    cycle.tick(6.5, PERIOD)
    assert worker.state == "dead"


def test_a_front_late_every_round_still_finds_a_dead_worker():
    cycle = lifecycle("w1")
    cycle.tick(0.5, PERIOD)
    cycle.tick(5.5, PERIOD)
    assert cycle.workers[b"w1"].state == "ready"  # one late round waits for the socket
    cycle.tick(10.5, PERIOD)
    assert cycle.workers[b"w1"].state == "dead"  # the next, late as well, judges


def test_a_dead_workers_jobs_run_elsewhere_unless_they_streamed_and_the_rest_fail():
    cycle = lifecycle("w1", "w2")
    fresh = running(cycle, "w1")
    streamed = running(cycle, "w1", stream=True, got_output=True)
    actions = cycle.take(b"w1", protocol.Bye("stopping"), 1.0)
    assert cycle.workers[b"w1"].state == "dead" and actions.changed
    assert actions.returned == [Requeue([fresh])]  # w2 is ready: no model lost its workers
    assert isinstance(outputs(fresh)[-1], Restart)
    assert isinstance(outputs(streamed)[-1], WorkerDied)


def test_a_hello_registers_and_is_welcomed_and_a_stranger_is_asked_to_say_hello():
    cycle = lifecycle()
    hello = protocol.Hello("w9", "mock", "m", 4, "cpu", "ready", pid=7)
    assert cycle.may_register(b"w9", hello, "", 0.0)
    actions = cycle.take(b"w9", hello, 0.0)
    assert actions.send == [(b"w9", protocol.Welcome("front-1", 2.0))] and actions.changed
    assert cycle.workers[b"w9"].load.max_num_seqs == 4
    assert not cycle.may_register(b"other", hello, "", 0.0)  # not its connection's id
    stranger = cycle.take(b"w5", protocol.Heartbeat(), 0.0)
    assert stranger.send == [(b"w5", protocol.HelloAgain())]


def test_outputs_reach_their_job_and_an_invalid_request_fails_alone():
    cycle = lifecycle("w1")
    done, refused = running(cycle, "w1"), running(cycle, "w1")
    cycle.take(b"w1", protocol.Out([protocol.out_item(done.id, b"{}", done=True)]), 1.0)
    assert outputs(done)[-1].done and done.id not in cycle.workers[b"w1"].jobs
    actions = cycle.take(b"w1", protocol.Error("bad body", [refused.id], "invalid"), 1.0)
    assert isinstance(outputs(refused)[-1], BadRequest) and actions.returned == []
    assert cycle.workers[b"w1"].breaker.failures == 0  # the client's fault, not the engine's


def test_an_unreadable_answer_ends_the_jobs_it_names_at_once():
    cycle = lifecycle("w1")
    job = running(cycle, "w1")
    data = protocol.Out([protocol.out_item(job.id, b"{}", done=True)]).encode()
    actions = cycle.unreadable(b"w1", data, protocol.ProtocolError("too large"), 1.0)
    [error] = outputs(job)
    assert error.status == 502 and "could not read" in error.message
    assert actions.returned == [] and cycle.workers[b"w1"].breaker.failures == 0


def test_a_worker_whose_engine_keeps_failing_is_paused_and_its_model_fails_what_waits():
    cycle = lifecycle("w1")
    returned = []
    for _ in range(5):
        job = running(cycle, "w1")
        returned += cycle.take(b"w1", protocol.Error("engine broke", [job.id]), 1.0).returned
    assert cycle.workers[b"w1"].state == "failing"
    assert [type(r) for r in returned] == [FailQueued]
    assert cycle.tick(2.5, PERIOD).changed  # its first pause (1 s) is over: tried again
    assert cycle.workers[b"w1"].state == "ready"


def test_a_stream_whose_client_does_not_read_is_stopped_past_its_buffer():
    cycle = lifecycle("w1")
    cycle.settings = ServerSettings(worker_timeout_s=2.0, stream_buffer_bytes=1000)
    job = running(cycle, "w1", stream=True)
    event = b"data: " + b"x" * 394 + b"\n\n"  # 402 bytes
    for _ in range(2):
        assert cycle.take(b"w1", protocol.Out([protocol.out_item(job.id, event)]), 1.0).send == []
    actions = cycle.take(b"w1", protocol.Out([protocol.out_item(job.id, event)]), 1.0)
    assert actions.send == [(b"w1", protocol.Abort([job.id]))]  # the engine's work is freed
    seen = outputs(job)
    assert [len(item.data) for item in seen[:3]] == [402] * 3  # what was buffered stays
    assert isinstance(seen[3], SlowReader) and "COHORT_STREAM_BUFFER_BYTES" in seen[3].message
    assert job.id not in cycle.workers[b"w1"].jobs
    assert cycle.take(b"w1", protocol.Out([protocol.out_item(job.id, event)]), 1.1).send == []
