"""Who gets a request: placement by load, then by prefix, and the batching loop driven by it,
without sockets, in virtual time."""

import subprocess
import sys

import trio

from common.protocol import EngineLoad
from server.jobs import Job, JobSpec
from server.scheduler import Scheduler
from server.scheduling.policy import SchedulingPolicy
from server.scheduling.placement import KV_FULL, Placement, WorkerLoad
from server.openai_schema import Message, chat_prompt_text
from server.scheduling.prefix import BLOCK_CHARS, PrefixHolders, prefix_blocks

SYSTEM = "You are a careful assistant. " * 40  # about 1,100 characters: four blocks


def job(prompt: str = "hi", n: int = 1) -> Job:
    made = Job(JobSpec("m", "completions", {"prompt": prompt, "n": n}, seqs=n, prompt_text=prompt),
               0.0, 60.0)
    made.prefix = prefix_blocks(prompt)
    return made


def seed(policy: Placement, key: str, placed: Job) -> None:
    """`placed` went to worker `key` (the only one there was): it will hold its prefix."""
    assert policy.assign([placed], {key: WorkerLoad()})[0] == {key: [placed]}


def placement(**kw) -> Placement:
    return Placement(**{"max_unacked_batches": 4, **kw})


def loads(**figures: dict) -> dict[str, WorkerLoad]:
    return {name: WorkerLoad(**values) for name, values in figures.items()}


def test_the_least_queued_worker_wins_then_kv_use_then_running():
    workers = loads(a=dict(running=10, waiting=2), b=dict(running=50), c=dict(running=5, kv_usage=0.5))
    plan, left = placement().assign([job()], workers)
    assert plan == {"b": plan["b"]} and not left  # b and c queue nothing; b's KV is emptier
    workers["b"].kv_usage = 0.9
    assert list(placement().assign([job()], workers)[0]) == ["c"]


def test_a_batch_spreads_by_room_and_what_fits_nowhere_is_left():
    workers = loads(a=dict(max_num_seqs=2), b=dict(max_num_seqs=2, running=1))
    jobs = [job() for _ in range(5)]
    plan, left = placement().assign(jobs, workers)
    assert {key: len(value) for key, value in plan.items()} == {"a": 2, "b": 1}
    assert left == jobs[3:]


def test_a_job_an_engine_failed_waits_for_another_worker_rather_than_go_back():
    workers = loads(broken=dict(), sound=dict(max_num_seqs=1, running=1))
    failed = job()
    failed.failed_on.add("broken")
    plan, left = placement().assign([failed, job()], workers)
    assert plan == {"broken": [plan["broken"][0]]} and left == [failed]  # broken is emptier
    workers["sound"].running = 0
    assert placement().assign([failed], workers)[0] == {"sound": [failed]}
    alone = {"broken": workers["broken"]}  # no other worker: it may try there again
    assert placement().assign([failed], alone)[0] == {"broken": [failed]}


def test_choices_count_as_sequences():
    workers = loads(a=dict(max_num_seqs=4))
    plan, left = placement().assign([job(n=3), job(n=3)], workers)
    assert len(plan["a"]) == 1 and len(left) == 1


def test_no_room_when_kv_is_full_or_the_worker_is_behind_on_acks():
    policy = placement(max_unacked_batches=2)
    assert policy.room(WorkerLoad(kv_usage=KV_FULL)) == 0
    behind = WorkerLoad()
    behind.sent_batch([job()])
    behind.sent_batch([job()])
    assert behind.unacked == 2 and policy.room(behind) == 0
    behind.report(EngineLoad(running=2, received=1))  # the first batch reached the engine
    assert behind.unacked == 1 and behind.outstanding == 3 and policy.room(behind) == 253


def test_force_queues_on_the_least_loaded_engine_but_never_on_one_that_stopped_reading():
    workers = loads(full=dict(max_num_seqs=1, running=1, waiting=3), fuller=dict(max_num_seqs=1, running=1, waiting=9))
    plan, left = placement().assign([job()], workers)
    assert not plan and len(left) == 1
    plan, left = placement().assign([job()], workers, force=True)
    assert list(plan) == ["full"] and not left
    for _ in range(4):
        workers["full"].sent_batch([job()])
    assert list(placement().assign([job()], workers, force=True)[0]) == ["fuller"]


