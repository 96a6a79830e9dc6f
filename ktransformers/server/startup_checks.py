"""Checks the server CLI runs before the slow model load, so bad input fails in a second.

Each failure is a `StartupError` whose message names the path (or option) and the reason;
chat_openai.py prints it as one `error: ...` line.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from gguf import Keys
from jinja2 import TemplateSyntaxError
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ktransformers.gguf import GGUFError, GGUFModel, open_gguf
from ktransformers.models.config import config_from_gguf, load_hf_config

# DeepSeek's Hugging Face repos ship the fast tokenizer; AutoTokenizer needs it (no sentencepiece).
TOKENIZER_FILE = "tokenizer.json"


class StartupError(ValueError):
    """The server cannot start with these arguments; the message says which and why."""


def _whole_number(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= {minimum}, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    return _whole_number(text, 1)


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    return _whole_number(text, 0)


def port_number(text: str) -> int:
    """argparse type for --port: an integer in 1..65535 (waitress would wrap 99999 to another port)."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number 1..65535, got {text!r}") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port must be in 1..65535, got {port}")
    return port


def check_model_files(gguf_path: str, model_path: str | None) -> GGUFModel:
    """Open the GGUF (a memory map: cheap) and check that config and tokenizer can be found.

    Returns the opened GGUF. Tensor data is not read; the loader reports what only it can see.
    """
    try:
        model = open_gguf(gguf_path)
    except GGUFError as err:
        raise StartupError(f"--gguf_path {err}") from None
    source = ", ".join(str(f) for f in model.files)
    config_from_gguf(model.metadata, model.tensors.keys(), source)   # raises ValueError naming the file
    if model_path is not None:
        _check_model_dir(Path(model_path))
        template, where = _dir_chat_template(Path(model_path))
    elif not (Keys.Tokenizer.HF_JSON in model.metadata or Keys.Tokenizer.LIST in model.metadata):
        raise StartupError(f"--gguf_path {source}: holds no tokenizer (no {Keys.Tokenizer.LIST} metadata); "
                           f"pass --model_path DIR with the model's {TOKENIZER_FILE}")
    else:
        template, where = model.metadata.get(Keys.Tokenizer.CHAT_TEMPLATE), f"--gguf_path {source}"
    check_template_syntax(template, where)
    return model


def _dir_chat_template(path: Path) -> tuple[str | None, str]:
    """The chat template a model directory gives the tokenizer: chat_template.jinja, else tokenizer_config.json's."""
    jinja = path / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8", errors="replace"), f"--model_path {jinja}"
    config = path / "tokenizer_config.json"
    try:
        template = json.loads(config.read_text(encoding="utf-8")).get("chat_template")
    except (OSError, ValueError, AttributeError):
        return None, str(config)   # the tokenizer load reports a missing or broken file
    if isinstance(template, list):   # named templates: the default one is used for chat
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"),
                        None)
    return (template if isinstance(template, str) else None), f"--model_path {config}"


def check_template_syntax(template: str | None, where: str) -> None:
    """Compile the chat template as transformers does (sandboxed jinja2), in milliseconds, before the load."""
    if not template:
        return   # no template: chat requests get a clear error, raw completions still work
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    try:
        env.parse(template)
    except TemplateSyntaxError as err:
        if "'generation'" in str(err):   # transformers' own {% generation %} tag: fine there
            return
        raise StartupError(f"{where}: the chat template does not compile (TemplateSyntaxError: {err.message} "
                           f"at template line {err.lineno})") from None


def _check_model_dir(path: Path) -> None:
    if not path.exists():
        raise StartupError(f"--model_path {path}: no such directory")
    if not path.is_dir():
        raise StartupError(f"--model_path {path}: not a directory (it must hold config.json and {TOKENIZER_FILE})")
    load_hf_config(path)   # raises ValueError naming config.json and the reason
    if not (path / TOKENIZER_FILE).is_file():
        raise StartupError(f"--model_path {path}: no {TOKENIZER_FILE} (copy the tokenizer files of the Hugging "
                           "Face repo there, or leave --model_path out to use the tokenizer in the GGUF)")


SAMPLE_CONVERSATION = [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": "Hi"},
                       {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "2+2?"}]


def check_chat_template(tokenizer, source: str, force_think: bool = False) -> None:
    """Render a sample conversation now: a template that does not compile or render would fail every chat."""
    from ktransformers.util.chat import build_prompt_ids

    try:
        build_prompt_ids(tokenizer, SAMPLE_CONVERSATION, force_think)
    except Exception as err:   # jinja2 syntax/undefined errors, the template's own raise_exception, ...
        detail = " ".join(str(err).split()) or type(err).__name__
        raise StartupError(f"{source}: the chat template cannot render a sample conversation "
                           f"({type(err).__name__}: {detail})") from None
