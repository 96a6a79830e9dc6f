"""Pydantic request models for the OpenAI and Ollama routes.

Strict types (a string where a number belongs is rejected). Unknown fields are ignored: clients such
as LangChain, Dify and Open-WebUI send many harmless ones (user, metadata, store, service_tier,
parallel_tool_calls, stream_options extras, reasoning_effort, which R1 has no control for). Fields that
would change the answer but are not implemented are declared below (REFUSED) and answered with a 400
naming them. Requests are validated straight from the raw body with `model_validate_json`, so
malformed JSON is reported the same way.
"""

from __future__ import annotations

from typing import Annotated, Any, Callable, Literal

from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, ValidationInfo, WithJsonSchema,
                      field_validator, model_validator)

from ktransformers.server.reasoning_format import ReasoningFormat
from ktransformers.util.logprobs import MAX_TOP_LOGPROBS
from ktransformers.server.tool_schemas import OllamaTool, OllamaToolCall, ResponseFormat, Tool, ToolCall, ToolChoice
from ktransformers.util.sampling import GREEDY_BELOW

Role = Literal["system", "developer", "user", "assistant", "tool"]

# Every limit the server enforces is stated here, so /openapi.json tells clients (and fuzzers) the truth.
NonEmpty = Annotated[str, Field(min_length=1)]
# Stop strings are matched after every token on the model's worker: bounded in number and length.
StopString = Annotated[str, Field(min_length=1, max_length=1024)]
StopStrings = StopString | Annotated[list[StopString], Field(max_length=16)]
Seed = Annotated[int, Field(ge=-(2 ** 63), le=2 ** 63 - 1, description="A signed 64-bit integer")]
TEMPERATURE_NOTE = f"0 (or below {GREEDY_BELOW:g}) decodes greedily"
LIMIT_NOTE = "Absent: the server's --max_new_tokens if set, else the reply may fill the context window"
LOGPROBS_NOTE = ("Log-probability of each generated token (reasoning included): the model's own log-softmax, "
                 "before penalties, temperature and top-k/top-p/min-p")


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class _Logprobs(_Request):
    """OpenAI chat's and Ollama's switches (logprobs first: top_logprobs' check reads it)."""

    logprobs: bool | None = Field(None, description=LOGPROBS_NOTE)
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS,
                                     description="The most likely tokens at each step, with theirs; needs logprobs: true")

    @field_validator("top_logprobs")
    @classmethod
    def _needs_logprobs(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value and not info.data.get("logprobs"):
            raise ValueError("needs logprobs: true")
        return value

    @property
    def wanted_logprobs(self) -> int | None:
        """None: none asked for; n: each token's log-probability and n alternatives."""
        return (self.top_logprobs or 0) if self.logprobs else None


# ---------------------------------------------------------------- refused fields (the one list)

def _refused(why: str, empty: dict | None = None, asks_nothing: Callable[[Any], bool] = lambda v: False):
    """A field this server does not implement: null (or the `empty` value, which asks for nothing) passes,
    anything else is a 400 naming the field and `why`."""
    def check(value):
        if value is not None and not asks_nothing(value):
            raise ValueError(f"not supported: {why}")
        return value
    accepted = [empty, {"type": "null"}] if empty else [{"type": "null"}]
    return Annotated[Any, AfterValidator(check),
                     WithJsonSchema({"anyOf": accepted, "description": f"Not supported: {why}"})]


_EMPTY_OBJECT = ({"type": "object", "maxProperties": 0}, lambda v: v == {})
_EMPTY_LIST = ({"type": "array", "maxItems": 0}, lambda v: v == [])
_EMPTY_TEXT = ({"type": "string", "maxLength": 0}, lambda v: v == "")
LogitBias = _refused("token biases are not implemented", *_EMPTY_OBJECT)
TextOnly = _refused("this model reads and writes text only")
Modalities = _refused("this model answers in text only", {"type": "array", "items": {"const": "text"}},
                      lambda v: isinstance(v, list) and all(m == "text" for m in v))
Prediction = _refused("predicted outputs are not implemented")
WebSearch = _refused("this server cannot search the web")
Functions = _refused("the legacy function-calling API: use tools", *_EMPTY_LIST)
FunctionCall = _refused("the legacy function-calling API: use tool_choice", {"const": "none"}, lambda v: v == "none")
Suffix = _refused("insertion (text after the completion) is not implemented", *_EMPTY_TEXT)
Echo = _refused("echoing the prompt is not implemented", {"const": False}, lambda v: v is False)
Template = _refused("the model's own chat template is used", *_EMPTY_TEXT)
OllamaContext = _refused("the token context of an earlier reply is not kept: send the conversation to /api/chat",
                         *_EMPTY_LIST)


class _RefusedChat(_Request):
    logit_bias: LogitBias = None
    audio: TextOnly = None
    modalities: Modalities = None
    prediction: Prediction = None
    web_search_options: WebSearch = None
    functions: Functions = None
    function_call: FunctionCall = None


class _RefusedCompletion(_Request):
    logit_bias: LogitBias = None
    suffix: Suffix = None
    echo: Echo = None
    best_of: int | None = Field(None, ge=1, le=1, description="Only 1: one completion is generated")


class _RefusedOllamaGenerate(_Request):
    suffix: Suffix = None
    template: Template = None
    context: OllamaContext = None


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
    min_p: float | None = Field(None, ge=0, le=1, description="Non-standard (vLLM style); 0 disables")
    seed: Seed | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    repetition_penalty: float | None = Field(None, gt=0, description="Non-standard (HF style)")
    stop: StopStrings | None = Field(None, description="Non-empty strings")
    n: int | None = Field(None, ge=1, le=1, description="Only 1 is supported")
    stream: bool = False
    stream_options: StreamOptions | None = None
    model: str | None = Field(None, description="Any name (or none): the served model answers and responses carry its name")


class ChatCompletionRequest(_Sampling, _Logprobs, _RefusedChat):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, description=LIMIT_NOTE)
    max_completion_tokens: int | None = Field(None, ge=1, description=LIMIT_NOTE)
    reasoning_format: ReasoningFormat | None = Field(
        None, description="deepseek/auto: reasoning in reasoning_content; think_tags/none: inline <think>...</think> "
                          "in content; deepseek-legacy: both (llama.cpp's values)")
    tools: list[Tool] | None = Field(None, max_length=128)
    tool_choice: ToolChoice | None = Field(None, description="Default: auto with tools, none without")
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None


