"""Pydantic request models for the OpenAI and Ollama routes.

Strict types (a string where a number belongs is rejected), unknown fields ignored (clients
such as LangChain, Dify and Open-WebUI send many we do not use).  Requests are validated
straight from the raw body with `model_validate_json`, so malformed JSON is reported the same way.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ktransformers.server.tool_schemas import OllamaTool, OllamaToolCall, ResponseFormat, Tool, ToolCall, ToolChoice
from ktransformers.util.sampling import GREEDY_BELOW

Role = Literal["system", "developer", "user", "assistant", "tool"]
ReasoningFormat = Literal["deepseek", "think_tags"]

# Every limit the server enforces is stated here, so /openapi.json tells clients (and fuzzers) the truth.
NonEmpty = Annotated[str, Field(min_length=1)]
# Stop strings are matched after every token on the model's worker: bounded in number and length.
StopString = Annotated[str, Field(min_length=1, max_length=1024)]
StopStrings = StopString | Annotated[list[StopString], Field(max_length=16)]
Seed = Annotated[int, Field(ge=-(2 ** 63), le=2 ** 63 - 1, description="A signed 64-bit integer")]
TEMPERATURE_NOTE = f"0 (or below {GREEDY_BELOW:g}) decodes greedily"


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


# ---------------------------------------------------------------- OpenAI

class ContentPart(_Request):
    type: Literal["text"] = Field(description="Only text parts: this model reads text only")
    text: str


class ChatMessage(_Request):
    role: Role
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = Field(None, description="An earlier assistant turn's calls")
    tool_call_id: str | None = Field(None, description="On role tool: the call this result answers")


class StreamOptions(_Request):
    include_usage: bool = False


class _Sampling(_Request):
    temperature: float | None = Field(None, ge=0, le=2, description=TEMPERATURE_NOTE)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0, description="Non-standard (vLLM style); 0 disables")
    seed: Seed | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    repetition_penalty: float | None = Field(None, gt=0, description="Non-standard (HF style)")
    stop: StopStrings | None = Field(None, description="Non-empty strings")
    n: int | None = Field(None, ge=1, le=1, description="Only 1 is supported")
    stream: bool = False
    stream_options: StreamOptions | None = None
    model: str | None = Field(None, description="Any name (or none): the served model answers and responses carry its name")


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    reasoning_format: ReasoningFormat | None = Field(
        None, description="deepseek: reasoning in reasoning_content; think_tags: inline <think>...</think> in content")
    tools: list[Tool] | None = Field(None, max_length=128)
    tool_choice: ToolChoice | None = Field(None, description="Default: auto with tools, none without")
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None


class CompletionRequest(_Sampling):
    prompt: NonEmpty | Annotated[list[NonEmpty], Field(min_length=1, max_length=1)] = Field(
        description="A non-empty string (or a list holding one); batched prompts are not supported")
    max_tokens: int | None = Field(None, ge=1)


# ---------------------------------------------------------------- Ollama

class OllamaOptions(_Request):
    temperature: float | None = Field(None, ge=0, description=TEMPERATURE_NOTE)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    seed: Seed | None = None
    num_predict: int | None = Field(None, description="-1 or absent: the server default")
    stop: Annotated[list[StopString], Field(max_length=16)] | None = Field(None, description="Non-empty strings")
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    repeat_penalty: float | None = Field(None, gt=0)


class OllamaMessage(_Request):
    role: Role
    content: str = ""
    thinking: str | None = None
    images: list[str] | None = Field(None, max_length=0, description="This model reads text only: none or empty")
    tool_calls: list[OllamaToolCall] | None = None
    tool_name: str | None = None


class _OllamaGenerate(_Request):
    model: str = Field(min_length=1, description="Any name: the served model answers and replies carry its name")
    stream: bool = True
    options: OllamaOptions | None = None
    think: bool | str | None = Field(None, description="true/absent: reasoning in `thinking`; false: inline <think> tags")
    format: str | dict | None = Field(None, description='"json" or a JSON Schema: the answer is JSON valid against it')
    keep_alive: int | float | str | None = None


class OllamaChatRequest(_OllamaGenerate):
    messages: list[OllamaMessage] = Field(default_factory=list)
    tools: list[OllamaTool] | None = Field(None, max_length=128)


class OllamaGenerateRequest(_OllamaGenerate):
    prompt: str = ""
    system: str | None = None
    raw: bool = False
    images: list[str] | None = Field(None, max_length=0, description="This model reads text only: none or empty")


class OllamaShowRequest(_Request):
    model_config = ConfigDict(json_schema_extra={"anyOf": [
        {"required": [key], "properties": {key: {"type": "string"}}} for key in ("model", "name")]})

    model: NonEmpty | None = None
    name: NonEmpty | None = Field(None, description="Older clients send `name` instead of `model`")

    @model_validator(mode="after")
    def _one_name(self):
        if not (self.model or self.name):
            raise ValueError("model: required (the model to describe)")
        return self


ALL_REQUEST_MODELS = (ChatCompletionRequest, CompletionRequest, OllamaChatRequest,
                      OllamaGenerateRequest, OllamaShowRequest)
