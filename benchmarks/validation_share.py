"""Measure the share of a training epoch that per-epoch validation takes.

Trains a ``capdec.training.CapDecRun`` on the text-only corpus of a prepared dataset and, after
each epoch, times ``CapDecRun.validate()`` on every validation photo. Validation is then timed
again in its two parts: decoding the photos and scoring the captions (one PTBTokenizer run on the
predictions, then BLEU, ROUGE-L and CIDEr). The once-per-study cost of tokenising the references
is timed separately, because a study pays it once and not every epoch.

The share reported is validation seconds divided by training-epoch seconds, both medians over
``--epochs`` epochs. The untrained model is validated once as well: its captions run to
``max_new_tokens``, the slowest case for decoding.

Usage:
    python benchmarks/validation_share.py --data /tmp/coco-tiny --epochs 2 --out /tmp/share.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from capdec.config import RunConfig
from capdec.metrics import CaptionScorer
from capdec.prepared import load_prepared
from capdec.training import CapDecRun

logger = logging.getLogger("benchmarks.validation_share")


def _timed(function, *args, **kwargs) -> tuple[float, Any]:
    started = time.perf_counter()
    result = function(*args, **kwargs)
    return time.perf_counter() - started, result


def _time_validation_parts(run: CapDecRun) -> dict[str, float]:
    """Time decoding and scoring of the validation photos separately, as ``validate`` runs them."""
    decode_s, captions = _timed(run.decode_images, run.val_rows)
    predictions = {int(row): caption for row, caption in zip(run.val_rows, captions)}
    score_s, _ = _timed(run.scorer.score, predictions)
    token_counts = [len(run.tokenizer(caption)["input_ids"]) for caption in captions]
    return {
        "decode_s": decode_s,
        "score_s": score_s,
        "mean_caption_tokens": statistics.fmean(token_counts),
    }


def _validation_row(run: CapDecRun, epoch: int) -> dict[str, Any]:
    load = os.getloadavg()[0]
    validate_s, (metrics, _) = _timed(run.validate)
    row = {"epoch": epoch, "validate_s": validate_s, "load_average_1min": load,
           "cider": metrics["val/cider"]}
    row.update(_time_validation_parts(run))
    return row


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """Build the run, then train and validate ``args.epochs`` epochs; return every timing."""
    config = RunConfig.from_dict(
        {
            "data": str(args.data),
            "train_text": args.train_text,
            "num_threads": args.threads,
            "epochs": args.epochs,
            "val_max_images": 0,
        }
    )
    dataset = load_prepared(config.data)
    val_references = dataset.references("val")
    reference_s, scorer = _timed(CaptionScorer, val_references)
    logger.info("tokenised %d validation references of %d photos in %.2f s (once per study)",
                sum(len(texts) for texts in val_references.values()), len(val_references),
                reference_s)

    run = CapDecRun(config, dataset=dataset, scorer=scorer)
    untrained = _validation_row(run, epoch=0)
    logger.info("untrained model: validation %.2f s (decode %.2f s, score %.2f s), "
                "%.1f tokens per caption", untrained["validate_s"], untrained["decode_s"],
                untrained["score_s"], untrained["mean_caption_tokens"])

    epochs = []
    for epoch in range(1, args.epochs + 1):
        load = os.getloadavg()[0]
        train_s, train_metrics = _timed(run.train_epoch)
        row = {"train_epoch_s": train_s, "train_load_average_1min": load,
               "train_loss": train_metrics["train/loss"]}
        row.update(_validation_row(run, epoch))
        row["share"] = row["validate_s"] / train_s
        epochs.append(row)
        logger.info("epoch %d: train %.1f s (load %.2f) | validation %.2f s (decode %.2f s, "
                    "score %.2f s, load %.2f) | share %.1f%% | CIDEr %.3f, %.1f tokens/caption",
                    epoch, train_s, load, row["validate_s"], row["decode_s"], row["score_s"],
                    row["load_average_1min"], 100 * row["share"], row["cider"],
                    row["mean_caption_tokens"])

    train_median = statistics.median(row["train_epoch_s"] for row in epochs)
    validate_median = statistics.median(row["validate_s"] for row in epochs)
    return {
        "machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "torch": torch.__version__, "python": platform.python_version()},
        "settings": {key: str(value) if isinstance(value, Path) else value
                     for key, value in vars(args).items()},
        "counts": {"train_captions": len(run.train_rows), "val_photos": len(run.val_rows),
                   "steps_per_epoch": run.steps_per_epoch},
        "reference_tokenisation_s": reference_s,
        "untrained": untrained,
        "epochs": epochs,
        "median_train_epoch_s": train_median,
        "median_validate_s": validate_median,
        "median_share": validate_median / train_median,
    }


def _parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="prepared-dataset folder")
    parser.add_argument("--epochs", type=int, default=2, help="epochs to train and validate")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument(
        "--train-text", default="corpus", help="training captions: corpus, train or both"
    )
    parser.add_argument("--out", type=Path, help="write the results as JSON to this file")
    args = parser.parse_args(argv)
    for name in ("epochs", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1; got {getattr(args, name)}")
    return args


def main(argv: list[str] | None = None) -> None:
    """Run the measurement from the command line and log the median share."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args = _parse_args(argv)
    report = run_benchmark(args)
    logger.info("median over %d epochs: train %.1f s, validation %.2f s, share %.1f%%",
                args.epochs, report["median_train_epoch_s"], report["median_validate_s"],
                100 * report["median_share"])
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        logger.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
