"""Final evaluation of a trained run on a held-out split with all seven captioning metrics."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from capdec.config import RunConfig
from capdec.metrics import CaptionScorer
from capdec.training import CapDecRun

logger = logging.getLogger(__name__)


def evaluate_checkpoint(
    config: RunConfig,
    checkpoint_dir: str | os.PathLike,
    *,
    split: str = "test",
    device: str = "cpu",
    meteor: bool = True,
) -> tuple[dict[str, float], dict[int, str]]:
    """Decode one split with a checkpoint's best-epoch weights and score it.

    Args:
        config: the run configuration the checkpoint was trained with.
        checkpoint_dir: a folder written by ``CapDecRun.save_checkpoint``.
        split: "test" or "val".
        device: torch device for decoding.
        meteor: also compute METEOR (starts a Java process, several seconds).

    Returns:
        (scores keyed bleu_1..bleu_4, meteor, rouge_l, cider; captions by image row)

    Raises:
        ValueError: when the split has no images.
    """
    run = CapDecRun(config, device=device)
    run.load_checkpoint(Path(checkpoint_dir))
    rows = run.dataset.image_indices(split)
    if len(rows) == 0:
        raise ValueError(f"prepared dataset {run.dataset.root} has no images in split {split!r}")
    captions = run.decode_images(rows, model=run.best_model())
    predictions = {int(r): c for r, c in zip(rows, captions)}
    references = run.dataset.references(split)
    scores = CaptionScorer(references).score(predictions, meteor=meteor)
    logger.info(
        "%s split: %d images, CIDEr %.4f, best epoch %d", split, len(rows), scores["cider"],
        run.best_epoch,
    )
    return scores, predictions
