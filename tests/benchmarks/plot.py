"""The benchmark's PNG: aggregate tokens/s and inter-token latency p50 against the number of
streams, one line per variant (matplotlib, no display needed)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any


def plot(results: dict, args: Any, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (tput, itl) = plt.subplots(1, 2, figsize=(12, 4.8))
    for variant, per in results.items():
        levels = sorted(per)
        style = {"linewidth": 2.5, "color": "black"} if variant == "monolith" else {}
        tput.plot(levels, [per[c]["aggregate_tok_s"] for c in levels], marker="o", label=variant, **style)
        p50 = [per[c].get("itl_p50_ms", math.nan) for c in levels]
        itl.plot(levels, p50, marker="o", label=variant, **style)
    for ax, what in ((tput, "aggregate tokens/s"), (itl, "inter-token latency p50 (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent streams")
        ax.set_ylabel(what)
        ax.grid(True, which="both", alpha=0.3)
        ax.set_xticks(args.concurrency, [str(c) for c in args.concurrency])
    itl.set_yscale("log")
    tput.legend(fontsize=8)
    fig.suptitle(
        f"{args.prompt_tokens}-token prompts, {args.new_tokens} new tokens, greedy; medians of "
        f"{args.rounds * args.repeats} passes (python -m tests.benchmarks.bench)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
