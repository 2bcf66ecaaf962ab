"""A whole study on real Ray, real Optuna, real MLflow (sqlite) and real pycocoevalcap."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from analysis.report import format_report, load_trials
from study.mlflow_tracking import STATUS_TAG, default_tracking_uri
from capdec.metric_names import FINAL_SCORE_KEYS
from study.evaluate import evaluate_study, format_evaluations
from study.runner import StudyError, connect_ray, run_study
from study.settings import StudySettings, load_study_settings
from tests.conftest import TOY_RUN

pytestmark = pytest.mark.ray


def _settings(tmp_path: Path, data: Path, **overrides) -> StudySettings:
    values = dict(
        name="toy-epsilon",
        data=str(data),
        space="epsilon",
        trials=3,
        epochs=2,
        storage=str(tmp_path),
        scheduler="fifo",
        cpus_per_trial=1,
        run=dict(TOY_RUN, train_text="both"),
    )
    values.update(overrides)
    return StudySettings(**values)


@pytest.fixture(scope="module")
def finished_study(tmp_path_factory: pytest.TempPathFactory, toy_dataset: Path, local_ray):
    storage = tmp_path_factory.mktemp("studies")
    outcome = run_study(_settings(storage, toy_dataset))
    return storage, outcome


def test_epsilon_study_end_to_end(finished_study) -> None:
    tmp_path, outcome = finished_study
    study_dir = tmp_path / "toy-epsilon"
    assert outcome.study_dir == study_dir
    assert outcome.finished == 3
    assert not outcome.interrupted

    # every trial is one MLflow run with one validation CIDEr per epoch
    client = MlflowClient(default_tracking_uri(study_dir))
    experiment = client.get_experiment_by_name("toy-epsilon")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 3
    for run in runs:
        history = client.get_metric_history(run.info.run_id, "val/cider")
        assert [m.step for m in history] == [1, 2]
        assert run.info.status == "FINISHED"
        assert run.data.tags[STATUS_TAG] == "FINISHED"
        variance = float(run.data.params["search/noise_variance"])
        assert 1e-4 <= variance <= 1e-1
        # the run receives the standard deviation, the square root of the searched variance
        assert math.isclose(float(run.data.params["epsilon"]), math.sqrt(variance), rel_tol=1e-9)

    # the report lists every trial, best CIDEr first, and each kept the best epoch's weights
    trials = load_trials(study_dir)
    assert len(trials) == 3
    assert [t.best_cider for t in trials] == sorted((t.best_cider for t in trials), reverse=True)
    assert all(t.epochs == 2 for t in trials)
    assert "search/noise_variance" in format_report(trials)
    assert all(list(t.folder.glob("checkpoint_*/best_model.pt")) for t in trials)
    assert load_study_settings(study_dir).trials == 3
    # validation references were tokenised once for the study and every trial was pointed at them
    assert (study_dir / "val_references.json").is_file()
    for trial in trials:
        config = json.loads((trial.folder / "params.json").read_text())
        assert config["val_references"] == str(study_dir / "val_references.json")


def test_existing_study_folder_is_rejected(tmp_path: Path, toy_dataset: Path) -> None:
    (tmp_path / "toy-epsilon").mkdir()
    with pytest.raises(StudyError, match="already exists; continue it with `capdec-study resume"):
        run_study(_settings(tmp_path, toy_dataset))


def test_gpu_request_without_gpus_fails_fast(tmp_path: Path, toy_dataset: Path, local_ray) -> None:
    settings = _settings(tmp_path, toy_dataset, gpus_per_trial=1)
    with pytest.raises(StudyError, match="requests 1 GPU but the Ray cluster has 0"):
        connect_ray(settings)


def test_evaluate_logs_test_scores(finished_study) -> None:
    tmp_path, outcome = finished_study
    evaluations = evaluate_study(outcome.study_dir, split="test", top=2)
    assert len(evaluations) == 2
    ranked = load_trials(outcome.study_dir)
    assert [e.trial.trial_id for e in evaluations] == [t.trial_id for t in ranked[:2]]
    for evaluation in evaluations:
        assert set(evaluation.scores) == set(FINAL_SCORE_KEYS)
        assert all(0.0 <= value for value in evaluation.scores.values())

    client = MlflowClient(default_tracking_uri(outcome.study_dir))
    experiment = client.get_experiment_by_name("toy-epsilon")
    runs = client.search_runs([experiment.experiment_id])
    evaluated = [r for r in runs if "test/cider" in r.data.metrics]
    assert len(evaluated) == 2
    assert all("test/meteor" in r.data.metrics for r in evaluated)
    table = format_evaluations(evaluations)
    assert "meteor" in table
    assert (outcome.study_dir / "evaluation").is_dir()


def test_nan_loss_fails_only_that_trial(tmp_path: Path, toy_dataset: Path, local_ray) -> None:
    settings = _settings(
        tmp_path,
        toy_dataset,
        name="nan-loss",
        space="tests.study.spaces_for_tests:diverging_lr",
        trials=2,
        start_points=[{"lr": 1e12}, {"lr": 3e-3}],
        max_failures=0,
        run={key: value for key, value in TOY_RUN.items() if key != "lr"},
    )
    outcome = run_study(settings)
    assert outcome.finished == 2

    client = MlflowClient(default_tracking_uri(outcome.study_dir))
    runs = client.search_runs([client.get_experiment_by_name("nan-loss").experiment_id])
    by_lr = {run.data.params["lr"]: run for run in runs}
    assert by_lr["1000000000000.0"].info.status == "FAILED"
    assert "training loss became" in by_lr["1000000000000.0"].data.tags["capdec.error"]
    # the study went on: the other trial finished normally
    assert by_lr["0.003"].info.status == "FINISHED"
