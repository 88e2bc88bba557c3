"""Settings: compatibility names, precedence, errors that name the setting, and documentation."""

import dataclasses

import pytest

from common import settings_doc
from common.config import ServerSettings, SettingError, WorkerSettings, describe, load



def test_old_names_work_and_cohort_names_win():
    old = load(ServerSettings, {"VLLM_MAX_BATCH_SIZE": "8", "VLLM_BATCH_WAIT_TIMEOUT": "0.25",
                                "VLLM_MAX_CONCURRENT_BATCHES": "2"})
    assert (old.max_batch_size, old.max_wait_s, old.max_batches_per_worker) == (8, 0.25, 2)
    both = load(ServerSettings, {"VLLM_MAX_BATCH_SIZE": "8", "COHORT_MAX_BATCH_SIZE": "16"})
    assert both.max_batch_size == 16


@pytest.mark.parametrize("env, engine", [
    ({}, "mock"), ({"USE_REAL_VLLM": "true"}, "vllm"), ({"MOCK_USE_REAL_VLLM": "1"}, "vllm"),
    ({"REAL_VLLM_URL": "http://x:8000"}, "http"), ({"COHORT_ENGINE": "mock", "USE_REAL_VLLM": "1"}, "mock"),
])
def test_engine_choice_from_the_old_flags(env, engine):
    assert load(WorkerSettings, env).engine_name == engine


def test_model_names_old_and_new():
    assert load(WorkerSettings, {"MOCK_VLLM_MODEL": "a"}).model == "a"
    assert load(WorkerSettings, {"REAL_VLLM_MODEL": "b", "MOCK_VLLM_MODEL": "a"}).model == "b"
    assert load(WorkerSettings, {"MOCK_VLLM_MAX_LEN": "512"}).max_model_len == 512


@pytest.mark.parametrize("env, named", [
    ({"VLLM_MAX_BATCH_SIZE": "lots"}, "VLLM_MAX_BATCH_SIZE"),
    ({"COHORT_MAX_BATCH_SIZE": "0"}, "max_batch_size"),
    ({"COHORT_AUTH_DISABLED": "maybe"}, "COHORT_AUTH_DISABLED"),
])
def test_bad_values_name_the_setting(env, named):
    with pytest.raises(SettingError, match=named):
        load(ServerSettings, env)


def test_http_engine_without_url_is_refused():
    with pytest.raises(SettingError, match="REAL_VLLM_URL"):
        load(WorkerSettings, {"COHORT_ENGINE": "http"})


def test_secrets_are_masked_in_health():
    shown = describe(load(WorkerSettings, {"COHORT_ENGINE": "vllm", "WORKER_HF_TOKEN": "hf_secret"}))
    assert shown["hf_token"] == "***" and shown["max_model_len"] == 2048


def test_every_setting_has_a_meaning_and_the_generated_documents_are_current():
    """docs/settings.md and .env.example are written from the dataclasses: a new or changed
    setting without `python -m common.settings_doc` fails here, naming the stale file."""
    for cls in (ServerSettings, WorkerSettings):
        for item in dataclasses.fields(cls):
            assert len(item.metadata["doc"]) > 10, f"{item.name} says nothing of what it does"
    assert settings_doc.main(["--check"]) == 0, "run python -m common.settings_doc"
    reference = settings_doc.reference()
    for cls in (ServerSettings, WorkerSettings):
        for item in dataclasses.fields(cls):
            assert all(f"`{name}`" in reference for name in item.metadata["env"])


def test_a_stale_reference_is_found(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(settings_doc, "REFERENCE", tmp_path / "settings.md")
    monkeypatch.setattr(settings_doc, "ROOT", tmp_path)
    monkeypatch.setattr(settings_doc, "ENV_EXAMPLE", tmp_path / ".env.example")
    (tmp_path / "settings.md").write_text("# Settings\n")
    (tmp_path / ".env.example").write_text(settings_doc.env_example())
    assert settings_doc.main(["--check"]) == 1
    assert "settings.md is stale" in capsys.readouterr().err


@pytest.mark.parametrize("env, said", [
    ({"COHORT_MAX_QUEU": "5"}, "COHORT_MAX_QUEU is not a setting; did you mean COHORT_MAX_QUEUE"),
    ({"MOCK_TOKENS_S": "0"}, "MOCK_TOKENS_S is not a setting; did you mean MOCK_TOKEN_S"),
    ({"COHORT_AFFINITY_MARGIN": "4"}, "no longer read: .*COHORT_PREFIX_SEQ_TOKENS"),
])
def test_a_variable_no_setting_reads_stops_the_start(env, said):
    for cls in (ServerSettings, WorkerSettings):  # one environment for both under honcho
        with pytest.raises(SettingError, match=said):
            load(cls, env)
    load(ServerSettings, {"COHORT_KEY": "k", "MOCK_TOKEN_S": "0", "OTHER_THING": "x"})


@pytest.mark.parametrize("env, said", [
    ({"COHORT_ENGINE": "vllm", "MOCK_TOKEN_S": "0.01"}, "MOCK_TOKEN_S: not read by engine vllm"),
    ({"COHORT_ENFORCE_EAGER": "0", "COHORT_KV_CACHE_MEMORY_BYTES": "1000"},
     "COHORT_KV_CACHE_MEMORY_BYTES, COHORT_ENFORCE_EAGER: not read by engine mock"),
    ({"COHORT_ENGINE": "http", "REAL_VLLM_URL": "http://x", "COHORT_KV_EVENTS": "0"},
     "COHORT_KV_EVENTS: not read by engine http"),
    ({"COHORT_ENGINE": "mock", "REAL_VLLM_URL": "http://x"}, "REAL_VLLM_URL: not read"),
])
def test_a_setting_the_workers_engine_does_not_read_stops_it(env, said):
    with pytest.raises(SettingError, match=said):
        load(WorkerSettings, env)
    load(ServerSettings, env)  # the front, under the same environment, has no engine


def test_what_an_engine_reads_is_taken():
    load(WorkerSettings, {"COHORT_ENGINE": "vllm", "COHORT_KV_CACHE_MEMORY_BYTES": "1000",
                          "COHORT_KV_EVENTS": "0", "COHORT_MAX_NUM_SEQS": "8"})
    load(WorkerSettings, {"MOCK_TOKEN_S": "0.01", "COHORT_KV_EVENTS": "0"})
    # behind an http engine that falls back to the mock, the mock's settings count
    load(WorkerSettings, {"REAL_VLLM_URL": "http://x", "COHORT_UPSTREAM_FALLBACK_TO_MOCK": "1",
                          "MOCK_TOKEN_S": "0.01"})
    with pytest.raises(SettingError, match="--quantization"):  # a flag is a setting given too
        load(WorkerSettings, {}, quantization="awq")
