import pytest
import trio

from harness.cluster import Cluster


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """One front with two mock workers for the tests that do not break it."""
    cluster = Cluster(tmp_path_factory.mktemp("shared"))
    cluster.start_front()
    cluster.start_worker("worker1")
    cluster.start_worker("worker2")
    try:
        cluster.api_key = cluster.add_user("alice")
        trio.run(cluster.wait_ready, 2)
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def make_cluster(tmp_path):
    """Clusters of a test's own (stopped at its end), for tests that kill or fill things."""
    made = []

    def make(**env) -> Cluster:
        cluster = Cluster(tmp_path / f"c{len(made)}", **env)
        (tmp_path / f"c{len(made)}").mkdir()
        made.append(cluster)
        return cluster

    yield make
    for cluster in made:
        cluster.stop()
