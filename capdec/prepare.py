"""The prepare pipeline: from a Karpathy split file, its photos and a caption corpus to a
prepared-dataset folder of CLIP embeddings (layout in ``capdec.prepared``).

Every input is checked before CLIP is loaded, and every photo is test-decoded before encoding
starts, so a missing or corrupt file fails in seconds instead of midway through encoding.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from capdec.data import KarpathyImage, check_image_files, read_caption_corpus, read_karpathy
from capdec.embedding import encode_images, encode_texts, load_clip
from capdec.prepared import CaptionRecord, ImageRecord, write_prepared

logger = logging.getLogger(__name__)


def prepare_dataset(
    *,
    karpathy_json: str | os.PathLike,
    images_root: str | os.PathLike,
    out: str | os.PathLike,
    text_corpus: str | os.PathLike | None = None,
    clip_model: str = "ViT-B-32",
    clip_pretrained: str | os.PathLike | None = "openai",
    device: str = "cpu",
    text_batch_size: int = 256,
    image_batch_size: int = 64,
    restval_as_train: bool = True,
    max_corpus_captions: int | None = None,
    num_workers: int = 0,
    seed: int = 0,
    progress: bool = True,
) -> Path:
    """Encode a captioning dataset with CLIP and write a prepared-dataset folder.

    Rows are written in this order: the photos in Karpathy file order, then their captions
    (source "paired"), then the corpus captions (split "train", image -1, source "corpus").
    The manifest's ``source`` records the input paths, the settings and the fixed modality
    offset: ``modality_offset`` is the mean of the L2-normalised train image embeddings minus the
    mean of the L2-normalised paired train caption embeddings, and ``modality_offset_raw`` is the
    same on unnormalised embeddings.

    Args:
        karpathy_json: Karpathy split file (``dataset_coco.json``).
        images_root: folder that contains each photo's ``filepath`` folder.
        out: prepared-dataset folder to create; an earlier prepared folder there is replaced.
        text_corpus: optional text-only caption corpus (JSON lines with ``caption``, or text).
        clip_model: open_clip model name, or ``tiny`` (see ``capdec.embedding.load_clip``).
        clip_pretrained: open_clip pretrained tag, checkpoint file, or None for random weights.
        device: torch device for encoding.
        text_batch_size: captions per CLIP forward pass, >= 1.
        image_batch_size: photos per CLIP forward pass, >= 1.
        restval_as_train: fold Karpathy ``restval`` photos into train, else drop them.
        max_corpus_captions: keep a seeded random subset of this many corpus captions (file
            order kept); None keeps all.
        num_workers: DataLoader worker processes that decode photos, >= 0.
        seed: seed of the corpus subset and of a random-initialised CLIP.
        progress: show tqdm progress bars while encoding.

    Returns:
        The path of the written folder.

    Raises:
        FileNotFoundError: when an input file or the images root does not exist.
        FileExistsError: when ``out`` exists and is not a prepared dataset.
        ValueError: on invalid settings, an invalid Karpathy file or corpus, missing or corrupt
            photos, or an unknown CLIP model or tag.
    """
    started = time.perf_counter()
    _check_settings(out, text_batch_size, image_batch_size, max_corpus_captions, num_workers)

    # read and check every input before CLIP is loaded
    images = read_karpathy(karpathy_json, restval_as_train=restval_as_train)
    corpus = read_caption_corpus(text_corpus) if text_corpus is not None else []
    corpus = _subset(corpus, max_corpus_captions, seed)
    image_paths = check_image_files(images, images_root)
    _report_corpus_overlap(corpus, images)

    encoder = load_clip(clip_model, clip_pretrained, device=device, seed=seed)
    image_records = [
        ImageRecord(
            image.image_id, Path(os.path.relpath(path, images_root)).as_posix(), image.split
        )
        for image, path in zip(images, image_paths, strict=True)
    ]
    captions = [
        CaptionRecord(text, image.split, row, "paired")
        for row, image in enumerate(images)
        for text in image.captions
    ]
    captions += [CaptionRecord(text, "train", -1, "corpus") for text in corpus]

    texts = [caption.text for caption in captions]
    text_embeddings = encode_texts(encoder, texts, batch_size=text_batch_size, progress=progress)
    image_embeddings = encode_images(
        encoder,
        image_paths,
        batch_size=image_batch_size,
        progress=progress,
        num_workers=num_workers,
    )

    source: dict[str, Any] = {
        "karpathy_json": str(Path(karpathy_json).resolve()),
        "images_root": str(Path(images_root).resolve()),
        "text_corpus": str(Path(text_corpus).resolve()) if text_corpus is not None else None,
        "restval_as_train": restval_as_train,
        "max_corpus_captions": max_corpus_captions,
        "seed": seed,
        **modality_offsets(captions, text_embeddings, image_records, image_embeddings),
    }
    path = write_prepared(
        out,
        captions=captions,
        images=image_records,
        text_embeddings=text_embeddings,
        image_embeddings=image_embeddings,
        clip=encoder.identity,
        source=source,
    )
    _log_summary(path, captions, image_records, encoder.identity, time.perf_counter() - started)
    return path


def _check_settings(
    out: str | os.PathLike,
    text_batch_size: int,
    image_batch_size: int,
    max_corpus_captions: int | None,
    num_workers: int,
) -> None:
    if text_batch_size < 1:
        raise ValueError(f"text_batch_size must be >= 1; got {text_batch_size}")
    if image_batch_size < 1:
        raise ValueError(f"image_batch_size must be >= 1; got {image_batch_size}")
    if max_corpus_captions is not None and max_corpus_captions < 1:
        raise ValueError(
            f"max_corpus_captions must be >= 1 or None (all); got {max_corpus_captions}"
        )
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0; got {num_workers}")
    # write_prepared checks this too, but only after encoding
    out = Path(out)
    if out.exists() and not (out / "manifest.json").exists():
        raise FileExistsError(
            f"{out} exists and is not a prepared dataset; choose another --out folder"
        )


def _subset(corpus: list[str], limit: int | None, seed: int) -> list[str]:
    """Return a seeded random subset of ``limit`` captions in file order, or all of them."""
    if limit is None or limit >= len(corpus):
        return corpus
    rows = np.sort(np.random.default_rng(seed).choice(len(corpus), size=limit, replace=False))
    logger.info("kept %d of %d corpus captions (seed %d)", limit, len(corpus), seed)
    return [corpus[i] for i in rows]


def _report_corpus_overlap(corpus: list[str], images: list[KarpathyImage]) -> None:
    """Log how many corpus captions equal a val or test reference caption (ignoring case).

    Short common captions repeat by chance (coco-mini: 29 of 24,209), so only a share above 1%
    is a warning that the corpus may contain the captions of evaluation photos.
    """
    held_out = {
        text.lower() for image in images if image.split != "train" for text in image.captions
    }
    repeated = sum(text.lower() in held_out for text in corpus)
    if not repeated:
        return
    level = logging.WARNING if repeated > 0.01 * len(corpus) else logging.INFO
    logger.log(
        level,
        "%d of %d corpus captions equal a val or test reference caption (ignoring case); "
        "many such repeats mean the corpus holds evaluation captions, which inflates scores",
        repeated,
        len(corpus),
    )


def _l2_normalise(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def modality_offsets(
    captions: list[CaptionRecord],
    text_embeddings: np.ndarray,
    images: list[ImageRecord],
    image_embeddings: np.ndarray,
) -> dict[str, list[float] | None]:
    """Compute the fixed modality offset between train photos and their paired captions.

    Returns:
        ``{"modality_offset": ..., "modality_offset_raw": ...}``, each the mean train image
        embedding minus the mean paired train caption embedding as a list of floats. The first
        uses L2-normalised embeddings, the second unnormalised ones. Both are None when there are
        no paired train photos.
    """
    image_rows = [i for i, image in enumerate(images) if image.split == "train"]
    caption_rows = [
        i for i, c in enumerate(captions) if c.source == "paired" and c.split == "train"
    ]
    if not image_rows or not caption_rows:
        return {"modality_offset": None, "modality_offset_raw": None}

    image_part = image_embeddings[image_rows].astype(np.float64)
    text_part = text_embeddings[caption_rows].astype(np.float64)
    normalised = _l2_normalise(image_part).mean(0) - _l2_normalise(text_part).mean(0)
    raw = image_part.mean(0) - text_part.mean(0)
    return {"modality_offset": normalised.tolist(), "modality_offset_raw": raw.tolist()}


def _log_summary(
    path: Path,
    captions: list[CaptionRecord],
    images: list[ImageRecord],
    clip: dict[str, Any],
    seconds: float,
) -> None:
    paired = sum(c.source == "paired" for c in captions)
    splits = {s: sum(im.split == s for im in images) for s in ("train", "val", "test")}
    logger.info(
        "prepared %s in %.1f s: %d photos %s, %d paired captions, %d corpus captions, "
        "CLIP %s pretrained=%s checkpoint=%s",
        path,
        seconds,
        len(images),
        splits,
        paired,
        len(captions) - paired,
        clip["model"],
        clip["pretrained"],
        clip["checkpoint"],
    )
    if clip["random_init"]:
        logger.warning(
            "%s was encoded with a random-initialised CLIP: use it for smoke runs only", path
        )
