"""GET /metrics: Prometheus' text format, read back with prometheus_client's own parser after real requests
(the `openai` SDK and the `ollama` client against the scripted model); each app has its own registry."""

import ollama
import openai
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from ktransformers.server.settings import ServerSettings
from ktransformers.server.testing import scripted_server


def scrape(url: str, **headers) -> dict:
    """{(sample name, frozen labels): value} of every sample /metrics exposes."""
    r = requests.get(url + "/metrics", headers=headers, timeout=5)
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/plain")
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(r.text) for s in family.samples}


def value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def test_counts_tokens_requests_and_timings_of_real_requests():
    with scripted_server(settings=ServerSettings(model_name="m", max_new_tokens=5)) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0, timeout=10)
        replies = [client.chat.completions.create(model="m", messages=[{"role": "user", "content": "one two three"}]),
                   client.completions.create(model="m", prompt="four five", max_tokens=3)]
        list(client.chat.completions.create(model="m", stream=True, messages=[{"role": "user", "content": "six"}]))
        ollama.Client(host=srv.url).chat(model="m", messages=[{"role": "user", "content": "seven"}])
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model="m", messages=[], max_tokens=3)
        samples = scrape(srv.url)

    prompt = sum(r.usage.prompt_tokens for r in replies) + 1 + 1
    completion = sum(r.usage.completion_tokens for r in replies) + 5 + 5
    assert value(samples, "ktransformers_prompt_tokens_total") == prompt
    assert value(samples, "ktransformers_completion_tokens_total") == completion
    assert value(samples, "ktransformers_generations_total", finish_reason="length") == 4
    assert value(samples, "ktransformers_requests_total", route="/v1/chat/completions", status="200") == 2
    assert value(samples, "ktransformers_requests_total", route="/v1/chat/completions", status="400") == 1
    assert value(samples, "ktransformers_requests_total", route="/v1/completions", status="200") == 1
    assert value(samples, "ktransformers_requests_total", route="/api/chat", status="200") == 1
    assert value(samples, "ktransformers_time_to_first_token_seconds_count") == 4
    assert 0 < value(samples, "ktransformers_time_to_first_token_seconds_sum") < 10
    assert value(samples, "ktransformers_decode_tokens_per_second_count") == 4
    assert value(samples, "ktransformers_prefill_tokens_per_second_count") == 4
    assert value(samples, "ktransformers_queue_waiting") == 0 and value(samples, "ktransformers_queue_size") == 4
    assert ("ktransformers_cached_prompt_tokens_total", frozenset()) in samples


def test_each_app_has_its_own_registry_and_the_key_guards_it():
    with scripted_server(settings=ServerSettings(model_name="a", api_key="k1", max_new_tokens=2)) as first, \
         scripted_server(settings=ServerSettings(model_name="b", max_new_tokens=2)) as second:
        requests.post(first.url + "/v1/chat/completions", headers={"Authorization": "Bearer k1"}, timeout=5,
                      json={"messages": [{"role": "user", "content": "x"}]})
        assert requests.get(first.url + "/metrics", timeout=5).status_code == 401
        assert value(scrape(first.url, Authorization="Bearer k1"), "ktransformers_completion_tokens_total") == 2
        assert value(scrape(second.url), "ktransformers_completion_tokens_total") == 0


def test_queue_depth_and_busy_are_live():
    with scripted_server() as srv:
        srv.generator.hold()
        with requests.post(srv.url + "/v1/chat/completions", stream=True, timeout=10,
                           json={"stream": True, "max_tokens": 3, "messages": [{"role": "user", "content": "x"}]}) as r:
            next(r.iter_lines())                      # the role chunk: the job is running, held
            samples = scrape(srv.url)
            assert value(samples, "ktransformers_busy") == 1 and value(samples, "ktransformers_running") == 1
            assert value(samples, "ktransformers_max_batch") == 1
            srv.generator.allow(3)
            list(r.iter_lines())
        assert value(scrape(srv.url), "ktransformers_busy") == 0
