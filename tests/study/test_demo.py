"""The quick demo: world, tiny CLIP, and an epsilon study, end to end on real components."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from analysis.report import load_trials
from study.mlflow_tracking import default_tracking_uri



def test_full_demo_searches_with_asha(tmp_path: Path) -> None:
    from study.demo import demo_settings

    settings = demo_settings(seed=3, quick=False, storage=tmp_path, data=tmp_path / "world",
                             trials=None)
    assert settings.scheduler == "asha"
    assert settings.space == "epsilon_linear"
    assert settings.seed == 3
    assert settings.trials == 8
    assert settings.epochs == 2
    # no noise and a noise variance of 0.25 are always trials, so the inverted U can be read off
    epsilons = [point["epsilon"] for point in settings.start_points]
    assert 0.0 in epsilons
    assert max(epsilons) ** 2 >= 0.25


@pytest.mark.ray
@pytest.mark.slow
def test_quick_demo_completes(tmp_path: Path, local_ray, monkeypatch: pytest.MonkeyPatch) -> None:
    from study.demo import describe_world_clip, run_demo
    from study.settings import load_study_settings

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    outcome = run_demo(seed=0, quick=True, storage=tmp_path / "demo", trials=4)
    assert not outcome.interrupted
    assert outcome.finished == 4

    client = MlflowClient(default_tracking_uri(outcome.study_dir))
    experiment = client.get_experiment_by_name(outcome.study_dir.name)
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 4
    assert all(run.info.status == "FINISHED" for run in runs)
    # the demo's start points put the no-noise baseline among the trials
    epsilons = sorted(float(run.data.params["epsilon"]) for run in runs)
    assert epsilons[0] == 0.0

    trials = load_trials(outcome.study_dir)
    assert len(trials) == 4
    assert all(trial.epochs >= 1 for trial in trials)
    # the world's CLIP was cached for the next demo
    assert list((tmp_path / "cache" / "capdec-study").rglob("*"))
    # and its retrieval and modality gap are shown with the report
    summary = describe_world_clip(load_study_settings(outcome.study_dir).data)
    assert "image-to-text top-1" in summary
    assert "modality gap" in summary
