"""The prepared-dataset folder: CLIP embeddings of captions and images, computed once.

``capdec-study prepare`` and the synthetic demo world both write this layout, and every trial of
every study reads it without re-encoding anything:

    manifest.json          format version, CLIP identity, counts, content hash, source
    captions.jsonl         one caption per line: {"text", "split", "image", "source"}
    images.jsonl           one image per line: {"image_id", "file", "split"}
    text_embeddings.npy    float32 (num_captions, dim), CLIP text features as the encoder returns them
    image_embeddings.npy   float32 (num_images, dim), CLIP image features as the encoder returns them

``image`` is the row of the caption's image in images.jsonl, or -1 for a text-only corpus caption.
``source`` is "paired" (a caption of a photo in the Karpathy JSON) or "corpus". Embeddings are
stored unnormalised, so the noise settings decide where L2 normalisation happens.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")
_FILES = ("captions.jsonl", "images.jsonl", "text_embeddings.npy", "image_embeddings.npy")


@dataclass(frozen=True)
class CaptionRecord:
    text: str
    split: str  # train | val | test
    image: int  # row in images.jsonl, or -1 for a corpus caption
    source: str  # paired | corpus


@dataclass(frozen=True)
class ImageRecord:
    image_id: str  # COCO id or generated id, unique in the dataset
    file: str  # path relative to the images root, or "" for generated images
    split: str  # train | val | test


@dataclass
class PreparedDataset:
    """A loaded prepared-dataset folder."""

    root: Path
    manifest: dict[str, Any]
    captions: list[CaptionRecord]
    images: list[ImageRecord]
    text_embeddings: np.ndarray  # (num_captions, dim) float32
    image_embeddings: np.ndarray  # (num_images, dim) float32

    @property
    def clip(self) -> dict[str, Any]:
        """The CLIP identity the embeddings were computed with (model, pretrained, checkpoint)."""
        return self.manifest["clip"]

    @property
    def embed_dim(self) -> int:
        return int(self.text_embeddings.shape[1])

    @property
    def content_hash(self) -> str:
        return self.manifest["content_hash"]

    def training_caption_indices(self, source: str) -> np.ndarray:
        """Return the caption rows used for text-only training.

        Args:
            source: "corpus" (text-only corpus captions), "train" (captions of the paired train
                photos) or "both".

        Raises:
            ValueError: when the chosen source has no captions in this dataset.
        """
        wanted = {"corpus": {"corpus"}, "train": {"paired"}, "both": {"corpus", "paired"}}[source]
        rows = [
            i for i, c in enumerate(self.captions) if c.split == "train" and c.source in wanted
        ]
        if not rows:
            raise ValueError(
                f"prepared dataset {self.root} has no training captions for train_text={source!r}; "
                "use train_text='train' when it was prepared without --text-corpus"
            )
        return np.asarray(rows, dtype=np.int64)

    def image_indices(self, split: str) -> np.ndarray:
        """Return the image rows of one split, in file order."""
        return np.asarray(
            [i for i, im in enumerate(self.images) if im.split == split], dtype=np.int64
        )

    def references(self, split: str) -> dict[int, list[str]]:
        """Map each image row of ``split`` to its reference captions."""
        refs: dict[int, list[str]] = {int(i): [] for i in self.image_indices(split)}
        for caption in self.captions:
            if caption.image >= 0 and caption.image in refs:
                refs[caption.image].append(caption.text)
        return refs


def content_hash(folder: Path) -> str:
    """Hash the data files of a prepared folder (SHA-256, hex), so studies can tell copies apart."""
    digest = hashlib.sha256()
    for name in _FILES:
        digest.update(name.encode())
        with open(folder / name, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def write_prepared(
    out_dir: str | os.PathLike,
    *,
    captions: list[CaptionRecord],
    images: list[ImageRecord],
    text_embeddings: np.ndarray,
    image_embeddings: np.ndarray,
    clip: dict[str, Any],
    source: dict[str, Any],
) -> Path:
    """Write a prepared-dataset folder atomically and return its path.

    The files are written into a temporary sibling folder that replaces ``out_dir`` only when
    complete, so an interrupted prepare never leaves a half-written dataset behind.

    Args:
        out_dir: destination folder; it must not exist or must be a previous prepared folder.
        captions, images: records in row order of the embedding arrays.
        text_embeddings: (len(captions), dim) array.
        image_embeddings: (len(images), dim) array; (0, dim) when there are no images.
        clip: CLIP identity, at least {"model", "pretrained", "checkpoint", "embed_dim"}.
        source: where the data came from (paths, flags), stored for the record.

    Raises:
        ValueError: when shapes disagree with the record lists or an image index is invalid.
    """
    out = Path(out_dir)
    text_embeddings = np.ascontiguousarray(text_embeddings, dtype=np.float32)
    image_embeddings = np.ascontiguousarray(image_embeddings, dtype=np.float32)
    if text_embeddings.shape[0] != len(captions):
        raise ValueError(
            f"{len(captions)} captions but {text_embeddings.shape[0]} text embeddings"
        )
    if image_embeddings.shape[0] != len(images):
        raise ValueError(f"{len(images)} images but {image_embeddings.shape[0]} image embeddings")
    if len(images) and image_embeddings.shape[1] != text_embeddings.shape[1]:
        raise ValueError(
            f"text embeddings have dim {text_embeddings.shape[1]} "
            f"but image embeddings have dim {image_embeddings.shape[1]}"
        )
    for row, caption in enumerate(captions):
        if not -1 <= caption.image < len(images):
            raise ValueError(f"caption {row} points to image {caption.image}, not in 0..{len(images) - 1}")

    if out.exists() and not (out / "manifest.json").exists():
        raise FileExistsError(
            f"{out} exists and is not a prepared dataset; choose another --out folder"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    # mkdir rather than mkdtemp, because mkdtemp makes the folder private (0700) whatever the umask
    staging = out.parent / f".{out.name}.{os.getpid()}.{secrets.token_hex(4)}"
    staging.mkdir()
    try:
        with open(staging / "captions.jsonl", "w", encoding="utf-8") as handle:
            for caption in captions:
                handle.write(json.dumps(caption.__dict__, ensure_ascii=False) + "\n")
        with open(staging / "images.jsonl", "w", encoding="utf-8") as handle:
            for image in images:
                handle.write(json.dumps(image.__dict__, ensure_ascii=False) + "\n")
        np.save(staging / "text_embeddings.npy", text_embeddings)
        np.save(staging / "image_embeddings.npy", image_embeddings)
        counts = {
            f"{split}_{kind}": n
            for split in SPLITS
            for kind, n in (
                ("images", sum(im.split == split for im in images)),
                ("captions", sum(c.split == split for c in captions)),
            )
        }
        counts["corpus_captions"] = sum(c.source == "corpus" for c in captions)
        manifest = {
            "format_version": FORMAT_VERSION,
            "clip": clip,
            "embed_dim": int(text_embeddings.shape[1]),
            "counts": counts,
            "content_hash": content_hash(staging),
            "source": source,
        }
        with open(staging / "manifest.json", "w", encoding="utf-8") as handle:
            json.dump(manifest, handle, indent=2)
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("wrote prepared dataset %s (%s)", out, manifest["counts"])
    return out


def load_prepared(path: str | os.PathLike) -> PreparedDataset:
    """Load a prepared-dataset folder.

    Raises:
        FileNotFoundError: when the folder or one of its files is missing.
        ValueError: when the format version is unknown or the files disagree with each other.
    """
    root = Path(path)
    manifest_path = root / "manifest.json"
    if not manifest_path.is_file():
        raise FileNotFoundError(
            f"{root} is not a prepared dataset (no manifest.json); "
            "create one with `capdec-study prepare` or `capdec-study demo`"
        )
    with open(manifest_path, encoding="utf-8") as handle:
        manifest = json.load(handle)
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{root} has prepared-dataset format {manifest.get('format_version')}, "
            f"this version reads format {FORMAT_VERSION}; prepare it again"
        )
    for name in _FILES:
        if not (root / name).is_file():
            raise FileNotFoundError(f"prepared dataset {root} is missing {name}; prepare it again")

    with open(root / "captions.jsonl", encoding="utf-8") as handle:
        captions = [CaptionRecord(**json.loads(line)) for line in handle if line.strip()]
    with open(root / "images.jsonl", encoding="utf-8") as handle:
        images = [ImageRecord(**json.loads(line)) for line in handle if line.strip()]
    text_embeddings = np.load(root / "text_embeddings.npy", allow_pickle=False)
    image_embeddings = np.load(root / "image_embeddings.npy", allow_pickle=False)
    if text_embeddings.shape[0] != len(captions) or image_embeddings.shape[0] != len(images):
        raise ValueError(f"prepared dataset {root} is inconsistent: row counts differ; prepare it again")
    return PreparedDataset(root, manifest, captions, images, text_embeddings, image_embeddings)
