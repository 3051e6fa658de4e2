"""Start-up discovery: what the gateway learns from the functions themselves before it serves. The
tokenizer function gives its `tokenizer.json`, EOS id and chat template; one replica of every stage
describes its inputs and outputs (Open Inference Protocol model metadata), from which the stage
layout follows. The gateway retries `discover` until it succeeds (functions may start after it).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from tokenizers import Tokenizer

from functions import contract
from functions.tokenizer_core import TokenizerCore
from gateway.call_inputs import StageLayout
from gateway.chat_template import ChatTemplate, ChatTemplateSyntaxError
from gateway.clients import Clients
from gateway.config import Node, check_served_model
from gateway.errors import GatewayError, StageUnavailableError
from gateway.replicas import Replicas

logger = logging.getLogger("tandem.gateway")


@dataclass(frozen=True)
class ChatOverride:
    """A chat template given to the gateway (`--chat-template FILE`), used instead of the model's."""

    source: str
    origin: str  # the file it came from, for messages


@dataclass(frozen=True)
class Discovered:
    tokenizer: TokenizerCore
    layout: StageLayout
    chat: ChatTemplate | None  # None: chat completions answer 400 with `chat_problem`
    chat_problem: str


async def discover(
    clients: Clients, replicas: Replicas, model_name: str, override: ChatOverride | None
) -> Discovered:
    """One attempt; raises when a function is not there (yet), or serves another model than the
    configured `model_name` (gateway.config.check_served_model)."""
    raw, eos = await clients.tokenizer_json()
    tok = TokenizerCore(Tokenizer.from_str(raw.decode()), eos_token_ids=eos, raw_json=raw)
    metas = [await stage_metadata(clients, p.name, [r.node for r in p.replicas]) for p in replicas.pools]
    check_served_model(model_name, [str(m["parameters"]["model_id"]) for m in metas])
    layout = layout_of(metas)
    chat, problem = chat_template_of(await clients.chat_template(), override)
    return Discovered(tok, layout, chat, problem)


async def stage_metadata(clients: Clients, name: str, nodes: list[Node]) -> dict[str, Any]:
    last_error = "no replica configured"
    for node in nodes:  # errors name the replica by id: addresses stay out of /readyz
        try:
            r = await clients.model_metadata(node, name)
            meta: dict[str, Any] = r.json()
            if r.status_code == 200 and meta.get("inputs"):
                return meta
            last_error = f"{node.id}: {r.status_code} {meta.get('detail', 'not loaded yet')}"
        except (GatewayError, ValueError) as e:  # the retrying face's, from httpx's
            last_error = f"{node.id}: {type(e.__cause__ or e).__name__}"
    raise StageUnavailableError(f"{name} metadata unavailable ({last_error})")


def layout_of(metas: list[dict[str, Any]]) -> StageLayout:
    """The stage layout from every stage's metadata, first to last."""
    p0 = metas[0]["parameters"]
    layout = StageLayout(
        input_names=[contract.data_input([t["name"] for t in m["inputs"]]) for m in metas],
        output_names=[m["outputs"][0]["name"] for m in metas if m["outputs"]],
        hidden_size=int(p0["hidden_size"]),
        max_positions=int(p0["max_positions"]),
        vocab_size=int(p0["vocab_size"]),
        model_id=str(p0["model_id"]),
        max_batch_tokens=min(int(m["parameters"].get("max_batch_tokens", 1 << 62)) for m in metas),
        max_call_positions=min(int(m["parameters"].get("max_call_positions") or 1 << 62) for m in metas),
        scoring=contract.TARGET_IDS in {t["name"] for t in metas[-1]["inputs"]},
    )
    if layout.output_names[-1] != contract.TOKEN_IDS:
        raise RuntimeError(f"the last configured stage is not the model's last ({layout.output_names})")
    return layout


def chat_template_of(info: dict[str, Any], override: ChatOverride | None) -> tuple[ChatTemplate | None, str]:
    """The chat template to render (the override, else the model's) and, when there is none, why."""
    tokens = {key: info.get(key) for key in ("bos_token", "eos_token")}
    if override is not None:  # compiled once already at start (a broken file stops the gateway)
        return ChatTemplate.compile(override.source, tokens, override.origin), ""
    source = info.get("chat_template")
    if not isinstance(source, str):
        return None, (
            "this model has no chat template (its bundle carries none), so /v1/chat/completions cannot "
            "build a prompt; use /v1/completions, or start the gateway with --chat-template FILE"
        )
    try:
        return ChatTemplate.compile(source, tokens), ""
    except ChatTemplateSyntaxError as e:
        logger.error("%s; chat completions are refused until it is fixed", e)
        return None, f"{e}; start the gateway with --chat-template FILE to use another"
