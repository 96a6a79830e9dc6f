"""Request models for tool calling and structured output (OpenAI and Ollama shapes).

Only the shape is checked here; server/output_rules.py checks what needs more than one field
(a tool_choice naming a listed function, parameter schemas that are valid JSON Schemas).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

FUNCTION_NAME = r"^[a-zA-Z0-9_-]{1,64}$"   # OpenAI's rule for function names


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class FunctionDefinition(_Request):
    name: str = Field(pattern=FUNCTION_NAME, description="Letters, digits, _ and -, at most 64")
    description: str | None = None
    parameters: dict[str, Any] | None = Field(
        None, description="A JSON Schema for the arguments; absent: the function takes none")
    strict: bool | None = Field(None, description="Accepted; arguments always follow the schema exactly")


class Tool(_Request):
    type: Literal["function"] = Field(description="Only function tools")
    function: FunctionDefinition


class FunctionName(_Request):
    name: str


class NamedToolChoice(_Request):
    type: Literal["function"]
    function: FunctionName


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class CalledFunction(_Request):
    name: str
    arguments: str | dict[str, Any] = Field(description="The JSON arguments (a string, as OpenAI sends them)")


class ToolCall(_Request):
    """A call an earlier assistant message made (history)."""

    id: str | None = None
    type: Literal["function"] = "function"
    function: CalledFunction


class JSONSchemaFormat(_Request):
    model_config = ConfigDict(strict=True, extra="ignore", populate_by_name=True)

    name: str = Field(pattern=FUNCTION_NAME)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema", description="Absent: any JSON object")
    strict: bool | None = None


class ResponseFormat(_Request):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = Field(None, description="Required with type json_schema")


# ---------------------------------------------------------------- Ollama

class OllamaFunction(_Request):
    name: str = Field(pattern=FUNCTION_NAME)
    description: str | None = None
    parameters: dict[str, Any] | None = None


class OllamaTool(_Request):
    type: Literal["function"] = "function"
    function: OllamaFunction


class OllamaCalledFunction(_Request):
    name: str
    arguments: dict[str, Any] = Field(default_factory=dict)


class OllamaToolCall(_Request):
    function: OllamaCalledFunction
