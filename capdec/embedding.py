"""Loading a CLIP model through open_clip and encoding captions and photos with it.

``load_clip`` validates the model name and the weights source before anything is downloaded, then
builds the model with ``open_clip.create_model_and_transforms``. The returned ``ClipEncoder``
carries an identity dictionary that the prepared dataset stores, so embeddings computed with
different weights are never mixed by accident.

The model name ``tiny`` is a small CLIP defined in ``capdec/clip_configs/tiny.json``. Without a
checkpoint it is random-initialised: its embeddings carry no meaning and serve smoke runs only.
"""

from __future__ import annotations

import difflib
import hashlib
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from capdec.data import convert_to_rgb, load_rgb_image
from capdec.devices import resolve_device

logger = logging.getLogger(__name__)

_CONFIG_DIR = Path(__file__).parent / "clip_configs"
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")


@dataclass
class ClipEncoder:
    """A loaded CLIP model with its image transform, tokenizer and identity."""

    model: torch.nn.Module  # an open_clip CLIP in eval mode
    preprocess: Callable[[Image.Image], torch.Tensor]  # PIL RGB image -> (3, H, W) tensor
    tokenizer: Callable[[list[str]], torch.Tensor]  # captions -> (N, context_length) token ids
    identity: dict[str, Any]  # model, pretrained, checkpoint, checkpoint_sha256, embed_dim, ...
    device: torch.device

    @property
    def embed_dim(self) -> int:
        return int(self.identity["embed_dim"])


def _register_configs() -> None:
    """Add capdec's model configs (``tiny``) to open_clip's registry, once per process."""
    missing = [p.stem for p in _CONFIG_DIR.glob("*.json") if p.stem not in open_clip.list_models()]
    if missing:
        open_clip.add_model_config(_CONFIG_DIR)


def _check_model_name(model: str) -> None:
    _register_configs()
    known = open_clip.list_models()
    if model in known:
        return
    close = difflib.get_close_matches(model, known, n=5, cutoff=0.5)
    suggestion = f"close names: {', '.join(close)}" if close else "no close names"
    raise ValueError(
        f"unknown CLIP model {model!r} ({suggestion}); list all with "
        "python -c 'import open_clip; print(open_clip.list_models())'"
    )