def test_a_shared_prefix_goes_back_to_the_worker_that_has_it():
    workers = loads(a=dict(running=3), b=dict(running=0))
    policy = placement()
    seed(policy, "a", job(SYSTEM + "first question"))
    workers["a"].report(EngineLoad(running=3, received=1))
    plan, _ = policy.assign([job(SYSTEM + "another question")], workers)
    # a: 38 uncached tokens + 3 sequences x 64 = 230; b: all 294 tokens of the prompt
    assert list(plan) == ["a"]
    workers["a"].report(EngineLoad(running=4, received=1))  # a tie (294): the less loaded
    assert list(policy.assign([job(SYSTEM + "another question")], workers)[0]) == ["b"]
    no_affinity = placement(prefix_affinity=False)
    assert list(no_affinity.assign([job(SYSTEM + "x")], workers)[0]) == ["b"]
    assert list(policy.assign([job("short, no prefix to speak of")], workers)[0]) == ["b"]


def test_a_hot_prefix_spreads_once_its_holder_has_more_sequences_than_the_prefill_saves():
    workers = loads(a=dict(running=5), b=dict(running=0))
    policy = placement()
    seed(policy, "a", job(SYSTEM))
    plan, _ = policy.assign([job(SYSTEM + "q")], workers)
    assert list(plan) == ["b"]  # a: 34 + 5 x 64 = 354; b: 290
    patient = placement(seq_tokens=32)  # a sequence is worth less: a keeps it (34 + 160)
    seed(patient, "a", job(SYSTEM))
    assert list(patient.assign([job(SYSTEM + "q")], workers)[0]) == ["a"]
    workers["b"].sent_batch(plan["b"])
    workers["a"].running = workers["b"].running = 0
    # a worker whose engine reports nothing is estimated: the prefix moved to b, computed last
    assert list(policy.assign([job(SYSTEM + "r")], workers)[0]) == ["b"]


def test_the_longest_held_prefix_wins_and_engines_that_report_hold_one_prefix_together():
    workers = loads(a=dict(reports_prefixes=True), b=dict(reports_prefixes=True, running=1))
    policy = placement()
    long_prompt = job(SYSTEM + "q")
    policy.reported("a", held=long_prompt.prefix[:2], dropped=[])
    policy.reported("b", held=long_prompt.prefix, dropped=[])
    assert list(policy.assign([long_prompt], workers)[0]) == ["b"]  # 4 blocks beat 2
    assert long_prompt.prefix_held == 4  # what b held when chosen (its trace says so)
    seed(policy, "a", long_prompt)  # reported engines keep what they hold
    assert policy.holders.longest(long_prompt.prefix, "b") == 4
    workers["b"].running = 2
    assert list(policy.assign([job(SYSTEM + "r")], workers)[0]) == ["a"]  # both: the idler


def test_an_eviction_the_engine_reports_ends_the_affinity():
    workers = loads(a=dict(reports_prefixes=True), b=dict(reports_prefixes=True))
    policy = placement()
    first = job(SYSTEM + "q")
    seed(policy, "a", first)
    workers["a"].running = 2
    assert list(policy.assign([job(SYSTEM + "r")], workers)[0]) == ["a"]
    policy.reported("a", held=[], dropped=first.prefix[2:])  # its engine evicted the tail
    assert policy.holders.longest(first.prefix, "a") == 2
    policy.reported("a", held=[], dropped=first.prefix[:2])
    assert list(policy.assign([job(SYSTEM + "r")], workers)[0]) == ["b"]
    policy.reported("b", held=first.prefix, dropped=[])
    policy.forget("b")  # b died: nothing of its cache counts
    assert policy.holders.longest(first.prefix, "b") == 0


