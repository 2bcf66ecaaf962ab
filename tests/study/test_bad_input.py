"""Bad input is rejected before any trial starts, with a message that names the fix."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from study.runner import StudyError, check_space, create_study, resume_study
from study.settings import StudySettings
from tests.conftest import TOY_RUN


def _settings(storage: Path, data: Path, **overrides) -> StudySettings:
    values = dict(name="bad", data=str(data), trials=2, epochs=1, storage=str(storage), run=dict(TOY_RUN))
    values.update(overrides)
    return StudySettings(**values)


def test_data_from_other_clip_is_rejected(tmp_path: Path, toy_dataset: Path) -> None:
    with pytest.raises(StudyError, match="encoded with CLIP 'toy', but the study names clip: 'ViT-B-32'"):
        create_study(_settings(tmp_path, toy_dataset, clip="ViT-B-32"))
    # nothing was written for the rejected study
    assert not (tmp_path / "bad").exists()


def test_folder_without_manifest_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(StudyError, match="is not a prepared dataset \\(no manifest.json\\)"):
        create_study(_settings(tmp_path, tmp_path))


def test_missing_java_is_reported(tmp_path: Path, toy_dataset: Path, monkeypatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.delenv("JAVA_HOME", raising=False)
    with pytest.raises(StudyError, match="(?i)java"):
        create_study(_settings(tmp_path, toy_dataset))
    assert not (tmp_path / "bad").exists()


def test_unknown_space_is_rejected(tmp_path: Path, toy_dataset: Path) -> None:
    with pytest.raises(StudyError, match="unknown search space 'epsilom'"):
        check_space(_settings(tmp_path, toy_dataset, space="epsilom"))


def test_space_with_invalid_value_is_rejected(tmp_path: Path, toy_dataset: Path, monkeypatch) -> None:
    module = tmp_path / "my_spaces.py"
    module.write_text(
        "def negative(trial):\n"
        "    trial.suggest_float('search/x', 0.1, 0.2)\n"
        "    return {'epsilon': -1.0}\n"
        "def typo(trial):\n"
        "    return {'epsilonn': 0.1}\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("my_spaces", None)
    with pytest.raises(StudyError, match="sampled an invalid value: epsilon must be a finite number >= 0"):
        check_space(_settings(tmp_path, toy_dataset, space="my_spaces:negative"))
    with pytest.raises(StudyError, match="unknown run configuration key\\(s\\): epsilonn"):
        check_space(_settings(tmp_path, toy_dataset, space="my_spaces:typo"))


def test_resume_on_changed_data_is_rejected(tmp_path: Path, toy_dataset: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(toy_dataset, data)
    study_dir = create_study(_settings(tmp_path, data))
    (study_dir / "tune").mkdir()
    manifest = json.loads((data / "manifest.json").read_text())
    manifest["content_hash"] = "f" * 64
    (data / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StudyError, match="changed since the study started"):
        resume_study(study_dir)


def test_resume_of_non_study_folder_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="is not a study folder"):
        resume_study(tmp_path)


def test_cuda_device_without_cuda_is_rejected() -> None:
    import torch

    from capdec.devices import resolve_device

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ValueError, match="CUDA is not available on this machine; use --device cpu"):
        resolve_device("cuda")


def test_fixed_value_searched_by_space_is_rejected(tmp_path: Path, toy_dataset: Path) -> None:
    settings = _settings(tmp_path, toy_dataset, space="epsilon", run={**TOY_RUN, "epsilon": 0.2})
    with pytest.raises(StudyError, match="run setting\\(s\\) epsilon are also set by search space 'epsilon'"):
        check_space(settings)


def test_demo_storage_file_rejected_before_building(tmp_path: Path) -> None:
    from study.demo import run_demo

    storage = tmp_path / "a-file"
    storage.write_text("not a folder")
    with pytest.raises(StudyError, match="cannot create the --storage folder .*; pass --storage DIR"):
        run_demo(quick=True, storage=storage)


def test_demo_unwritable_cache_rejected_before_building(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from study.demo import run_demo

    # a file where the cache folder should be: no folder can be made below it, even by root
    cache = tmp_path / "cache-file"
    cache.write_text("not a folder")
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    with pytest.raises(StudyError, match="world-CLIP cache folder .*; set XDG_CACHE_HOME"):
        run_demo(quick=True, storage=tmp_path / "demo")
    # the world was not built
    assert not list((tmp_path / "demo").glob("world-*"))


@pytest.mark.parametrize(
    "args, message",
    [
        (["demo", "--trials", "0"], "argument --trials: must be >= 1; got 0"),
        (["demo", "--seed", "-1"], "argument --seed: must be >= 0; got -1"),
        (["ui", "study", "--port", "99999"], "argument --port: must be in 1..65535; got 99999"),
    ],
)
def test_cli_rejects_out_of_range_flags(args, message, capsys: pytest.CaptureFixture) -> None:
    from study.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_demo_trials_zero_is_invalid_not_default(tmp_path: Path) -> None:
    from study.demo import demo_settings

    with pytest.raises(ValueError, match="trials"):
        demo_settings(seed=0, quick=True, storage=tmp_path, data=tmp_path / "w", trials=0)
