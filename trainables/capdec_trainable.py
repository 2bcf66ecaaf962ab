"""The Ray Tune function trainable that runs one CapDec trial on its resource slot.

The trial config is a flat dictionary of run-configuration keys (``capdec.config.config_keys``)
plus a nested ``search`` dictionary of search-only quantities, which training ignores. Every epoch
the trainable reports its metrics with a checkpoint (model, optimiser, scheduler, epoch, best CIDEr
so far, random generator states, and the best epoch's weights) and, when Tune restarts the trial,
continues from ``tune.get_checkpoint()``.
"""

from __future__ import annotations

import logging
import tempfile
from typing import Any

import torch
from ray import tune

from capdec.config import RunConfig
from capdec.training import CapDecRun

logger = logging.getLogger(__name__)

SEARCH_KEY = "search"  # nested dictionary of search-only values, e.g. the noise variance


def run_config_from_trial(config: dict[str, Any]) -> RunConfig:
    """Convert a Tune trial config into a ``RunConfig``, once, at the top of the trial.

    Raises:
        ValueError: on an unknown key or an invalid value, naming it.
    """
    values = {key: value for key, value in config.items() if key != SEARCH_KEY}
    return RunConfig.from_dict(values)


def _configure_worker_logging() -> None:
    """Send INFO lines of the method and of this trainable to the worker's stderr, which Ray
    forwards to the driver's console."""
    for name in ("capdec", "trainables"):
        package_logger = logging.getLogger(name)
        if package_logger.handlers:
            continue
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        package_logger.addHandler(handler)
        package_logger.setLevel(logging.INFO)
        package_logger.propagate = False


def train_capdec(config: dict[str, Any]) -> None:
    """Train one CapDec configuration, reporting and checkpointing every epoch to Ray Tune."""
    _configure_worker_logging()
    run_config = run_config_from_trial(config)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    run = CapDecRun(run_config, device=device)

    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            run.load_checkpoint(folder)
        logger.info("continuing trial from its checkpoint after epoch %d", run.epoch)

    while run.epoch < run_config.train.epochs:
        metrics = run.run_epoch()
        with tempfile.TemporaryDirectory() as folder:
            run.save_checkpoint(folder)
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))
