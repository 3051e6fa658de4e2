"""Build a model bundle: load, split, export, verify, hash, then publish atomically."""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from export.errors import ExportError
from export.publish import log, publish, up_to_date, versions
from functions.bundle import FORMAT_VERSION, MANIFEST, RANDOM_INIT_PREFIX, Manifest, StageEntry, sha256_file

__all__ = ["build", "log", "up_to_date"]
FP32_MAX_DIFF = 1e-3


@dataclass
class Source:
    ref: str  # what from_pretrained loads: a hub id or a directory
    revision: str | None
    directory: Path  # a local directory with its config and tokenizer files
    label: str  # the model's id in the manifest
    tokenizer_note: str  # where the tokenizer came from


def _source(args: Any, work: Path) -> Source:
    from export import source

    if args.random_init:
        from export.random_init import make_random_model

        log(f"building {args.random_init} with seeded random weights (seed {args.seed})")
        hf_dir = work / "_hf"
        note = make_random_model(
            args.random_init, hf_dir, Path(args.tokenizer) if args.tokenizer else None, args.seed
        )
        log(note)
        return Source(str(hf_dir), None, hf_dir, f"{RANDOM_INIT_PREFIX}{args.random_init}", note)
    directory = source.model_dir(args.model, args.revision)
    return Source(args.model, args.revision, directory, args.model, "the model's own")


def _load(src: Source) -> tuple[Any, Any]:
    from export import source
    from export.families import parts_of

    t = time.perf_counter()
    config = source.load_config(src.directory)
    model = source.load_model(src.ref, src.revision, config)
    parts = parts_of(model)
    s = parts.shape
    window = f", sliding window {s.sliding_window}" if s.sliding_window else ""
    log(
        f"loaded {s.family}: {s.num_layers} layers, hidden {s.hidden_size}, {s.num_attention_heads} heads / "
        f"{s.num_kv_heads} KV heads of {s.head_dim}, vocab {s.vocab_size}{window}"
        f"{', tied embeddings' if s.tied else ''} ({time.perf_counter() - t:.1f} s)"
    )
    return model, parts


def _tokenizer(args: Any, src: Source, config: Any) -> Any:
    from export import source, tokenizer_meta

    given = Path(args.tokenizer) if args.tokenizer and not args.random_init else None
    tok = source.load_tokenizer_path(given) if given else source.load_model_tokenizer(src.directory)
    info = tokenizer_meta.describe(
        tok, src.directory, config, f"tokenizer from {given}" if given else src.tokenizer_note
    )
    tokenizer_meta.cover(info, int(config.vocab_size))
    if info.fillers:
        log(f"tokenizer: {info.fillers} filler tokens added so that all {config.vocab_size} ids decode")
    chat = Path(args.chat_template) if getattr(args, "chat_template", None) else None
    tokenizer_meta.set_template(info, chat, default=bool(args.random_init))
    if not info.eos_ids:
        log("warning: the model names no end-of-sequence token; generation stops at max_tokens only")
    return info


def _split(args: Any, parts: Any) -> tuple[list[tuple[int, int]], dict[str, Any]]:
    """The layer ranges, and the manifest's record of the split (how, each stage's weight bytes)."""
    from export import split

    costs = split.costs_of(parts)
    ranges, how = split.plan(costs, args.stages, args.layers)
    planned = costs.stage_bytes(ranges)
    mean = sum(planned) / len(planned)
    log(f"split into {len(ranges)} stage(s), {how}; weights (embedding on the first, LM head on the last):")
    for k, ((a, b), size) in enumerate(zip(ranges, planned, strict=True)):
        share = f"{size / 1e6:.1f} MB ({size / mean:.2f}x the mean)"
        log(f"  stage {k + 1}: layers {a}-{b - 1} ({b - a}), {share}")
    model_bytes = sum(costs.layers) + costs.first + costs.last - costs.tied
    return ranges, {
        "policy": how,
        "weight_bytes": planned,
        "model_bytes": model_bytes,
        "tied_bytes": costs.tied,
    }