def test_a_waiting_queue_counts_against_affinity_like_any_load():
    def placed_with(waiting: int) -> list[str]:
        workers = loads(a=dict(waiting=waiting), b=dict())
        policy = placement(seq_tokens=100)
        seed(policy, "a", job(SYSTEM))
        return list(policy.assign([job(SYSTEM + "q")], workers)[0])

    assert placed_with(2) == ["a"]  # 34 + 200 < 290
    assert placed_with(3) == ["b"]  # 34 + 300 > 290


def test_affinity_within_one_batch_cannot_pile_everything_on_one_worker():
    workers = loads(a=dict(), b=dict())
    policy = placement()
    seed(policy, "a", job(SYSTEM))
    plan, _ = policy.assign([job(SYSTEM + str(i)) for i in range(10)], workers)
    # a keeps the prefix while it has fewer than 4 more sequences than b (256 tokens saved);
    # the fifth goes to b, which then holds it too, and the two share the rest
    assert {key: len(value) for key, value in plan.items()} == {"a": 4, "b": 6}


def test_the_front_remembers_a_bounded_number_of_prefixes_and_estimates_one_holder():
    holders = PrefixHolders(max_blocks=4)
    holders.sent((0, 1, 2), "a", estimated={"a", "c"})
    holders.held("b", (3, 4, 5, 6))
    assert holders.longest((0, 1, 2), "a") == 0  # the oldest went
    assert holders.longest((3, 4, 5, 6), "b") == 4
    holders.sent((3, 4), "a", estimated={"a", "c"})
    holders.sent((3, 4), "c", estimated={"a", "c"})  # estimated: the prefix moves from a to c
    assert [holders.longest((3, 4), w) for w in "abc"] == [0, 2, 2]  # b reports: it stays


def test_ties_go_to_the_worker_sent_least():
    workers = loads(a=dict(sent=10), b=dict(sent=3))
    assert list(placement().assign([job()], workers)[0]) == ["b"]


def test_prefix_blocks_chain_and_chat_roles_count():
    text = "x" * (3 * BLOCK_CHARS + 10)
    blocks = prefix_blocks(text)
    assert len(blocks) == 3 and prefix_blocks(text[:2 * BLOCK_CHARS]) == blocks[:2]
    assert prefix_blocks("y" + text[1:])[0] != blocks[0]
    as_system = chat_prompt_text([Message(role="system", content=text)])
    as_user = chat_prompt_text([Message(role="user", content=text)])
    assert prefix_blocks(as_system)[0] != prefix_blocks(as_user)[0]
    # the same in every process: a worker reports back fingerprints the front sent it
    code = "from server.scheduling.prefix import prefix_blocks; print(prefix_blocks('x' * 600))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == str(prefix_blocks("x" * 600))


class SimulatedWorkers:
    """The dispatcher's policy side over in-memory workers: placement decides, engines are
    stood for by load reports the test sends."""

    def __init__(self, policy: Placement, **workers: WorkerLoad) -> None:
        self.policy = policy
        self.loads = workers
        self.sent: list[tuple[float, str, int, bool]] = []
        self._changed = trio.Event()

    def room(self, model: str) -> int:
        return sum(self.policy.room(load) for load in self.loads.values())

    def backlog_room(self, model: str) -> int:
        return sum(self.policy.backlog_room(load) for load in self.loads.values())

    def held(self, model: str) -> dict[str, tuple[int, float]]:
        return {}  # one user: fair shares have no say

    def capacity(self, model: str) -> int:
        return sum(load.max_num_seqs for load in self.loads.values())

    def headroom(self, model: str) -> int:
        return 0

    async def wait_for_change(self) -> None:
        await self._changed.wait()

    async def send_batch(self, model, jobs, *, force=False, beyond_backlog=False):
        plan, left = self.policy.assign(jobs, self.loads, force=force,
                                        beyond_backlog=beyond_backlog)
        for name, assigned in plan.items():
            self.loads[name].sent_batch(assigned)
            self.sent.append((trio.current_time(), name, len(assigned), force))
        return left

    def report(self, name: str, load: EngineLoad) -> None:
        self.loads[name].report(load)
        self._changed.set()
        self._changed = trio.Event()


