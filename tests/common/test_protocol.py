"""The wire: round trips, and every way a message can be wrong is a ProtocolError, not a crash."""

import msgpack
import msgspec
import pytest

from common import protocol


@pytest.mark.parametrize("message", [
    protocol.Hello("w1", "mock", "m", 8, "cpu", "ready", 42, 1.5, ""),
    protocol.Ready(3.25),
    protocol.Heartbeat(active=3, state="ready"),
    protocol.Heartbeat(3, "ready", protocol.EngineLoad(running=2, waiting=1, kv_usage=0.25,
                                                       prefix_hit_rate=0.5, max_num_seqs=128,
                                                       max_num_batched_tokens=2048, received=7)),
    protocol.Out([protocol.out_item("j1", b'data: {"x":1}\n\n'),
                  protocol.out_item("j2", b"{}", done=True, status=400,
                                    usage={"prompt_tokens": 5, "completion_tokens": 0})]),
    protocol.Out([], protocol.EngineLoad(running=1, received=3)),
    protocol.Error("boom", ["j1"], "invalid"),
    protocol.Bye("stopping"),
    protocol.Welcome("front-1"),
    protocol.HelloAgain(),
    protocol.Batch("b1", [protocol.request_item(
        "j1", "chat", {"model": "m", "messages": [{"role": "user", "content": "x"}]})]),
    protocol.Ready(3.25, "m", ["chat", "logprobs"]),
    protocol.Abort(["j1", "j2"]),
    protocol.Shutdown(),
])
def test_round_trip(message):
    assert protocol.decode(message.encode()) == message


def test_every_message_is_a_map_with_its_version_and_type():
    body = msgpack.unpackb(protocol.Abort(["j1"]).encode())
    assert body == {"type": "abort", "v": protocol.VERSION, "ids": ["j1"]}


def test_missing_optional_fields_take_defaults_so_older_peers_still_talk():
    data = msgpack.packb({"v": protocol.VERSION, "type": "hello", "worker_id": "w", "engine": "e",
                          "model": "m", "capacity": 1, "device": "cpu"})
    hello = protocol.decode(data)
    assert hello.state == "loading" and hello.error == ""


def test_unknown_extra_fields_are_ignored():
    data = msgpack.packb({"v": protocol.VERSION, "type": "ready", "load_time_s": 1, "new": 1,
                          "features": None})
    assert protocol.decode(data) == protocol.Ready(1)


@pytest.mark.parametrize("data, reason", [
    (b"\xc1", "malformed"),
    (msgpack.packb([1, 2]), "Expected `object`, got `array`"),
    (msgpack.packb({"v": 99, "type": "ready", "load_time_s": 1}), "version 99"),
    (msgpack.packb({"v": protocol.VERSION, "type": "launch"}), "Invalid value 'launch'"),
    (msgpack.packb({"v": protocol.VERSION, "type": "ready"}), "missing required field"),
    (msgpack.packb({"v": protocol.VERSION, "type": "ready", "load_time_s": "x"}),
     r"Expected `float`, got `str` - at `\$.load_time_s`"),
    (msgpack.packb({"v": protocol.VERSION, "type": "abort", "ids": "j1"}), "Expected `array`"),
    (msgpack.packb({"v": protocol.VERSION, "type": "out", "items": [{"id": 1}]}),
     r"\$.items\[0\].id"),
    (msgpack.packb({"v": protocol.VERSION, "type": "out",
                    "items": [{"id": "j", "data": "text"}]}), "Expected `bytes`, got `str`"),
    (msgpack.packb({"v": protocol.VERSION, "type": "out",
                    "items": [{"id": "j", "usage": {"prompt_tokens": -1}}]}), ">= 0"),
    (msgpack.packb({"v": protocol.VERSION, "type": "batch", "batch_id": "b",
                    "requests": [{"id": "j", "route": "chat", "body": "x"}]}),
     r"\$.requests\[0\].body"),
    (msgpack.packb({"v": protocol.VERSION, "type": "batch", "batch_id": "b",
                    "requests": ["x"]}), "Expected `object`, got `str`"),
    (msgpack.packb({"v": protocol.VERSION, "type": "error", "message": "boom",
                    "ids": [{"a": 1}]}), r"\$.ids\[0\]"),  # once a TypeError deep in the front
    (msgpack.packb({"v": protocol.VERSION, "type": "heartbeat", "state": "bogus"}),
     "Invalid enum value 'bogus'"),  # once a 500 on /metrics
    (msgpack.packb({"v": protocol.VERSION, "type": "out", "load": {"running": "1"}}),
     r"\$.load.running"),
    (msgpack.packb({"v": protocol.VERSION, "type": "heartbeat", "load": {"waiting": -1}}),
     ">= 0"),
    (msgpack.packb({"v": protocol.VERSION, "type": "heartbeat", "load": {"kv_usage": True}}),
     "got `bool`"),
    (msgpack.packb({"v": protocol.VERSION, "type": "heartbeat", "load": [1]}),
     r"got `array` - at `\$.load`"),
])
def test_malformed_messages_are_refused_with_a_reason(data, reason):
    with pytest.raises(protocol.ProtocolError, match=reason):
        protocol.decode(data)


