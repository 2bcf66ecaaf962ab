"""Noise injection into CLIP text embeddings, and the matching treatment of image embeddings.

CapDec trains the decoder on CLIP *text* embeddings and captions CLIP *image* embeddings at test
time. Text and image embeddings of the same content do not coincide (the modality gap), so the
text embedding is perturbed during training. The decoder then learns to read a neighbourhood of
each text embedding, and with enough noise that neighbourhood contains the matching images.

Training input:  x -> L2-normalise (normalize_before) -> + offset -> + noise -> L2-normalise
(normalize_after). Inference input: the same normalisations without offset or noise. The offset
(the mean image embedding minus the mean text embedding, or a learned vector) moves text towards
images during training, so images are decoded as they are.
"""

from __future__ import annotations

import math

import torch

from capdec.config import NoiseConfig

IMAGE_MIXING_MODES = ("interleave", "random")


def l2_normalize(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Scale each row of ``x`` (last dimension) to unit L2 norm; all-zero rows stay zero."""
    return x / x.norm(dim=-1, keepdim=True).clamp_min(eps)


def ball_radius(cfg: NoiseConfig, dim: int) -> float:
    """Return the radius of the uniform-ball noise for embeddings of size ``dim``.

    "epsilon" uses epsilon as the radius, as the CapDec code does. A point uniform in that ball has
    E|n|^2 = eps^2 d / (d + 2), about 1/(d + 2) of the Gaussian's d eps^2, so its norm is near
    eps where Gaussian noise of the same epsilon has norm near eps sqrt(d). "matched" uses
    eps sqrt(d + 2), which gives E|n|^2 = d eps^2, the same mean squared norm as the Gaussian.

    Raises:
        ValueError: when dim is below 1.
    """
    if dim < 1:
        raise ValueError(f"embedding dim must be >= 1; got {dim}")
    if cfg.ball_radius == "matched":
        return cfg.epsilon * math.sqrt(dim + 2)
    return cfg.epsilon


def sample_noise(
    shape: tuple[int, ...] | torch.Size,
    cfg: NoiseConfig,
    generator: torch.Generator,
    *,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Draw one noise vector per row.

    Args:
        shape: output shape; the last dimension is the embedding size d.
        cfg: the noise distribution and its epsilon.
        generator: source of randomness; the noise is created on its device.
        dtype: floating dtype of the result.

    Returns:
        "gaussian": N(0, eps^2) independently per dimension. "uniform_ball": uniform in the L2
        ball of radius ``ball_radius(cfg, d)``. "none", or epsilon 0: zeros, drawing nothing from
        the generator.
    """
    device = generator.device
    if cfg.distribution == "none" or cfg.epsilon == 0:
        return torch.zeros(shape, dtype=dtype, device=device)
    if cfg.distribution == "gaussian":
        return cfg.epsilon * torch.randn(shape, generator=generator, dtype=dtype, device=device)

    # uniform in the ball: an isotropic direction, radius r U^(1/d) so the density is uniform
    dim = shape[-1]
    direction = l2_normalize(torch.randn(shape, generator=generator, dtype=dtype, device=device))
    u = torch.rand((*shape[:-1], 1), generator=generator, dtype=dtype, device=device)
    return ball_radius(cfg, dim) * u.pow(1.0 / dim) * direction


def perturb_text_embeddings(
    x: torch.Tensor,
    cfg: NoiseConfig,
    generator: torch.Generator,
    offset: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Turn clean text embeddings into the noisy training input of the mapping network.

    Args:
        x: (B, D) CLIP text embeddings.
        cfg: noise and normalisation settings.
        generator: source of the noise; it may live on another device than ``x``.
        offset: (D,) vector added before the noise (the fixed modality offset, or the learned
            ``ClipCaptionModel.offset`` parameter, which then receives gradients), or None.

    Returns:
        The perturbed (B, D) embeddings, and diagnostics: "noise_norm", the mean L2 norm of the
        noise, and "clean_noisy_cosine", the mean cosine between the clean input (after
        normalize_before, if set) and the result.
    """
    clean = l2_normalize(x) if cfg.normalize_before else x
    shifted = clean if offset is None else clean + offset.to(clean.dtype)
    noise = sample_noise(clean.shape, cfg, generator, dtype=clean.dtype).to(clean.device)
    noisy = shifted + noise
    if cfg.normalize_after:
        noisy = l2_normalize(noisy)

    with torch.no_grad():
        diagnostics = {
            "noise_norm": noise.norm(dim=-1).mean().item(),
            "clean_noisy_cosine": torch.nn.functional.cosine_similarity(clean, noisy, dim=-1)
            .mean()
            .item(),
        }
    return noisy, diagnostics


def prepare_image_embeddings(x: torch.Tensor, cfg: NoiseConfig) -> torch.Tensor:
    """Prepare CLIP image embeddings for decoding: the training normalisations, nothing else.

    No offset is added, because the offset already moved the text embeddings towards the images
    during training, and no noise is added, because inference is deterministic. The same applies
    to image embeddings mixed into training batches (``NoiseConfig.image_ratio``).

    Args:
        x: (N, D) CLIP image embeddings.
        cfg: the run's noise settings; only normalize_before and normalize_after are read.

    Returns:
        (N, D) embeddings, unit norm when either normalisation is on.
    """
    if cfg.normalize_before:
        x = l2_normalize(x)
    if cfg.normalize_after:
        x = l2_normalize(x)
    return x


def image_sample_mask(
    num_samples: int, ratio: float, mode: str, generator: torch.Generator
) -> torch.Tensor:
    """Choose which training samples use a real image embedding instead of a noisy text one.

    Args:
        num_samples: number of samples (a batch, or an epoch); >= 0.
        ratio: fraction of image samples, in [0, 1].
        mode: "interleave" marks exactly round(num_samples * ratio) samples (halves rounded up),
            spread evenly over the range, the same every call. "random" marks each sample
            independently with probability ``ratio``, drawn from ``generator``.
        generator: used by "random" only.

    Returns:
        (num_samples,) bool tensor on the CPU, True for image samples.

    Raises:
        ValueError: on a negative num_samples, a ratio outside [0, 1] or an unknown mode.
    """
    if num_samples < 0:
        raise ValueError(f"num_samples must be >= 0; got {num_samples}")
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"image ratio must be in [0, 1]; got {ratio}")
    if mode not in IMAGE_MIXING_MODES:
        raise ValueError(
            f"image mixing mode must be one of {', '.join(IMAGE_MIXING_MODES)}; got {mode!r}"
        )

    if mode == "random":
        draws = torch.rand(num_samples, generator=generator, device=generator.device)
        return (draws < ratio).cpu()

    # sample j is marked when floor((j + 1) k / n) steps up, which happens exactly k times
    count = math.floor(num_samples * ratio + 0.5)
    index = torch.arange(num_samples)
    return (index + 1) * count // max(num_samples, 1) > index * count // max(num_samples, 1)


def noise_magnitude(cfg: NoiseConfig, dim: int) -> dict[str, float]:
    """Return the expected size of the noise, in units that compare across distributions.

    Args:
        cfg: the noise settings.
        dim: embedding size d; >= 1.

    Returns:
        "norm_mean": E|n|, the mean L2 norm of one noise vector. "norm_rms": sqrt(E|n|^2).
        "std_per_dim": sqrt(E|n|^2 / d), the per-dimension standard deviation (epsilon for the
        Gaussian). All are 0 for "none".

    Raises:
        ValueError: when dim is below 1.
    """
    if dim < 1:
        raise ValueError(f"embedding dim must be >= 1; got {dim}")
    if cfg.distribution == "none":
        return {"norm_mean": 0.0, "norm_rms": 0.0, "std_per_dim": 0.0}

    if cfg.distribution == "gaussian":
        # |n| / eps follows a chi distribution with d degrees of freedom
        chi_mean = math.sqrt(2.0) * math.exp(math.lgamma((dim + 1) / 2) - math.lgamma(dim / 2))
        norm_mean = cfg.epsilon * chi_mean
        mean_square = dim * cfg.epsilon**2
    else:
        # the radius of a uniform point in a d-ball of radius R has density d r^(d-1) / R^d
        radius = ball_radius(cfg, dim)
        norm_mean = radius * dim / (dim + 1)
        mean_square = radius**2 * dim / (dim + 2)
    return {
        "norm_mean": norm_mean,
        "norm_rms": math.sqrt(mean_square),
        "std_per_dim": math.sqrt(mean_square / dim),
    }
