"""MLflow tracking of a study: exactly one MLflow run per Tune trial, across resumes.

Ray's stock ``MLflowLoggerCallback`` opens a new MLflow run whenever a trial starts, so a trial
resumed after an interruption ends up as two runs, the first left RUNNING forever. This callback
finds a trial's run by its ``capdec.trial_id`` tag and re-attaches to it, logs each epoch's
metrics once (step = epoch), and sets the final status to how the trial really ended: FINISHED,
FAILED, or KILLED when the study was interrupted.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from ray import tune

from capdec import metric_names as names

logger = logging.getLogger(__name__)

TRIAL_ID_TAG = "capdec.trial_id"
STUDY_TAG = "capdec.study"
STATUS_TAG = "capdec.status"
ERROR_TAG = "capdec.error"
STOPPED_EARLY_TAG = "capdec.stopped_early"
MLFLOW_DB = "mlflow.db"
_MAX_PARAM_LENGTH = 6000  # MLflow's limit on one param value (MLflow 3.x)


def default_tracking_uri(study_dir: Path) -> str:
    """Return the sqlite tracking URI of the study's own MLflow database."""
    return f"sqlite:///{(Path(study_dir) / MLFLOW_DB).resolve()}"


def flatten_params(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Flatten a nested trial config into MLflow params, joining nested keys with '/'."""
    flat: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten_params(value, prefix=f"{name}/"))
        else:
            flat[name] = str(value)[:_MAX_PARAM_LENGTH]
    return flat


def get_or_create_experiment(client: MlflowClient, name: str, artifact_location: str) -> str:
    """Return the id of the experiment called ``name``, creating it if needed."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    return client.create_experiment(name, artifact_location=artifact_location)


def find_trial_run(client: MlflowClient, experiment_id: str, trial_id: str):
    """Return the MLflow run of a trial, or None; more than one run is an error."""
    runs = client.search_runs(
        [experiment_id], filter_string=f"tags.`{TRIAL_ID_TAG}` = '{trial_id}'", max_results=2
    )
    if len(runs) > 1:
        raise RuntimeError(
            f"MLflow experiment {experiment_id} has {len(runs)} runs for trial {trial_id}; "
            "expected one"
        )
    return runs[0] if runs else None


class MlflowTrialCallback(tune.Callback):
    """Log every trial of a study as one MLflow run.

    Args:
        tracking_uri: MLflow tracking URI, e.g. ``sqlite:////abs/path/mlflow.db``.
        experiment_name: MLflow experiment, the study's name.
        artifact_location: folder for MLflow artifacts of new experiments.
        max_epochs: epochs a trial runs unless stopped early, to tag early stops.
    """

    def __init__(
        self, *, tracking_uri: str, experiment_name: str, artifact_location: str, max_epochs: int
    ) -> None:
        self.tracking_uri = tracking_uri
        self.experiment_name = experiment_name
        self.artifact_location = artifact_location
        self.max_epochs = max_epochs
        self._client: MlflowClient | None = None
        self._experiment_id: str | None = None
        self._run_ids: dict[str, str] = {}
        self._logged_epochs: dict[str, set[int]] = {}

    def __getstate__(self) -> dict[str, Any]:
        # the client keeps a database connection open, so it is rebuilt after unpickling
        state = self.__dict__.copy()
        state.update(_client=None, _experiment_id=None, _run_ids={}, _logged_epochs={})
        return state

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            self._client = MlflowClient(tracking_uri=self.tracking_uri)
            self._experiment_id = get_or_create_experiment(
                self._client, self.experiment_name, self.artifact_location
            )
        return self._client

    def setup(self, **info: Any) -> None:
        logger.info(
            "MLflow tracking at %s, experiment %r", self.tracking_uri, self.experiment_name
        )
        _ = self.client

    # --------------------------------------------------------------- runs

    def _attach(self, trial: Any) -> str:
        """Return the trial's run id, re-attaching to an existing run or creating one."""
        if trial.trial_id in self._run_ids:
            return self._run_ids[trial.trial_id]
        client = self.client
        run = find_trial_run(client, self._experiment_id, trial.trial_id)
        if run is None:
            run = client.create_run(
                self._experiment_id,
                run_name=str(trial),
                tags={
                    TRIAL_ID_TAG: trial.trial_id,
                    STUDY_TAG: self.experiment_name,
                    STATUS_TAG: "RUNNING",
                },
            )
            params = flatten_params(trial.config)
            client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in params.items()])
            logged: set[int] = set()
            logger.info("trial %s: MLflow run %s", trial.trial_id, run.info.run_id)
        else:
            client.update_run(run.info.run_id, status="RUNNING")
            client.set_tag(run.info.run_id, STATUS_TAG, "RUNNING")
            history = client.get_metric_history(run.info.run_id, names.EPOCH)
            logged = {int(m.step) for m in history}
            logger.info(
                "trial %s: re-attached to MLflow run %s (epochs logged: %s)",
                trial.trial_id,
                run.info.run_id,
                sorted(logged) or "none",
            )
        self._run_ids[trial.trial_id] = run.info.run_id
        self._logged_epochs[trial.trial_id] = logged
        return run.info.run_id

    def _finish(self, trial: Any, status: str, *, error: str | None = None) -> None:
        run_id = self._attach(trial)
        epochs = self._logged_epochs.get(trial.trial_id, set())
        tags = [RunTag(STATUS_TAG, status)]
        if status == "FINISHED":
            stopped_early = max(epochs, default=0) < self.max_epochs
            tags.append(RunTag(STOPPED_EARLY_TAG, str(stopped_early).lower()))
        if error:
            tags.append(RunTag(ERROR_TAG, error[:_MAX_PARAM_LENGTH]))
        self.client.log_batch(run_id, tags=tags)
        self.client.set_terminated(run_id, status=status)
        self._run_ids.pop(trial.trial_id, None)

    # ---------------------------------------------------------- Tune hooks

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._attach(trial)

    def on_trial_result(
        self, iteration: int, trials: list, trial: Any, result: dict, **info: Any
    ) -> None:
        run_id = self._attach(trial)
        epoch = int(result.get(names.EPOCH, result.get("training_iteration", 0)))
        logged = self._logged_epochs[trial.trial_id]
        if epoch in logged:
            # a trial that continued from an older checkpoint repeats an epoch: keep the first
            logger.debug("trial %s: epoch %d already logged, skipped", trial.trial_id, epoch)
            return
        timestamp = int(result.get("timestamp", 0) * 1000)
        metrics = [
            Metric(key, float(value), timestamp, epoch)
            for key, value in result.items()
            if _is_metric(key, value)
        ]
        self.client.log_batch(run_id, metrics=metrics)
        logged.add(epoch)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._finish(trial, "FINISHED")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._finish(trial, "FAILED", error=_trial_error_message(trial))

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        # trials still attached were interrupted (Ctrl-C or a stopped driver)
        by_id = {trial.trial_id: trial for trial in trials}
        for trial_id in list(self._run_ids):
            if trial_id in by_id:
                self._finish(by_id[trial_id], "KILLED")


def _is_metric(key: str, value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return "/" in key or key == names.EPOCH


def _trial_error_message(trial: Any) -> str:
    """Return the last line of a trial's error file: the exception type and message."""
    path = getattr(trial, "error_file", None)
    if not path or not Path(path).is_file():
        return "unknown error (no error file)"
    lines = [line for line in Path(path).read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1] if lines else "unknown error (empty error file)"
