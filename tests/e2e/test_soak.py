"""The HTTP edge under a minute of mixed traffic (the 60-second version of bench/soak.py):
greedy, slow and odd clients cost bounded memory and descriptors, the front logs no traceback,
and a well-behaved client beside them is served without an error."""

from harness.soak import soak


async def test_a_minute_of_greedy_slow_and_odd_clients(make_cluster):
    cluster = make_cluster(MOCK_TOKEN_S="0.002", MOCK_TTFT_S="0", COHORT_LOG_LEVEL="WARNING")
    cluster.start_front()
    cluster.start_worker("worker1")
    cluster.api_key = cluster.add_user("soak")
    await cluster.wait_ready(1)
    report = await soak(cluster, 60, sample_every_s=5)
    summary = report.summary()
    assert report.errors == 0 and len(report.latencies_s) > 100, summary
    assert report.tracebacks == 0, cluster.log("front")[-3000:]
    for group in ("streams", "left_mid_stream", "non_readers", "connection_close",
                  "slowloris_cut"):
        assert report.counts.get(group, 0) > 0, (group, summary)
    first, last = report.samples[0], report.samples[-1]
    assert last.rss_mb - first.rss_mb < 48, summary  # bounded: no buffer grows with the traffic
    assert last.descriptors < first.descriptors + 100, summary  # every client's socket closes
