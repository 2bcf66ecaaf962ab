"""Whether a study counts as finished or interrupted, from Tune's per-trial results."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from study.runner import _outcome

EPOCHS = 3


def _result(epochs: int, *, done: bool = False, error: Exception | None = None) -> SimpleNamespace:
    metrics = {} if epochs == 0 else {"training_iteration": epochs, "done": done}
    return SimpleNamespace(metrics=metrics, error=error)


def test_all_epochs_reported_is_finished(tmp_path: Path) -> None:
    # a trial restored from Tune's saved state may lack the done flag
    outcome = _outcome([_result(EPOCHS)] * 3, tmp_path, requested=3, max_epochs=EPOCHS)
    assert outcome.finished == 3
    assert not outcome.interrupted


def test_early_stop_and_failure_count_as_ended(tmp_path: Path) -> None:
    results = [_result(1, done=True), _result(2, error=RuntimeError("nan loss")), _result(EPOCHS)]
    outcome = _outcome(results, tmp_path, requested=3, max_epochs=EPOCHS)
    assert outcome.finished == 3
    assert not outcome.interrupted


def test_running_trial_at_ctrl_c_is_interrupted(tmp_path: Path) -> None:
    # after Ctrl-C Tune lists the running trial as terminated, but it is neither done nor complete
    results = [_result(EPOCHS)] * 7 + [_result(1)]
    outcome = _outcome(results, tmp_path, requested=8, max_epochs=EPOCHS)
    assert outcome.finished == 7
    assert outcome.interrupted


def test_unstarted_trials_are_interrupted(tmp_path: Path) -> None:
    results = [_result(EPOCHS), _result(0)]
    outcome = _outcome(results, tmp_path, requested=4, max_epochs=EPOCHS)
    assert outcome.finished == 1
    assert outcome.interrupted
