"""Noise-injection variants end to end: FGSM, magnitudes, inference, and each key in training."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import capdec.training as training
from capdec.config import ModelConfig, NoiseConfig, RunConfig
from capdec.model import ClipCaptionModel, caption_loss, load_decoder
from capdec.noise import l2_normalize, noise_magnitude, prepare_image_embeddings, sample_noise
from capdec.tokenizer import encode_captions, pad_batch, train_caption_tokenizer
from capdec.training import CapDecRun
from tests.conftest import TOY_RUN

CLIP_DIM = 16
PREFIX_LENGTH = 2
CAPTIONS = [
    "a red circle on a table",
    "the blue square is small",
    "one green triangle here",
    "a yellow circle next to a square",
]


def _config(data: Path, **overrides: Any) -> RunConfig:
    values = {"data": str(data), "train_text": "both", "epochs": 1, **TOY_RUN, **overrides}
    return RunConfig.from_dict(values)


def _small_model() -> tuple[ClipCaptionModel, torch.Tensor, torch.Tensor]:
    """Return a tiny random captioning model in eval mode and a padded batch of caption tokens."""
    torch.manual_seed(0)
    tokenizer = train_caption_tokenizer(CAPTIONS, 300)
    model_cfg = ModelConfig(tiny_layers=1, tiny_width=32, tiny_heads=2, prefix_length=PREFIX_LENGTH)
    decoder = load_decoder(model_cfg, tokenizer)
    model = ClipCaptionModel(decoder, clip_dim=CLIP_DIM, prefix_length=PREFIX_LENGTH).eval()
    token_lists, _ = encode_captions(tokenizer, CAPTIONS, 12)
    tokens, mask = pad_batch(token_lists, tokenizer.pad_token_id)
    return model, tokens, mask


def _loss(model: ClipCaptionModel, x: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor):
    logits = model(model.prefix(x), tokens, mask)
    return caption_loss(logits, tokens, mask, PREFIX_LENGTH)


def _record_prefix_inputs(run: CapDecRun, monkeypatch: pytest.MonkeyPatch) -> list[torch.Tensor]:
    """Record every (B, D) embedding that the mapping network receives during training."""
    inputs: list[torch.Tensor] = []
    original = run.model.prefix

    def recording_prefix(embeddings: torch.Tensor) -> torch.Tensor:
        inputs.append(embeddings.detach().clone())
        return original(embeddings)

    monkeypatch.setattr(run.model, "prefix", recording_prefix)
    return inputs


# ------------------------------------------------------------------ FGSM


@pytest.mark.parametrize("epsilon_adv", [1e-3, 1e-2, 5e-2])
def test_fgsm_step_raises_loss(epsilon_adv: float) -> None:
    model, tokens, mask = _small_model()
    x = l2_normalize(torch.randn(len(CAPTIONS), CLIP_DIM, generator=torch.Generator().manual_seed(1)))
    x.requires_grad_(True)
    clean = _loss(model, x, tokens, mask)
    (gradient,) = torch.autograd.grad(clean, x)

    with torch.no_grad():
        ascent = _loss(model, x + epsilon_adv * gradient.sign(), tokens, mask)
        descent = _loss(model, x - epsilon_adv * gradient.sign(), tokens, mask)
    assert ascent.item() > clean.item()
    # the sign matters: the opposite step lowers the loss
    assert descent.item() < clean.item()


def test_fgsm_step_l2_norm() -> None:
    gradient = torch.randn(64, 512, generator=torch.Generator().manual_seed(0))
    step = 0.01 * gradient.sign()
    # an L-inf step of size e moves every coordinate by e, so its L2 norm is e sqrt(d)
    assert torch.allclose(step.norm(dim=1), torch.full((64,), 0.01 * math.sqrt(512)))


@pytest.mark.parametrize("fgsm_random", [False, True])
def test_training_fgsm_input_has_higher_loss(toy_dataset: Path, fgsm_random: bool) -> None:
    run = CapDecRun(_config(toy_dataset, fgsm_epsilon=0.01, fgsm_random=fgsm_random))
    run.model.eval()  # no dropout, so the two losses differ only by the input
    rows = run.train_rows[:16]
    tokens, mask = pad_batch([run.tokens_by_row[int(r)] for r in rows], run.tokenizer.pad_token_id)
    embeddings = l2_normalize(torch.from_numpy(run.dataset.text_embeddings[rows]))

    losses: list[float] = []
    original = run._loss

    def recording_loss(*args: torch.Tensor) -> torch.Tensor:
        loss = original(*args)
        losses.append(loss.item())
        return loss

    run._loss = recording_loss
    for _ in range(8):
        run._fgsm_loss(embeddings, tokens, mask)
    clean, adversarial = losses[0::2], losses[1::2]
    assert len(adversarial) == 8
    assert all(a > c for c, a in zip(clean, adversarial))


# ------------------------------------------------------------- magnitudes


@pytest.mark.parametrize("dim", [1, 32, 512])
def test_matched_ball_rms_equals_gaussian(dim: int) -> None:
    gaussian = noise_magnitude(NoiseConfig(distribution="gaussian", epsilon=0.2), dim)
    matched = noise_magnitude(
        NoiseConfig(distribution="uniform_ball", epsilon=0.2, ball_radius="matched"), dim
    )
    assert matched["norm_rms"] == pytest.approx(gaussian["norm_rms"])
    assert matched["std_per_dim"] == pytest.approx(0.2)


@pytest.mark.parametrize("dim", [32, 512])
def test_epsilon_ball_rms_below_gaussian(dim: int) -> None:
    gaussian = noise_magnitude(NoiseConfig(distribution="gaussian", epsilon=0.2), dim)
    radius_epsilon = noise_magnitude(
        NoiseConfig(distribution="uniform_ball", epsilon=0.2, ball_radius="epsilon"), dim
    )
    assert radius_epsilon["norm_rms"] == pytest.approx(gaussian["norm_rms"] / math.sqrt(dim + 2))
    assert radius_epsilon["norm_rms"] < 0.2


def test_matched_ball_sampled_mean_square() -> None:
    generator = torch.Generator().manual_seed(0)
    shape = (4000, 512)
    gaussian = sample_noise(shape, NoiseConfig(distribution="gaussian", epsilon=0.1), generator)
    ball_cfg = NoiseConfig(distribution="uniform_ball", epsilon=0.1, ball_radius="matched")
    ball = sample_noise(shape, ball_cfg, generator)
    gaussian_square = gaussian.pow(2).sum(dim=1).mean().item()
    ball_square = ball.pow(2).sum(dim=1).mean().item()
    assert ball_square == pytest.approx(gaussian_square, rel=0.01)
    # equal mean square, but the ball's norms spread far less than the Gaussian's
    assert ball.norm(dim=1).std().item() < 0.5 * gaussian.norm(dim=1).std().item()


# -------------------------------------------------------------- inference


@pytest.mark.parametrize("modality_offset", ["none", "fixed", "learned"])
@pytest.mark.parametrize(("normalize_before", "normalize_after"), [(True, False), (False, True), (False, False)])
def test_images_decoded_without_offset(
    toy_dataset: Path,
    monkeypatch: pytest.MonkeyPatch,
    modality_offset: str,
    normalize_before: bool,
    normalize_after: bool,
) -> None:
    run = CapDecRun(
        _config(
            toy_dataset,
            modality_offset=modality_offset,
            normalize_before=normalize_before,
            normalize_after=normalize_after,
        )
    )
    if run.model.offset is not None:
        with torch.no_grad():
            run.model.offset.fill_(0.5)  # a trained offset is non-zero
    decoded: list[torch.Tensor] = []

    def capture(model, tokenizer, embeddings, **kwargs):
        decoded.append(embeddings)
        return [""] * len(embeddings)

    monkeypatch.setattr(training, "generate_captions", capture)
    run.decode_images(run.val_rows)

    raw = torch.from_numpy(run.dataset.image_embeddings[run.val_rows])
    # the normalisations of training, and nothing else: no offset, no noise
    assert torch.equal(decoded[0], prepare_image_embeddings(raw, run.config.noise))
    if normalize_before or normalize_after:
        assert torch.allclose(decoded[0].norm(dim=1), torch.ones(len(run.val_rows)))
    else:
        assert torch.equal(decoded[0], raw)


# ------------------------------------------------ each variant reaches training


def test_no_noise_run_has_zero_noise_norm(toy_dataset: Path) -> None:
    metrics = CapDecRun(_config(toy_dataset, distribution="none", epsilon=0.3)).train_epoch()
    assert metrics["train/noise_norm"] == 0.0
    assert metrics["train/clean_noisy_cosine"] == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("distribution", "ball_radius"),
    [("gaussian", "matched"), ("uniform_ball", "matched"), ("uniform_ball", "epsilon")],
)
def test_run_noise_norm_matches_theory(toy_dataset: Path, distribution: str, ball_radius: str) -> None:
    config = _config(toy_dataset, distribution=distribution, epsilon=0.1, ball_radius=ball_radius)
    run = CapDecRun(config)
    metrics = run.train_epoch()
    expected = noise_magnitude(config.noise, run.dataset.embed_dim)["norm_mean"]
    # the mean over 112 noise vectors of dimension 32 varies by about 1% (Gaussian) or less (ball)
    assert metrics["train/noise_norm"] == pytest.approx(expected, rel=0.05)
    assert metrics["train/clean_noisy_cosine"] < 1.0


@pytest.mark.parametrize(
    ("normalize_before", "normalize_after", "epsilon", "unit"),
    [
        (True, False, 0.001, True),
        (False, True, 0.3, True),
        (True, True, 0.3, True),
        (False, False, 0.001, False),
    ],
)
def test_normalisation_switches_reach_training(
    toy_dataset: Path,
    monkeypatch: pytest.MonkeyPatch,
    normalize_before: bool,
    normalize_after: bool,
    epsilon: float,
    unit: bool,
) -> None:
    config = _config(
        toy_dataset,
        epsilon=epsilon,
        normalize_before=normalize_before,
        normalize_after=normalize_after,
    )
    run = CapDecRun(config)
    inputs = _record_prefix_inputs(run, monkeypatch)
    run.train_epoch()
    norms = torch.cat(inputs).norm(dim=1)
    if unit:
        assert torch.allclose(norms, torch.ones_like(norms), atol=0.01)
    else:
        # the toy text embeddings have norms near sqrt(32), about 5.7
        assert norms.min().item() > 2.0


def test_fixed_offset_reaches_training(toy_dataset: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = CapDecRun(_config(toy_dataset, distribution="none", modality_offset="fixed"))
    offset = run.fixed_offset
    assert offset is not None
    assert offset.norm().item() > 0.1
    inputs = _record_prefix_inputs(run, monkeypatch)
    run.train_epoch()
    shifted = torch.cat(inputs)
    # the input is the normalised text embedding plus the offset
    assert torch.allclose((shifted - offset).norm(dim=1), torch.ones(len(shifted)), atol=1e-5)
    assert not torch.allclose(shifted.norm(dim=1), torch.ones(len(shifted)), atol=1e-2)


def test_learned_offset_gets_gradient_in_training(toy_dataset: Path) -> None:
    run = CapDecRun(_config(toy_dataset, modality_offset="learned"))
    assert torch.equal(run.model.offset.detach(), torch.zeros(run.dataset.embed_dim))
    metrics = run.train_epoch()
    assert run.model.offset.grad is not None
    assert run.model.offset.grad.abs().sum().item() > 0
    assert metrics["train/offset_norm"] == pytest.approx(run.model.offset.detach().norm().item())


def test_image_ratio_one_trains_on_images_only(
    toy_dataset: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = CapDecRun(_config(toy_dataset, image_ratio=1.0, epsilon=0.3))
    inputs = _record_prefix_inputs(run, monkeypatch)
    metrics = run.train_epoch()
    assert metrics["train/image_fraction"] == 1.0
    # no text sample was perturbed, so no noise was measured
    assert metrics["train/noise_norm"] == 0.0
    fed = torch.cat(inputs)
    images = prepare_image_embeddings(
        torch.from_numpy(run.dataset.image_embeddings[run.image_pairs[:, 0]]), run.config.noise
    )
    # every input is one of the paired training photos' prepared image embeddings, unperturbed
    distances = torch.cdist(fed, images, compute_mode="donot_use_mm_for_euclid_dist")
    distances = distances.min(dim=1).values
    assert distances.max().item() < 1e-5


def test_random_image_mixing_reaches_training(toy_dataset: Path) -> None:
    fractions = {
        CapDecRun(_config(toy_dataset, image_ratio=0.3, image_mixing="random", seed=seed))
        .train_epoch()["train/image_fraction"]
        for seed in range(3)
    }
    # Bernoulli draws per sample: the fraction varies with the seed and stays near 0.3
    assert len(fractions) > 1
    assert all(0.1 < fraction < 0.5 for fraction in fractions)


@pytest.mark.parametrize(("fgsm_epsilon", "calls_per_batch"), [(0.0, 1), (0.01, 2)])
def test_fgsm_epsilon_reaches_training(
    toy_dataset: Path, monkeypatch: pytest.MonkeyPatch, fgsm_epsilon: float, calls_per_batch: int
) -> None:
    run = CapDecRun(_config(toy_dataset, fgsm_epsilon=fgsm_epsilon))
    calls: list[int] = []
    original = run._loss

    def counting_loss(*args: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return original(*args)

    monkeypatch.setattr(run, "_loss", counting_loss)
    run.train_epoch()
    assert len(calls) == calls_per_batch * run.steps_per_epoch


def test_fgsm_loss_mixes_with_alpha(toy_dataset: Path) -> None:
    run = CapDecRun(_config(toy_dataset, fgsm_epsilon=0.01, fgsm_alpha=0.25))
    run.model.eval()
    rows = run.train_rows[:8]
    tokens, mask = pad_batch([run.tokens_by_row[int(r)] for r in rows], run.tokenizer.pad_token_id)
    x = l2_normalize(torch.from_numpy(run.dataset.text_embeddings[rows]))
    losses: list[torch.Tensor] = []
    original = run._loss

    def recording_loss(*args: torch.Tensor) -> torch.Tensor:
        losses.append(original(*args))
        return losses[-1]

    run._loss = recording_loss
    mixed = run._fgsm_loss(x, tokens, mask)
    clean, adversarial = losses
    assert mixed.item() == pytest.approx(0.25 * clean.item() + 0.75 * adversarial.item())
    assert np.isfinite(mixed.item())
