"""`python -m infra.deploy`: write every deployment file for a bundle of N stages (compose,
Kubernetes, Knative, Cloud Run, KServe) from one plan; the committed files are its output for the
default (3 stages of gpt2), which `--check` verifies.

  python -m infra.deploy --bundle bundles/gpt2     # N and the model's name from the manifest
  python -m infra.deploy --stages 4                # or N given
  python -m infra.deploy --check                   # exit 1 when the files differ from the output
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from functions.bundle import BundleError
from infra.deploy import cloudrun, compose, k8s, k8s_ops, knative, kserve
from infra.deploy.plan import Plan

REPO = Path(__file__).resolve().parents[2]
# folders holding nothing but generated files: a file there the plan does not make is stale
OWNED = ("infra/k8s", "infra/knative", "infra/cloudrun", "infra/kserve")


def generate(plan: Plan) -> dict[str, str]:
    """Relative path -> content of every generated file."""
    out = compose.files(plan)
    out |= {
        "infra/k8s/config.yaml": k8s.config(plan),
        "infra/k8s/tokenizer.yaml": k8s.tokenizer(plan),
        "infra/k8s/stages.yaml": k8s.stages(plan),
        "infra/k8s/gateway.yaml": k8s.gateway(plan),
        "infra/k8s/frontend.yaml": k8s.frontend(plan),
    }
    return out | k8s_ops.files(plan) | knative.files(plan) | cloudrun.files(plan) | kserve.files(plan)


def stale(root: Path, files: dict[str, str]) -> list[Path]:
    found = [p for d in OWNED for p in sorted((root / d).glob("*")) if p.suffix in (".yaml", ".json")]
    return [p for p in found if p.relative_to(root).as_posix() not in files]


def write(root: Path, files: dict[str, str]) -> list[str]:
    """Write the files under `root`, remove stale ones; returns the paths that changed."""
    changed = []
    for rel, text in files.items():
        path = root / rel
        if not path.is_file() or path.read_text() != text:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            changed.append(rel)
    for path in stale(root, files):
        path.unlink()
        changed.append(f"{path.relative_to(root).as_posix()} (removed)")
    return changed


def differences(root: Path, files: dict[str, str]) -> list[str]:
    out = [
        rel for rel, text in files.items() if not (root / rel).is_file() or (root / rel).read_text() != text
    ]
    return out + [f"{p.relative_to(root).as_posix()} (not generated)" for p in stale(root, files)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m infra.deploy",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    source = p.add_mutually_exclusive_group()
    source.add_argument(
        "--bundle", type=Path, help="a bundle directory: N and the model's name from its manifest"
    )
    source.add_argument("--stages", type=int, help="the number of stages (default 3)")
    p.add_argument("--model", help="the model's name (default: the bundle's, else gpt2)")
    p.add_argument("--out", type=Path, default=REPO, help="where to write (default: the repository)")
    p.add_argument("--check", action="store_true", help="write nothing; exit 1 when a file differs")
    args = p.parse_args(argv)
    try:
        plan = (
            Plan.from_bundle(args.bundle) if args.bundle else Plan(3 if args.stages is None else args.stages)
        )
        if args.model:
            plan = Plan(plan.stages, args.model)
    except (BundleError, ValueError) as e:
        print(f"infra.deploy: error: {e}", file=sys.stderr)
        return 2
    files = generate(plan)
    if args.check:
        diff = differences(args.out, files)
        for rel in diff:
            print(f"differs from `python -m infra.deploy`: {rel}")
        return 1 if diff else 0
    for rel in write(args.out, files):
        print(f"wrote {rel}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
