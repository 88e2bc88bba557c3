"""The usage tap: the front always gets the usage, the client gets `vllm serve`'s stream exactly."""

from worker.engines.usage_tap import UsageTap

TOKEN = '{"choices":[{"index":0,"delta":{"content":"x"},"finish_reason":null}]}'
FINISH = '{"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}'
USAGE = ('{"choices":[],"usage":{"prompt_tokens":3,"total_tokens":4,"completion_tokens":1},'
         '"system_fingerprint":"fp"}')


def test_a_client_that_did_not_ask_gets_no_usage_and_the_fingerprint_where_vllm_puts_it():
    tap = UsageTap({"stream_options": {"continuous_usage_stats": True}}, True, "fp")
    assert tap.body["stream_options"] == {"include_usage": True, "continuous_usage_stats": False}
    sent = [c for chunk in (TOKEN, FINISH, USAGE) for c in tap.relay(chunk)] + tap.rest()
    assert sent == [TOKEN, FINISH[:-1] + ',"system_fingerprint":"fp"}']
    assert tap.usage == {"prompt_tokens": 3, "completion_tokens": 1}


def test_without_a_known_fingerprint_finish_chunks_wait_for_the_usage_chunk():
    tap = UsageTap({}, True)
    assert tap.relay(TOKEN) == [TOKEN] and tap.relay(FINISH) == []
    assert tap.relay(USAGE) == [FINISH[:-1] + ',"system_fingerprint":"fp"}']


def test_a_client_that_asked_gets_the_stream_untouched():
    tap = UsageTap({"stream_options": {"include_usage": True}}, True, "fp")
    sent = [c for chunk in (TOKEN, FINISH, USAGE) for c in tap.relay(chunk)]
    assert sent == [TOKEN, FINISH, USAGE] and tap.usage["completion_tokens"] == 1
    assert UsageTap({"n": 1}, False).body == {"n": 1}  # not streamed: the body has the usage
