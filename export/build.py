"""Build a model bundle: load, split, export, verify, hash, then publish atomically."""

from __future__ import annotations

import shutil
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from export.errors import ExportError
from functions import contract as c
from functions.bundle import (
    FORMAT_VERSION,
    MANIFEST,
    RANDOM_INIT_PREFIX,
    BundleError,
    Manifest,
    StageEntry,
    TensorSpec,
    load_manifest,
    sha256_file,
    verify_files,
)

FP32_MAX_DIFF = 1e-3


def log(msg: str) -> None:
    print(f"[export] {msg}", flush=True)


def split_layers(n_layer: int, stages: int | None, layers: str | None) -> list[tuple[int, int]]:
    """Balanced split into `stages` parts, or the explicit `a:b,b:c,...` split checked for cover."""
    if layers:
        try:
            ranges = [tuple(int(x) for x in part.split(":")) for part in layers.split(",")]
        except ValueError:
            raise ExportError(f"--layers {layers!r}: expected ranges like 0:4,4:8,8:12") from None
        if any(len(r) != 2 for r in ranges):
            raise ExportError(f"--layers {layers!r}: each range is START:STOP, like 0:4")
        expect = 0
        for a, b in ranges:
            if a != expect or b <= a:
                raise ExportError(
                    f"--layers {layers!r} must cover layers 0..{n_layer} exactly, in order, each "
                    f"range non-empty (problem at {a}:{b}; expected it to start at {expect})"
                )
            expect = b
        if expect != n_layer:
            raise ExportError(f"--layers {layers!r} ends at {expect}; the model has {n_layer} layers")
        return ranges  # type: ignore[return-value]
    n = 3 if stages is None else stages
    if n < 1 or n > n_layer:
        raise ExportError(f"--stages {n}: must be between 1 and the number of layers ({n_layer})")
    base, extra = divmod(n_layer, n)
    out, start = [], 0
    for k in range(n):
        stop = start + base + (1 if k < extra else 0)
        out.append((start, stop))
        start = stop
    return out


def check_vocab(tokenizer_size: int, model_size: int) -> None:
    """Refuse a tokenizer that cannot decode every id the model can generate."""
    if tokenizer_size < model_size:
        raise ExportError(
            f"the tokenizer covers {tokenizer_size} ids but the model's vocab_size is {model_size}: "
            f"{model_size - tokenizer_size} ids the model can generate would decode to nothing; pass the "
            "model's own tokenizer with --tokenizer"
        )


def _tensor_specs(spec: Any, cfg: Any) -> tuple[list[TensorSpec], list[TensorSpec]]:
    h, d = cfg.n_head, cfg.n_embd // cfg.n_head
    x = (
        TensorSpec(c.INPUT_IDS, "INT64", ["batch", "sequence"])
        if spec.first
        else TensorSpec(spec.input_name, "FP32", ["batch", "sequence", cfg.n_embd])
    )
    inputs = [
        x,
        TensorSpec(c.ATTENTION_MASK, "INT64", ["batch", "total_sequence"]),
        TensorSpec(c.POSITION_IDS, "INT64", ["batch", "sequence"]),
    ]
    inputs += [TensorSpec(n, "FP32", ["batch", h, "past_sequence", d]) for n in spec.past_names()]
    y = (
        TensorSpec(c.LOGITS, "FP32", ["batch", cfg.vocab_size])
        if spec.last
        else TensorSpec(spec.output_name, "FP32", ["batch", "sequence", cfg.n_embd])
    )
    outputs = [y] + [TensorSpec(n, "FP32", ["batch", h, "total_sequence", d]) for n in spec.present_names()]
    if spec.last:  # every position's final hidden states, for the scoring head (export/head.py)
        outputs.append(TensorSpec(c.FINAL_HIDDEN, "FP32", ["batch", "sequence", cfg.n_embd]))
    return inputs, outputs