async def test_a_burst_leaves_at_once_over_both_workers(autojump_clock, nursery):
    workers = SimulatedWorkers(placement(), a=WorkerLoad(), b=WorkerLoad())
    scheduler = Scheduler(workers, SchedulingPolicy(max_batch_size=32, max_wait_s=0.1,
                                                     max_queue=100))
    await nursery.start(scheduler.run)
    for _ in range(32):
        scheduler.submit(job())
    await trio.sleep(0)
    await trio.sleep(0)
    assert [(t, n) for t, _, n, _ in workers.sent] and all(t == 0 for t, *_ in workers.sent)
    assert sum(n for *_, n, _ in workers.sent) == 32
    assert {name: sum(n for _, w, n, _ in workers.sent if w == name) for name in "ab"} == {"a": 16, "b": 16}


async def test_saturated_workers_get_more_when_a_report_frees_room(autojump_clock, nursery):
    workers = SimulatedWorkers(placement(), a=WorkerLoad(max_num_seqs=2), b=WorkerLoad(max_num_seqs=2))
    scheduler = Scheduler(workers, SchedulingPolicy(max_batch_size=32, max_wait_s=0.1,
                                                     max_queue=100))
    await nursery.start(scheduler.run)
    t0 = trio.current_time()
    for _ in range(6):
        scheduler.submit(job())
    await trio.sleep(0.02)
    assert sum(n for *_, n, _ in workers.sent) == 4 and scheduler.queued() == {"m": 2}
    workers.report("b", EngineLoad(running=1, received=2))  # one of b's two finished
    await trio.sleep(0.01)
    assert [(round(t - t0, 9), w, n) for t, w, n, _ in workers.sent][-1] == (0.02, "b", 1)
    await trio.sleep(1)  # the last one waits the window out, then queues in an engine
    assert [(round(t - t0, 9), n, force) for t, _, n, force in workers.sent][-1] == (0.1, 1, True)


def test_forced_work_fills_an_engines_backlog_and_no_more():
    policy = Placement(max_unacked_batches=4, backlog=0.25)
    full = WorkerLoad(max_num_seqs=8, running=8)
    plan, left = policy.assign([job() for _ in range(5)], {"a": full}, force=True)
    assert len(plan["a"]) == 2 and len(left) == 3  # two may wait in the engine, three here


def test_a_saturated_holder_queues_its_prefix_within_its_backlog_rather_than_lose_it():
    # a's KV cache is full (no room), b is idle: a moment's wait at a beats b's prefill
    workers = loads(a=dict(running=3, kv_usage=0.99, max_num_seqs=8), b=dict(max_num_seqs=8))
    policy = placement(backlog=0.25)
    seed(policy, "a", job(SYSTEM))
    assert list(policy.assign([job(SYSTEM + "q")], workers)[0]) == ["a"]  # 34 + 192 < 290
    assert list(policy.assign([job("no prefix here")], workers)[0]) == ["b"]  # no room at a
    workers["a"].waiting = 7  # its backlog (8 + 2) is full: the prompt goes where it fits
    assert list(policy.assign([job(SYSTEM + "q")], workers)[0]) == ["b"]


def test_a_new_prefix_goes_to_the_least_loaded_engine_then_to_the_one_holding_fewest():
    workers = loads(a=dict(reports_prefixes=True), b=dict(reports_prefixes=True, kv_usage=0.2))
    policy = placement()
    policy.reported("a", held=job(SYSTEM).prefix, dropped=[])  # a holds one prefix, b none
    other = "An entirely different system prompt. " * 40
    assert list(policy.assign([job(other)], workers)[0]) == ["b"]  # despite b's KV use
    workers["b"].waiting = 1  # but a queue counts first
    third = "A third system prompt, unlike the others. " * 30
    assert list(policy.assign([job(third)], workers)[0]) == ["a"]
    fresh = placement()  # fewer sequences count before fewer prefixes
    fresh.reported("b", held=job(SYSTEM).prefix, dropped=[])
    busy = loads(a=dict(reports_prefixes=True, running=2), b=dict(reports_prefixes=True))
    assert list(fresh.assign([job(other)], busy)[0]) == ["b"]
