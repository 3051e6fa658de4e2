"""`python -m export.job`: the export as a deployment's one-shot step (the compose `export` service,
the Kubernetes export Job), set up by environment variables; a usable bundle already there is kept.

  TANDEM_EXPORT_OUT          the bundle directory (required)
  TANDEM_EXPORT_MODEL        hub id or local model directory (default gpt2)
  TANDEM_EXPORT_RANDOM_INIT  gpt2, tiny or a config JSON: seeded random weights instead (offline)
  TANDEM_EXPORT_STAGES       how many stages the deployment runs (default 3)

A bundle whose files match its manifest and that has that many stages is kept, whatever made it
(the gateway holds its model against config.json's model_name); otherwise the export runs.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path

from functions.bundle import MANIFEST, BundleError, load_manifest, verify_files
from functions.settings import Env, SettingsError

DEFAULT_MODEL = "gpt2"
DEFAULT_STAGES = 3


def usable(out: Path, stages: int) -> str | None:
    """Why the bundle at `out` will not do (None: keep it)."""
    if not (out / MANIFEST).is_file():
        return f"no bundle at {out} yet"
    try:
        manifest = load_manifest(out)
    except BundleError as e:
        return str(e)
    if len(manifest.stages) != stages:
        return f"{out} has {len(manifest.stages)} stages, the deployment runs {stages}"
    problems = verify_files(out, manifest)
    return "; ".join(problems) if problems else None


def export_args(env: Mapping[str, str] | None = None) -> tuple[Path, int, list[str]]:
    """The bundle directory, the stage count, and the arguments of `python -m export` for them."""
    e = Env(env)
    out = e.text("TANDEM_EXPORT_OUT")
    if not out:
        raise SettingsError("environment variable TANDEM_EXPORT_OUT must name the bundle directory")
    stages = int(e.integer("TANDEM_EXPORT_STAGES", DEFAULT_STAGES, minimum=1))
    random_init = e.text("TANDEM_EXPORT_RANDOM_INIT")
    source = (
        ["--random-init", random_init]
        if random_init
        else ["--model", e.text("TANDEM_EXPORT_MODEL", DEFAULT_MODEL)]
    )
    return Path(out), stages, [*source, "--out", out, "--stages", str(stages)]


def main(env: Mapping[str, str] | None = None) -> int:
    try:
        out, stages, args = export_args(env)
    except SettingsError as e:
        print(f"export.job: error: {e}", file=sys.stderr)
        return 2
    why = usable(out, stages)
    if why is None:
        model = load_manifest(out).model["id"]
        print(
            f"export.job: keeping the bundle at {out} ({model}, {stages} stages); delete it to export again"
        )
        return 0
    print(f"export.job: exporting ({why}): python -m export {' '.join(args)}", flush=True)
    from export.__main__ import main as export_main  # torch only when there is something to do

    return export_main(args)


if __name__ == "__main__":
    sys.exit(main())
