"""Server settings: everything the routes need to know that is not the model itself."""

from __future__ import annotations

from dataclasses import dataclass, field

from ktransformers.server.reasoning_format import REASONING_FORMATS


@dataclass
class ServerSettings:
    model_name: str = "DeepSeek-R1"
    api_key: str | None = None
    max_new_tokens: int | None = None   # operator's cap for requests naming none; None: the rest of the context
    max_context: int = 4096             # reported by /api/show and /v1/models
    reasoning_format: str = "deepseek"  # see reasoning_format.py: deepseek (own field), think_tags (inline), ...
    force_think: bool = False
    retry_after_s: int = 5              # Retry-After sent with 503 when the queue is full
    stream_ping_s: float = 10.0         # SSE comment sent while the model is silent (long prefills)
    model_family: str = "deepseek2"
    parameter_size: str = ""
    quantization_level: str = ""
    model_size_bytes: int = 0
    created: int = field(default=0)     # unix time the model was loaded
    max_token_chars: int = 64           # the longest token's text: prompts over max_context * this are refused unread
    cors_origins: tuple[str, ...] = ()  # browser origins allowed to call the API ("*" = any); none: no CORS headers
    allowed_hosts: tuple[str, ...] = () # Host header names accepted besides loopback ones (see host_guard)
    loopback_only: bool = True          # bound to a loopback address: refuse foreign Host headers (DNS rebinding)
    supports_tools: bool = False        # the chat template renders tool calls (Ollama's "tools" capability)

    def __post_init__(self) -> None:
        if self.reasoning_format not in REASONING_FORMATS:
            raise ValueError(f"reasoning_format must be one of {REASONING_FORMATS}, got {self.reasoning_format!r}")
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("api_key is empty: give a real key, or none to leave the server open")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")

    @property
    def max_prompt_chars(self) -> int:
        return self.max_context * self.max_token_chars

    def reply_limit(self, requested: int | None) -> int:
        """Tokens a reply may take: the request's limit, else the operator's cap, else the whole context
        (generation stops where prompt + reply fill max_context, as OpenAI and Ollama have no default cap)."""
        return requested or self.max_new_tokens or self.max_context

    def accepts_model(self, name: str | None) -> bool:
        """True when `name` designates the served model (Ollama clients append ':latest')."""
        if not name:
            return True
        wanted = name.strip().lower()
        served = self.model_name.lower()
        return wanted in (served, f"{served}:latest")
