"""Search spaces over the noise level epsilon of CapDec's Gaussian noise injection."""

from __future__ import annotations

import math
from typing import Any

# Variance range searched in the CapDec paper ("Text-Only Training for Image Captioning using
# Noise-Injected CLIP", Nukrai et al., 2022), which reports variances 0.001 to 0.1 for COCO.
VARIANCE_RANGE = (1e-4, 1e-1)
# Standard deviation range of the linear space; it includes 0 (no noise) as a baseline.
STD_RANGE = (0.0, 0.75)


def epsilon(trial: Any) -> dict[str, Any]:
    """Gaussian noise variance log-uniform on 1e-4..1e-1, L2 normalisation before the noise.

    Optuna searches ``search/noise_variance``; the run receives ``epsilon``, the standard deviation
    per dimension (its square root), so both units appear with every trial.
    """
    variance = trial.suggest_float("search/noise_variance", *VARIANCE_RANGE, log=True)
    return {
        "distribution": "gaussian",
        "epsilon": math.sqrt(variance),
        "normalize_before": True,
    }


def epsilon_linear(trial: Any) -> dict[str, Any]:
    """Gaussian noise std uniform on 0..0.75 (0 = no noise), L2 normalisation before the noise.

    A linear range contains the no-noise baseline, so a study can compare against it directly;
    the variance is recorded as ``search/noise_variance``.
    """
    std = trial.suggest_float("epsilon", *STD_RANGE)
    return {
        "distribution": "gaussian",
        "normalize_before": True,
        "search/noise_variance": std * std,
    }
