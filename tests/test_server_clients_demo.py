"""Chat clients' request shapes against the real entry point on the demo model (`chat_openai.py --demo
--reasoning_format think_tags`, the setting for clients that want <think> tags): AnythingLLM's Generic OpenAI
provider (reads timings on the finishing chunk, then stops), its Ollama provider (stops at done=true), Dify's
OpenAI-compatible plugin (sends llama.cpp's reasoning_format), and a Prometheus scrape afterwards."""

import os

import ollama
import openai
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from ktransformers.demo import demo_model_name
from ktransformers.server.testing import chat_openai_process

QUESTION = [{"role": "user", "content": "What is 4821 plus 367?"}]
MODEL = demo_model_name("q4_k_m")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    env = {**os.environ, "KTRANSFORMERS_CACHE": os.environ.get("KTRANSFORMERS_CACHE")
           or str(tmp_path_factory.mktemp("kt-cache"))}
    with chat_openai_process("--demo", "--reasoning_format", "think_tags", env=env) as (port, _):
        yield f"http://127.0.0.1:{port}"


def test_anythingllm_generic_openai_reads_timings_and_the_answer(base):
    client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=60)
    stream = client.chat.completions.create(model=MODEL, messages=QUESTION, stream=True, temperature=0,
                                            max_tokens=1024)      # AnythingLLM's default "Max Tokens"
    text, timings = "", None
    for chunk in stream:
        text += chunk.choices[0].delta.content or ""
        if chunk.choices[0].finish_reason:
            timings = chunk.model_extra["timings"]
            break                                                  # as AnythingLLM does
    stream.close()
    assert text.startswith("<think>") and "</think>" in text and text.rstrip().endswith("4821 + 367 = 5188")
    assert timings["prompt_n"] + timings["cache_n"] > 10 and timings["predicted_n"] > 10
    assert timings["predicted_per_second"] > 0


def test_anythingllm_ollama_provider_sees_the_think_block_closed_before_done(base):
    parts = list(ollama.Client(host=base, timeout=60).chat(model=MODEL, messages=QUESTION, stream=True,
                                                           options={"temperature": 0, "num_predict": 6}))
    before_done = "".join(p.message.content for p in parts if not p.done)
    assert before_done.startswith("<think>") and before_done.endswith("</think>")   # cut while thinking
    assert parts[-1].done and parts[-1].message.content == "" and parts[-1].done_reason == "length"


def test_dify_sends_llama_cpp_reasoning_format(base):
    reply = requests.post(base + "/v1/chat/completions", timeout=60, json={
        "model": MODEL, "messages": QUESTION, "temperature": 0, "stream": False, "reasoning_format": "deepseek",
        "user": "dify-user", "max_tokens": 512}).json()
    message = reply["choices"][0]["message"]
    assert "8+3+0=11" in message["reasoning_content"] and message["content"].strip() == "4821 + 367 = 5188"
    legacy = requests.post(base + "/v1/chat/completions", timeout=60, json={
        "model": MODEL, "messages": QUESTION, "temperature": 0, "reasoning_format": "deepseek-legacy"}).json()
    legacy = legacy["choices"][0]["message"]
    assert legacy["content"] == f"<think>{legacy['reasoning_content']}</think>{message['content']}"


def test_prometheus_scrape_after_a_chat(base):
    requests.post(base + "/v1/chat/completions", timeout=60, json={"messages": QUESTION, "temperature": 0})
    text = requests.get(base + "/metrics", timeout=10).text
    samples = {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples
               if not s.labels}
    assert samples["ktransformers_completion_tokens_total"] > 20
    assert samples["ktransformers_time_to_first_token_seconds_count"] >= 1