def _resolve_pretrained(
    model: str, pretrained: str | os.PathLike | None
) -> tuple[str | None, Path | None]:
    """Split ``pretrained`` into (open_clip tag, checkpoint file); at most one is not None."""
    if pretrained is None:
        return None, None
    text = os.fspath(pretrained)
    # open_clip checks tags before files too, so a file named like a tag is never picked up
    if open_clip.is_pretrained_cfg(model, text):
        return text, None
    path = Path(text).expanduser()
    if path.is_file():
        return None, path.resolve()
    if path.suffix in CHECKPOINT_SUFFIXES or "/" in text or "\\" in text:
        raise FileNotFoundError(f"CLIP checkpoint file not found: {path}")

    tags = open_clip.list_pretrained_tags_by_model(model)
    raise ValueError(
        f"unknown pretrained tag {text!r} for CLIP model {model!r}; "
        f"known tags: {', '.join(tags) if tags else 'none'}. "
        "Pass one of them, a checkpoint file (.pt, .pth, .bin, .safetensors), "
        "or None for random initialisation"
    )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_clip(
    model: str = "ViT-B-32",
    pretrained: str | os.PathLike | None = "openai",
    *,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> ClipEncoder:
    """Load a CLIP model, its eval image transform and its tokenizer through open_clip.

    Args:
        model: an open_clip model name (``open_clip.list_models()``), or ``tiny`` for capdec's
            small CLIP (64-dim embeddings, 64x64 pixel input).
        pretrained: an open_clip pretrained tag for this model (``openai`` downloads OpenAI's
            weights on first use), a local checkpoint file (.pt, .pth, .bin or .safetensors,
            a state dict as open_clip saves it), or None for random initialisation.
        device: torch device the model runs on.
        seed: torch seed of the random initialisation, so ``pretrained=None`` is reproducible.

    Returns:
        The encoder; ``identity`` has model, pretrained (tag or None), checkpoint (absolute path
        or None), checkpoint_sha256, embed_dim, quick_gelu and random_init.

    Raises:
        ValueError: on an unknown model name or an unknown pretrained tag for the model.
        FileNotFoundError: when ``pretrained`` names a checkpoint file that does not exist.
    """
    _check_model_name(model)
    tag, checkpoint = _resolve_pretrained(model, pretrained)
    # open_clip 3.3.0 builds ViT-B-32 with nn.GELU even for the 'openai' tag and only warns,
    # but those weights were trained with QuickGELU. Follow the tag so the features match.
    quick_gelu = bool(tag and open_clip.get_pretrained_cfg(model, tag).get("quick_gelu", False))

    device = resolve_device(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        clip_model, _, preprocess = open_clip.create_model_and_transforms(
            model,
            pretrained=tag or (str(checkpoint) if checkpoint else None),
            device=device,
            force_quick_gelu=quick_gelu,
        )
    clip_model.eval()

    identity = {
        "model": model,
        "pretrained": tag,
        "checkpoint": str(checkpoint) if checkpoint else None,
        "checkpoint_sha256": _sha256(checkpoint) if checkpoint else None,
        "embed_dim": int(open_clip.get_model_config(model)["embed_dim"]),
        "quick_gelu": quick_gelu,
        "random_init": tag is None and checkpoint is None,
    }
    if identity["random_init"]:
        logger.warning(
            "CLIP %s is random-initialised: its embeddings carry no meaning, so use it for "
            "smoke runs only, never for results",
            model,
        )
    logger.info("loaded CLIP %s on %s", identity, device)
    return ClipEncoder(clip_model, preprocess, open_clip.get_tokenizer(model), identity, device)


def encode_texts(
    encoder: ClipEncoder,
    texts: Sequence[str],
    *,
    batch_size: int = 256,
    progress: bool = True,
) -> np.ndarray:
    """Encode captions with CLIP's text tower.

    Captions longer than the context length (77 tokens for OpenAI CLIP) are truncated by the
    tokenizer, end-of-text token kept.

    Args:
        encoder: from ``load_clip``.
        texts: captions.
        batch_size: captions per forward pass, >= 1.
        progress: show a tqdm progress bar.

    Returns:
        float32 array (len(texts), embed_dim) of unnormalised text features.

    Raises:
        ValueError: when batch_size < 1.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    features = [np.zeros((0, encoder.embed_dim), dtype=np.float32)]
    starts = range(0, len(texts), batch_size)
    with torch.no_grad():
        for start in tqdm(starts, desc="encode captions", unit="batch", disable=not progress):
            tokens = encoder.tokenizer(list(texts[start : start + batch_size])).to(encoder.device)
            batch = encoder.model.encode_text(tokens, normalize=False)
            features.append(batch.float().cpu().numpy())
    return np.concatenate(features)


class _ImageDataset(Dataset):
    def __init__(
        self, items: Sequence[str | os.PathLike | Image.Image], preprocess: Callable
    ) -> None:
        self.items = items
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> torch.Tensor:
        item = self.items[index]
        image = convert_to_rgb(item) if isinstance(item, Image.Image) else load_rgb_image(item)
        return self.preprocess(image)


def encode_images(
    encoder: ClipEncoder,
    paths_or_pil: Sequence[str | os.PathLike | Image.Image],
    *,
    batch_size: int = 64,
    progress: bool = True,
    num_workers: int = 0,
) -> np.ndarray:
    """Encode photos with CLIP's image tower, applying the model's eval transform.

    Args:
        encoder: from ``load_clip``.
        paths_or_pil: image files or PIL images, converted to RGB as ``load_rgb_image`` does.
        batch_size: photos per forward pass, >= 1.
        progress: show a tqdm progress bar.
        num_workers: DataLoader worker processes that decode photos; 0 decodes in this process.

    Returns:
        float32 array (len(paths_or_pil), embed_dim) of unnormalised image features.

    Raises:
        ValueError: when batch_size < 1 or num_workers < 0, or when a photo does not decode.
        FileNotFoundError: when a photo file does not exist.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0; got {num_workers}")
    loader = DataLoader(
        _ImageDataset(paths_or_pil, encoder.preprocess),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
    )
    features = [np.zeros((0, encoder.embed_dim), dtype=np.float32)]
    with torch.no_grad():
        for pixels in tqdm(loader, desc="encode photos", unit="batch", disable=not progress):
            batch = encoder.model.encode_image(pixels.to(encoder.device), normalize=False)
            features.append(batch.float().cpu().numpy())
    return np.concatenate(features)
