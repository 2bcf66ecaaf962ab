"""A `full`-space study on real Ray, Optuna and MLflow: every variant reaches a trial's run."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from study.mlflow_tracking import default_tracking_uri
from study.runner import run_study
from study.settings import StudySettings
from tests.conftest import TOY_RUN

pytestmark = pytest.mark.ray

DIAGNOSTICS = ("train/noise_norm", "train/clean_noisy_cosine", "train/image_fraction")

# One start point per trial, named by the space's Optuna parameters. Together they cover every
# distribution, both normalisations, all three offsets, both image-mixing modes and FGSM.
START_POINTS = [
    {
        "distribution": "gaussian",
        "epsilon": 0.1,
        "normalize_before": True,
        "normalize_after": False,
        "modality_offset": "learned",
        "image_ratio": 0.0,
        "search/adversarial": "off",
    },
    {
        "distribution": "uniform_ball",
        "epsilon": 0.1,
        "normalize_before": True,
        "normalize_after": True,
        "modality_offset": "fixed",
        "image_ratio": 0.5,
        "image_mixing": "interleave",
        "search/adversarial": "off",
    },
    {
        "distribution": "none",
        "normalize_before": False,
        "normalize_after": False,
        "modality_offset": "none",
        "image_ratio": 0.2,
        "image_mixing": "random",
        "search/adversarial": "fgsm",
        "fgsm_epsilon": 0.01,
        "fgsm_alpha": 0.5,
        "fgsm_random": False,
    },
    {
        "distribution": "gaussian",
        "epsilon": 0.05,
        "normalize_before": True,
        "normalize_after": False,
        "modality_offset": "learned",
        "image_ratio": 0.1,
        "image_mixing": "interleave",
        "search/adversarial": "fgsm",
        "fgsm_epsilon": 0.005,
        "fgsm_alpha": 0.7,
        "fgsm_random": True,
    },
]


@pytest.fixture(scope="module")
def full_study_runs(tmp_path_factory: pytest.TempPathFactory, toy_dataset: Path, local_ray):
    storage = tmp_path_factory.mktemp("studies")
    settings = StudySettings(
        name="toy-full",
        data=str(toy_dataset),
        space="full",
        trials=len(START_POINTS),
        epochs=1,
        storage=str(storage),
        scheduler="fifo",
        cpus_per_trial=1,
        start_points=START_POINTS,
        run=dict(TOY_RUN, train_text="both"),
    )
    outcome = run_study(settings)
    assert outcome.finished == len(START_POINTS)
    client = MlflowClient(default_tracking_uri(outcome.study_dir))
    experiment = client.get_experiment_by_name("toy-full")
    return client, client.search_runs([experiment.experiment_id])


def _by_variant(runs: list) -> dict[tuple[str, str], object]:
    return {(r.data.params["distribution"], r.data.params["modality_offset"]): r for r in runs}


def test_full_study_runs_every_start_point(full_study_runs) -> None:
    _, runs = full_study_runs
    assert len(runs) == len(START_POINTS)
    assert all(run.info.status == "FINISHED" for run in runs)
    params = [run.data.params for run in runs]
    assert {p["distribution"] for p in params} == {"gaussian", "uniform_ball", "none"}
    assert {p["modality_offset"] for p in params} == {"none", "fixed", "learned"}
    assert {p.get("image_mixing") for p in params} == {None, "interleave", "random"}
    assert {p["search/adversarial"] for p in params} == {"off", "fgsm"}
    assert sum(float(p["fgsm_epsilon"]) > 0 for p in params) == 2


def test_full_study_logs_diagnostics(full_study_runs) -> None:
    client, runs = full_study_runs
    for run in runs:
        for key in DIAGNOSTICS:
            history = client.get_metric_history(run.info.run_id, key)
            assert [m.step for m in history] == [1], f"{key} missing in {run.data.params}"


def test_full_study_diagnostics_match_variants(full_study_runs) -> None:
    _, runs = full_study_runs
    by_variant = _by_variant(runs)
    without_noise = by_variant["none", "none"].data.metrics
    assert without_noise["train/noise_norm"] == 0.0
    assert without_noise["train/clean_noisy_cosine"] == pytest.approx(1.0)

    # interleaving marks exactly half of the 112 training captions ("both" text sources)
    ball = by_variant["uniform_ball", "fixed"].data.metrics
    assert ball["train/image_fraction"] == 0.5
    assert ball["train/noise_norm"] > 0


def test_learned_offset_norm_is_logged(full_study_runs) -> None:
    client, runs = full_study_runs
    for run in runs:
        history = client.get_metric_history(run.info.run_id, "train/offset_norm")
        if run.data.params["modality_offset"] == "learned":
            assert len(history) == 1
            assert history[0].value > 0
        else:
            assert history == []
