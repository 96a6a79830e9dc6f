"""Pydantic models of the OpenAI response bodies, for the OpenAPI document.

The routes build plain dicts (one per token, so cheap); tests validate real responses
against the JSON schemas generated from these models, so document and wire cannot drift.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel

FinishReason = Literal["stop", "length", "tool_calls"]


class PromptTokensDetails(BaseModel):
    cached_tokens: int  # prompt tokens served from the prefix cache (not prefilled again)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class Timings(BaseModel):
    """llama.cpp's timings (server/timings.py): on the chunk with finish_reason, and on non-streamed replies."""

    cache_n: int                 # prompt tokens reused from the prefix cache
    prompt_n: int                # prompt tokens evaluated
    prompt_ms: float
    prompt_per_token_ms: float
    prompt_per_second: float
    predicted_n: int             # completion tokens
    predicted_ms: float          # decode steps after the first token (sampled with the prefill)
    predicted_per_token_ms: float
    predicted_per_second: float


class TopLogprob(BaseModel):
    token: str              # the token's text (U+FFFD where it holds part of a character)
    logprob: float          # the model's log-softmax, before penalties, temperature and filters
    bytes: list[int]        # the token's exact UTF-8 bytes


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    """One entry per generated token (reasoning included) whose text this choice or chunk sends."""

    content: list[TokenLogprob]


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]
class CalledFunction(BaseModel):
    name: str
    arguments: str   # JSON, valid against the function's parameters unless cut short by max_tokens


class ToolCall(BaseModel):
    id: str
    type: Literal["function"]
    function: CalledFunction


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str | None   # null when the reply is only tool calls
    reasoning_content: str | None = None   # absent when reasoning is inlined as <think> tags
    tool_calls: list[ToolCall] | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None    # with logprobs: true
    finish_reason: FinishReason


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    timings: Timings


class FunctionDelta(BaseModel):
    name: str | None = None          # in a call's first delta
    arguments: str | None = None     # the next fragment of the JSON arguments


class ToolCallDelta(BaseModel):
    index: int
    id: str | None = None            # in a call's first delta, with type and function.name
    type: Literal["function"] | None = None
    function: FunctionDelta


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChunkChoice(BaseModel):
    index: int
    delta: Delta
    logprobs: ChoiceLogprobs | None
    finish_reason: FinishReason | None


class ChatCompletionChunk(BaseModel):
    """One `data:` event of a streamed chat completion (the stream ends with `data: [DONE]`)."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None   # with stream_options.include_usage: null, then a last chunk with no choices
    timings: Timings | None = None   # on the chunk carrying finish_reason


class CompletionChoice(BaseModel):
    text: str
    index: int
    logprobs: CompletionLogprobs | None   # with logprobs: n
    finish_reason: FinishReason | None


class Completion(BaseModel):
    """A text completion, or one `data:` event of a streamed one."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    timings: Timings | None = None   # non-streamed, or the streamed chunk carrying finish_reason


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


ALL_RESPONSE_MODELS = (ChatCompletion, ChatCompletionChunk, Completion, ModelCard, ModelList)
