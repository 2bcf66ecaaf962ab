"""The prepared dataset of the embedded demo: the synthetic world encoded by its own tiny CLIP.

``build_demo_dataset`` generates the world, trains the world CLIP (or loads it from the cache),
encodes every image and caption and writes a prepared-dataset folder that the training loop reads
like one made from COCO. The world has no text-only corpus, so every caption is a "paired"
caption of a world image and studies on it train with ``train_text="train"``.

Besides the usual manifest fields, ``source`` contains the world and CLIP settings, the CLIP
diagnostics on the validation split and the ``modality_offset`` vector of the fixed-offset
variant. Its ``image_attributes`` map each validation and test image row to the size-colour-shape
triples that ``capdec.world.attribute_f1`` scores against.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from capdec.prepared import CaptionRecord, ImageRecord, PreparedDataset, write_prepared
from capdec.world import SPLITS, Triple, World, WorldConfig, generate_world
from capdec.world_clip import (
    MODEL_NAME,
    CachedClip,
    WorldClipConfig,
    clip_diagnostics,
    encode_images,
    encode_texts,
    load_or_train_world_clip,
    modality_offset,
)

logger = logging.getLogger(__name__)

WORLD_KIND = "capdec-world"

# Full: the demo's world, sized so world and CLIP build in a few minutes on two CPU cores.
# Quick: a smaller world and a shorter CLIP training for tests.
FULL_WORLD = WorldConfig()
FULL_CLIP = WorldClipConfig()
QUICK_WORLD = WorldConfig(num_train=2000, num_val=200, num_test=200)
QUICK_CLIP = WorldClipConfig(epochs=8, warmup_steps=50)  # a fifth of the images, so more passes


def demo_configs(*, seed: int = 0, quick: bool = False) -> tuple[WorldConfig, WorldClipConfig]:
    """Return the world and CLIP settings that ``build_demo_dataset`` uses."""
    world = QUICK_WORLD if quick else FULL_WORLD
    return WorldConfig(**{**world.to_dict(), "seed": seed}), QUICK_CLIP if quick else FULL_CLIP


@contextlib.contextmanager
def _torch_threads(num_threads: int | None) -> Iterator[None]:
    if num_threads is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def build_demo_dataset(
    out: Path,
    *,
    seed: int = 0,
    quick: bool = False,
    cache_dir: Path | None = None,
    num_threads: int | None = None,
) -> Path:
    """Generate the demo world, encode it with the world CLIP and write a prepared-dataset folder.

    Args:
        out: destination folder; it must not exist or must be a previous prepared folder.
        seed: world seed; it also seeds the CLIP's initialisation and batch order.
        quick: build the small world and short CLIP training meant for tests.
        cache_dir: folder of cached world CLIPs; None uses
            ``$XDG_CACHE_HOME/capdec-study/world-clip``.
        num_threads: torch intra-op threads while building; None leaves torch's setting.

    Returns:
        ``out``, loadable with ``capdec.prepared.load_prepared``.

    Raises:
        ValueError: when ``num_threads`` is given and below 1.
        FileExistsError: when ``out`` exists and is not a prepared dataset.
    """
    if num_threads is not None and num_threads < 1:
        raise ValueError(f"num_threads must be >= 1 or None; got {num_threads}")
    world_config, clip_config = demo_configs(seed=seed, quick=quick)
    with _torch_threads(num_threads):
        world = generate_world(world_config)
        clip = load_or_train_world_clip(world, clip_config, cache_dir=cache_dir)
        images, captions, caption_image = _records(world)
        image_features = encode_images(
            clip.model, np.concatenate([world.splits[s].images for s in SPLITS])
        )
        text_features = encode_texts(clip.model, clip.tokenizer, [c.text for c in captions])

    diagnostics = _val_diagnostics(world, images, caption_image, image_features, text_features)
    logger.info(
        "world CLIP on val: image-to-text top-1 %.3f (own captions %.3f, chance %.4f), "
        "modality gap %.3f, matched cosine %.3f",
        diagnostics["i2t_top1_content"],
        diagnostics["i2t_top1"],
        diagnostics["i2t_chance_content"],
        diagnostics["modality_gap"],
        diagnostics["matched_cosine"],
    )
    train_images = np.asarray([im.split == "train" for im in images])
    train_captions = np.asarray([c.split == "train" for c in captions])
    offset = modality_offset(image_features[train_images], text_features[train_captions])
    source = _source(world, clip, quick, diagnostics, offset, images)
    clip_identity = {
        "model": MODEL_NAME,
        "pretrained": None,
        "checkpoint": str(clip.checkpoint),
        "embed_dim": clip_config.embed_dim,
        "random_init": False,
        "settings_hash": clip.settings_hash,
    }
    return write_prepared(
        out,
        captions=captions,
        images=images,
        text_embeddings=text_features,
        image_embeddings=image_features,
        clip=clip_identity,
        source=source,
    )


def _records(world: World) -> tuple[list[ImageRecord], list[CaptionRecord], np.ndarray]:
    """Lay out images split by split and captions image by image, plus each caption's image row."""
    images, captions, caption_image = [], [], []
    for split in SPLITS:
        part = world.splits[split]
        for index, image_captions in enumerate(part.captions):
            row = len(images)
            images.append(ImageRecord(image_id=f"world-{split}-{index:05d}", file="", split=split))
            for text in image_captions:
                captions.append(CaptionRecord(text=text, split=split, image=row, source="paired"))
                caption_image.append(row)
    return images, captions, np.asarray(caption_image)


