"""The tiny CLIP of the demo world: an open_clip model trained contrastively on the world's pairs.

No pretrained CLIP can be downloaded for the demo, and a randomly initialised one carries no
meaning, so the demo trains its own. It is open_clip's ``CLIP`` class with a small ModifiedResNet
image tower and a two-layer text transformer over the world's word vocabulary, optimised with
open_clip's ``ClipLoss``.

The learnable logit scale starts at log(100), the value OpenAI's CLIP ends training with (open_clip
clamps it there too). Started at open_clip's default log(1/0.07) instead, the two modalities
nearly merge and the gap that noise injection bridges disappears. On the quick demo world
(``capdec.demo_data.QUICK_CLIP``) that start gave a modality gap of 0.08 and a matched-pair cosine
of 0.95, against 0.94 and 0.47 from log(100).

A trained model is cached under ``<cache root>/capdec-study/world-clip/<settings hash>/`` with
its diagnostics, written atomically and reused by later builds with the same settings.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import pickle
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
from open_clip.loss import ClipLoss
from open_clip.model import CLIPTextCfg, CLIPVisionCfg
from tqdm import tqdm

from capdec.world import IMAGE_SIZE, VOCABULARY, World, WorldConfig

logger = logging.getLogger(__name__)

CACHE_VERSION = 1  # bump when a code change alters the trained model for the same settings
CHECKPOINT_FILE = "world_clip.pt"
DIAGNOSTICS_FILE = "diagnostics.json"
MODEL_NAME = "capdec-world-clip"

_PIXEL_MEAN, _PIXEL_STD = 0.5, 0.25  # maps uint8 intensities to roughly [-2, 2]


@dataclass(frozen=True)
class WorldClipConfig:
    """Architecture and contrastive training of the world CLIP."""

    embed_dim: int = 64  # shared embedding size of both towers
    vision_width: int = 16  # ModifiedResNet stem width; the last stage has 32x this many channels
    vision_layers: tuple[int, int, int, int] = (1, 1, 1, 1)  # bottleneck blocks per ResNet stage
    text_width: int = 64
    text_layers: int = 2
    text_heads: int = 4
    context_length: int = 24  # tokens including start and end; the longest caption has 19 words
    epochs: int = 6
    # image-caption pairs per step, one random caption per image. For the same number of images
    # seen, 64 reached higher retrieval than 128 or 256 on the quick world: it takes more steps.
    batch_size: int = 64
    lr: float = 2e-3  # peak AdamW learning rate, cosine decay after warm-up
    weight_decay: float = 0.1
    warmup_steps: int = 100
    init_logit_scale: float = math.log(100.0)  # log of the inverse softmax temperature

    def __post_init__(self) -> None:
        for name in (
            "embed_dim",
            "vision_width",
            "text_width",
            "text_layers",
            "text_heads",
            "epochs",
            "batch_size",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1; got {getattr(self, name)}")
        if len(self.vision_layers) != 4 or min(self.vision_layers) < 1:
            raise ValueError(
                f"vision_layers must be 4 block counts >= 1; got {self.vision_layers}"
            )
        if self.text_width % self.text_heads:
            raise ValueError(
                f"text_width ({self.text_width}) must be divisible by "
                f"text_heads ({self.text_heads})"
            )
        if self.context_length < 3:
            raise ValueError(f"context_length must be >= 3; got {self.context_length}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0; got {self.lr}")

    def to_dict(self) -> dict[str, Any]:
        values = asdict(self)
        values["vision_layers"] = list(self.vision_layers)
        return values


class WorldTokenizer:
    """Word-level tokenizer over the world vocabulary, laid out for open_clip's argmax pooling.

    Id 0 pads, 1 starts a caption and the highest id ends it, so ``text.argmax(-1)`` finds the
    end token as open_clip's text tower expects.
    """

    def __init__(self, context_length: int, vocabulary: Sequence[str] = VOCABULARY) -> None:
        self.context_length = context_length
        self.word_ids = {word: i for i, word in enumerate(vocabulary, start=2)}
        self.start_id, self.pad_id = 1, 0
        self.end_id = len(vocabulary) + 2

    @property
    def vocab_size(self) -> int:
        return self.end_id + 1

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        """Encode captions as a (len(texts), context_length) int64 tensor.

        Raises:
            ValueError: when a caption has a word outside the vocabulary or too many words.
        """
        tokens = torch.full((len(texts), self.context_length), self.pad_id, dtype=torch.long)
        for row, text in enumerate(texts):
            words = text.split()
            if len(words) + 2 > self.context_length:
                raise ValueError(
                    f"caption has {len(words)} words, more than context_length - 2 = "
                    f"{self.context_length - 2}: {text!r}"
                )
            try:
                ids = [self.start_id] + [self.word_ids[w] for w in words] + [self.end_id]
            except KeyError as error:
                raise ValueError(
                    f"word {error.args[0]!r} of caption {text!r} is not in the world vocabulary"
                ) from None
            tokens[row, : len(ids)] = torch.tensor(ids)
        return tokens


def build_world_clip(config: WorldClipConfig, vocab_size: int) -> open_clip.CLIP:
    """Build an untrained open_clip ``CLIP`` with the world's small towers.

    Args:
        config: architecture settings.
        vocab_size: size of the ``WorldTokenizer`` vocabulary, end token included.
    """
    vision = CLIPVisionCfg(
        layers=config.vision_layers,
        width=config.vision_width,
        head_width=64,
        image_size=IMAGE_SIZE,
    )
    text = CLIPTextCfg(
        context_length=config.context_length,
        vocab_size=vocab_size,
        width=config.text_width,
        heads=config.text_heads,
        layers=config.text_layers,
    )
    return open_clip.CLIP(config.embed_dim, vision, text, init_logit_scale=config.init_logit_scale)


def images_to_tensor(images: np.ndarray) -> torch.Tensor:
    """Convert (N, 32, 32, 3) uint8 images to the normalised (N, 3, 32, 32) float CLIP input."""
    pixels = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
    return (pixels - _PIXEL_MEAN) / _PIXEL_STD


def _cosine_schedule(step: int, warmup_steps: int, total_steps: int) -> float:
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def train_world_clip(world: World, config: WorldClipConfig) -> tuple[open_clip.CLIP, list[float]]:
    """Train a world CLIP contrastively on the training split.

    Each epoch visits every training image once, paired with one of its captions drawn at random.
    The result depends only on the world and ``config``: initialisation, batch order and caption
    choice are seeded with the world seed.

    Returns:
        The trained model in eval mode and the mean loss of each epoch.
    """
    seed = world.config.seed
    torch.manual_seed(seed)
    tokenizer = WorldTokenizer(config.context_length)
    model = build_world_clip(config, tokenizer.vocab_size)
    model.train()

    train = world.splits["train"]
    pixels = images_to_tensor(train.images)
    tokens = torch.stack(
        [tokenizer(captions) for captions in train.captions]
    )  # (N, captions, context)
    n_images, n_captions = tokens.shape[:2]
    generator = torch.Generator().manual_seed(seed)

    steps_per_epoch = math.ceil(n_images / config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.lr, weight_decay=config.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: _cosine_schedule(step, config.warmup_steps, total_steps)
    )
    loss_fn = ClipLoss()
    epoch_losses = []
    progress = tqdm(total=total_steps, desc="world CLIP", unit="step", leave=False)
    for _ in range(config.epochs):
        order = torch.randperm(n_images, generator=generator)
        choice = torch.randint(n_captions, (n_images,), generator=generator)
        losses = []
        for start in range(0, n_images, config.batch_size):
            rows = order[start : start + config.batch_size]
            image_features, text_features, logit_scale = model(
                pixels[rows], tokens[rows, choice[rows]]
            )
            loss = loss_fn(image_features, text_features, logit_scale)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            # open_clip's trainer keeps the temperature at or above 0.01 the same way
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100.0))
            losses.append(loss.item())
            progress.update()
        epoch_losses.append(float(np.mean(losses)))
        progress.set_postfix(loss=f"{epoch_losses[-1]:.3f}")
    progress.close()
    model.eval()
    return model, epoch_losses


def _encode_in_batches(encode, items, batch_size: int, desc: str) -> np.ndarray:
    """Apply ``encode`` to consecutive batches of ``items`` and stack the float32 results."""
    chunks = []
    for start in tqdm(range(0, len(items), batch_size), desc=desc, unit="batch", leave=False):
        chunks.append(encode(items[start : start + batch_size]))
    return torch.cat(chunks).numpy().astype(np.float32)


@torch.no_grad()
def encode_images(model: open_clip.CLIP, images: np.ndarray, batch_size: int = 500) -> np.ndarray:
    """Encode (N, 32, 32, 3) uint8 images as unnormalised (N, embed_dim) float32 features."""
    model.eval()
    return _encode_in_batches(
        lambda batch: model.encode_image(images_to_tensor(batch)), images, batch_size,
        "encode images",
    )


@torch.no_grad()
def encode_texts(
    model: open_clip.CLIP, tokenizer: WorldTokenizer, texts: Sequence[str], batch_size: int = 2000
) -> np.ndarray:
    """Encode captions as unnormalised (len(texts), embed_dim) float32 features."""
    model.eval()
    return _encode_in_batches(
        lambda batch: model.encode_text(tokenizer(batch)), texts, batch_size, "encode captions"
    )


def _normalize(features: np.ndarray) -> np.ndarray:
    return features / np.linalg.norm(features, axis=1, keepdims=True)


def modality_offset(image_features: np.ndarray, text_features: np.ndarray) -> np.ndarray:
    """Return the mean normalised image feature minus the mean normalised text feature, (dim,)."""
    return _normalize(image_features).mean(axis=0) - _normalize(text_features).mean(axis=0)


def clip_diagnostics(
    image_features: np.ndarray,
    text_features: np.ndarray,
    caption_image: np.ndarray,
    image_content: Sequence[Any],
) -> dict[str, float]:
    """Measure how well a CLIP aligns one split's images and captions, and how far apart they sit.

    Args:
        image_features: (num_images, dim) features of the split's images.
        text_features: (num_captions, dim) features of all their captions.
        caption_image: (num_captions,) row of each caption's image in ``image_features``.
        image_content: one hashable scene description per image; captions of images with equal
            content describe each other's images equally well.

    Returns:
        ``i2t_top1``: share of images whose nearest caption (cosine, among all the split's
        captions) is one of their own. ``i2t_top1_content``: the same, also counting a caption of
        another image with identical content. ``i2t_chance_content``: the expected
        ``i2t_top1_content`` of a caption picked at random. ``modality_gap``: L2 distance between
        the mean normalised image and the mean normalised text feature. ``matched_cosine``: mean
        cosine of an image and its own captions.
    """
    images, texts = _normalize(image_features), _normalize(text_features)
    caption_image = np.asarray(caption_image)
    content_ids = {content: i for i, content in enumerate(dict.fromkeys(image_content))}
    image_content_id = np.asarray([content_ids[c] for c in image_content])
    caption_content_id = image_content_id[caption_image]

    nearest = (images @ texts.T).argmax(axis=1)
    own = caption_image[nearest] == np.arange(len(images))
    same_content = caption_content_id[nearest] == image_content_id
    chance = (caption_content_id[None, :] == image_content_id[:, None]).mean()
    matched = np.sum(images[caption_image] * texts, axis=1)
    return {
        "i2t_top1": float(own.mean()),
        "i2t_top1_content": float(same_content.mean()),
        "i2t_chance_content": float(chance),
        "modality_gap": float(np.linalg.norm(images.mean(axis=0) - texts.mean(axis=0))),
        "matched_cosine": float(matched.mean()),
    }


def settings_hash(world_config: WorldConfig, clip_config: WorldClipConfig) -> str:
    """Return a 16-hex-digit hash of everything that determines the trained world CLIP."""
    settings = {
        "cache_version": CACHE_VERSION,
        "world": world_config.to_dict(),
        "clip": clip_config.to_dict(),
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def default_cache_dir() -> Path:
    """Return ``$XDG_CACHE_HOME/capdec-study/world-clip``, with ``~/.cache`` if it is unset."""
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "capdec-study" / "world-clip"


@dataclass
class CachedClip:
    model: open_clip.CLIP
    tokenizer: WorldTokenizer
    checkpoint: Path  # the cached checkpoint file
    settings_hash: str
    trained: bool  # True when this call trained the model, False when it loaded the cache
    record: dict[str, Any]  # contents of the cache's diagnostics JSON


def _write_cache(folder: Path, model: open_clip.CLIP, record: dict[str, Any]) -> None:
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    staging.chmod(0o755)  # mkdtemp creates it private to the user
    try:
        torch.save(
            {"state_dict": model.state_dict(), "world": record["world"], "clip": record["clip"]},
            staging / CHECKPOINT_FILE,
        )
        with open(staging / DIAGNOSTICS_FILE, "w", encoding="utf-8") as handle:
            json.dump(record, handle, indent=2)
        try:
            os.replace(staging, folder)
        except OSError:
            # another process finished the same settings first; its files are equivalent
            if not (folder / CHECKPOINT_FILE).is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def load_or_train_world_clip(
    world: World, config: WorldClipConfig, *, cache_dir: Path | None = None
) -> CachedClip:
    """Load the world CLIP for these settings from the cache, training and caching it when absent.

    Args:
        world: the generated world; its configuration is part of the cache key.
        config: CLIP architecture and training settings.
        cache_dir: folder holding one subfolder per settings hash; ``default_cache_dir()`` if None.

    Returns:
        The model in eval mode with its tokenizer, cache location and diagnostics record.

    Raises:
        RuntimeError: when a cached checkpoint exists but cannot be loaded into the model.
    """
    digest = settings_hash(world.config, config)
    folder = Path(cache_dir if cache_dir is not None else default_cache_dir()) / digest
    checkpoint = folder / CHECKPOINT_FILE
    tokenizer = WorldTokenizer(config.context_length)

    if checkpoint.is_file() and (folder / DIAGNOSTICS_FILE).is_file():
        model = build_world_clip(config, tokenizer.vocab_size)
        try:
            state = torch.load(checkpoint, map_location="cpu", weights_only=True)
            model.load_state_dict(state["state_dict"])
        except (RuntimeError, KeyError, OSError, EOFError, pickle.UnpicklingError) as error:
            raise RuntimeError(
                f"could not load cached world CLIP {checkpoint}; delete {folder} and rerun"
            ) from error
        with open(folder / DIAGNOSTICS_FILE, encoding="utf-8") as handle:
            record = json.load(handle)
        logger.info("loaded cached world CLIP %s", checkpoint)
        return CachedClip(model.eval(), tokenizer, checkpoint, digest, False, record)

    logger.info("training world CLIP (settings %s), cached afterwards in %s", digest, folder)
    started = time.perf_counter()
    model, epoch_losses = train_world_clip(world, config)
    record = {
        "world": world.config.to_dict(),
        "clip": config.to_dict(),
        "settings_hash": digest,
        "train_seconds": round(time.perf_counter() - started, 1),
        "epoch_losses": epoch_losses,
        "logit_scale": model.logit_scale.exp().item(),
        "num_parameters": sum(p.numel() for p in model.parameters()),
    }
    record["val"] = _split_diagnostics(model, tokenizer, world, "val")
    _write_cache(folder, model, record)
    return CachedClip(model, tokenizer, checkpoint, digest, True, record)


def _split_diagnostics(
    model: open_clip.CLIP, tokenizer: WorldTokenizer, world: World, split: str
) -> dict[str, float]:
    part = world.splits[split]
    texts = [caption for captions in part.captions for caption in captions]
    caption_image = np.repeat(np.arange(len(part.scenes)), [len(c) for c in part.captions])
    content = [scene.combination for scene in part.scenes]
    return clip_diagnostics(
        encode_images(model, part.images),
        encode_texts(model, tokenizer, texts),
        caption_image,
        content,
    )
