"""The wire types of /v1/chat/completions (OpenAI's chat API with vLLM's extensions) and how a
request becomes a prompt: messages checked (roles system, user and assistant; content a string or
a list of text parts, joined with newlines as vLLM's "string" content format does), rendered with
the model's chat template (gateway.chat_template) and encoded without adding special tokens unless
`add_special_tokens` asks (the template writes them).
"""

from __future__ import annotations

from typing import Any

import msgspec

from functions import contract
from gateway.errors import InvalidRequestError
from gateway.openai_common import SamplingFields, refuse_set
from gateway.params import choices_from
from gateway.sequence import SamplingParams
from gateway.service import Gateway

ROLES = ("system", "user", "assistant")
TOOLS_WHY = ": this server generates text only (no tool calling)"


class ContentPart(msgspec.Struct):
    """One part of a message's content; only text parts are supported."""

    type: str
    text: str | None = None


class ChatMessage(msgspec.Struct):
    """Fields other than these (OpenAI's `refusal`, `annotations`, ...) are ignored."""

    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None  # refused when not empty


class ChatCompletionRequest(SamplingFields, kw_only=True):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None  # OpenAI's newer name for max_tokens; wins when both are set
    logprobs: bool = False
    top_logprobs: int | None = None
    # vLLM's extensions
    echo: bool = False  # the answer starts with the last message's content when that is the assistant's
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    return_tokens_as_token_ids: bool = False  # logprobs' tokens as "token_id:{id}"
    # known to OpenAI's API but not supported here: refused with a 400 that names them when set
    tools: list[dict[str, Any]] | None = None
    functions: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    function_call: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    chat_template: str | None = None  # vLLM takes one per request; here only --chat-template

    def to_sampling_params(self, gw: Gateway) -> tuple[SamplingParams, int]:
        """The sampling parameters and the choices per request; refuses what is not supported."""
        gw.check_model(self.model)
        self.refuse_unsupported()
        n, _ = choices_from(self.n, None, self.stream)
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidRequestError("top_logprobs needs logprobs: true", param="top_logprobs")
        top = self.top_logprobs or 0
        if not 0 <= top <= contract.TOP_LOGPROBS_MAX:
            raise InvalidRequestError(
                f"top_logprobs must be between 0 and {contract.TOP_LOGPROBS_MAX}, got {top}",
                param="top_logprobs",
            )
        if self.continue_final_message and self.add_generation_prompt:
            raise InvalidRequestError(
                "continue_final_message continues the last message, add_generation_prompt starts a new "
                "one: set add_generation_prompt to false to continue",
                param="continue_final_message",
            )
        if self.max_completion_tokens is not None:
            max_tokens = self.max_completion_tokens
        else:
            max_tokens = gw.cfg.default_max_tokens if self.max_tokens is None else self.max_tokens
        return self.sampling(max_tokens, logprobs=self.logprobs, top_logprobs=top), n

    def refuse_unsupported(self) -> None:
        refuse_set(self, ["tools", "functions", "function_call"], TOOLS_WHY)
        if self.tool_choice not in (None, "none", "auto"):
            raise InvalidRequestError(f"tool_choice is not supported{TOOLS_WHY}", param="tool_choice")
        kind = (self.response_format or {}).get("type", "text")
        if kind != "text":
            raise InvalidRequestError(
                f"response_format {kind!r} is not supported: only text (no structured output)",
                param="response_format",
            )
        refuse_set(self, ["chat_template"], " per request: start the gateway with --chat-template FILE")

    def conversation(self) -> list[dict[str, Any]]:
        """The messages as the template sees them: role, content (a string) and name when given."""
        return template_messages(self.messages)

    def echoed(self) -> str:
        """What `echo` puts in front of the answer: the last message's content, when it is the
        assistant's (the answer continues it), else nothing."""
        last = self.conversation()[-1] if self.echo else None
        return str(last["content"]) if last is not None and last["role"] == "assistant" else ""


def template_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    if not messages:
        raise InvalidRequestError("messages must not be empty: send at least one message", param="messages")
    out = []
    for i, m in enumerate(messages):
        if m.role not in ROLES:
            raise InvalidRequestError(
                f"messages[{i}].role must be one of {', '.join(ROLES)}, got {m.role!r}", param="messages"
            )
        if m.tool_calls:
            raise InvalidRequestError(
                f"messages[{i}].tool_calls is not supported{TOOLS_WHY}", param="messages"
            )
        message: dict[str, Any] = {"role": m.role, "content": _text(m, i)}
        if m.name is not None:
            message["name"] = m.name
        out.append(message)
    return out


def _text(m: ChatMessage, i: int) -> str:
    if m.content is None:
        if m.role == "assistant":
            return ""
        raise InvalidRequestError(
            f"messages[{i}].content is missing: a {m.role} message needs content", param="messages"
        )
    if isinstance(m.content, str):
        return m.content
    texts = []
    for j, part in enumerate(m.content):
        if part.type != "text" or part.text is None:
            raise InvalidRequestError(
                f"messages[{i}].content[{j}] is a {part.type!r} part; only text parts "
                '({"type": "text", "text": ...}) are supported',
                param="messages",
            )
        texts.append(part.text)
    return "\n".join(texts)


async def chat_prompt(gw: Gateway, data: ChatCompletionRequest) -> list[int]:
    """The request's prompt ids: its messages rendered with the chat template, then encoded."""
    template = gw.chat()
    text = template.render(
        data.conversation(),
        add_generation_prompt=data.add_generation_prompt,
        continue_final_message=data.continue_final_message,
        kwargs=data.chat_template_kwargs,
    )
    if not text:
        raise InvalidRequestError(
            "the chat template rendered these messages as an empty prompt", param="messages"
        )
    (ids,) = await gw.encode([text], add_special_tokens=data.add_special_tokens)
    return ids
