"""Chat templates render as transformers renders them: for each template written for these tests
(tests/gateway/chat_templates: Llama-3, ChatML (Qwen), tandem's default for random-init bundles, Mistral [INST], Gemma (raises on a system
message), Phi-3, Qwen3's reasoning switch, and one that uses namespaces, loop controls, tojson and
whitespace control), the gateway's renderer followed by an encode that adds no special tokens gives
the token ids of transformers' `apply_chat_template(..., add_generation_prompt=True, tokenize=True)`
on the same tokenizer, whose post-processor would add a BOS if asked to. Errors the template raises
are 400s with the template's message."""

from __future__ import annotations

from typing import Any

import pytest
from tokenizers import Tokenizer

from functions.tokenizer_core import TokenizerCore
from gateway.chat_template import ChatTemplate, ChatTemplateSyntaxError
from gateway.errors import InvalidRequestError
from tests.helpers.chat import EOS, TEMPLATES, chat_tokenizer, hf_tokenizer

SYSTEM = {"role": "system", "content": "  You answer briefly.\n"}
TURNS = [
    {"role": "user", "content": "Hello, how are you?"},
    {"role": "assistant", "content": " The quick brown fox. "},
    {"role": "user", "content": "Café <|im_end|> naïve [INST] 東京 🙂"},  # special tokens in text
]
# (template, its BOS string, conversations it renders)
CASES: list[tuple[str, str | None, list[list[dict[str, Any]]]]] = [
    ("llama3", "<|begin_of_text|>", [[SYSTEM, *TURNS], TURNS]),
    ("chatml", None, [[SYSTEM, *TURNS], TURNS[:1]]),
    ("default", None, [[SYSTEM, *TURNS], TURNS[:1]]),  # what --random-init bundles carry
    ("mistral", "<s>", [[SYSTEM, *TURNS], TURNS]),
    ("gemma", "<bos>", [TURNS, TURNS[:1]]),
    ("phi3", None, [[SYSTEM, *TURNS], TURNS]),
    (
        "thinking",
        None,
        [[*TURNS[:1], {"role": "assistant", "content": "<think>\nhm\n</think>\n\nYes."}, TURNS[2]]],
    ),
    (
        "stress",
        None,
        [[SYSTEM, *TURNS], [{**TURNS[0], "name": "ann"}, {"role": "user", "content": "STOP"}, TURNS[2]]],
    ),
]


@pytest.fixture(scope="module")
def base() -> Tokenizer:
    return chat_tokenizer(700, bos=None)


def template(name: str) -> str:
    if name == "default":  # tandem's own, which the export gives --random-init bundles
        from export.tokenizer_meta import DEFAULT_TEMPLATE

        return DEFAULT_TEMPLATE.read_text()
    return (TEMPLATES / f"{name}.jinja").read_text()


def with_bos(base: Tokenizer, bos: str | None) -> Tokenizer:
    """The tokenizer with a post-processor that adds `bos` (when given) with special tokens."""
    from tokenizers.processors import TemplateProcessing

    tok = Tokenizer.from_str(base.to_str())
    if bos is not None:
        tok.post_processor = TemplateProcessing(
            single=f"{bos} $A", special_tokens=[(bos, tok.token_to_id(bos))]
        )
    return tok


def ours(
    tok: Tokenizer, source: str, bos: str | None, messages: list[dict[str, Any]], **kw: Any
) -> tuple[str, list[int]]:
    chat = ChatTemplate.compile(source, {"bos_token": bos, "eos_token": EOS})
    text = chat.render(messages, **kw)
    return text, TokenizerCore(tok).encode(text, add_special_tokens=False)