class CompletionRequest(_Sampling, _RefusedCompletion):
    prompt: NonEmpty | Annotated[list[NonEmpty], Field(min_length=1, max_length=1)] = Field(
        description="A non-empty string (or a list holding one); batched prompts are not supported")
    max_tokens: int | None = Field(None, ge=1, description=LIMIT_NOTE)
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS,
                                 description=f"{LOGPROBS_NOTE}; the number is how many alternatives per token")


# ---------------------------------------------------------------- Ollama

class OllamaOptions(_Request):
    temperature: float | None = Field(None, ge=0, description=TEMPERATURE_NOTE)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    min_p: float | None = Field(None, ge=0, le=1)
    seed: Seed | None = None
    num_predict: int | None = Field(None, description="-1 or absent: the server's cap, if any, else the rest of the context")
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


class _OllamaGenerate(_Logprobs):
    model: str = Field(min_length=1, description="Any name: the served model answers and replies carry its name")
    stream: bool = True
    options: OllamaOptions | None = None
    think: bool | str | None = Field(None, description="true/absent: reasoning in `thinking`; false: inline <think> tags")
    format: str | dict | None = Field(None, description='"json" or a JSON Schema: the answer is JSON valid against it')
    keep_alive: int | float | str | None = None


class OllamaChatRequest(_OllamaGenerate):
    messages: list[OllamaMessage] = Field(default_factory=list)
    tools: list[OllamaTool] | None = Field(None, max_length=128)


class OllamaGenerateRequest(_OllamaGenerate, _RefusedOllamaGenerate):
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
