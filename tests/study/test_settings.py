"""Study settings: YAML parsing, flag overrides, validation messages."""

from __future__ import annotations

from pathlib import Path

import pytest

from study.cli import build_parser, parse_set_values, resolve_run_settings
from study.settings import StudySettings, load_study_settings, read_settings_file, save_settings


def _parse_run(argv: list[str]):
    return resolve_run_settings(build_parser().parse_args(["run", *argv]))


def test_flags_override_settings_file(tmp_path: Path) -> None:
    settings_file = tmp_path / "study.yaml"
    settings_file.write_text("trials: 5\nepochs: 4\nspace: epsilon\nrun:\n  batch_size: 16\n")
    settings = _parse_run([str(settings_file), "--trials", "2", "--name", "s1", "--set", "lr=0.001"])
    assert settings.trials == 2
    assert settings.epochs == 4
    assert settings.run == {"batch_size": 16, "lr": 0.001}


def test_unknown_settings_key_is_error(tmp_path: Path) -> None:
    settings_file = tmp_path / "study.yaml"
    settings_file.write_text("trails: 5\n")
    with pytest.raises(ValueError, match="unknown key.*trails"):
        _parse_run([str(settings_file)])


def test_unknown_run_key_is_error() -> None:
    with pytest.raises(ValueError, match="unknown run setting.*batchsize"):
        StudySettings(run={"batchsize": 3})


def test_study_owned_run_key_is_error() -> None:
    with pytest.raises(ValueError, match="run.epochs is set by the study"):
        StudySettings(run={"epochs": 3})


def test_invalid_run_value_fails_early() -> None:
    with pytest.raises(ValueError, match="epsilon must be a finite number >= 0; got -1"):
        StudySettings(run={"epsilon": -1})


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"trials": 0}, "trials must be >= 1; got 0"),
        ({"grace_period": 5, "epochs": 3}, r"grace_period \(5\) must be <= epochs \(3\)"),
        ({"gpus_per_trial": -1}, "gpus_per_trial must be a number >= 0"),
        ({"gpus_per_trial": 1.5}, "gpus_per_trial above 1 must be whole"),
        ({"scheduler": "hyperband"}, "scheduler must be one of asha, fifo"),
        ({"name": "../escape"}, "study name '../escape' is invalid"),
        ({"reduction_factor": 1}, "reduction_factor must be > 1"),
    ],
)
def test_settings_validation_messages(values: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        StudySettings(**values)


def test_settings_file_is_not_executed(tmp_path: Path) -> None:
    # a YAML tag that would construct a Python object must be rejected by the safe loader
    settings_file = tmp_path / "evil.yaml"
    settings_file.write_text("name: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        read_settings_file(settings_file)


def test_resolved_settings_round_trip(tmp_path: Path) -> None:
    settings = StudySettings(name="s", trials=3, run={"batch_size": 8}, start_points=[{"epsilon": 0.0}])
    save_settings(settings, tmp_path)
    assert load_study_settings(tmp_path) == settings


def test_set_values_are_typed() -> None:
    settings = _parse_run(["--set", "lr=1e-3", "--set", "normalize_after=true", "--set", "mapping=transformer"])
    assert settings.run == {"lr": 1e-3, "normalize_after": True, "mapping": "transformer"}


def test_non_numeric_value_is_error() -> None:
    with pytest.raises(ValueError, match="TrainConfig.lr must be a number"):
        StudySettings(run={"lr": "fast"})


def test_set_without_equals_is_error() -> None:
    with pytest.raises(ValueError, match="--set expects KEY=VALUE"):
        parse_set_values(["lr"])


def test_trial_constants_hold_study_values(tmp_path: Path) -> None:
    settings = StudySettings(data=str(tmp_path), epochs=4, seed=7, cpus_per_trial=2, run={"lr": 0.01})
    constants = settings.trial_constants(tokenizer_dir="/tok")
    assert constants["epochs"] == 4
    assert constants["seed"] == 7
    assert constants["num_threads"] == 2
    assert constants["lr"] == 0.01
    assert constants["data"] == str(tmp_path.resolve())
