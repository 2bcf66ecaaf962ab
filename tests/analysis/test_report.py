"""The study report, read from Tune's trial files without running a study."""

from __future__ import annotations

import json
from pathlib import Path

from analysis.report import format_report, load_trials
from study.settings import StudySettings, save_settings


def _write_trial(study_dir: Path, trial_id: str, config: dict, ciders: list[float]) -> None:
    folder = study_dir / "tune" / f"trial_{trial_id}"
    folder.mkdir(parents=True)
    (folder / "params.json").write_text(json.dumps(config))
    lines = [
        json.dumps({"trial_id": trial_id, "epoch": epoch, "val/cider": cider})
        for epoch, cider in enumerate(ciders, start=1)
    ]
    (folder / "result.json").write_text("\n".join(lines) + "\n")


def _study(tmp_path: Path) -> tuple[Path, dict]:
    settings = StudySettings(name="one", data=str(tmp_path / "data"), space="epsilon",
                             storage=str(tmp_path), run={"batch_size": 8})
    study_dir = tmp_path / "one"
    study_dir.mkdir()
    save_settings(settings, study_dir)
    constants = settings.trial_constants(tokenizer_dir=str(study_dir / "tokenizer"))
    return study_dir, constants


def test_one_trial_lists_searched_keys_only(tmp_path: Path) -> None:
    study_dir, constants = _study(tmp_path)
    _write_trial(study_dir, "a", {**constants, "epsilon": 0.1, "search": {"noise_variance": 0.01}},
                 [1.0, 1.5, 1.2])
    [trial] = load_trials(study_dir)
    assert trial.params == {"epsilon": 0.1, "search/noise_variance": 0.01}
    assert trial.best_cider == 1.5
    assert trial.best_epoch == 2
    assert "batch_size" not in format_report([trial])


def test_several_trials_list_differing_keys(tmp_path: Path) -> None:
    study_dir, constants = _study(tmp_path)
    _write_trial(study_dir, "a", {**constants, "epsilon": 0.1}, [1.0])
    _write_trial(study_dir, "b", {**constants, "epsilon": 0.3}, [2.0])
    trials = load_trials(study_dir)
    assert [t.trial_id for t in trials] == ["b", "a"]
    assert all(set(t.params) == {"epsilon"} for t in trials)
