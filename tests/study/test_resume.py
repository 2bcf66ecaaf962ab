"""Interrupted studies: Ctrl-C and SIGKILL of the driver, and a killed trial worker.

Each study runs in its own `capdec-study` process with its own local Ray, as a user runs it, so
that signals reach only that driver. The tests clean up every process the driver started.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml
from mlflow.tracking import MlflowClient

from study.mlflow_tracking import STATUS_TAG, default_tracking_uri
from tests.conftest import TOY_RUN

pytestmark = [pytest.mark.ray, pytest.mark.slow]

TRIALS = 3
EPOCHS = 3
STUDY_TIMEOUT_S = 600


def _write_settings(tmp_path: Path, data: Path, name: str) -> Path:
    settings = {
        "name": name,
        "data": str(data),
        "space": "epsilon",
        "trials": TRIALS,
        "epochs": EPOCHS,
        "storage": str(tmp_path),
        "scheduler": "fifo",
        "cpus_per_trial": 1,
        "max_failures": 2,
        "run": dict(TOY_RUN, train_text="both"),
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(settings))
    return path


def _start(args: list[str], log: Path) -> subprocess.Popen:
    env = dict(os.environ, RAY_DEDUP_LOGS="0", PYTHONUNBUFFERED="1")
    with open(log, "ab") as handle:
        return subprocess.Popen(
            [sys.executable, "-m", "study.cli", *args],
            stdout=handle,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # signals from the test reach only this driver
        )


def _start_study(tmp_path: Path, data: Path, name: str) -> tuple[Path, Path, subprocess.Popen]:
    """Start `capdec-study run` on a toy study; return its folder, its log and the driver."""
    settings = _write_settings(tmp_path, data, name)
    log = tmp_path / f"{name}.log"
    return tmp_path / name, log, _start(["run", str(settings)], log)


def _kill_tree(processes: list[psutil.Process]) -> None:
    for process in processes:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(processes, timeout=30)


def _wait_for_results(study_dir: Path, count: int, timeout: float) -> None:
    """Wait until the trials have reported ``count`` results in total."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = sum(
            len(p.read_text().splitlines()) for p in study_dir.glob("tune/trial_*/result.json")
        )
        if lines >= count:
            return
        time.sleep(0.5)
    raise TimeoutError(f"{study_dir}: fewer than {count} results after {timeout} s")


def _run_to_end(args: list[str], log: Path) -> int:
    process = _start(args, log)
    try:
        return process.wait(timeout=STUDY_TIMEOUT_S)
    finally:
        _kill_tree([process, *_descendants(process)])


def _command_line(process: psutil.Process) -> str:
    """Return a process's command line, or "" when it has exited or become a zombie."""
    try:
        return " ".join(process.cmdline() or [])
    except psutil.Error:
        # Ray's short-lived helper processes can exit between listing and reading
        return ""


def _descendants(process: subprocess.Popen) -> list[psutil.Process]:
    try:
        return psutil.Process(process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _assert_complete(study_dir: Path, name: str) -> None:
    """Every trial is one FINISHED MLflow run with exactly one value per epoch."""
    client = MlflowClient(default_tracking_uri(study_dir))
    experiment = client.get_experiment_by_name(name)
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == TRIALS
    trial_ids = {run.data.tags["capdec.trial_id"] for run in runs}
    assert len(trial_ids) == TRIALS
    for run in runs:
        assert run.info.status == "FINISHED"
        assert run.data.tags[STATUS_TAG] == "FINISHED"
        for metric in ("val/cider", "train/loss", "epoch"):
            steps = [m.step for m in client.get_metric_history(run.info.run_id, metric)]
            assert sorted(steps) == list(range(1, EPOCHS + 1)), (run.info.run_id, metric, steps)
    trial_folders = list((study_dir / "tune").glob("trial_*"))
    assert len(trial_folders) == TRIALS


@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGKILL], ids=["sigint", "sigkill"])
def test_interrupted_study_resumes(tmp_path: Path, toy_dataset: Path, stop_signal: int) -> None:
    name = f"resume-{stop_signal.name.lower()}"
    study_dir, log, driver = _start_study(tmp_path, toy_dataset, name)
    try:
        # interrupt at a random point after the first epoch of some trial was reported
        _wait_for_results(study_dir, 1, timeout=STUDY_TIMEOUT_S)
        time.sleep(random.uniform(0.0, 3.0))
        started = _descendants(driver)
        driver.send_signal(stop_signal)
        exit_code = driver.wait(timeout=120)
    finally:
        _kill_tree([*_descendants(driver), *locals().get("started", [])])

    output = log.read_text(errors="replace")
    if stop_signal == signal.SIGINT:
        assert exit_code == 130, output[-3000:]
        assert f"capdec-study resume {study_dir}" in output
    else:
        assert exit_code == -signal.SIGKILL

    resume_code = _run_to_end(["resume", str(study_dir)], log)
    output = log.read_text(errors="replace")
    assert resume_code == 0, output[-3000:]
    _assert_complete(study_dir, name)


def test_ctrl_c_during_last_trial_resumes(tmp_path: Path, toy_dataset: Path) -> None:
    # Once the last trial's folder exists every trial has been created, so only running trials
    # are unfinished. The signal then lands while the last trial's worker starts or trains.
    name = "resume-late"
    study_dir, log, driver = _start_study(tmp_path, toy_dataset, name)
    try:
        deadline = time.monotonic() + STUDY_TIMEOUT_S
        while len(list(study_dir.glob("tune/trial_*"))) < TRIALS:
            assert time.monotonic() < deadline, "the last trial never started"
            time.sleep(0.2)
        started = _descendants(driver)
        driver.send_signal(signal.SIGINT)
        exit_code = driver.wait(timeout=120)
    finally:
        _kill_tree([*_descendants(driver), *locals().get("started", [])])

    output = log.read_text(errors="replace")
    assert exit_code == 130, output[-3000:]
    assert f"capdec-study resume {study_dir}" in output
    assert f"of {TRIALS} trials finished" in output

    resume_code = _run_to_end(["resume", str(study_dir)], log)
    output = log.read_text(errors="replace")
    assert resume_code == 0, output[-3000:]
    _assert_complete(study_dir, name)


def test_killed_worker_resumes_from_checkpoint(tmp_path: Path, toy_dataset: Path) -> None:
    name = "worker-kill"
    study_dir, log, driver = _start_study(tmp_path, toy_dataset, name)
    try:
        _wait_for_results(study_dir, 1, timeout=STUDY_TIMEOUT_S)
        workers = [p for p in _descendants(driver) if "ImplicitFunc" in _command_line(p)]
        assert workers, "no trial worker process found"
        workers[0].kill()
        exit_code = driver.wait(timeout=STUDY_TIMEOUT_S)
    finally:
        _kill_tree(_descendants(driver))

    output = log.read_text(errors="replace")
    assert exit_code == 0, output[-3000:]
    assert "continuing trial from its checkpoint after epoch" in output
    _assert_complete(study_dir, name)
    # Tune recorded the failure and retried the trial instead of starting a new one
    state_files = sorted((study_dir / "tune").glob("experiment_state-*.json"))
    state = json.loads(state_files[-1].read_text())
    assert len(state["trial_data"]) == TRIALS
