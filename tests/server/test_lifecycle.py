"""The one lifecycle's rules, without sockets, in virtual time: a refusal gives everything back,
real use is charged, a client that left keeps its estimate, a row only for a request that reached
a worker, durable rows left to their runner, interactive rows to the ledger's group commit."""

import trio
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from server.auth import Principal
from server.errors import NoWorkers
from server.jobs import Job, JobSpec
from server.lifecycle import Lifecycle, Run
from server.live_window import LiveWindow
from server.tracing import Tracing
from server.limits import Limiter, Limits
from server.metrics import Metrics
from server.usage import UsageLedger

PAYER = Principal(7, "alice", 3, (("user:7", Limits(tokens_per_day=1000)),))


class FakeGateway:
    """Runs a job by handing back what `outcome` says: a refusal, a body, or a wait forever."""

    def __init__(self, outcome: str = "ok", used: tuple[int, int] = (30, 20)) -> None:
        self.limiter, self.metrics = Limiter(), Metrics()
        self.outcome, self.used = outcome, used
        self.spans = InMemorySpanExporter()
        self.tracing = Tracing("", processor=SimpleSpanProcessor(self.spans))
        self.live = LiveWindow()

    def submit(self, spec: JobSpec) -> Job:
        if self.outcome == "refuse":
            raise NoWorkers("no worker")
        now = trio.current_time()
        job = Job(spec, now, now + 60)
        job.worker_id, job.started_at = "w1", now
        return job

    async def submit_when_possible(self, spec: JobSpec) -> Job:
        return self.submit(spec)

    async def complete(self, job: Job, route: str) -> bytes:
        if self.outcome == "hang":
            await trio.sleep_forever()
        await trio.sleep(1)
        job.usage = {"prompt_tokens": self.used[0], "completion_tokens": self.used[1]}
        job.used_tokens = sum(self.used)
        return b"{}"


class FakeStore:
    def __init__(self) -> None:
        self.rows: list[dict] = []

    async def run(self, fn, *args):
        return fn(*args)

    def add_usage(self, rows):
        self.rows.extend(rows)


def lifecycle(outcome: str = "ok", **kwargs) -> tuple[Lifecycle, FakeGateway, FakeStore]:
    gateway, store = FakeGateway(outcome, **kwargs), FakeStore()
    return Lifecycle(gateway, UsageLedger(store)), gateway, store


def spec() -> JobSpec:
    return JobSpec("m", "chat", {"messages": []}, cost=100)


def today_used(gateway: FakeGateway) -> int:
    return gateway.limiter._counters["user:7"].day_tokens  # what the daily quota has counted


async def test_real_use_is_charged_and_an_interactive_row_goes_to_the_ledger(autojump_clock):
    cycle, gateway, store = lifecycle(used=(90, 60))  # 150 used, 100 estimated
    [ticket] = cycle.admit(PAYER, [spec()])
    run = Run(PAYER, spec(), "chat", ticket)
    assert await cycle.complete(run) == b"{}"
    assert today_used(gateway) == 150 and run.status == 200
    await cycle.ledger.flush()
    assert [(r["route"], r["username"], r["prompt_tokens"]) for r in store.rows] == [
        ("chat", "alice", 90)]
    assert store.rows[0]["request_id"] == run.job.id
    # stored or not, every run is traced once it reaches the lifecycle: here, from its start
    [queue, root] = gateway.spans.get_finished_spans()
    assert (queue.name, root.name) == ("queue", "cohort chat")
    assert root.attributes["gen_ai.usage.input_tokens"] == 90
    assert root.attributes["http.response.status_code"] == 200


async def test_a_refusal_at_submit_gives_everything_back_and_leaves_no_row(autojump_clock):
    cycle, gateway, store = lifecycle("refuse")
    [ticket] = cycle.admit(PAYER, [spec()])
    run = Run(PAYER, spec(), "chat", ticket)
    try:
        await cycle.complete(run)
    except NoWorkers:
        pass
    assert today_used(gateway) == 0 and run.status == 503 and run.row is None
    [root] = gateway.spans.get_finished_spans()  # refused at submit: no queue, a failed trace
    assert root.attributes["http.response.status_code"] == 503 and not root.status.is_ok


async def test_a_client_that_left_mid_run_keeps_its_estimate_and_leaves_a_499_row(autojump_clock):
    cycle, gateway, store = lifecycle("hang")
    [ticket] = cycle.admit(PAYER, [spec()])
    run = Run(PAYER, spec(), "completions", ticket)
    with trio.move_on_after(5):
        await cycle.complete(run)
    assert today_used(gateway) == 100 and run.status == 499 and run.row["status"] == 499
    assert {span.name for span in gateway.spans.get_finished_spans()} == {"queue",
                                                                          "cohort completions"}


async def test_a_durable_row_is_left_to_its_runner_with_the_runners_request_id(autojump_clock):
    cycle, gateway, store = lifecycle()
    [ticket] = cycle.admit(PAYER, [spec()], stored=True)
    run = Run(PAYER, spec(), "batch_api", ticket, request_id="batch_x-1", durable=True)
    await cycle.complete(run, wait_for_worker=True)
    assert run.row["request_id"] == "batch_x-1" and run.row["route"] == "batch_api"
    await cycle.ledger.flush()
    assert store.rows == []  # written with its outcome by its runner, not here
    cycle.end(run, 500)  # a second end changes nothing: settled once
    assert today_used(gateway) == 50 and run.status == 200