def _name_axes(path: Path, inputs: list[TensorSpec], outputs: list[TensorSpec]) -> None:
    """Give the graph's dynamic axes the manifest's names instead of the exporter's s27, s69..."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    by_name = {t.name: t.shape for t in inputs + outputs}
    for v in list(model.graph.input) + list(model.graph.output):
        for dim, want in zip(v.type.tensor_type.shape.dim, by_name[v.name], strict=False):
            if isinstance(want, str):
                dim.dim_param = want
    onnx.save(model, str(path))


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for pkg in (
        "torch",
        "transformers",
        "onnx",
        "onnxruntime",
        "onnxscript",
        "optimum",
        "optimum-onnx",
        "tokenizers",
    ):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def up_to_date(out: Path, export_args: dict[str, Any]) -> bool:
    """True when `out` is an intact bundle built with the same arguments; says why otherwise."""
    if not (out / MANIFEST).exists():
        if out.exists() and any(out.iterdir()):
            log(f"{out} exists but has no manifest: partial bundle, rebuilding")
        return False
    try:
        m = load_manifest(out)
    except BundleError as e:
        log(f"{e}; rebuilding")
        return False
    if m.head is None:
        log("bundle predates the scoring head (echo + logprobs); rebuilding")
        return False
    want = dict(export_args)
    if m.export_args.get("with_reference") and not want.get("with_reference"):
        want["with_reference"] = True  # a bundle with the reference serves a run without it too
    if m.export_args != want:
        log("bundle was built with other arguments; rebuilding")
        return False
    problems = verify_files(out, m)
    if problems:
        log(f"bundle is corrupt ({'; '.join(problems)}); rebuilding")
        return False
    return True


def _publish(tmp: Path, out: Path) -> None:
    """Swap the finished bundle into place so `out` is never half-written."""
    old = out.with_name(f".{out.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if out.exists():
        out.rename(old)
    tmp.chmod(0o755)  # mkdtemp made it private
    tmp.rename(out)
    if old.exists():
        shutil.rmtree(old)


def build(args: Any) -> Manifest:
    import logging

    from export import source, to_onnx

    # torch resets its loggers on import; its exporter then lists missing torchvision ops
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)

    t0 = time.perf_counter()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        model_ref, revision, tok_how = args.model, args.revision, None
        if args.random_init:
            log(f"building a GPT-2 ({args.random_init}) with seeded random weights (seed {args.seed})")
            hf_dir = work / "_hf"
            tok_how = source.make_random_model(
                args.random_init, hf_dir, Path(args.tokenizer) if args.tokenizer else None, args.seed
            )
            log(tok_how)
            model_ref, revision = str(hf_dir), None
        t = time.perf_counter()
        log(f"loading {args.random_init and 'random-init ' + args.random_init or model_ref}")
        model = source.load_model(model_ref, revision)
        cfg = model.config
        ranges = split_layers(cfg.n_layer, args.stages, args.layers)
        log(
            f"loaded: {cfg.n_layer} layers, n_embd {cfg.n_embd}, vocab {cfg.vocab_size} "
            f"({time.perf_counter() - t:.1f} s)"
        )
        tok = (
            source.load_tokenizer_path(Path(args.tokenizer))
            if args.tokenizer and not args.random_init
            else source.load_model_tokenizer(model_ref, revision)
        )
        check_vocab(tok.get_vocab_size(), cfg.vocab_size)
        tok.save(str(work / "tokenizer.json"))
        eos = tok.token_to_id(source.EOS)
        eos = cfg.eos_token_id if eos is None else eos

        from export.stages import StageSpec

        stages: list[StageEntry] = []
        head: dict[str, Any] | None = None
        for k, (a, b) in enumerate(ranges):
            spec = StageSpec(k, a, b, cfg.n_layer)
            t = time.perf_counter()
            target = work / spec.file
            raw = work / f"_{spec.file}" if args.quantize else target
            to_onnx.export_stage(model, spec, raw, args.opset)
            inputs, outputs = _tensor_specs(spec, cfg)
            _name_axes(raw, inputs, outputs)
            if args.quantize:
                to_onnx.quantize_int8(raw, target)
                raw.unlink()
            files = {
                p.name: sha256_file(p)
                for p in sorted(work.iterdir())
                if p.name == spec.file or p.name.startswith(spec.file + ".")
            }
            if spec.last:
                from export.head import build_head

                head, head_files = build_head(model, work, args.opset, log)
                files |= head_files
            stages.append(StageEntry(k, spec.name, spec.file, [a, b], inputs, outputs, files))
            size = sum((work / f).stat().st_size for f in files) / 1e6
            log(
                f"{spec.name}: layers {a}-{b - 1} -> {spec.file} ({size:.1f} MB, {time.perf_counter() - t:.1f} s)"
            )

        parity: dict[str, Any] = {"skipped": True}
        if not args.skip_verify:
            from export.verify import verify

            t = time.perf_counter()
            log(f"verifying parity against PyTorch ({'int8' if args.quantize else 'fp32'}) ...")
            parity = verify(model, work, stages, cfg.to_dict())
            parity["seconds"] = round(time.perf_counter() - t, 2)
            log(
                f"parity: max |logit diff| {parity['max_abs_logit_diff']:.2e}, "
                f"top-1 agreement {parity['top1_agreement']:.1%} ({parity['seconds']} s)"
            )
            if not args.quantize and (
                parity["max_abs_logit_diff"] > FP32_MAX_DIFF or parity["top1_agreement"] < 1.0
            ):
                raise ExportError(
                    f"parity check failed: max |logit diff| {parity['max_abs_logit_diff']:.3g} "
                    f"(limit {FP32_MAX_DIFF}), top-1 agreement {parity['top1_agreement']:.1%} "
                    "(must be 100%); the bundle was not written"
                )

        reference = None
        if args.with_reference:
            from export.reference import export_reference

            t = time.perf_counter()
            log("exporting the monolithic reference with optimum (text-generation-with-past) ...")
            reference = export_reference(model_ref, revision, work)
            log(f"reference: {len(reference['files'])} files ({time.perf_counter() - t:.1f} s)")

        if args.random_init:
            shutil.rmtree(work / "_hf")
        manifest = Manifest(
            format_version=FORMAT_VERSION,
            model={
                "id": f"{RANDOM_INIT_PREFIX}{args.random_init}" if args.random_init else args.model,
                "revision": revision or (f"seed-{args.seed}" if args.random_init else "main"),
                "architecture": "GPT2LMHeadModel",
                "source": tok_how or "hub or local directory",
            },
            config={
                k: getattr(cfg, k)
                for k in (
                    "n_layer",
                    "n_embd",
                    "n_head",
                    "n_positions",
                    "vocab_size",
                    "layer_norm_epsilon",
                    "activation_function",
                    "eos_token_id",
                )
            },
            dtype="float32",
            quantization=args.quantize,
            opset=args.opset or _onnx_opset(work / stages[0].file),
            stages=stages,
            tokenizer={
                "file": "tokenizer.json",
                "sha256": sha256_file(work / "tokenizer.json"),
                "eos_token_id": eos,
                "vocab_size": tok.get_vocab_size(),
            },
            versions=_versions(),
            parity=parity,
            export_args=args.export_args,
            reference=reference,
            head=head,
            created=datetime.now(UTC).isoformat(timespec="seconds"),
        )
        (work / MANIFEST).write_text(manifest.to_json())
        _publish(work, out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) / 1e6
    log(f"done in {time.perf_counter() - t0:.1f} s: {out} ({total:.1f} MB)")
    for s in manifest.stages:
        log(
            f"  {s.file}: layers {s.layers[0]}-{s.layers[1] - 1}, inputs "
            f"{', '.join(t.name for t in s.inputs[:3])}, ... -> {s.outputs[0].name}"
        )
    return manifest


def _onnx_opset(path: Path) -> int:
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    return int(max(o.version for o in m.opset_import if o.domain in ("", "ai.onnx")))
