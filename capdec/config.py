"""Typed configuration of one CapDec training run.

A run is described by four frozen dataclasses, one per concern. Each checks its own ranges in
``__post_init__``, so a bad value fails before any data is read. ``RunConfig.from_dict`` builds
them from a flat dictionary (a Ray Tune trial config or a settings file) and rejects unknown
keys instead of dropping them.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields
from typing import Any

NOISE_DISTRIBUTIONS = ("gaussian", "uniform_ball", "none")
BALL_RADII = ("epsilon", "matched")
MODALITY_OFFSETS = ("none", "fixed", "learned")
IMAGE_MIXING = ("interleave", "random")
MAPPINGS = ("mlp", "transformer")
TRAIN_TEXT_SOURCES = ("corpus", "train", "both")


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def coerce_field(owner: str, name: str, annotation: str, value: Any) -> Any:
    """Convert a value read from YAML, a flag or a trial config to its field's type.

    YAML 1.1 reads ``1e-3`` as text, so numbers written that way are converted here.

    Raises:
        ValueError: when the value cannot be read as the field's type.
    """
    kind = annotation.split("|")[0].strip()
    try:
        if kind == "float" and not isinstance(value, bool):
            return float(value)
        if kind == "int" and not isinstance(value, bool):
            number = float(value)
            if number != int(number):
                raise ValueError
            return int(number)
    except (TypeError, ValueError):
        raise ValueError(f"{owner}.{name} must be a number ({kind}); got {value!r}") from None
    if kind == "bool" and not isinstance(value, bool):
        raise ValueError(f"{owner}.{name} must be true or false; got {value!r}")
    if kind == "str" and not isinstance(value, str):
        raise ValueError(f"{owner}.{name} must be text; got {value!r}")
    return value


def coerce_fields(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    """Apply ``coerce_field`` to every known field of dataclass ``cls`` in ``values``."""
    types = {f.name: str(f.type) for f in fields(cls)}
    return {
        key: coerce_field(cls.__name__, key, types[key], value) if key in types else value
        for key, value in values.items()
    }


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    _check(value in choices, f"{name} must be one of {', '.join(choices)}; got {value!r}")


@dataclass(frozen=True)
class NoiseConfig:
    """Noise settings: the perturbation of the CLIP text embedding during training."""

    distribution: str = "gaussian"  # gaussian | uniform_ball | none
    epsilon: float = 0.1  # gaussian: standard deviation per dimension; ball: see ball_radius
    ball_radius: str = "matched"  # epsilon: radius = epsilon (CapDec code); matched: E|n|^2 = d eps^2
    normalize_before: bool = True  # L2-normalise the clean embedding before adding noise
    normalize_after: bool = False  # L2-normalise the noisy embedding
    modality_offset: str = "none"  # none | fixed (mean image - mean text) | learned vector
    image_ratio: float = 0.0  # fraction of training samples that are real image embeddings
    image_mixing: str = "interleave"  # interleave: every k-th sample; random: Bernoulli per sample
    fgsm_epsilon: float = 0.0  # FGSM step (L-inf) on the CLIP embedding fed to the mapping; 0 = off
    fgsm_alpha: float = 0.5  # loss = alpha * L(x) + (1 - alpha) * L(x_adv)
    fgsm_random: bool = False  # draw the FGSM step per batch as |N(0, fgsm_epsilon^2)|

    def __post_init__(self) -> None:
        _check_choice("noise distribution", self.distribution, NOISE_DISTRIBUTIONS)
        _check_choice("ball_radius", self.ball_radius, BALL_RADII)
        _check_choice("modality_offset", self.modality_offset, MODALITY_OFFSETS)
        _check_choice("image_mixing", self.image_mixing, IMAGE_MIXING)
        _check(
            math.isfinite(self.epsilon) and self.epsilon >= 0,
            f"epsilon must be a finite number >= 0; got {self.epsilon}",
        )
        _check(0.0 <= self.image_ratio <= 1.0, f"image_ratio must be in [0, 1]; got {self.image_ratio}")
        _check(
            math.isfinite(self.fgsm_epsilon) and self.fgsm_epsilon >= 0,
            f"fgsm_epsilon must be a finite number >= 0; got {self.fgsm_epsilon}",
        )
        _check(0.0 <= self.fgsm_alpha <= 1.0, f"fgsm_alpha must be in [0, 1]; got {self.fgsm_alpha}")

    @property
    def variance(self) -> float:
        """Noise variance per dimension, the unit the CapDec paper reports."""
        return self.epsilon**2


@dataclass(frozen=True)
class ModelConfig:
    """The mapping network and the GPT-2 decoder."""

    decoder: str = "tiny"  # "tiny" (random-initialised), a hub name such as "gpt2", or a folder
    mapping: str = "mlp"  # mlp | transformer
    prefix_length: int = 10  # GPT-2 input positions produced from one CLIP embedding
    mapping_layers: int = 8  # transformer mapping only
    tiny_layers: int = 2  # tiny decoder: transformer blocks
    tiny_width: int = 128  # tiny decoder: hidden size
    tiny_heads: int = 4  # tiny decoder: attention heads
    tiny_vocab_size: int = 4096  # tiny decoder: BPE vocabulary trained on the training captions
    max_caption_tokens: int = 40  # longer captions are truncated, end-of-text token included
    freeze_decoder: bool = False  # train the mapping network only (ClipCap's frozen-GPT variant)

    def __post_init__(self) -> None:
        _check(bool(self.decoder), "decoder must be 'tiny', a model name or a folder; got ''")
        _check_choice("mapping", self.mapping, MAPPINGS)
        for name in ("prefix_length", "mapping_layers", "tiny_layers", "tiny_width", "tiny_heads"):
            value = getattr(self, name)
            _check(value >= 1, f"{name} must be >= 1; got {value}")
        _check(
            self.tiny_width % self.tiny_heads == 0,
            f"tiny_width ({self.tiny_width}) must be divisible by tiny_heads ({self.tiny_heads})",
        )
        _check(self.tiny_vocab_size >= 300, f"tiny_vocab_size must be >= 300; got {self.tiny_vocab_size}")
        _check(self.max_caption_tokens >= 2, f"max_caption_tokens must be >= 2; got {self.max_caption_tokens}")


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation, data selection and validation of one run."""

    epochs: int = 10
    batch_size: int = 64  # captions per optimiser step
    lr: float = 2e-4  # peak AdamW learning rate
    weight_decay: float = 0.0
    warmup_steps: int = 100  # linear warm-up, then linear decay to 0 at the last epoch
    grad_clip: float = 1.0  # max gradient L2 norm; 0 disables clipping
    seed: int = 0
    train_text: str = "corpus"  # corpus | train (paired train captions) | both
    max_train_captions: int = 0  # 0 = all; otherwise a seeded subset of this size
    val_max_images: int = 0  # 0 = all validation images; otherwise a fixed seeded subset
    val_batch_size: int = 64  # images decoded at once during validation
    max_new_tokens: int = 30  # generation length limit
    num_beams: int = 1  # 1 = greedy
    num_threads: int = 0  # torch intra-op threads; 0 leaves torch's default

    def __post_init__(self) -> None:
        _check(self.epochs >= 1, f"epochs must be >= 1; got {self.epochs}")
        _check(self.batch_size >= 1, f"batch_size must be >= 1; got {self.batch_size}")
        _check(self.lr > 0, f"lr must be > 0; got {self.lr}")
        _check(self.weight_decay >= 0, f"weight_decay must be >= 0; got {self.weight_decay}")
        _check(self.warmup_steps >= 0, f"warmup_steps must be >= 0; got {self.warmup_steps}")
        _check(self.grad_clip >= 0, f"grad_clip must be >= 0; got {self.grad_clip}")
        _check_choice("train_text", self.train_text, TRAIN_TEXT_SOURCES)
        for name in ("max_train_captions", "val_max_images", "num_threads"):
            value = getattr(self, name)
            _check(value >= 0, f"{name} must be >= 0; got {value}")
        for name in ("val_batch_size", "max_new_tokens", "num_beams"):
            value = getattr(self, name)
            _check(value >= 1, f"{name} must be >= 1; got {value}")


