"""The front's services, assembled once into one frozen object: nothing is patched on later,
and every part gets what it needs when it is made (no part reaches into another's owner)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from common.config import ServerSettings
from server.auth import Auth
from server.batch_runner import BatchRunner
from server.workers.pump import Dispatcher
from server.gateway import Gateway
from server.lifecycle import Lifecycle
from server.limit_sync import LimitSync
from server.limits import Limiter
from server.metrics import Metrics
from server.scheduler import Scheduler
from server.store import Store
from server.task_runner import TaskRunner
from server.usage import UsageLedger


@dataclass(frozen=True)
class Services:
    """Everything the routes use; built by `assemble`, started by the app (server.app)."""

    settings: ServerSettings
    gateway: Gateway  # jobs: submitted, waited for whole or streamed; drain on SIGTERM
    store: Store
    auth: Auth
    usage: UsageLedger
    lifecycle: Lifecycle
    tasks: TaskRunner
    batches: BatchRunner
    limit_sync: LimitSync

    @property
    def dispatcher(self) -> Dispatcher:
        return self.gateway.dispatcher

    @property
    def scheduler(self) -> Scheduler:
        return self.gateway.scheduler

    @property
    def metrics(self) -> Metrics:
        return self.gateway.metrics

    @property
    def limiter(self) -> Limiter:
        return self.gateway.limiter


def assemble(settings: ServerSettings) -> Services:
    """Build every service of one front, each from the ones it needs."""
    gateway = Gateway(settings)
    store = Store(settings.db_url)
    usage = UsageLedger(store, settings.usage_ledger, os.path.join(settings.data_dir, "ledger"),
                        gateway.dispatcher.front_id)
    lifecycle = Lifecycle(gateway, usage)
    tasks, batches = TaskRunner(gateway, store, lifecycle), BatchRunner(gateway, store, lifecycle)
    limit_sync = LimitSync(gateway.limiter, store, gateway.dispatcher.front_id,
                           settings.limit_sync_s)
    streaks = {"task_leases": tasks.lease_streak, "batch_leases": batches.lease_streak,
               "limit_sync": limit_sync.streak, "housekeeping": tasks.housekeeping_streak}
    for what, streak in streaks.items():  # the periodic store work's failures, for /metrics
        gateway.metrics.follow_streak(what, streak)
    return Services(
        settings=settings, gateway=gateway, store=store, auth=Auth(settings, store), usage=usage,
        lifecycle=lifecycle, tasks=tasks, batches=batches, limit_sync=limit_sync)