def test_booleans_are_not_numbers():
    data = msgpack.packb({"v": protocol.VERSION, "type": "ready", "load_time_s": True})
    with pytest.raises(protocol.ProtocolError):
        protocol.decode(data)


def test_a_load_from_a_newer_peer_keeps_what_we_know():
    data = msgpack.packb({"v": protocol.VERSION, "type": "heartbeat", "load": {
        "running": 4, "kv_usage": 1, "future_figure": "x"}})
    load = protocol.decode(data).load
    assert (load.running, load.kv_usage, load.waiting) == (4, 1, 0)


# --- fuzzing: any field of any message with any value is a clean refusal or a typed message -------

from hypothesis import given, settings, strategies as st  # noqa: E402

VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.floats() | st.text(max_size=8)
    | st.binary(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=8)
SAMPLES = {message.type: message for message in [
    protocol.Hello("w1", "mock", "m", 8, "cpu", "ready", 42, 1.5, "", ["chat"], 2048),
    protocol.Ready(1.0, "m", ["chat"]), protocol.Heartbeat(1, "ready",
                                                           protocol.EngineLoad(running=1)),
    protocol.Out([protocol.out_item("j", b"x", done=True, usage={"prompt_tokens": 1})],
                 protocol.EngineLoad(waiting=1)),
    protocol.Error("boom", ["j1"], "engine"), protocol.Bye("x"), protocol.Welcome("f"),
    protocol.HelloAgain(), protocol.Abort(["j"]), protocol.Shutdown(),
    protocol.Batch("b", [protocol.request_item("j", "chat", {"model": "m"})])]}


@settings(max_examples=400, deadline=None)
@given(kind=st.sampled_from(sorted(SAMPLES)), data=st.data(), value=VALUES)
def test_a_wrong_value_anywhere_is_refused_or_typed(kind, data, value):
    sample = SAMPLES[kind]
    body = msgpack.unpackb(sample.encode())
    names = [name for name in body if name not in ("v", "type")]
    if names:
        name = data.draw(st.sampled_from(names))
        if isinstance(body[name], list) and body[name] and data.draw(st.booleans()):
            body[name] = [value] + body[name][1:]  # a wrong element, the rest right
        else:
            body[name] = value
    try:
        message = protocol.decode(msgpack.packb(body, use_bin_type=True))
    except protocol.ProtocolError:
        return
    # what got through has exactly the declared types: checking it again changes nothing
    assert msgspec.convert(msgspec.structs.asdict(message), type(message)) == message


def test_the_decode_limit_is_the_configured_one_not_a_fixed_64_mib():
    """COHORT_ZMQ_MAX_MESSAGE_BYTES may allow (and for large bodies requires) more than 64 MiB."""
    big = protocol.Batch("b1", [protocol.request_item("r1", "completions", {
        "prompt": "x" * (65 << 20)})]).encode()
    assert len(big) > protocol.MAX_MESSAGE_BYTES
    with pytest.raises(protocol.ProtocolError, match="COHORT_ZMQ_MAX_MESSAGE_BYTES"):
        protocol.decode(big)
    assert protocol.decode(big, max_bytes=128 << 20).requests[0].id == "r1"
    with pytest.raises(protocol.ProtocolError, match="over the limit of 1000"):
        protocol.decode(big, max_bytes=1000)


def test_a_message_that_cannot_be_decoded_still_names_its_requests_for_an_answer():
    batch = protocol.Batch("b1", [protocol.request_item(f"r{i}", "completions", {"prompt": "x"})
                                  for i in range(3)]).encode()
    assert protocol.request_ids(batch) == ["r0", "r1", "r2"]
    with pytest.raises(protocol.ProtocolError):
        protocol.decode(batch, max_bytes=10)  # refused, yet its requests can be answered
    wrong = msgpack.packb({"v": 999, "type": "out", "items": [{"id": "j1"}, {"id": 5}]})
    assert protocol.request_ids(wrong) == ["j1"]
    assert protocol.request_ids(b"\xc1 not msgpack") == []
    assert protocol.request_ids(msgpack.packb([1, 2])) == []
