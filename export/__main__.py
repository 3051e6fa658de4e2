"""`python -m export`: split a decoder-only causal LM (hub id, local directory or seeded random
weights) into a bundle of N ONNX pipeline stages. Families: gpt2, llama, qwen2, mistral, phi3, gemma,
gemma2, and others with the same layout (docs/families.md)."""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import sys
from pathlib import Path


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m export", description=__doc__)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", default="gpt2", help="hub id or local HF model directory (default gpt2)")
    src.add_argument(
        "--random-init",
        metavar="SHAPE|CONFIG.json",
        help="seeded random weights of a named shape (works offline): a family's real size (gpt2, llama "
        "= SmolLM2-135M, qwen2 = Qwen2.5-0.5B, mistral, phi3, gemma, gemma2) or its tiny test shape "
        "(FAMILY-tiny; tiny = gpt2-tiny), or a config.json of any supported family",
    )
    p.add_argument("--revision", help="hub revision (branch, tag or commit)")
    p.add_argument(
        "--tokenizer", metavar="PATH", help="tokenizer.json, or a directory with vocab.json + merges.txt"
    )
    p.add_argument(
        "--chat-template", metavar="FILE", help="a Jinja chat template for the bundle (overrides the model's)"
    )
    p.add_argument("--out", required=True, help="bundle directory to write")
    p.add_argument("--stages", type=int, help="number of stages, balanced by bytes (default 3)")
    p.add_argument("--layers", help="explicit split, e.g. 0:4,4:8,8:12")
    p.add_argument("--quantize", choices=["int8"], help="dynamic int8 quantisation of the weights")
    p.add_argument("--opset", type=int, help="ONNX opset (default: the exporter's)")
    p.add_argument(
        "--with-reference",
        action="store_true",
        help="also export the monolithic model with optimum (the benchmark baseline)",
    )
    p.add_argument("--skip-verify", action="store_true", help="skip the parity check (not advised)")
    p.add_argument("--seed", type=int, default=0, help="seed for --random-init (default 0)")
    p.add_argument("--force", action="store_true", help="rebuild even when the bundle is up to date")
    args = p.parse_args(argv)
    if args.stages is not None and args.layers:
        p.error("give --stages or --layers, not both")
    tok_digest = _digest(p, "--tokenizer", args.tokenizer)
    template_digest = _digest(p, "--chat-template", args.chat_template)
    args.export_args = {
        "model": None if args.random_init else args.model,
        "revision": args.revision,
        "random_init": args.random_init,
        "seed": args.seed if args.random_init else None,
        "tokenizer_sha256": tok_digest,
        "chat_template_sha256": template_digest,
        "stages": args.stages,
        "layers": args.layers,
        "quantize": args.quantize,
        "opset": args.opset,
        "with_reference": args.with_reference,
        "verify": not args.skip_verify,
    }
    return args


def _digest(p: argparse.ArgumentParser, flag: str, value: str | None) -> str | None:
    """sha256 of a given file (or a directory's files), so that a re-run with other contents rebuilds."""
    if not value:
        return None
    t = Path(value)
    if not t.exists():
        p.error(f"{flag} {t}: no such file or directory")
    files = [t] if t.is_file() else sorted(f for f in t.iterdir() if f.is_file())
    return hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    # The exporters are chatty (torchvision-missing notices, tracing warnings): keep the output to
    # our progress lines.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    logging.getLogger("torch").setLevel(logging.ERROR)
    from export.build import build, log, up_to_date
    from export.errors import ExportError

    out = Path(args.out)
    if not args.force and up_to_date(out, args.export_args):
        log(f"{out} is up to date (manifest and sha256 of every file checked); nothing to do")
        return 0
    try:
        build(args)
    except ExportError as e:
        print(f"export: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("export: interrupted; nothing was written", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
