"""Chat messages -> prompt token ids, through the tokenizer's own chat template.

DeepSeek-R1 expects earlier assistant turns without their reasoning; its template drops
everything up to "</think>", and we do the same before templating so a template without
that rule gets the same history. `force_think` ends the prompt with "<think>\\n" so the
model reasons first (R1 otherwise sometimes skips thinking).
"""

from ktransformers.util.reasoning import THINK_CLOSE, THINK_OPEN

ROLES = ("system", "user", "assistant", "tool")
FORCED_THINK = THINK_OPEN + "\n"


def strip_reasoning(content: str) -> str:
    """The answer part of an assistant turn (R1 history rule)."""
    return content.split(THINK_CLOSE)[-1]


def _message_text(content, where: str) -> str:
    """Message content as a string; OpenAI-style lists of text parts are joined."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not (isinstance(part, dict) and part.get("type") == "text"
                    and isinstance(part.get("text"), str)):
                raise ValueError(f"{where}.content[{j}] is invalid: only text parts "
                                 f"({{'type': 'text', 'text': ...}}) are supported")
            texts.append(part["text"])
        return "".join(texts)
    raise ValueError(f"{where}.content must be a string or a list of text parts, "
                     f"got {type(content).__name__}")


def normalize_messages(messages) -> list[dict]:
    """Validate chat messages; content becomes a string, other keys (tool_calls...) pass."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError("messages must be a non-empty list of {'role', 'content'} objects")
    normalized = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise ValueError(f"{where} must be an object with 'role' and 'content', "
                             f"got {type(message).__name__}")
        role = message.get("role")
        if role not in ROLES:
            raise ValueError(f"{where}.role={role!r} is invalid: must be one of {list(ROLES)}")
        content = message.get("content")
        calls = role == "assistant" and bool(message.get("tool_calls"))
        if content is None and not calls:
            raise ValueError(f"{where}.content is missing")
        # DeepSeek's own templates render an assistant's tool calls only when its content is None
        text = None if content is None else _message_text(content, where)
        if role == "assistant" and text is not None:
            text = strip_reasoning(text)
        normalized.append({**message, "content": None if calls and not text else text})
    return normalized


def build_prompt_text(tokenizer, messages, force_think: bool = False, tools=None) -> str:
    """`tools` go to templates that render them (util/tool_format.py decides which do)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the tokenizer has no chat_template (tokenizer_config.json "
                         "'chat_template'); cannot build a chat prompt")
    text = tokenizer.apply_chat_template(normalize_messages(messages), tools=tools, tokenize=False,
                                         add_generation_prompt=True)
    if force_think and not text.endswith(FORCED_THINK):
        text += FORCED_THINK
    return text


def build_prompt_ids(tokenizer, messages, force_think: bool = False, tools=None) -> list[int]:
    """Prompt ids for `messages`, ending with the assistant generation prompt.

    The template already writes the special tokens (begin-of-sentence), so none are added.
    """
    text = build_prompt_text(tokenizer, messages, force_think, tools)
    return tokenizer.encode(text, add_special_tokens=False)
