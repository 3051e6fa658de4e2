"""`python -m export`: turn GPT-2 (hub id, local directory or random weights) into a bundle."""

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
        metavar="gpt2|tiny|CONFIG.json",
        help="seeded random weights of this GPT-2 shape: works offline",
    )
    p.add_argument("--revision", help="hub revision (branch, tag or commit)")
    p.add_argument(
        "--tokenizer", metavar="PATH", help="tokenizer.json, or a directory with vocab.json + merges.txt"
    )
    p.add_argument("--out", required=True, help="bundle directory to write")
    p.add_argument("--stages", type=int, help="number of balanced stages (default 3)")
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
    tok_digest = None
    if args.tokenizer:
        t = Path(args.tokenizer)
        if not t.exists():
            p.error(f"--tokenizer {t}: no such file or directory")
        files = [t] if t.is_file() else sorted(f for f in t.iterdir() if f.is_file())
        tok_digest = hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()
    args.export_args = {
        "model": None if args.random_init else args.model,
        "revision": args.revision,
        "random_init": args.random_init,
        "seed": args.seed if args.random_init else None,
        "tokenizer_sha256": tok_digest,
        "stages": args.stages,
        "layers": args.layers,
        "quantize": args.quantize,
        "opset": args.opset,
        "with_reference": args.with_reference,
        "verify": not args.skip_verify,
    }
    return args


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