@dataclass(frozen=True)
class RunConfig:
    """Everything one training run needs: the prepared data folder plus the three concerns."""

    data: str  # prepared-dataset folder written by `capdec-study prepare` or the demo
    noise: NoiseConfig = field(default_factory=NoiseConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tokenizer_dir: str = ""  # folder of a trained tiny-decoder tokenizer shared by a study's trials
    val_references: str = ""  # reference cache (CaptionScorer.save) of the validation split

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RunConfig:
        """Build a run configuration from a flat dictionary of field names.

        Keys are the field names of NoiseConfig, ModelConfig and TrainConfig plus ``data``,
        ``tokenizer_dir`` and ``val_references``. No two concerns share a field name, so a flat
        dictionary is unambiguous.

        Raises:
            ValueError: on a missing ``data`` key, an unknown key, or a value out of range.
        """
        remaining = dict(values)
        unknown = set(remaining) - set(config_keys())
        if unknown:
            raise ValueError(
                f"unknown run configuration key(s): {', '.join(sorted(unknown))}; "
                f"valid keys are {', '.join(config_keys())}"
            )
        if "data" not in remaining:
            raise ValueError("run configuration is missing 'data', the prepared-dataset folder")
        parts = {}
        for name, part_cls in _PARTS.items():
            names = {f.name for f in fields(part_cls)}
            chosen = {k: remaining.pop(k) for k in list(remaining) if k in names}
            parts[name] = part_cls(**coerce_fields(part_cls, chosen))
        return cls(**coerce_fields(cls, remaining), **parts)

    def to_dict(self) -> dict[str, Any]:
        """Return the flat dictionary that ``from_dict`` reads back."""
        flat: dict[str, Any] = {
            "data": self.data,
            "tokenizer_dir": self.tokenizer_dir,
            "val_references": self.val_references,
        }
        for name in _PARTS:
            flat.update(dataclasses.asdict(getattr(self, name)))
        return flat


_PARTS: dict[str, type] = {"noise": NoiseConfig, "model": ModelConfig, "train": TrainConfig}


def config_keys() -> list[str]:
    """Return every flat key that ``RunConfig.from_dict`` accepts."""
    keys = ["data", "tokenizer_dir", "val_references"]
    for part_cls in _PARTS.values():
        keys.extend(f.name for f in fields(part_cls))
    return keys
