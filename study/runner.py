"""Build, run and resume a study: Ray Tune with OptunaSearch, ASHA and MLflow tracking.

Study folder layout (``STORAGE/NAME``):

    settings.yaml   the resolved settings
    mlflow.db       MLflow tracking store (sqlite), unless another tracking URI was given
    mlartifacts/    MLflow artifacts
    tokenizer/      the tiny decoder's tokenizer, trained once and shared by all trials
    val_references.json  the validation references, PTB-tokenised once for all trials
    tune/           Ray Tune's experiment folder: trial results, checkpoints, searcher state
    study.log       the driver's log
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import optuna
import ray
from optuna.samplers import TPESampler
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search.optuna import OptunaSearch

from capdec import metric_names as names
from capdec.config import RunConfig
from capdec.metrics import CaptionScorer, JavaNotFoundError, check_java
from capdec.model import build_tokenizer
from capdec.prepared import load_prepared
from search_spaces import SEARCH_PREFIX, get_space
from study.mlflow_tracking import MlflowTrialCallback, default_tracking_uri
from study.settings import StudySettings, load_study_settings, save_settings
from trainables.capdec_trainable import train_capdec

logger = logging.getLogger(__name__)

TUNE_FOLDER = "tune"
STUDY_RECORD = "study.json"  # prepared data's content hash and CLIP identity at creation
TOKENIZER_FOLDER = "tokenizer"
VAL_REFERENCES_FILE = "val_references.json"
METRIC = names.VAL_CIDER_BEST  # best CIDEr so far: an overfitting trial is judged by its best epoch
MODE = "max"


class StudyError(RuntimeError):
    """A study cannot start or continue; the message names the cause and the remedy."""


@dataclass
class StudyOutcome:
    study_dir: Path
    finished: int  # trials that ended (completed, stopped early or failed)
    requested: int
    interrupted: bool

    @property
    def resume_command(self) -> str:
        return f"capdec-study resume {shlex.quote(str(self.study_dir))}"


def study_dir_of(settings: StudySettings) -> Path:
    return Path(settings.storage).resolve() / settings.name


def tracking_uri_of(settings: StudySettings, study_dir: Path) -> str:
    return settings.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(
        study_dir
    )


def connect_ray(settings: StudySettings) -> None:
    """Start or join Ray, and check that the cluster can ever run one trial.

    Raises:
        StudyError: when the trial's GPU or CPU request exceeds what the cluster has; Tune
            would otherwise leave such trials pending forever.
    """
    # epochs of small runs finish within seconds; Tune's warning about frequent experiment
    # snapshots is then noise, since every epoch's checkpoint is wanted
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    if not ray.is_initialized():
        ray.init(
            address=settings.ray_address or None,
            include_dashboard=False,
            configure_logging=True,
            logging_level=logging.WARNING,
        )
    resources = ray.cluster_resources()
    gpus, cpus = resources.get("GPU", 0.0), resources.get("CPU", 0.0)
    if settings.gpus_per_trial > gpus:
        raise StudyError(
            f"each trial requests {settings.gpus_per_trial:g} GPU but the Ray cluster has {gpus:g}; "
            "set --gpus-per-trial 0 (gpus_per_trial: 0) to train on CPUs, or connect to a "
            "cluster with GPUs with --ray-address"
        )
    if settings.cpus_per_trial > cpus:
        raise StudyError(
            f"each trial requests {settings.cpus_per_trial:g} CPUs but the Ray cluster has "
            f"{cpus:g}; lower --cpus-per-trial"
        )


def _prepare_tokenizer(settings: StudySettings, study_dir: Path) -> str:
    """Save the decoder's tokenizer once per study, so every trial reads the same one.

    The tiny decoder's tokenizer is trained on the training captions. Other decoders' tokenizers
    load here, so a decoder name that cannot be loaded fails before any trial starts.
    """
    run_config = RunConfig.from_dict({**settings.run, "data": settings.data, "decoder": settings.decoder})
    if settings.decoder == "tiny":
        dataset = load_prepared(settings.data)
        rows = dataset.training_caption_indices(run_config.train.train_text)
        tokenizer = build_tokenizer(run_config.model, [dataset.captions[i].text for i in rows])
    else:
        tokenizer = build_tokenizer(run_config.model, [])
    folder = study_dir / TOKENIZER_FOLDER
    tokenizer.save_pretrained(folder)
    logger.info("saved the %s decoder's tokenizer (%d tokens) to %s", settings.decoder,
                len(tokenizer), folder)
    return str(folder)


def _prepare_val_references(settings: StudySettings, study_dir: Path) -> str:
    """Tokenise the validation references once per study and save them for every trial.

    Each trial would otherwise start Java to run the PTB tokenizer over the same captions.
    """
    references = load_prepared(settings.data).references("val")
    path = CaptionScorer(references).save(study_dir / VAL_REFERENCES_FILE)
    logger.info("tokenised the references of %d validation images into %s", len(references), path)
    return str(path)


def _trainable(settings: StudySettings):
    resources = {"cpu": settings.cpus_per_trial, "gpu": settings.gpus_per_trial}
    return tune.with_resources(train_capdec, resources)


def trial_dirname(trial) -> str:
    """Name a trial's folder by its id; Ray's default packs the whole config into the name."""
    return f"trial_{trial.trial_id}"


def build_tuner(settings: StudySettings, study_dir: Path) -> tune.Tuner:
    """Build the Tuner of a new study in ``study_dir``."""
    space = get_space(settings.space)
    searcher = OptunaSearch(
        space=space,
        metric=METRIC,
        mode=MODE,
        sampler=TPESampler(seed=settings.seed),
        points_to_evaluate=settings.start_points or None,
    )
    if settings.scheduler == "asha":
        scheduler = ASHAScheduler(
            time_attr="training_iteration",
            max_t=settings.epochs,
            grace_period=settings.grace_period,
            reduction_factor=settings.reduction_factor,
        )
    else:
        scheduler = FIFOScheduler()

    tokenizer_dir = _prepare_tokenizer(settings, study_dir)
    callback = MlflowTrialCallback(
        tracking_uri=tracking_uri_of(settings, study_dir),
        experiment_name=settings.name,
        artifact_location=str(study_dir / "mlartifacts"),
        max_epochs=settings.epochs,
    )
    return tune.Tuner(
        _trainable(settings),
        param_space=settings.trial_constants(
            tokenizer_dir=tokenizer_dir,
            val_references=_prepare_val_references(settings, study_dir),
        ),
        tune_config=tune.TuneConfig(
            metric=METRIC,
            mode=MODE,
            search_alg=searcher,
            scheduler=scheduler,
            num_samples=settings.trials,
            max_concurrent_trials=settings.max_concurrent or None,
            trial_dirname_creator=trial_dirname,
        ),
        run_config=tune.RunConfig(
            name=TUNE_FOLDER,
            storage_path=str(study_dir),
            callbacks=[callback],
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            failure_config=tune.FailureConfig(max_failures=settings.max_failures),
            verbose=1,
        ),
    )


def check_space(settings: StudySettings) -> None:
    """Sample the search space once, in memory, and check that a run config can be built.

    Raises:
        StudyError: when the space cannot be found, raises, or returns invalid keys or values.
    """
    try:
        space = get_space(settings.space)
    except ValueError as error:
        raise StudyError(str(error)) from error
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    trial = optuna.create_study(sampler=TPESampler(seed=settings.seed)).ask()
    try:
        values = space(trial) or {}
    except Exception as error:  # a user's space can raise anything; report it before Ray starts
        raise StudyError(f"search space {settings.space!r} failed when sampled: {error}") from error
    sampled = {**trial.params, **values}
    run_values = {k: v for k, v in sampled.items() if not k.startswith(SEARCH_PREFIX)}
    overlap = sorted(set(run_values) & set(settings.run))
    if overlap:
        # Tune lets the space's values win, so the fixed value would be silently ignored
        raise StudyError(
            f"run setting(s) {', '.join(overlap)} are also set by search space "
            f"{settings.space!r}, which would override them; remove them from run/--set or "
            "use a space that leaves them alone"
        )
    constants = settings.trial_constants(tokenizer_dir="")
    try:
        RunConfig.from_dict({**constants, **run_values})
    except ValueError as error:
        raise StudyError(f"search space {settings.space!r} sampled an invalid value: {error}") from error


def check_data(settings: StudySettings) -> dict:
    """Check the prepared data against the settings and return its manifest.

    Raises:
        StudyError: when the folder is not a prepared dataset, or was encoded with another CLIP
            than ``settings.clip`` names.
    """
    manifest_path = Path(settings.data) / "manifest.json"
    if not manifest_path.is_file():
        raise StudyError(
            f"--data {settings.data} is not a prepared dataset (no manifest.json); "
            "create it with `capdec-study prepare` or `capdec-study demo`"
        )
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    clip_model = manifest.get("clip", {}).get("model")
    if settings.clip and clip_model != settings.clip:
        raise StudyError(
            f"prepared data {settings.data} was encoded with CLIP {clip_model!r}, but the study "
            f"names clip: {settings.clip!r}; prepare the data with --clip {settings.clip} or "
            "change the clip setting"
        )
    return manifest


def check_java_available() -> None:
    """Raise StudyError before any trial starts when validation could not run for lack of Java."""
    try:
        check_java("validation CIDEr, BLEU and ROUGE-L (the PTB tokenizer)")
    except JavaNotFoundError as error:
        raise StudyError(str(error)) from error


def create_study(settings: StudySettings) -> Path:
    """Create the study folder and save the resolved settings.

    Raises:
        StudyError: when the folder already exists (resume it instead), the data is missing or
            encoded with another CLIP, the search space samples invalid values, or Java is
            missing.
    """
    if not settings.name:
        raise StudyError("a study needs a name; pass --name NAME")
    if not settings.data:
        raise StudyError("a study needs prepared data; pass --data DIR")
    study_dir = study_dir_of(settings)
    if study_dir.exists():
        raise StudyError(
            f"study folder {study_dir} already exists; continue it with "
            f"`capdec-study resume {shlex.quote(str(study_dir))}` or choose another --name"
        )
    manifest = check_data(settings)
    check_space(settings)
    check_java_available()
    study_dir.mkdir(parents=True)
    settings.data = str(Path(settings.data).resolve())
    save_settings(settings, study_dir)
    record = {"data_content_hash": manifest.get("content_hash"), "clip": manifest.get("clip")}
    (study_dir / STUDY_RECORD).write_text(json.dumps(record, indent=2), encoding="utf-8")
    return study_dir


def _outcome(
    results: Iterable[tune.Result], study_dir: Path, requested: int, max_epochs: int
) -> StudyOutcome:
    """Count the trials that ended and decide whether the study was interrupted.

    A trial ended when it failed, reported all ``max_epochs`` epochs, or was stopped early by the
    scheduler (its last result is marked ``done``). After Ctrl-C, Tune lists the trials it was
    running as terminated too, so Tune's status alone would count them as finished.
    """
    finished = sum(
        1
        for result in results
        if result.error is not None
        or result.metrics.get("done") is True
        or result.metrics.get("training_iteration", 0) >= max_epochs
    )
    finished = min(finished, requested)
    return StudyOutcome(study_dir, finished, requested, interrupted=finished < requested)


def run_study(settings: StudySettings) -> StudyOutcome:
    """Create and run a new study; Ctrl-C stops it cleanly so that it can be resumed."""
    study_dir = create_study(settings)
    _add_log_file(study_dir)
    logger.info("study %s: %d trials x %d epochs, space %s", settings.name, settings.trials,
                settings.epochs, settings.space)
    connect_ray(settings)
    tuner = build_tuner(settings, study_dir)
    results = tuner.fit()
    return _outcome(results, study_dir, settings.trials, settings.epochs)


def resume_study(study_dir: str | Path) -> StudyOutcome:
    """Continue an interrupted study: finished trials are kept, unfinished ones continue from
    their last checkpoint, errored ones are retried from theirs.

    Raises:
        FileNotFoundError: when the folder is not a study folder.
        StudyError: when the prepared data changed since the study started, or Java is missing.
    """
    study_dir = Path(study_dir).resolve()
    settings = load_study_settings(study_dir)
    tune_dir = study_dir / TUNE_FOLDER
    _check_same_data(settings, study_dir)
    check_java_available()
    _add_log_file(study_dir)
    connect_ray(settings)
    if not tune.Tuner.can_restore(str(tune_dir)):
        # stopped before Tune saved any state: no trial ran, so start the study in its folder
        logger.info("%s has no Tune state yet; starting the study from its saved settings", study_dir)
        return _outcome(
            build_tuner(settings, study_dir).fit(), study_dir, settings.trials, settings.epochs
        )
    # restart_errored=True would give errored trials new ids that OptunaSearch cannot find,
    # so errored trials are resumed (same id, from their checkpoint) instead
    tuner = tune.Tuner.restore(
        str(tune_dir),
        trainable=_trainable(settings),
        resume_unfinished=True,
        resume_errored=True,
        restart_errored=False,
    )
    results = tuner.fit()
    return _outcome(results, study_dir, settings.trials, settings.epochs)


def _check_same_data(settings: StudySettings, study_dir: Path) -> None:
    """Refuse to resume on prepared data that changed since the study started."""
    manifest = check_data(settings)
    record_path = study_dir / STUDY_RECORD
    if not record_path.is_file():
        return
    recorded = json.loads(record_path.read_text(encoding="utf-8")).get("data_content_hash")
    if recorded != manifest.get("content_hash"):
        raise StudyError(
            f"prepared data {settings.data} changed since the study started (content hash "
            f"{str(recorded)[:12]} then, {str(manifest.get('content_hash'))[:12]} now); "
            "checkpoints would not match it: restore the original data or start a new study"
        )


def _add_log_file(study_dir: Path) -> None:
    handler = logging.FileHandler(study_dir / "study.log", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)


def print_outcome(outcome: StudyOutcome) -> None:
    if outcome.interrupted:
        print(
            f"\nStudy stopped with {outcome.finished} of {outcome.requested} trials finished.\n"
            f"Resume it with:\n  {outcome.resume_command}",
            file=sys.stderr,
        )
