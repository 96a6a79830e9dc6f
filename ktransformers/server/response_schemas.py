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
    logprobs: None
    finish_reason: FinishReason


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


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
    logprobs: None
    finish_reason: FinishReason | None


class ChatCompletionChunk(BaseModel):
    """One `data:` event of a streamed chat completion (the stream ends with `data: [DONE]`)."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None   # with stream_options.include_usage: null, then a last chunk with no choices


class CompletionChoice(BaseModel):
    text: str
    index: int
    logprobs: None
    finish_reason: FinishReason | None


class Completion(BaseModel):
    """A text completion, or one `data:` event of a streamed one."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


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
