"""Plots of a study's trials: validation CIDEr per epoch, and best CIDEr against noise level."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display is needed or assumed
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from analysis.report import TrialSummary  # noqa: E402
from capdec import metric_names as names  # noqa: E402

logger = logging.getLogger(__name__)


def plot_cider_curves(trials: list[TrialSummary], path: str | Path) -> Path:
    """Write a PNG with validation CIDEr per epoch (left) and best CIDEr against epsilon (right).

    The right panel is left empty when the trials carry no ``epsilon`` parameter.
    """
    path = Path(path)
    figure, (curves, scatter) = plt.subplots(1, 2, figsize=(11, 4.2))
    for trial in trials:
        epochs = [r[names.EPOCH] for r in trial.history]
        ciders = [r[names.VAL_CIDER] for r in trial.history]
        label = trial.trial_id
        if "epsilon" in trial.params:
            label += f" (eps {trial.params['epsilon']:.3g})"
        curves.plot(epochs, ciders, marker="o", label=label)
    curves.set(xlabel="epoch", ylabel="validation CIDEr", title="Validation CIDEr per epoch")
    curves.xaxis.set_major_locator(MaxNLocator(integer=True))
    if len(trials) <= 12:
        curves.legend(fontsize=7)

    points = [
        (float(t.params["epsilon"]), t.best_cider)
        for t in trials
        if "epsilon" in t.params and not math.isnan(t.best_cider)
    ]
    if points:
        points.sort()
        scatter.plot([p[0] for p in points], [p[1] for p in points], marker="o")
        scatter.set(xlabel="noise std per dimension (epsilon)", ylabel="best validation CIDEr",
                    title="Best CIDEr against noise level")
    else:
        scatter.set_axis_off()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    logger.info("wrote %s", path)
    return path
