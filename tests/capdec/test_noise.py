from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from capdec.config import NoiseConfig
from capdec.noise import (
    ball_radius,
    image_sample_mask,
    l2_normalize,
    noise_magnitude,
    perturb_text_embeddings,
    prepare_image_embeddings,
    sample_noise,
)

DIM = 512
NUM_SAMPLES = 4000


def _generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _raw(**changes: object) -> NoiseConfig:
    """Return a noise config with both normalisations off, so outputs are easy to predict."""
    base = NoiseConfig(normalize_before=False, normalize_after=False)
    return dataclasses.replace(base, **changes)


def test_gaussian_mean_square_norm() -> None:
    cfg = NoiseConfig(distribution="gaussian", epsilon=0.1)
    noise = sample_noise((NUM_SAMPLES, DIM), cfg, _generator())
    scaled = noise.pow(2).sum(dim=1) / cfg.epsilon**2  # chi-square with DIM degrees of freedom
    # the mean of NUM_SAMPLES chi-square(d) draws has standard deviation sqrt(2 d / n)
    tolerance = 5 * math.sqrt(2 * DIM / NUM_SAMPLES)
    assert abs(scaled.mean().item() - DIM) < tolerance
    assert abs(noise.std().item() - cfg.epsilon) < 0.002


def test_gaussian_norm_matches_noise_magnitude() -> None:
    cfg = NoiseConfig(distribution="gaussian", epsilon=0.2)
    noise = sample_noise((NUM_SAMPLES, DIM), cfg, _generator())
    expected = noise_magnitude(cfg, DIM)
    assert (
        abs(noise.norm(dim=1).mean().item() - expected["norm_mean"]) < 0.01 * expected["norm_mean"]
    )
    assert expected["std_per_dim"] == pytest.approx(0.2)
    assert expected["norm_rms"] == pytest.approx(0.2 * math.sqrt(DIM))


@pytest.mark.parametrize("radius_mode", ["epsilon", "matched"])
def test_ball_norms_stay_inside_radius(radius_mode: str) -> None:
    cfg = NoiseConfig(distribution="uniform_ball", epsilon=0.1, ball_radius=radius_mode)
    radius = ball_radius(cfg, DIM)
    norms = sample_noise((NUM_SAMPLES, DIM), cfg, _generator()).norm(dim=1)
    assert norms.max().item() <= radius * (1 + 1e-6)
    # in 512 dimensions P(|n| < 0.99 R) = 0.99^512, about 0.6%, so the 1% quantile sits near R
    assert torch.quantile(norms, 0.01).item() > 0.985 * radius


def test_ball_radius_conventions() -> None:
    assert (
        ball_radius(
            NoiseConfig(distribution="uniform_ball", epsilon=0.1, ball_radius="epsilon"), DIM
        )
        == 0.1
    )
    matched = NoiseConfig(distribution="uniform_ball", epsilon=0.1, ball_radius="matched")
    assert ball_radius(matched, DIM) == pytest.approx(0.1 * math.sqrt(DIM + 2))


def test_ball_radius_rejects_zero_dim() -> None:
    with pytest.raises(ValueError, match="dim must be >= 1"):
        ball_radius(NoiseConfig(), 0)


def test_matched_ball_mean_square_norm() -> None:
    cfg = NoiseConfig(distribution="uniform_ball", epsilon=0.1, ball_radius="matched")
    noise = sample_noise((NUM_SAMPLES, DIM), cfg, _generator())
    mean_square = noise.pow(2).sum(dim=1).mean().item()
    assert mean_square == pytest.approx(DIM * 0.1**2, rel=0.01)
    assert noise_magnitude(cfg, DIM)["std_per_dim"] == pytest.approx(0.1)


def test_ball_directions_are_isotropic() -> None:
    cfg = NoiseConfig(distribution="uniform_ball", epsilon=1.0, ball_radius="epsilon")
    noise = sample_noise((NUM_SAMPLES, 8), cfg, _generator())
    # every coordinate has mean 0 and the same variance R^2 / (d + 2)
    assert noise.mean(dim=0).abs().max().item() < 0.03
    assert torch.allclose(noise.var(dim=0), torch.full((8,), 1 / 10), atol=0.01)


