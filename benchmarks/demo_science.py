"""Check that noise injection visibly works in the embedded demo, on several seeds.

For each seed this runs the full demo (world, tiny CLIP, epsilon study) and reads its trials:

- the no-noise trial (variance 0) must score at least 10% below the best trial's validation CIDEr
  (the best trial at least 10% above it), and
- every trial with noise variance >= 0.25 (std >= 0.5) must score at least 10% below the best,

the inverted U of CIDEr against noise that the CapDec paper reports for COCO. It writes a JSON
record and prints a Markdown table for benchmarks/RESULTS.md.

    python benchmarks/demo_science.py --seeds 0 1 --out benchmarks/demo_science.json
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from pathlib import Path

from analysis.report import load_trials
from study.cli import setup_logging
from study.demo import run_demo

logger = logging.getLogger("benchmarks.demo_science")

MARGIN = 0.10  # relative CIDEr margin both checks require
HIGH_VARIANCE = 0.25


def summarise_seed(seed: int, storage: Path) -> dict:
    """Run the demo for one seed and return its trials and the two margin checks."""
    started = time.perf_counter()
    outcome = run_demo(seed=seed, quick=False, storage=storage)
    seconds = time.perf_counter() - started
    trials = load_trials(outcome.study_dir)
    rows = [
        {
            "trial": t.trial_id,
            "epsilon": float(t.params.get("epsilon", math.nan)),
            "variance": float(t.params.get("epsilon", math.nan)) ** 2,
            "best_cider": t.best_cider,
            "best_epoch": t.best_epoch,
            "attribute_f1": max((r.get("val/attribute_f1", math.nan) for r in t.history), default=math.nan),
        }
        for t in trials
    ]
    best = max(rows, key=lambda r: r["best_cider"])
    baseline = [r for r in rows if r["variance"] == 0.0]
    noisy = [r for r in rows if r["variance"] >= HIGH_VARIANCE]
    baseline_cider = baseline[0]["best_cider"] if baseline else math.nan
    return {
        "seed": seed,
        "wall_seconds": seconds,
        "study_dir": str(outcome.study_dir),
        "trials": sorted(rows, key=lambda r: r["epsilon"]),
        "best": best,
        "best_over_no_noise": best["best_cider"] / baseline_cider - 1 if baseline_cider else math.nan,
        "high_noise_below_best": [1 - r["best_cider"] / best["best_cider"] for r in noisy],
        "passes": bool(baseline)
        and best["best_cider"] >= (1 + MARGIN) * baseline_cider
        and bool(noisy)
        and all(r["best_cider"] <= (1 - MARGIN) * best["best_cider"] for r in noisy),
    }


def markdown(results: list[dict]) -> str:
    lines = []
    for result in results:
        lines.append(
            f"Seed {result['seed']} ({result['wall_seconds']:.0f} s for world, CLIP and study): "
            f"best epsilon {result['best']['epsilon']:.3f} is "
            f"{100 * result['best_over_no_noise']:+.1f}% over no noise; trials with variance >= "
            f"{HIGH_VARIANCE} are "
            + ", ".join(f"{100 * d:.1f}%" for d in result["high_noise_below_best"])
            + f" below the best. Passes: {result['passes']}.\n"
        )
        lines.append("| epsilon (std) | variance | best val CIDEr | best epoch | attribute F1 |")
        lines.append("|---|---|---|---|---|")
        for row in result["trials"]:
            lines.append(
                f"| {row['epsilon']:.3f} | {row['variance']:.4f} | {row['best_cider']:.3f} | "
                f"{row['best_epoch']} | {row['attribute_f1']:.3f} |"
            )
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="demo seeds")
    parser.add_argument("--storage", type=Path, default=Path("capdec-demo-benchmark"),
                        help="folder for the demo worlds and studies")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/demo_science.json"),
                        help="JSON record to write")
    args = parser.parse_args()
    setup_logging()
    results = [summarise_seed(seed, args.storage) for seed in args.seeds]
    args.out.write_text(json.dumps(results, indent=2))
    print(markdown(results))


if __name__ == "__main__":
    main()
