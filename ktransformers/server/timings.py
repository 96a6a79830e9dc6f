"""llama.cpp-style `timings`: clients written for llama-server (AnythingLLM's Generic OpenAI provider,
llama.cpp's web UI, benchmarks) read their token counts and speeds from it.

Sent on the chunk that carries `finish_reason` (AnythingLLM stops reading there) and on non-streamed
replies; `usage` keeps its own final chunk. The context in use is prompt_n + cache_n + predicted_n.
"""

from __future__ import annotations


def _per_token_ms(ms: float, tokens: int) -> float:
    return ms / tokens if tokens else 0.0


def llama_timings(finish) -> dict:
    """`finish` is the FinishEvent. The first answer token is sampled at the end of the prefill, so
    predicted_ms covers the decode steps after it and predicted_per_second is their rate."""
    prompt_n = finish.prompt_tokens - finish.cached_tokens   # evaluated, not reused from the prefix cache
    prompt_ms = finish.prefill_seconds * 1000.0
    predicted_ms = finish.decode_seconds * 1000.0
    decode_rate = finish.decode_tokens_per_s
    return {
        "cache_n": finish.cached_tokens,
        "prompt_n": prompt_n,
        "prompt_ms": prompt_ms,
        "prompt_per_token_ms": _per_token_ms(prompt_ms, prompt_n),
        "prompt_per_second": finish.prefill_tokens_per_s,
        "predicted_n": finish.completion_tokens,
        "predicted_ms": predicted_ms,
        "predicted_per_token_ms": 1000.0 / decode_rate if decode_rate else 0.0,
        "predicted_per_second": decode_rate,
    }
