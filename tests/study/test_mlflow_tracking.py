"""The MLflow callback keeps one run per trial across restarts, on a real sqlite store."""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from study.mlflow_tracking import (
    ERROR_TAG,
    STATUS_TAG,
    STOPPED_EARLY_TAG,
    MlflowTrialCallback,
    default_tracking_uri,
    find_trial_run,
    flatten_params,
)


@dataclass
class FakeTrial:
    """The attributes of ray.tune.experiment.Trial that the callback reads."""

    trial_id: str
    config: dict = field(default_factory=dict)
    error_file: str | None = None

    def __str__(self) -> str:
        return f"train_capdec_{self.trial_id}"


def _callback(tmp_path: Path, max_epochs: int = 3) -> MlflowTrialCallback:
    callback = MlflowTrialCallback(
        tracking_uri=default_tracking_uri(tmp_path),
        experiment_name="study-a",
        artifact_location=str(tmp_path / "artifacts"),
        max_epochs=max_epochs,
    )
    callback.setup()
    return callback


def _result(epoch: int, cider: float) -> dict:
    return {"epoch": epoch, "val/cider": cider, "train/loss": 1.0 / epoch, "timestamp": 1_700_000_000}


def _runs(tmp_path: Path) -> list:
    client = MlflowClient(default_tracking_uri(tmp_path))
    experiment = client.get_experiment_by_name("study-a")
    return client.search_runs([experiment.experiment_id])


def test_params_flatten_nested_search_values() -> None:
    params = flatten_params({"epsilon": 0.1, "search": {"noise_variance": 0.01}})
    assert params == {"epsilon": "0.1", "search/noise_variance": "0.01"}


def test_resumed_trial_reattaches_to_its_run(tmp_path: Path) -> None:
    trial = FakeTrial("t1", {"epsilon": 0.1})
    callback = _callback(tmp_path)
    callback.on_trial_start(0, [], trial)
    callback.on_trial_result(0, [], trial, _result(1, 0.5))
    callback.on_experiment_end([trial])  # interrupted

    runs = _runs(tmp_path)
    assert len(runs) == 1
    assert runs[0].info.status == "KILLED"

    # the driver restarts: a new callback object unpickled from the experiment state
    resumed = pickle.loads(pickle.dumps(callback))
    resumed.setup()
    resumed.on_trial_start(0, [], trial)
    resumed.on_trial_result(0, [], trial, _result(1, 0.5))  # a repeated epoch is not logged twice
    resumed.on_trial_result(0, [], trial, _result(2, 0.7))
    resumed.on_trial_result(0, [], trial, _result(3, 0.6))
    resumed.on_trial_complete(0, [], trial)

    runs = _runs(tmp_path)
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.tags[STATUS_TAG] == "FINISHED"
    assert run.data.tags[STOPPED_EARLY_TAG] == "false"
    history = MlflowClient(default_tracking_uri(tmp_path)).get_metric_history(run.info.run_id, "val/cider")
    assert [m.step for m in history] == [1, 2, 3]
    assert [m.value for m in history] == [0.5, 0.7, 0.6]
    assert run.data.params["epsilon"] == "0.1"


def test_trial_error_is_recorded(tmp_path: Path) -> None:
    error_file = tmp_path / "error.txt"
    error_file.write_text("Traceback ...\ncapdec.training.NonFiniteLossError: training loss became nan\n")
    trial = FakeTrial("t2", {"epsilon": 0.2}, error_file=str(error_file))
    callback = _callback(tmp_path)
    callback.on_trial_start(0, [], trial)
    callback.on_trial_error(0, [], trial)

    run = find_trial_run(MlflowClient(default_tracking_uri(tmp_path)), _runs(tmp_path)[0].info.experiment_id, "t2")
    assert run.info.status == "FAILED"
    assert "training loss became nan" in run.data.tags[ERROR_TAG]


def test_early_stopped_trial_is_tagged(tmp_path: Path) -> None:
    trial = FakeTrial("t3")
    callback = _callback(tmp_path, max_epochs=3)
    callback.on_trial_result(0, [], trial, _result(1, 0.1))
    callback.on_trial_complete(0, [], trial)
    assert _runs(tmp_path)[0].data.tags[STOPPED_EARLY_TAG] == "true"


def test_duplicate_runs_for_trial_are_error(tmp_path: Path) -> None:
    callback = _callback(tmp_path)
    client = callback.client
    experiment_id = client.get_experiment_by_name("study-a").experiment_id
    for _ in range(2):
        client.create_run(experiment_id, tags={"capdec.trial_id": "t4"})
    with pytest.raises(RuntimeError, match="2 runs for trial t4"):
        find_trial_run(client, experiment_id, "t4")
