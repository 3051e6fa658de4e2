"""The stage function's HTTP surface, defined once for the stage (functions.stage_routes), the gateway
(gateway.clients) and the tests: the route templates, the paths a caller builds from them, and the
JSON bodies of the sequence routes as msgspec Structs. The infer route's tensors are
functions.contract's; its framing is functions.protocol's.

    GET    /v2                                       server metadata (OIP)
    GET    /v2/models/{model}                        model metadata (OIP)
    GET    /v2/models/{model}/ready                  model readiness (OIP)
    POST   /v2/models/{model}/infer                  one batch (OIP, JSON or binary tensors)
    GET    /v2/models/{model}/sequences              SequencesAnswer: the KV cache held
    POST   /v2/models/{model}/sequences/fork         ForkRequest -> ForkAnswer
    POST   /v2/models/{model}/sequences/release      ReleaseRequest -> ReleaseAnswer
    DELETE /v2/models/{model}/sequences/{seq_id}     -> ReleaseOneAnswer
"""

from __future__ import annotations

import re

import msgspec

MODELS = "/v2/models"
_MODEL = MODELS + "/{model:str}"  # Litestar's path parameter syntax
_INFER, _READY, _SEQUENCES = "/infer", "/ready", "/sequences"
_FORK, _RELEASE = _SEQUENCES + "/fork", _SEQUENCES + "/release"

# ---- route templates (Litestar) ----
SERVER_ROUTE = "/v2"  # server metadata (OIP)
MODEL_ROUTE = _MODEL
READY_ROUTE = _MODEL + _READY
INFER_ROUTE = _MODEL + _INFER
SEQUENCES_ROUTE = _MODEL + _SEQUENCES
FORK_ROUTE = _MODEL + _FORK
RELEASE_ROUTE = _MODEL + _RELEASE
RELEASE_ONE_ROUTE = _MODEL + _SEQUENCES + "/{seq_id:int}"
# the infer route as the fast path matches it and as the metrics label it (Litestar's template)
INFER_PATTERN = re.compile(re.escape(MODELS) + r"/(?P<model>[^/]+)" + re.escape(_INFER))
INFER_TEMPLATE = MODELS + "/{model}" + _INFER
SEQUENCES_PART = _SEQUENCES  # what the tracing config leaves out: control-plane calls
# the server metadata's extensions (the sequence routes are the second), also the routes' OpenAPI tag
EXTENSIONS = ("binary_tensor_data", "sequences")
SEQUENCES_TAG = EXTENSIONS[1]


# ---- paths a caller builds ----
def model_path(model: str) -> str:
    return f"{MODELS}/{model}"


def ready_path(model: str) -> str:
    return model_path(model) + _READY


def infer_path(model: str) -> str:
    return model_path(model) + _INFER


def sequences_path(model: str) -> str:
    return model_path(model) + _SEQUENCES


def fork_path(model: str) -> str:
    return model_path(model) + _FORK


def release_path(model: str) -> str:
    return model_path(model) + _RELEASE


def release_one_path(model: str, seq_id: int) -> str:
    return f"{sequences_path(model)}/{seq_id}"


def is_infer_path(path: str) -> bool:
    return INFER_PATTERN.fullmatch(path) is not None


# ---- bodies ----
MAX_FORK = 256  # children per fork call (n and best_of are at most 128 per prompt)


class ReleaseRequest(msgspec.Struct, forbid_unknown_fields=True):
    sequence_ids: list[int]


class ReleaseAnswer(msgspec.Struct):
    released: list[int]  # those of the ids asked that were held (and are freed now)


class ReleaseOneAnswer(msgspec.Struct):
    released: bool  # false when none was held: releasing is idempotent


class ForkRequest(msgspec.Struct, forbid_unknown_fields=True):
    parent: int  # the held sequence to fork
    length: int  # positions the caller believes it holds (a 409 when it does not)
    children: list[int]  # new sequence ids, each starting with a copy of the parent's KV cache
    release: bool = True  # free the parent once forked


class ForkAnswer(msgspec.Struct):
    parent: int
    children: list[int]
    length: int


class SequencesAnswer(msgspec.Struct):
    sequences: dict[str, int]  # sequence id (as a JSON key) -> positions held
    bytes: int  # bytes their keys and values take
    capacity_bytes: int | None  # the cache's budget (TANDEM_KV_CACHE_BYTES)
