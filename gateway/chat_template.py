"""A model's chat template rendered the way transformers' `apply_chat_template` renders it, so that
the prompt the gateway builds from `messages` is the text (and, encoded without adding special
tokens, the token ids) the model was trained on.

The environment: Jinja's immutable sandbox (a template reads its inputs, never attributes outside
them, and cannot change them), `trim_blocks` and `lstrip_blocks`, loop controls (`break`,
`continue`), a `{% generation %}` block that renders its body (transformers uses it to mark
assistant tokens), `tojson` without HTML escaping, and the globals `raise_exception(message)` and
`strftime_now(format)`. The render gets `messages`, `tools` and `documents` (None here),
`add_generation_prompt`, the special tokens' strings (`bos_token`, `eos_token`) and the request's
`chat_template_kwargs`, which win over the special tokens as in transformers.

`continue_final_message`: the final message is left open for the model to continue. A marker is
appended to its text before rendering and the rendered text is cut where the marker starts (and
right-stripped when the template trimmed the marker's trailing space), as transformers does.

Errors: a template that does not compile is a ChatTemplateSyntaxError (the operator's to fix; the
gateway says so at start or in the route's answer); anything raised while rendering particular
messages (`raise_exception`, a bad role order, an undefined name used wrongly) is the request's
problem: InvalidRequestError (400) with the template's message.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension
from jinja2.parser import Parser
from jinja2.sandbox import ImmutableSandboxedEnvironment

from gateway.errors import InvalidRequestError

# names the gateway passes itself: chat_template_kwargs may not set them
RESERVED = frozenset({"messages", "tools", "documents", "add_generation_prompt"})
_CONTINUE_MARK = "<<tandem-continue-final-message>> "  # ends in a space, as transformers' tag does


class ChatTemplateSyntaxError(ValueError):
    """The template itself is broken (it does not compile)."""


class _GenerationBlock(Extension):
    """`{% generation %}...{% endgeneration %}` renders its body unchanged."""

    tags = {"generation"}

    def parse(self, parser: Parser) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Any) -> str:
        return str(caller())


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: Any = None,
    sort_keys: bool = False,
) -> str:
    # Jinja's own tojson escapes <, >, & and ' for HTML; a prompt wants the JSON as it is
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, "jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


@dataclass(frozen=True)
class ChatTemplate:
    """A compiled chat template with the special tokens' strings it is rendered with."""

    source: str
    special_tokens: Mapping[str, str] = field(default_factory=dict)  # bos_token, eos_token, ...
    origin: str = "the model bundle"  # where it came from, for messages
    _compiled: jinja2.Template | None = field(default=None, repr=False, compare=False)

    @classmethod
    def compile(
        cls,
        source: str,
        special_tokens: Mapping[str, str | None] | None = None,
        origin: str = "the model bundle",
    ) -> ChatTemplate:
        try:
            compiled = _environment().from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise ChatTemplateSyntaxError(
                f"the chat template from {origin} does not compile: {e} (line {e.lineno})"
            ) from None
        tokens = {k: v for k, v in (special_tokens or {}).items() if isinstance(v, str)}
        return cls(source, tokens, origin, compiled)

    def render(
        self,
        messages: list[dict[str, Any]],
        *,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        kwargs: Mapping[str, Any] | None = None,
    ) -> str:
        """The prompt text for these messages (dicts with role and string content)."""
        assert self._compiled is not None
        extra = dict(kwargs or {})
        reserved = sorted(RESERVED & set(extra))
        if reserved:
            raise InvalidRequestError(
                f"chat_template_kwargs may not set {reserved}: they are request fields of their own",
                param="chat_template_kwargs",
            )
        if continue_final_message:
            messages = [*messages[:-1], {**messages[-1], "content": messages[-1]["content"] + _CONTINUE_MARK}]
        values = {**self.special_tokens, **extra}
        values |= {"messages": messages, "tools": None, "documents": None}
        values["add_generation_prompt"] = add_generation_prompt
        try:
            text = self._compiled.render(**values)
        except jinja2.TemplateError as e:  # raise_exception, undefined names, sandbox refusals
            raise InvalidRequestError(
                f"the chat template refused these messages: {e}", param="messages"
            ) from None
        except (
            TypeError,
            ValueError,
            KeyError,
            IndexError,
            AttributeError,
            ArithmeticError,
            RecursionError,
        ) as e:
            raise InvalidRequestError(
                f"the chat template failed on these messages: {type(e).__name__}: {e}", param="messages"
            ) from None
        return _cut_at_mark(text, messages[-1]["content"]) if continue_final_message else text


def _cut_at_mark(text: str, final: str) -> str:
    """The rendered text up to the end of the final message (its marker removed)."""
    mark = _CONTINUE_MARK.strip()
    at = text.rfind(mark)
    if at < 0 or final[: -len(_CONTINUE_MARK)].strip() not in text:
        raise InvalidRequestError(
            "continue_final_message: the final message does not appear in the rendered prompt (this "
            "model's chat template changes or drops it), so it cannot be continued",
            param="continue_final_message",
        )
    if text.startswith(_CONTINUE_MARK, at):
        return text[:at]
    return text[:at].rstrip()  # the template trimmed the message: so are its trailing spaces
