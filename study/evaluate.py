"""Final evaluation of a study's best trials on a held-out split, logged to their MLflow runs.

Test scores are written to MLflow and to ``evaluation/`` in the study folder only; nothing here
reaches the searcher, so test numbers never feed back into the search.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from mlflow.entities import Metric, RunTag
from mlflow.tracking import MlflowClient

from analysis.report import TrialSummary, load_trials
from capdec.evaluation import evaluate_checkpoint
from capdec.metric_names import FINAL_SCORE_KEYS
from study.mlflow_tracking import find_trial_run, get_or_create_experiment
from study.runner import tracking_uri_of
from study.settings import load_study_settings
from trainables.capdec_trainable import run_config_from_trial

logger = logging.getLogger(__name__)

EVALUATION_FOLDER = "evaluation"


@dataclass
class TrialEvaluation:
    trial: TrialSummary
    split: str
    scores: dict[str, float]


def latest_checkpoint(trial_folder: Path) -> Path:
    """Return the newest ``checkpoint_*`` folder of a trial.

    Raises:
        FileNotFoundError: when the trial has no checkpoint.
    """
    checkpoints = sorted(trial_folder.glob("checkpoint_*"))
    if not checkpoints:
        raise FileNotFoundError(f"trial folder {trial_folder} has no checkpoint to evaluate")
    return checkpoints[-1]


def evaluate_study(
    study_dir: str | Path, *, split: str = "test", top: int = 3, device: str = "cpu"
) -> list[TrialEvaluation]:
    """Score the ``top`` trials by best validation CIDEr on ``split`` with all seven metrics.

    Raises:
        ValueError: when ``top`` < 1 or no trial has reported a validation result.
    """
    if top < 1:
        raise ValueError(f"--top must be >= 1; got {top}")
    study_dir = Path(study_dir).resolve()
    settings = load_study_settings(study_dir)
    trials = [t for t in load_trials(study_dir) if t.epochs > 0][:top]
    if not trials:
        raise ValueError(f"no trial of {study_dir} has a validation result to rank by")

    client = MlflowClient(tracking_uri_of(settings, study_dir))
    experiment_id = get_or_create_experiment(client, settings.name, str(study_dir / "mlartifacts"))
    output = study_dir / EVALUATION_FOLDER
    output.mkdir(exist_ok=True)

    evaluations = []
    for trial in trials:
        config = run_config_from_trial(json.loads((trial.folder / "params.json").read_text()))
        scores, predictions = evaluate_checkpoint(
            config, latest_checkpoint(trial.folder), split=split, device=device
        )
        evaluations.append(TrialEvaluation(trial, split, scores))
        (output / f"{trial.trial_id}_{split}.json").write_text(
            json.dumps({"scores": scores, "captions": predictions}, indent=1)
        )
        run = find_trial_run(client, experiment_id, trial.trial_id)
        if run is None:
            logger.warning("trial %s has no MLflow run; scores saved in %s only", trial.trial_id, output)
            continue
        client.log_batch(
            run.info.run_id,
            metrics=[Metric(f"{split}/{k}", v, 0, trial.best_epoch) for k, v in scores.items()],
            tags=[RunTag(f"capdec.{split}_evaluated_epoch", str(trial.best_epoch))],
        )
    return evaluations


def format_evaluations(evaluations: list[TrialEvaluation]) -> str:
    """Render evaluations as a table: trial, best epoch, validation CIDEr, then the seven scores."""
    header = ["trial", "best epoch", "val CIDEr", *FINAL_SCORE_KEYS]
    rows = [header]
    for evaluation in evaluations:
        rows.append(
            [
                evaluation.trial.trial_id,
                str(evaluation.trial.best_epoch),
                f"{evaluation.trial.best_cider:.4f}",
                *(f"{evaluation.scores[k]:.4f}" for k in FINAL_SCORE_KEYS),
            ]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