def _verify(args: Any, model: Any, parts: Any, stages: list[StageEntry], work: Path) -> dict[str, Any]:
    from export.families import NAMED, SUPPORTED
    from export.verify import links_of, verify

    if args.skip_verify:
        if parts.shape.family not in NAMED:
            log(
                f"warning: {parts.shape.family!r} is vouched for by the parity check only, which --skip-verify skips"
            )
        return {"skipped": True}
    t = time.perf_counter()
    log(f"verifying parity against PyTorch ({'int8' if args.quantize else 'fp32'}) ...")
    parity = verify(model, links_of(work, stages), parts.shape)
    parity["seconds"] = round(time.perf_counter() - t, 2)
    log(
        f"parity: max |logit diff| {parity['max_abs_logit_diff']:.2e}, "
        f"top-1 agreement {parity['top1_agreement']:.1%} ({parity['seconds']} s)"
    )
    if not args.quantize and (parity["max_abs_logit_diff"] > FP32_MAX_DIFF or parity["top1_agreement"] < 1.0):
        why = (
            ""
            if parts.shape.family in NAMED
            else f"; {parts.shape.family!r} may compute something at the model level that tandem does not "
            f"rebuild (supported: {SUPPORTED})"
        )
        raise ExportError(
            f"parity check failed: max |logit diff| {parity['max_abs_logit_diff']:.3g} (limit {FP32_MAX_DIFF}), "
            f"top-1 agreement {parity['top1_agreement']:.1%} (must be 100%){why}; the bundle was not written"
        )
    return parity


def _manifest(
    args: Any, src: Source, model: Any, parts: Any, stages: list[StageEntry], **rest: Any
) -> Manifest:
    from export.stage_files import onnx_opset

    cfg = model.config
    work: Path = rest.pop("work")
    return Manifest(
        format_version=FORMAT_VERSION,
        model={
            "id": src.label,
            "revision": src.revision or (f"seed-{args.seed}" if args.random_init else "main"),
            "architecture": (cfg.architectures or [type(model).__name__])[0],
            "family": parts.shape.family,
            "source": "seeded random weights" if args.random_init else "hub or local directory",
        },
        config=parts.shape.manifest(),
        dtype="float32",
        quantization=args.quantize,
        opset=args.opset or onnx_opset(work / stages[0].file),
        stages=stages,
        versions=versions(),
        export_args=args.export_args,
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        **rest,
    )


def build(args: Any) -> Manifest:
    t0 = time.perf_counter()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        src = _source(args, work)
        model, parts = _load(src)
        tok = _tokenizer(args, src, model.config)
        ranges, split_record = _split(args, parts)
        from export.stage_files import export_stage_files  # torch: after the quick refusals

        stages, head = [], None
        for k, layers in enumerate(ranges):
            entry, last_head = export_stage_files(parts, k, layers, work, args.opset, args.quantize)
            stages.append(entry)
            head = last_head or head
        parity = _verify(args, model, parts, stages, work)
        reference = _reference(args, src, work)
        tokenizer = tok.entry(work, sha256_file)
        if args.random_init:
            shutil.rmtree(work / "_hf")
        manifest = _manifest(
            args,
            src,
            model,
            parts,
            stages,
            work=work,
            tokenizer=tokenizer,
            parity=parity,
            reference=reference,
            head=head,
            extra={"split": split_record},
        )
        (work / MANIFEST).write_text(manifest.to_json())
        publish(work, out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) / 1e6
    log(f"done in {time.perf_counter() - t0:.1f} s: {out} ({total:.1f} MB)")
    for s in manifest.stages:
        log(
            f"  {s.file}: layers {s.layers[0]}-{s.layers[1] - 1}, {s.bytes / 1e6:.1f} MB -> {s.outputs[0].name}"
        )
    return manifest


def _reference(args: Any, src: Source, work: Path) -> dict[str, Any] | None:
    if not args.with_reference:
        return None
    from export.reference import export_reference

    t = time.perf_counter()
    log("exporting the monolithic reference with optimum (text-generation-with-past) ...")
    reference = export_reference(src.ref, src.revision, work)
    log(f"reference: {len(reference['files'])} files ({time.perf_counter() - t:.1f} s)")
    return reference
