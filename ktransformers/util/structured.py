"""From what a request asks of the answer (tools, tool_choice, a JSON schema) to a prompt, a
constraint for the sampler and a tool-call parser, for one loaded model.

    structured = StructuredOutput(tokenizer, vocab_size, eos_ids)        # once per model
    messages, tools = structured.prompt_messages(messages, rules)       # request thread
    plan = structured.plan(rules, prompt_in_reasoning)                  # request thread: builds grammars
    prefill_and_generate(..., constraint=plan.constraint, tool_calls=plan.parser())     # worker, once

tool_choice "auto" leaves the model free until it emits the calls-begin token, then holds it to
the call format and the arguments' schemas; "required" or a named function constrains from the
first token (after any reasoning); "none" bans the calls-begin token. A JSON schema constrains the
whole answer (with "auto" tools: a JSON answer or calls).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from ktransformers.util.constrained import (BannedTokens, GrammarConstraint, GrammarError, Grammars,
                                            TriggeredConstraint)
from ktransformers.util.grammar import Reasoning, calls_after_begin_grammar, json_grammar, tool_calls_grammar
from ktransformers.util.reasoning import THINK_CLOSE, THINK_OPEN
from ktransformers.util.tool_calls import ToolCallParser
from ktransformers.util.tool_format import ToolCallFormat


class FieldError(ValueError):
    """The request's `param` cannot be served as asked (the server answers 400 naming it)."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


@dataclass
class OutputRules:
    """What the request asks of the answer's shape (already validated by the server's schemas)."""

    tools: list[dict] = field(default_factory=list)   # OpenAI function tools
    tool_choice: str | dict = "auto"                  # auto | none | required | {"function": {"name": ...}}
    parallel_tool_calls: bool = True
    json_schema: dict | None = None                   # the answer is JSON valid against it
    json_param: str = "response_format"               # the request field that asked for JSON

    @property
    def calls_allowed(self) -> bool:
        return bool(self.tools) and self.tool_choice != "none"

    def called_tools(self) -> list[dict]:
        """The tools a call may use: all of them, or the one tool_choice names."""
        if isinstance(self.tool_choice, dict):
            name = self.tool_choice["function"]["name"]
            return [t for t in self.tools if t["function"]["name"] == name]
        return self.tools


@dataclass
class Plan:
    """One request's constraint (its grammar already built) and how to make its tool-call parser."""

    constraint: object = None
    _make_parser: Callable | None = None

    def parser(self):
        return self._make_parser() if self._make_parser else None


class StructuredOutput:
    def __init__(self, tokenizer, vocab_size: int, eos_ids):
        self.tokenizer, self.vocab_size, self._eos_ids = tokenizer, vocab_size, set(eos_ids)
        self.format = ToolCallFormat.from_tokenizer(tokenizer)
        vocab = tokenizer.get_vocab()
        # a reasoning model may think before the constrained part (needs <think> and </think> tokens)
        self._think = (vocab[THINK_OPEN], vocab[THINK_CLOSE]) if THINK_OPEN in vocab and THINK_CLOSE in vocab else None
        self._grammars: Grammars | None = None
        self._lock = threading.Lock()

    @property
    def grammars(self) -> Grammars:
        """Built on first use: reading a 129k-token vocabulary takes about two seconds."""
        with self._lock:
            if self._grammars is None:
                self._grammars = Grammars(self.tokenizer, self.vocab_size, self._eos_ids)
            return self._grammars

    def prompt_messages(self, messages: list[dict], rules: OutputRules | None) -> tuple[list[dict], list | None]:
        """(messages, tools for the template): the tools described in a system message when the
        template does not render `tools` itself. Refuses tools this model's template cannot express."""
        if self.format is None:
            for i, message in enumerate(messages):
                if message.get("tool_calls") or message["role"] == "tool":
                    raise FieldError(f"messages[{i}]", f"messages[{i}]: this model's chat template cannot "
                                                       "render tool calls or their results")
        if rules is None or not rules.calls_allowed:   # tool_choice "none": the model is not told of tools
            return messages, None
        if self.format is None:
            raise FieldError("tools", "this model's chat template cannot render tool calls (it does not write "
                                      "DeepSeek's tool-call markers), so it cannot be given tools")
        if self.format.renders_tools:
            return messages, rules.tools
        return self.format.with_tools(messages, rules.tools, rules.tool_choice), None

    def plan(self, rules: OutputRules | None, prompt_in_reasoning: bool = False) -> Plan | None:
        """Build what `rules` need (`prompt_in_reasoning`: the prompt ends inside a <think> block);
        FieldError names the field the grammar library refused."""
        if rules is None or (not rules.tools and rules.json_schema is None):
            return None
        reasoning = Reasoning(*self._think, started=prompt_in_reasoning) if self._think else None
        fmt, vocab = self.format, self.vocab_size
        if not rules.calls_allowed:
            if rules.json_schema is not None:
                matcher = self._matcher(rules.json_param, json_grammar, rules.json_schema, reasoning)
                return Plan(GrammarConstraint(matcher, vocab))
            return Plan(BannedTokens([fmt.ids["calls_begin"]])) if fmt is not None else None
        if fmt is None:
            raise FieldError("tools", "this model's chat template cannot render tool calls")
        parser = lambda: ToolCallParser(self.tokenizer, fmt)  # noqa: E731
        # a named function is called once; "required" and "auto" may call several when parallel
        tools = rules.called_tools()
        parallel = rules.parallel_tool_calls and not isinstance(rules.tool_choice, dict)
        if rules.json_schema is not None:   # built alone first, so a failure names the right field
            self._matcher(rules.json_param, json_grammar, rules.json_schema, reasoning)
        if rules.tool_choice == "auto" and rules.json_schema is None:
            matcher = self._matcher("tools", calls_after_begin_grammar, fmt, tools, parallel)
            return Plan(TriggeredConstraint(fmt.ids["calls_begin"], matcher, vocab), parser)
        matcher = self._matcher("tools", tool_calls_grammar, fmt, tools, reasoning, parallel, rules.json_schema,
                                rules.tool_choice == "auto")
        return Plan(GrammarConstraint(matcher, vocab), parser)

    def _matcher(self, param: str, build, *args):
        """A matcher for the grammar `build(*args)`; failures name `param`."""
        try:
            return self.grammars.matcher(build(*args))
        except GrammarError as exc:
            raise FieldError(param, f"{param}: cannot constrain the answer to it (llguidance {exc})") from None
