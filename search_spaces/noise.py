"""Search spaces over the noise-injection variants: distribution, scale, normalisation, and
(in ``full``) the modality offset, image mixing and FGSM adversarial training.

Both spaces fix ``ball_radius`` to "matched" (radius eps sqrt(d + 2)), so one epsilon gives the
Gaussian and the uniform ball the same mean squared noise norm d eps^2 and the distributions
compare at equal scale. docs/noise-variants.md describes each variant and shows how to search the
CapDec code's radius convention with a space of your own.

Each space returns every noise setting that applies to the trial, sampled or fixed, so the trial
config (and with it the MLflow run) records the whole variant. Settings that do not apply are
neither sampled nor returned: no ``epsilon`` search without noise, no ``image_mixing`` without
image samples, no ``fgsm_alpha`` without FGSM.
"""

from __future__ import annotations

from typing import Any

DISTRIBUTIONS = ("gaussian", "uniform_ball", "none")
# Standard deviation per dimension. The epsilon space searches variances 1e-4..1e-1 (std 0.01 to
# 0.32); this range starts at the same std and reaches further, to 0.5.
EPSILON_RANGE = (0.01, 0.5)
MODALITY_OFFSETS = ("none", "fixed", "learned")
IMAGE_RATIOS = (0.0, 0.1, 0.2, 0.5)
IMAGE_MIXING = ("interleave", "random")
ADVERSARIAL_MODES = ("off", "fgsm")
# FGSM's L-inf step per dimension. Its L2 norm is fgsm_epsilon sqrt(d), 0.02 to 1.1 for d = 512,
# so the step stays below or near the unit norm of a normalised CLIP embedding.
FGSM_EPSILON_RANGE = (1e-3, 5e-2)
# weight alpha of the clean loss, centred on an equal mix of the clean and the adversarial loss
FGSM_ALPHA_RANGE = (0.25, 0.75)


def noise(trial: Any) -> dict[str, Any]:
    """distribution {gaussian, uniform_ball, none} x epsilon log 0.01..0.5 x normalize_before/after.

    ``epsilon`` is the standard deviation per dimension, sampled only when there is noise; its
    square is recorded as ``search/noise_variance`` (the CapDec paper's unit). The ball uses the
    matched radius. Both L2 normalisation switches are searched independently, and validation
    applies the same normalisations to the image embeddings.
    """
    return _noise_settings(trial)


def full(trial: Any) -> dict[str, Any]:
    """noise x modality_offset {none, fixed, learned} x image_ratio {0, .1, .2, .5} x adversarial {off, fgsm}.

    On top of ``noise``: ``image_mixing`` {interleave, random} is sampled only when image_ratio
    > 0. ``search/adversarial`` {off, fgsm} chooses FGSM; only under fgsm are ``fgsm_epsilon``
    (log 0.001..0.05, the L-inf step), ``fgsm_alpha`` (0.25..0.75, weight of the clean loss) and
    ``fgsm_random`` {false, true} sampled. FGSM combines with every distribution, including
    none (FGSM instead of noise). The fixed offset needs a dataset prepared from paired
    training photos; image_ratio > 0 needs those photos too.
    """
    settings = _noise_settings(trial)
    settings["modality_offset"] = trial.suggest_categorical("modality_offset", MODALITY_OFFSETS)

    image_ratio = trial.suggest_categorical("image_ratio", IMAGE_RATIOS)
    settings["image_ratio"] = image_ratio
    if image_ratio > 0:
        settings["image_mixing"] = trial.suggest_categorical("image_mixing", IMAGE_MIXING)

    adversarial = trial.suggest_categorical("search/adversarial", ADVERSARIAL_MODES)
    if adversarial == "fgsm":
        settings["fgsm_epsilon"] = trial.suggest_float(
            "fgsm_epsilon", *FGSM_EPSILON_RANGE, log=True
        )
        settings["fgsm_alpha"] = trial.suggest_float("fgsm_alpha", *FGSM_ALPHA_RANGE)
        settings["fgsm_random"] = trial.suggest_categorical("fgsm_random", (False, True))
    else:
        settings["fgsm_epsilon"] = 0.0  # 0 disables FGSM
    return settings


def _noise_settings(trial: Any) -> dict[str, Any]:
    """Sample the distribution, its epsilon and both normalisation switches."""
    distribution = trial.suggest_categorical("distribution", DISTRIBUTIONS)
    settings: dict[str, Any] = {"distribution": distribution}
    if distribution == "none":
        settings["epsilon"] = 0.0
    else:
        settings["epsilon"] = trial.suggest_float("epsilon", *EPSILON_RANGE, log=True)
    settings["search/noise_variance"] = settings["epsilon"] ** 2
    if distribution == "uniform_ball":
        settings["ball_radius"] = "matched"

    settings["normalize_before"] = trial.suggest_categorical("normalize_before", (True, False))
    settings["normalize_after"] = trial.suggest_categorical("normalize_after", (True, False))
    return settings
