"""The model bundle manifest: the contract between `export` and the functions (export builds it,
the functions and the gateway read it).

Standard library only, so a function that reads a bundle never imports torch.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from functions.contract import PAST_PREFIX, PRESENT_PREFIX

# 2: any decoder-only family (the config is family-generic, stages carry their byte sizes, the
# tokenizer entry lists every EOS id and the chat template); format 1 was GPT-2 only
FORMAT_VERSION = 2
MANIFEST = "manifest.json"
# model.id of a bundle exported with --random-init SHAPE: "random-init:SHAPE"
RANDOM_INIT_PREFIX = "random-init:"


class BundleError(Exception):
    """A bundle is missing, partial, corrupt or of an unknown format."""


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str  # Open Inference Protocol name: INT64, FP32, ...
    shape: list[str | int]  # named dynamic axes ("batch", "sequence", ...) or fixed sizes


@dataclass(frozen=True)
class StageEntry:
    index: int  # 0-based
    name: str  # "stage-1"
    file: str  # "stage1.onnx"
    layers: list[int]  # [start, stop)
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    files: dict[str, str]  # file name -> sha256 (the .onnx and any external data)
    bytes: int = 0  # size of its files on disk (the scoring head's included for the last stage)

    @property
    def first(self) -> bool:
        return self.layers[0] == 0

    def past_names(self) -> list[str]:
        return [t.name for t in self.inputs if t.name.startswith(PAST_PREFIX)]

    def present_names(self) -> list[str]:
        return [t.name for t in self.outputs if t.name.startswith(PRESENT_PREFIX)]


@dataclass(frozen=True)
class Manifest:
    format_version: int
    model: dict[str, Any]  # id, revision, architecture, source
    # family-generic (export/families.py Shape): family, hidden_size, num_layers,
    # num_attention_heads, num_kv_heads, head_dim, max_positions, vocab_size, sliding_window ...
    config: dict[str, Any]
    dtype: str  # "float32"
    quantization: str | None  # None or "int8"
    opset: int
    stages: list[StageEntry]
    # file, sha256, eos_token_id (the first of eos_token_ids), eos_token_ids, bos_token_id,
    # bos_token, eos_token, add_bos_token, chat_template (file name or None), chat_template_sha256
    tokenizer: dict[str, Any]
    versions: dict[str, str]
    parity: dict[str, Any]
    export_args: dict[str, Any]  # normalised arguments: a re-run with the same ones is a no-op
    reference: dict[str, Any] | None = None  # monolithic optimum export, when asked for
    # the scoring head (export/head.py): file, top_k, inputs, outputs; None in bundles made before
    # it existed (they serve, without prompt scoring). Its file is among the last stage's files.
    head: dict[str, Any] | None = None
    created: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    # convenience views used by the serving side
    @property
    def family(self) -> str:
        return str(self.config["family"])

    @property
    def num_layers(self) -> int:
        return int(self.config["num_layers"])

    @property
    def hidden_size(self) -> int:
        return int(self.config["hidden_size"])

    @property
    def num_kv_heads(self) -> int:
        return int(self.config["num_kv_heads"])

    @property
    def head_dim(self) -> int:
        """The width of one key/value head: the config's own, never hidden_size / heads."""
        return int(self.config["head_dim"])

    @property
    def max_positions(self) -> int:
        return int(self.config["max_positions"])

    @property
    def vocab_size(self) -> int:
        return int(self.config["vocab_size"])

    @property
    def eos_token_ids(self) -> list[int]:
        """Every id that ends a sequence (Llama 3 has several), first the tokenizer's own."""
        return eos_ids(self.tokenizer)

    @property
    def chat_template(self) -> str | None:
        """The chat template's file name in the bundle, or None."""
        name = self.tokenizer.get("chat_template")
        return str(name) if name else None

    def stage(self, name_or_index: str | int) -> StageEntry:
        for s in self.stages:
            if s.name == name_or_index or s.index == name_or_index:
                return s
        names = ", ".join(s.name for s in self.stages)
        raise BundleError(f"no stage {name_or_index!r} in this bundle; it has {names}")

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=False) + "\n"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Manifest:
        if d.get("format_version") != FORMAT_VERSION:
            raise BundleError(
                f"bundle format {d.get('format_version')!r} is not supported (this version reads "
                f"format {FORMAT_VERSION}); re-export it: run the same `python -m export` command "
                "again (`make up` re-exports an outdated bundle by itself)"
            )
        try:
            stages = [
                StageEntry(
                    **{
                        **s,
                        "inputs": [TensorSpec(**t) for t in s["inputs"]],
                        "outputs": [TensorSpec(**t) for t in s["outputs"]],
                    }
                )
                for s in d["stages"]
            ]
            return cls(**{**d, "stages": stages})
        except (KeyError, TypeError) as e:
            raise BundleError(f"manifest.json does not match the bundle schema: {e}") from e


def short_name(model_id: str) -> str:
    """What clients call a bundle's model: its id without a hub organisation or a directory
    ("openai-community/gpt2", "/models/gpt2" -> "gpt2"), random weights by their shape
    ("random-init:gpt2" -> "gpt2", "random-init:cfg/small.json" -> "small")."""
    if model_id.startswith(RANDOM_INIT_PREFIX):
        return PurePosixPath(model_id.removeprefix(RANDOM_INIT_PREFIX)).stem
    return PurePosixPath(model_id.rstrip("/")).name or model_id


def names_model(name: str, model_id: str) -> bool:
    """Whether `name` (a gateway's model_name) names the model of id `model_id`: the id itself or
    its short name."""
    return name in (model_id, short_name(model_id))


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_manifest(bundle: Path | str) -> Manifest:
    path = Path(bundle) / MANIFEST
    if not path.is_file():
        raise BundleError(f"{path} not found: is {bundle} a bundle made by `python -m export`?")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise BundleError(f"{path} is not readable JSON: {e}") from e
    return Manifest.from_dict(data)


def eos_ids(tokenizer: dict[str, Any]) -> list[int]:
    """The EOS ids of a manifest's `tokenizer` entry (`eos_token_ids`, else the one `eos_token_id`)."""
    ids = tokenizer.get("eos_token_ids")
    if ids is None:
        one = tokenizer.get("eos_token_id")
        ids = [] if one is None else [one]
    return [int(i) for i in ids]


def tokenizer_files(m: Manifest) -> dict[str, str]:
    """The tokenizer function's files: tokenizer.json and the chat template when there is one."""
    files = {m.tokenizer["file"]: m.tokenizer["sha256"]}
    if m.chat_template:
        files[m.chat_template] = m.tokenizer["chat_template_sha256"]
    return files


def all_files(m: Manifest) -> dict[str, str]:
    """Every file the manifest vouches for, with its sha256."""
    files: dict[str, str] = {}
    for s in m.stages:
        files.update(s.files)
    files |= tokenizer_files(m)
    if m.reference:
        files.update(m.reference["files"])
    return files


def verify_files(bundle: Path | str, m: Manifest, only: list[str] | None = None) -> list[str]:
    """Problems found (missing files, hash mismatches); empty when the bundle is intact."""
    problems = []
    for name, digest in all_files(m).items():
        if only is not None and name not in only:
            continue
        p = Path(bundle) / name
        if not p.is_file():
            problems.append(f"{name} is missing")
        elif sha256_file(p) != digest:
            problems.append(f"{name} does not match its sha256 in the manifest")
    return problems
