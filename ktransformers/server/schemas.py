"""Pydantic request models for the OpenAI and Ollama routes.

Strict types (a string where a number belongs is rejected), unknown fields ignored (clients
such as LangChain, Dify and Open-WebUI send many we do not use).  Requests are validated
straight from the raw body with `model_validate_json`, so malformed JSON is reported the same way.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Role = Literal["system", "developer", "user", "assistant", "tool"]
ReasoningFormat = Literal["deepseek", "think_tags"]


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


# ---------------------------------------------------------------- OpenAI

class ContentPart(_Request):
    type: str
    text: str | None = None


class ChatMessage(_Request):
    role: Role
    content: str | list[ContentPart] | None = None
    name: str | None = None


class StreamOptions(_Request):
    include_usage: bool = False


class _Sampling(_Request):
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    top_k: int | None = Field(None, ge=0, description="Non-standard (vLLM style); 0 disables")
    seed: int | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    repetition_penalty: float | None = Field(None, gt=0, description="Non-standard (HF style)")
    stop: str | list[str] | None = None
    n: int | None = Field(None, description="Only 1 is supported")
    stream: bool = False
    stream_options: StreamOptions | None = None
    model: str | None = Field(None, description="Any name (or none): the served model answers and responses carry its name")


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    reasoning_format: ReasoningFormat | None = Field(
        None, description="deepseek: reasoning in reasoning_content; think_tags: inline <think>...</think> in content")


class CompletionRequest(_Sampling):
    prompt: str | list[str] = Field(description="A string (or a list holding one string)")
    max_tokens: int | None = Field(None, ge=1)


# ---------------------------------------------------------------- Ollama

class OllamaOptions(_Request):
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, ge=0, le=1)
    top_k: int | None = Field(None, ge=0)
    seed: int | None = None
    num_predict: int | None = Field(None, description="-1 or absent: the server default")
    stop: list[str] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repeat_penalty: float | None = Field(None, gt=0)


class OllamaMessage(_Request):
    role: Role
    content: str = ""
    thinking: str | None = None
    images: list[str] | None = None


class _OllamaGenerate(_Request):
    model: str = Field(min_length=1, description="Any name: the served model answers and replies carry its name")
    stream: bool = True
    options: OllamaOptions | None = None
    think: bool | str | None = Field(None, description="true/absent: reasoning in `thinking`; false: inline <think> tags")
    format: str | dict | None = None
    keep_alive: int | float | str | None = None


class OllamaChatRequest(_OllamaGenerate):
    messages: list[OllamaMessage] = Field(default_factory=list)


class OllamaGenerateRequest(_OllamaGenerate):
    prompt: str = ""
    system: str | None = None
    raw: bool = False
    images: list[str] | None = None


class OllamaShowRequest(_Request):
    model: str | None = None
    name: str | None = Field(None, description="Older clients send `name` instead of `model`")


ALL_REQUEST_MODELS = (ChatCompletionRequest, CompletionRequest, OllamaChatRequest,
                      OllamaGenerateRequest, OllamaShowRequest)