def test_ball_norm_mean_matches_noise_magnitude() -> None:
    cfg = NoiseConfig(distribution="uniform_ball", epsilon=0.3, ball_radius="epsilon")
    norms = sample_noise((NUM_SAMPLES, 16), cfg, _generator()).norm(dim=1)
    assert norms.mean().item() == pytest.approx(noise_magnitude(cfg, 16)["norm_mean"], rel=0.01)


@pytest.mark.parametrize("distribution", ["gaussian", "uniform_ball", "none"])
def test_zero_noise_is_identity(distribution: str) -> None:
    x = torch.randn(5, 16, generator=_generator(1))
    epsilon = 0.3 if distribution == "none" else 0.0
    output, diagnostics = perturb_text_embeddings(
        x, _raw(distribution=distribution, epsilon=epsilon), _generator()
    )
    assert torch.equal(output, x)
    assert diagnostics["noise_norm"] == 0.0
    assert diagnostics["clean_noisy_cosine"] == pytest.approx(1.0)


def test_no_noise_draws_nothing_from_generator() -> None:
    generator = _generator()
    perturb_text_embeddings(torch.randn(3, 8), _raw(distribution="none"), generator)
    assert torch.equal(torch.rand(4, generator=generator), torch.rand(4, generator=_generator()))


def test_normalize_before_gives_unit_clean_input() -> None:
    x = 3 * torch.randn(6, 32, generator=_generator(1))
    cfg = _raw(epsilon=0.0, normalize_before=True)
    output, _ = perturb_text_embeddings(x, cfg, _generator())
    assert torch.allclose(output.norm(dim=1), torch.ones(6))
    assert torch.allclose(output, x / x.norm(dim=1, keepdim=True))


def test_normalize_after_gives_unit_output() -> None:
    x = 3 * torch.randn(6, 32, generator=_generator(1))
    output, diagnostics = perturb_text_embeddings(
        x, _raw(epsilon=0.5, normalize_after=True), _generator()
    )
    assert torch.allclose(output.norm(dim=1), torch.ones(6))
    assert diagnostics["clean_noisy_cosine"] < 0.99


def test_noise_diagnostics_report_noise_norm() -> None:
    x = torch.randn(2000, 64, generator=_generator(1))
    cfg = NoiseConfig(distribution="gaussian", epsilon=0.05)
    _, diagnostics = perturb_text_embeddings(x, cfg, _generator())
    assert diagnostics["noise_norm"] == pytest.approx(
        noise_magnitude(cfg, 64)["norm_mean"], rel=0.01
    )
    # unit vectors plus noise of norm ~0.4: cosine ~ 1 / sqrt(1 + 0.16)
    assert diagnostics["clean_noisy_cosine"] == pytest.approx(
        1 / math.sqrt(1 + 64 * 0.05**2), abs=0.01
    )


def test_fixed_offset_is_added_before_noise() -> None:
    x = torch.randn(4, 8, generator=_generator(1))
    offset = torch.linspace(-1, 1, 8)
    output, _ = perturb_text_embeddings(x, _raw(distribution="none"), _generator(), offset=offset)
    assert torch.allclose(output, x + offset)


def test_offset_follows_normalize_before() -> None:
    x = 5 * torch.randn(4, 8, generator=_generator(1))
    offset = torch.full((8,), 0.1)
    cfg = _raw(distribution="none", normalize_before=True)
    output, _ = perturb_text_embeddings(x, cfg, _generator(), offset=offset)
    assert torch.allclose(output, l2_normalize(x) + offset)


def test_learned_offset_receives_gradients() -> None:
    offset = torch.nn.Parameter(torch.zeros(8))
    x = torch.randn(4, 8, generator=_generator(1))
    output, _ = perturb_text_embeddings(
        x, NoiseConfig(epsilon=0.1, normalize_after=True), _generator(), offset=offset
    )
    output.sum().backward()
    assert offset.grad is not None
    assert offset.grad.abs().sum().item() > 0