@pytest.mark.parametrize("name,bos,conversations", CASES, ids=[c[0] for c in CASES])
def test_prompt_ids_equal_transformers(
    base: Tokenizer, name: str, bos: str | None, conversations: Any
) -> None:
    tok = with_bos(base, bos)
    hf = hf_tokenizer(tok, template(name), bos, EOS)
    seen: set[int] = set()
    for messages in conversations:
        want_text = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        want_ids = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        text, ids = ours(tok, template(name), bos, messages)
        assert text == want_text
        assert ids == want_ids
        assert len(ids) > 10
        seen |= set(ids)
        if bos is not None:  # the template wrote BOS once; encoding added none
            assert ids[0] == tok.token_to_id(bos) and ids[1] != ids[0]
            assert TokenizerCore(tok).encode(text, add_special_tokens=True)[:2] == [ids[0], ids[0]]
        # without the generation prompt too
        text, ids = ours(tok, template(name), bos, messages, add_generation_prompt=False)
        assert ids == hf.apply_chat_template(messages, add_generation_prompt=False, tokenize=True)
    assert tok.token_to_id("<|im_end|>") in seen, "a special token in a message's text keeps its id"


@pytest.mark.parametrize("name", ["llama3", "chatml", "mistral", "phi3", "thinking"])
def test_continue_final_message_equals_transformers(base: Tokenizer, name: str) -> None:
    messages = [*TURNS[:1], {"role": "assistant", "content": "The answer is "}]
    if name == "mistral":
        messages = [TURNS[0], {"role": "assistant", "content": "The answer is"}]
    tok = with_bos(base, "<s>")
    hf = hf_tokenizer(tok, template(name), "<s>", EOS)
    want = hf.apply_chat_template(messages, continue_final_message=True, tokenize=True)
    text, ids = ours(
        tok, template(name), "<s>", messages, add_generation_prompt=False, continue_final_message=True
    )
    assert ids == want
    assert text.rstrip().endswith("The answer is")


def test_template_kwargs_reach_the_template_as_in_transformers(base: Tokenizer) -> None:
    tok = with_bos(base, None)
    for name, kwargs in (("thinking", {"enable_thinking": False}), ("stress", {"style": "terse"})):
        hf = hf_tokenizer(tok, template(name), None, EOS)
        want = hf.apply_chat_template(TURNS[:1], add_generation_prompt=True, tokenize=True, **kwargs)
        _, ids = ours(tok, template(name), None, TURNS[:1], kwargs=kwargs)
        _, plain = ours(tok, template(name), None, TURNS[:1])
        assert ids == want and ids != plain


def test_template_errors_are_400_with_the_templates_message() -> None:
    gemma = ChatTemplate.compile(template("gemma"), {"bos_token": "<bos>"})
    with pytest.raises(InvalidRequestError, match="System role not supported") as e:
        gemma.render([SYSTEM, *TURNS])
    assert e.value.status_code == 400 and e.value.param == "messages"
    mistral = ChatTemplate.compile(template("mistral"), {"bos_token": "<s>", "eos_token": EOS})
    with pytest.raises(InvalidRequestError, match="must alternate"):
        mistral.render([TURNS[0], TURNS[0]])
    with pytest.raises(InvalidRequestError, match="may not set"):
        mistral.render(TURNS, kwargs={"messages": []})
    # a template that uses a value wrongly: still the request's 400, not a crash
    broken = ChatTemplate.compile("{{ messages[0]['content'] + 1 }}")
    with pytest.raises(InvalidRequestError, match="TypeError"):
        broken.render(TURNS)


def test_the_sandbox_refuses_what_a_template_must_not_do() -> None:
    sneaky = ChatTemplate.compile("{{ messages.__class__.__mro__ }}{{ messages.append(1) }}")
    with pytest.raises(InvalidRequestError, match="refused"):
        sneaky.render(TURNS)
    mutate = ChatTemplate.compile("{% set x = messages.pop() %}{{ messages | length }}")
    with pytest.raises(InvalidRequestError):
        mutate.render(list(TURNS))


def test_a_template_that_does_not_compile_is_named() -> None:
    with pytest.raises(ChatTemplateSyntaxError, match="my.jinja does not compile"):
        ChatTemplate.compile("{% for m in messages %}{{ m }}", origin="my.jinja")


def test_generation_blocks_render_their_body() -> None:
    chat = ChatTemplate.compile(
        "{% for m in messages %}{% generation %}[{{ m['content'] }}]{% endgeneration %}{% endfor %}"
    )
    assert (
        chat.render(TURNS[:2], add_generation_prompt=False) == "[Hello, how are you?][ The quick brown fox. ]"
    )