def _val_diagnostics(
    world: World,
    images: list[ImageRecord],
    caption_image: np.ndarray,
    image_features: np.ndarray,
    text_features: np.ndarray,
) -> dict[str, Any]:
    val_rows = np.flatnonzero([im.split == "val" for im in images])
    val_captions = np.flatnonzero(np.isin(caption_image, val_rows))
    content = [scene.combination for scene in world.splits["val"].scenes]
    diagnostics: dict[str, Any] = clip_diagnostics(
        image_features[val_rows],
        text_features[val_captions],
        caption_image[val_captions] - val_rows[0],
        content,
    )
    diagnostics["definition"] = (
        "split val. i2t_top1_content: share of val images whose nearest caption (cosine, among "
        "all val captions) belongs to an image with the same objects at the same positions, "
        "background ignored; i2t_top1: nearest caption is one of the image's own; "
        "i2t_chance_content: i2t_top1_content of a random caption; modality_gap: L2 distance "
        "between mean normalised image and mean normalised caption embedding; matched_cosine: "
        "mean cosine of an image and its own captions"
    )
    return diagnostics


def _source(
    world: World,
    clip: CachedClip,
    quick: bool,
    diagnostics: dict[str, Any],
    offset: np.ndarray,
    images: list[ImageRecord],
) -> dict[str, Any]:
    evaluated = [(row, im.split) for row, im in enumerate(images) if im.split != "train"]
    scenes = {split: iter(world.splits[split].scenes) for split in ("val", "test")}
    attributes = {
        str(row): [" ".join(t) for t in next(scenes[split]).attributes] for row, split in evaluated
    }
    training = {
        k: clip.record[k]
        for k in ("train_seconds", "epoch_losses", "logit_scale", "num_parameters")
    }
    return {
        "kind": WORLD_KIND,
        "seed": world.config.seed,
        "quick": quick,
        "world": world.config.to_dict(),
        "clip_settings": clip.record["clip"],
        "clip_training": training,
        "clip_loaded_from_cache": not clip.trained,
        "clip_diagnostics": diagnostics,
        "modality_offset": [float(x) for x in offset],
        "image_attributes": attributes,
    }


def image_attributes(dataset: PreparedDataset) -> dict[int, list[Triple]]:
    """Read the size-colour-shape triples of each validation and test image of a demo dataset.

    Returns:
        Image row -> list of (size, colour, shape) triples, the ``attributes`` of ``attribute_f1``.

    Raises:
        ValueError: when the dataset was not built by ``build_demo_dataset``.
    """
    stored = dataset.manifest.get("source", {}).get("image_attributes")
    if stored is None:
        raise ValueError(
            f"prepared dataset {dataset.root} has no image attributes; attribute F1 needs a "
            "dataset built by build_demo_dataset (capdec-study demo)"
        )
    return {int(row): [tuple(obj.split()) for obj in objects] for row, objects in stored.items()}
