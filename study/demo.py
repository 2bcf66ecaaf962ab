"""The embedded demo: a synthetic world, its self-trained tiny CLIP, and an epsilon study.

The world and the CLIP are cached (the prepared data under the storage folder, the CLIP in the
user's cache folder), so a second demo with the same seed only runs the study.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

from capdec.world_clip import default_cache_dir
from study.runner import StudyError, StudyOutcome, run_study
from study.settings import StudySettings

logger = logging.getLogger(__name__)

# Decoder and training settings for the synthetic world: a 2-layer decoder over a small word
# vocabulary, trained on the captions of the world's training images.
DEMO_RUN: dict[str, Any] = {
    "train_text": "train",
    "prefix_length": 4,
    "tiny_layers": 2,
    "tiny_width": 128,
    "tiny_heads": 4,
    "tiny_vocab_size": 512,  # byte-level BPE: 256 bytes plus merges that make every word one token
    "batch_size": 64,
    "lr": 1e-3,
    "warmup_steps": 50,
    "max_new_tokens": 20,
    "val_batch_size": 256,
}
# noise std per dimension tried first: no noise, the expected sweet spot, and too much noise
DEMO_START_POINTS = [{"epsilon": 0.0}, {"epsilon": 0.1}, {"epsilon": 0.5}]


def demo_settings(*, seed: int, quick: bool, storage: Path, data: Path, trials: int | None):
    """Return the study settings the demo runs on its prepared world."""
    name = f"demo-seed{seed}{'-quick' if quick else ''}-{time.strftime('%Y%m%d-%H%M%S')}"
    if trials is None:
        trials = 4 if quick else 8
    run = dict(DEMO_RUN)
    if quick:
        run["max_train_captions"] = 6000
        run["val_max_images"] = 200
    else:
        # Half of the 50,000 training captions halves the study's time. With all of them, every
        # trial's validation CIDEr peaked in epoch 1 already.
        run["max_train_captions"] = 25000
    return StudySettings(
        name=name,
        data=str(data),
        space="epsilon_linear",
        trials=trials,
        epochs=1 if quick else 2,
        decoder="tiny",
        storage=str(storage),
        seed=seed,
        cpus_per_trial=1.0,
        # One ASHA rung at epoch 1 keeps the better half of the trials, as a real study would.
        # Every trial still reports epoch 1, which compares noise levels like for like.
        scheduler="asha",
        grace_period=1,
        reduction_factor=2.0,
        start_points=DEMO_START_POINTS,
        run=run,
    )


def describe_world_clip(data: str | Path) -> str:
    """Return one line on the world CLIP's validation retrieval and modality gap."""
    from capdec.prepared import load_prepared

    diagnostics = load_prepared(data).manifest.get("source", {}).get("clip_diagnostics")
    if not diagnostics:
        return f"{data} records no world-CLIP diagnostics"
    return (
        "World CLIP on validation: image-to-text top-1 "
        f"{diagnostics['i2t_top1_content']:.3f} by content (chance "
        f"{diagnostics['i2t_chance_content']:.3f}), {diagnostics['i2t_top1']:.3f} for the image's "
        f"own captions; modality gap {diagnostics['modality_gap']:.3f}, matched-pair cosine "
        f"{diagnostics['matched_cosine']:.3f}"
    )


def run_demo(*, seed: int = 0, quick: bool = False, storage: str | Path = "capdec-demo",
             trials: int | None = None) -> StudyOutcome:
    """Build (or reuse) the world and its CLIP, then run the demo's epsilon study."""
    from capdec.demo_data import build_demo_dataset

    if seed < 0:
        raise ValueError(f"seed must be >= 0; got {seed}")
    storage = Path(storage)
    data = storage / f"world-seed{seed}{'-quick' if quick else ''}"
    # settings first: they check every value before minutes go into the world and the CLIP
    settings = demo_settings(seed=seed, quick=quick, storage=storage, data=data, trials=trials)
    _check_writable(storage, "the --storage folder", "pass --storage DIR with a folder you can write")
    started = time.perf_counter()
    if (data / "manifest.json").is_file():
        logger.info("reusing the prepared world in %s", data)
    else:
        _check_writable(default_cache_dir(), "the world-CLIP cache folder",
                        "set XDG_CACHE_HOME to a folder you can write")
        # one thread: on two busy cores two threads fought each other (14-24 min vs 2 min)
        build_demo_dataset(data, seed=seed, quick=quick, num_threads=1)
    logger.info("world and CLIP ready after %.0f s", time.perf_counter() - started)

    outcome = run_study(settings)
    state = "stopped" if outcome.interrupted else "finished"
    logger.info("demo %s after %.0f s in total", state, time.perf_counter() - started)
    return outcome


def _check_writable(folder: Path, label: str, fix: str) -> None:
    """Create ``folder`` if needed and check that files can be written in it.

    Raises:
        StudyError: when the folder cannot be created or written.
    """
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise StudyError(f"cannot create {label} {folder}: {error.strerror or error}; {fix}") from error
    if not os.access(folder, os.W_OK | os.X_OK):
        raise StudyError(f"cannot write in {label} {folder}; {fix}")