def test_noise_is_reproducible_with_seeded_generator() -> None:
    x = torch.randn(4, 8)
    first, _ = perturb_text_embeddings(x, NoiseConfig(), _generator(7))
    second, _ = perturb_text_embeddings(x, NoiseConfig(), _generator(7))
    third, _ = perturb_text_embeddings(x, NoiseConfig(), _generator(8))
    assert torch.equal(first, second)
    assert not torch.equal(first, third)


def test_image_embeddings_get_normalisation_only() -> None:
    x = 4 * torch.randn(5, 16, generator=_generator(1))
    assert torch.equal(prepare_image_embeddings(x, _raw(epsilon=0.5)), x)
    prepared = prepare_image_embeddings(x, NoiseConfig(epsilon=0.5, modality_offset="fixed"))
    assert torch.allclose(prepared, x / x.norm(dim=1, keepdim=True))
    after_only = prepare_image_embeddings(x, _raw(normalize_after=True))
    assert torch.allclose(after_only.norm(dim=1), torch.ones(5))


@pytest.mark.parametrize(
    ("num_samples", "ratio", "expected"),
    [
        (64, 0.25, 16),
        (64, 0.0, 0),
        (64, 1.0, 64),
        (10, 0.33, 3),
        (7, 0.5, 4),
        (1, 0.4, 0),
        (0, 0.5, 0),
    ],
)
def test_interleave_mask_marks_exact_count(num_samples: int, ratio: float, expected: int) -> None:
    mask = image_sample_mask(num_samples, ratio, "interleave", _generator())
    assert mask.dtype == torch.bool
    assert mask.shape == (num_samples,)
    assert int(mask.sum()) == expected


def test_interleave_mask_spreads_evenly() -> None:
    mask = image_sample_mask(100, 0.3, "interleave", _generator())
    gaps = torch.diff(torch.nonzero(mask).flatten())
    assert set(gaps.tolist()) <= {3, 4}
    assert torch.equal(
        image_sample_mask(64, 0.25, "interleave", _generator()).nonzero().flatten(),
        torch.arange(3, 64, 4),
    )


def test_interleave_mask_ignores_generator() -> None:
    first = image_sample_mask(50, 0.2, "interleave", _generator(1))
    second = image_sample_mask(50, 0.2, "interleave", _generator(2))
    assert torch.equal(first, second)


def test_random_mask_fraction_is_close_to_ratio() -> None:
    num_samples, ratio = 20000, 0.3
    mask = image_sample_mask(num_samples, ratio, "random", _generator())
    spread = math.sqrt(ratio * (1 - ratio) / num_samples)
    assert abs(mask.float().mean().item() - ratio) < 5 * spread
    assert not torch.equal(mask, image_sample_mask(num_samples, ratio, "random", _generator(1)))


@pytest.mark.parametrize(("ratio", "expected"), [(0.0, 0), (1.0, 100)])
def test_random_mask_extremes_are_exact(ratio: float, expected: int) -> None:
    assert int(image_sample_mask(100, ratio, "random", _generator()).sum()) == expected


def test_image_mask_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="image ratio must be in"):
        image_sample_mask(10, 1.5, "interleave", _generator())
    with pytest.raises(ValueError, match="image mixing mode"):
        image_sample_mask(10, 0.5, "alternate", _generator())
    with pytest.raises(ValueError, match="num_samples must be >= 0"):
        image_sample_mask(-1, 0.5, "random", _generator())


def test_noise_magnitude_is_zero_without_noise() -> None:
    assert noise_magnitude(NoiseConfig(distribution="none", epsilon=0.5), DIM) == {
        "norm_mean": 0.0,
        "norm_rms": 0.0,
        "std_per_dim": 0.0,
    }


def test_l2_normalize_keeps_zero_rows() -> None:
    x = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    assert torch.equal(l2_normalize(x), torch.tensor([[0.6, 0.8], [0.0, 0.0]]))
