"""Read a study's results and summarise its trials, best validation CIDEr first.

Reads only files: Ray Tune's per-trial ``params.json`` and ``result.json`` under the study's
``tune/`` folder. It needs neither a running Ray nor the MLflow store.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from capdec import metric_names as names

logger = logging.getLogger(__name__)


@dataclass
class TrialSummary:
    trial_id: str
    folder: Path
    params: dict[str, Any]  # searched values (the study's constants left out)
    epochs: int  # epochs reported
    best_cider: float
    best_epoch: int
    last: dict[str, Any] = field(default_factory=dict)  # last reported result
    history: list[dict[str, Any]] = field(default_factory=list)  # one result per epoch


def _read_results(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    results = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            try:
                results.append(json.loads(line))
            except json.JSONDecodeError:
                logger.warning("skipped a truncated line in %s", path)
    # a trial that continued from a checkpoint may repeat an epoch; keep the last report of each
    by_epoch = {int(r.get(names.EPOCH, r.get("training_iteration", 0))): r for r in results}
    return [by_epoch[epoch] for epoch in sorted(by_epoch)]


def _flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}/"))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _searched_keys(configs: list[dict[str, Any]], study_dir: Path) -> set[str]:
    """Return the config keys whose values differ between trials.

    A single trial has nothing to compare with, so its keys less the study's constants (read
    from settings.yaml, when there is one) count as searched.
    """
    keys: set[str] = set().union(*configs) if configs else set()
    if len(configs) < 2:
        return keys - _constant_keys(study_dir)
    return {
        key
        for key in keys
        if len({json.dumps(config.get(key), sort_keys=True) for config in configs}) > 1
    }


def _constant_keys(study_dir: Path) -> set[str]:
    """Return the run keys a study fixes for every trial; empty when settings.yaml is unreadable."""
    from study.settings import load_study_settings

    try:
        settings = load_study_settings(study_dir)
    except (OSError, ValueError) as error:
        logger.debug("cannot read the settings of %s (%s); listing every key", study_dir, error)
        return set()
    return set(settings.trial_constants(tokenizer_dir=""))


def load_trials(study_dir: str | Path) -> list[TrialSummary]:
    """Return one summary per trial of a study, best validation CIDEr first.

    Raises:
        FileNotFoundError: when the folder has no Tune results.
    """
    tune_dir = Path(study_dir) / "tune"
    if not tune_dir.is_dir():
        raise FileNotFoundError(
            f"{study_dir} has no trial results (no tune/ folder); is it a study folder?"
        )
    configs = [_flatten(json.loads(p.read_text())) for p in sorted(tune_dir.glob("*/params.json"))]
    searched = _searched_keys(configs, Path(study_dir))

    trials = []
    for params_path in sorted(tune_dir.glob("*/params.json")):
        folder = params_path.parent
        config = _flatten(json.loads(params_path.read_text()))
        history = _read_results(folder / "result.json")
        ciders = [r.get(names.VAL_CIDER, -math.inf) for r in history]
        best = max(range(len(ciders)), key=ciders.__getitem__) if ciders else None
        trials.append(
            TrialSummary(
                trial_id=history[-1]["trial_id"] if history else folder.name,
                folder=folder,
                params={k: config[k] for k in sorted(searched) if k in config},
                epochs=len(history),
                best_cider=ciders[best] if best is not None else math.nan,
                best_epoch=int(history[best][names.EPOCH]) if best is not None else 0,
                last=history[-1] if history else {},
                history=history,
            )
        )
    # best first; trials without a validation result go last
    trials.sort(key=lambda t: -t.best_cider if not math.isnan(t.best_cider) else math.inf)
    return trials


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def format_report(trials: list[TrialSummary]) -> str:
    """Render trials as a plain-text table: rank, trial, best CIDEr, best epoch, epochs, params."""
    if not trials:
        return "no trials have reported results yet"
    param_keys = sorted({key for trial in trials for key in trial.params})
    header = ["rank", "trial", "best val CIDEr", "best epoch", "epochs", *param_keys]
    rows = [header]
    for rank, trial in enumerate(trials, start=1):
        rows.append(
            [
                str(rank),
                trial.trial_id,
                "-" if math.isnan(trial.best_cider) else f"{trial.best_cider:.4f}",
                str(trial.best_epoch or "-"),
                str(trial.epochs),
                *(_format_value(trial.params.get(key, "")) for key in param_keys),
            ]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)
