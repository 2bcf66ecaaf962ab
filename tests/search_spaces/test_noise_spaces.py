"""The `noise` and `full` search spaces, sampled with a real Optuna study."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import optuna
import pytest

from capdec.config import RunConfig
from search_spaces import SEARCH_PREFIX, SPACES, describe_spaces, get_space
from search_spaces.noise import (
    EPSILON_RANGE,
    FGSM_ALPHA_RANGE,
    FGSM_EPSILON_RANGE,
    full,
    noise,
)

NUM_SAMPLES = 300
FGSM_KEYS = {"fgsm_alpha", "fgsm_random"}


def _samples(space: Callable[[Any], dict[str, Any]], seed: int = 0) -> list[dict[str, Any]]:
    """Return the full trial config (sampled and fixed values) of NUM_SAMPLES random trials."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    configs = []
    for _ in range(NUM_SAMPLES):
        trial = study.ask()
        fixed = space(trial)
        configs.append({**trial.params, **fixed})
        study.tell(trial, 0.0)
    return configs


def _run_values(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if not k.startswith(SEARCH_PREFIX)}


@pytest.mark.parametrize("name", ["noise", "full"])
def test_space_is_registered(name: str) -> None:
    assert SPACES[name] is get_space(name)
    assert f"{name}: " in describe_spaces()


@pytest.mark.parametrize("space", [noise, full])
def test_every_sample_builds_a_run_config(space: Callable[[Any], dict[str, Any]]) -> None:
    for config in _samples(space):
        run = RunConfig.from_dict({"data": "unused", **_run_values(config)})
        assert run.noise.distribution == config["distribution"]
        assert run.noise.epsilon == config["epsilon"]
        assert run.noise.normalize_before is config["normalize_before"]
        assert run.noise.normalize_after is config["normalize_after"]


@pytest.mark.parametrize("space", [noise, full])
def test_epsilon_sampled_only_with_noise(space: Callable[[Any], dict[str, Any]]) -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    for _ in range(NUM_SAMPLES):
        trial = study.ask()
        config = space(trial)
        if config["distribution"] == "none":
            assert "epsilon" not in trial.params
            assert config["epsilon"] == 0.0
        else:
            assert EPSILON_RANGE[0] <= trial.params["epsilon"] <= EPSILON_RANGE[1]
        assert config["search/noise_variance"] == pytest.approx(config["epsilon"] ** 2)
        study.tell(trial, 0.0)


@pytest.mark.parametrize("space", [noise, full])
def test_ball_uses_matched_radius(space: Callable[[Any], dict[str, Any]]) -> None:
    for config in _samples(space):
        if config["distribution"] == "uniform_ball":
            assert config["ball_radius"] == "matched"
        else:
            assert "ball_radius" not in config


def test_noise_space_reaches_every_category() -> None:
    configs = _samples(noise)
    assert {c["distribution"] for c in configs} == {"gaussian", "uniform_ball", "none"}
    assert {c["normalize_before"] for c in configs} == {True, False}
    assert {c["normalize_after"] for c in configs} == {True, False}
    # the noise space leaves offset, image mixing and FGSM at their run-setting defaults
    keys = set().union(*configs)
    assert keys.isdisjoint({"modality_offset", "image_ratio", "image_mixing", "fgsm_epsilon"})


def test_full_space_reaches_every_category() -> None:
    configs = _samples(full)
    assert {c["distribution"] for c in configs} == {"gaussian", "uniform_ball", "none"}
    assert {c["modality_offset"] for c in configs} == {"none", "fixed", "learned"}
    assert {c["image_ratio"] for c in configs} == {0.0, 0.1, 0.2, 0.5}
    assert {c["image_mixing"] for c in configs if "image_mixing" in c} == {"interleave", "random"}
    assert {c["search/adversarial"] for c in configs} == {"off", "fgsm"}
    assert {c["fgsm_random"] for c in configs if "fgsm_random" in c} == {False, True}
    # FGSM without noise (FGSM instead of noise) is reachable too
    assert any(c["distribution"] == "none" and c["fgsm_epsilon"] > 0 for c in configs)


def test_image_mixing_sampled_only_with_images() -> None:
    for config in _samples(full):
        if config["image_ratio"] > 0:
            assert config["image_mixing"] in ("interleave", "random")
        else:
            assert "image_mixing" not in config


def test_fgsm_settings_sampled_only_under_fgsm() -> None:
    for config in _samples(full):
        if config["search/adversarial"] == "fgsm":
            assert FGSM_EPSILON_RANGE[0] <= config["fgsm_epsilon"] <= FGSM_EPSILON_RANGE[1]
            assert FGSM_ALPHA_RANGE[0] <= config["fgsm_alpha"] <= FGSM_ALPHA_RANGE[1]
            assert isinstance(config["fgsm_random"], bool)
        else:
            # fgsm_epsilon 0 is what turns FGSM off in training
            assert config["fgsm_epsilon"] == 0.0
            assert FGSM_KEYS.isdisjoint(config)


def test_epsilon_is_log_uniform() -> None:
    epsilons = [c["epsilon"] for c in _samples(noise) if c["distribution"] != "none"]
    logs = [math.log(e) for e in epsilons]
    midpoint = (math.log(EPSILON_RANGE[0]) + math.log(EPSILON_RANGE[1])) / 2
    below = sum(value < midpoint for value in logs) / len(logs)
    # half of a log-uniform sample lies below the geometric midpoint (0.07)
    assert 0.35 < below < 0.65


def test_enqueued_point_is_sampled_as_given() -> None:
    # start points name the Optuna parameters, including search/adversarial
    point = {
        "distribution": "uniform_ball",
        "epsilon": 0.1,
        "normalize_before": True,
        "normalize_after": False,
        "modality_offset": "learned",
        "image_ratio": 0.5,
        "image_mixing": "random",
        "search/adversarial": "fgsm",
        "fgsm_epsilon": 0.01,
        "fgsm_alpha": 0.5,
        "fgsm_random": True,
    }
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study()
    study.enqueue_trial(point)
    config = full(study.ask())
    for key in ("distribution", "epsilon", "modality_offset", "image_ratio", "image_mixing"):
        assert config[key] == point[key]
    for key in ("fgsm_epsilon", "fgsm_alpha", "fgsm_random"):
        assert config[key] == point[key]
