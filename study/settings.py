"""Study settings: one YAML file, overridden by command-line flags, saved with the study.

Settings files are data: they are parsed with ``yaml.safe_load`` and never executed. Unknown keys
are errors, never dropped, so a typo cannot silently fall back to a default.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from capdec.config import RunConfig, coerce_fields, config_keys

SETTINGS_FILE = "settings.yaml"
SCHEDULERS = ("asha", "fifo")
# run-configuration keys that the study sets itself from top-level settings
_STUDY_OWNED_RUN_KEYS = ("data", "decoder", "epochs", "seed", "tokenizer_dir", "val_references")


@dataclass
class StudySettings:
    """Everything that defines a study; ``run`` contains fixed run-configuration values."""

    name: str = ""  # study folder name under `storage`, and the MLflow experiment name
    data: str = ""  # prepared-dataset folder
    clip: str = ""  # CLIP model the data must be encoded with, e.g. ViT-B-32; empty = any
    space: str = "epsilon"  # registered search space or package.module:function
    trials: int = 8  # number of trials Optuna samples
    epochs: int = 3  # maximum epochs per trial
    decoder: str = "tiny"  # "tiny", a transformers model name such as "gpt2", or a folder
    storage: str = "studies"  # folder in which the study folder is created
    seed: int = 0  # seed of the Optuna sampler and of every trial's training
    cpus_per_trial: float = 1.0  # CPU cores reserved per trial; also torch's thread count
    gpus_per_trial: float = 0.0  # GPUs per trial; fractions share one GPU between trials
    max_concurrent: int = 0  # trials run at once; 0 = as many as the resources allow
    scheduler: str = "asha"  # asha (early stopping on validation CIDEr) | fifo (no stopping)
    grace_period: int = 1  # epochs every trial runs before ASHA may stop it
    reduction_factor: float = 3.0  # ASHA keeps the best 1/reduction_factor at each rung
    max_failures: int = 2  # times a trial whose worker died is retried from its checkpoint
    tracking_uri: str = ""  # MLflow tracking URI; empty = sqlite database in the study folder
    ray_address: str = ""  # Ray cluster address; empty = start a local Ray
    start_points: list[dict[str, Any]] = field(default_factory=list)  # values tried first
    run: dict[str, Any] = field(default_factory=dict)  # fixed run-configuration values

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check ranges and keys before any trial starts.

        Raises:
            ValueError: naming the setting, its value and the fix.
        """
        if self.name and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", self.name):
            raise ValueError(
                f"study name {self.name!r} is invalid; use letters, digits, '.', '_' and '-'"
            )
        for key in ("trials", "epochs", "grace_period"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1; got {getattr(self, key)}")
        for key in ("cpus_per_trial", "gpus_per_trial"):
            value = getattr(self, key)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{key} must be a number >= 0; got {value}")
        if self.cpus_per_trial == 0 and self.gpus_per_trial == 0:
            raise ValueError("a trial needs resources: cpus_per_trial or gpus_per_trial must be > 0")
        if self.gpus_per_trial > 1 and self.gpus_per_trial != int(self.gpus_per_trial):
            raise ValueError(f"gpus_per_trial above 1 must be whole; got {self.gpus_per_trial}")
        if self.max_concurrent < 0 or self.max_failures < 0:
            raise ValueError("max_concurrent and max_failures must be >= 0")
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler must be one of {', '.join(SCHEDULERS)}; got {self.scheduler!r}")
        if self.scheduler == "asha" and self.grace_period > self.epochs:
            raise ValueError(
                f"grace_period ({self.grace_period}) must be <= epochs ({self.epochs}); "
                "lower --grace-period or raise --epochs"
            )
        if self.reduction_factor <= 1:
            raise ValueError(f"reduction_factor must be > 1; got {self.reduction_factor}")
        self._validate_run()

    def _validate_run(self) -> None:
        owned = [key for key in self.run if key in _STUDY_OWNED_RUN_KEYS]
        if owned:
            raise ValueError(
                f"run.{owned[0]} is set by the study; use the top-level setting "
                f"{owned[0]!r} (or its command-line flag) instead"
            )
        unknown = sorted(set(self.run) - set(config_keys()))
        if unknown:
            raise ValueError(
                f"unknown run setting(s): {', '.join(unknown)}; valid keys are "
                f"{', '.join(k for k in config_keys() if k not in _STUDY_OWNED_RUN_KEYS)}"
            )
        # build a run config now so out-of-range fixed values fail before Ray starts, and keep
        # the typed values (YAML reads 1e-3 as text)
        typed = RunConfig.from_dict({**self.run, "data": self.data or "."}).to_dict()
        self.run = {key: typed[key] for key in self.run}

    @classmethod
    def from_dict(cls, values: dict[str, Any], *, source: str = "settings") -> StudySettings:
        """Build settings from a dictionary, rejecting unknown keys.

        Raises:
            ValueError: on an unknown key or an invalid value.
        """
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(
                f"unknown key(s) in {source}: {', '.join(unknown)}; valid keys are "
                f"{', '.join(sorted(known))}"
            )
        return cls(**coerce_fields(cls, values))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def trial_constants(self, *, tokenizer_dir: str, val_references: str = "") -> dict[str, Any]:
        """Return the run-configuration values shared by every trial of the study."""
        constants = {
            "data": str(Path(self.data).resolve()),
            "decoder": self.decoder,
            "epochs": self.epochs,
            "seed": self.seed,
            "tokenizer_dir": tokenizer_dir,
            "val_references": val_references,
        }
        constants.setdefault("num_threads", max(int(self.cpus_per_trial), 1))
        constants.update(self.run)
        return constants


def read_settings_file(path: str | Path) -> dict[str, Any]:
    """Parse a YAML settings file into a dictionary (safe loader: data only, never code).

    Raises:
        FileNotFoundError: when the file does not exist.
        ValueError: when it is not valid YAML or not a mapping.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"settings file {path} not found")
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise ValueError(f"settings file {path} is not valid YAML: {error}") from error
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ValueError(f"settings file {path} must contain a mapping of keys to values")
    return values


def save_settings(settings: StudySettings, study_dir: Path) -> Path:
    """Write the resolved settings into the study folder and return the file path."""
    path = study_dir / SETTINGS_FILE
    path.write_text(yaml.safe_dump(settings.to_dict(), sort_keys=False), encoding="utf-8")
    return path


def load_study_settings(study_dir: str | Path) -> StudySettings:
    """Read the resolved settings saved in a study folder.

    Raises:
        FileNotFoundError: when the folder has no saved settings (not a study folder).
    """
    path = Path(study_dir) / SETTINGS_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{study_dir} is not a study folder (no {SETTINGS_FILE}); "
            "pass the folder that `capdec-study run` created under --storage"
        )
    return StudySettings.from_dict(read_settings_file(path), source=str(path))
