"""Tests of the world CLIP: tokenizer, model, determinism, diagnostics and the cache."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from capdec import world_clip
from capdec.world import VOCABULARY, WorldConfig, generate_world
from capdec.world_clip import (
    CHECKPOINT_FILE,
    DIAGNOSTICS_FILE,
    WorldClipConfig,
    WorldTokenizer,
    build_world_clip,
    clip_diagnostics,
    default_cache_dir,
    encode_images,
    encode_texts,
    load_or_train_world_clip,
    modality_offset,
    settings_hash,
    train_world_clip,
)

TINY_WORLD = WorldConfig(num_train=128, num_val=32, num_test=32)
TINY_CLIP = WorldClipConfig(epochs=1, batch_size=64, warmup_steps=1)


@pytest.fixture(scope="module")
def tiny_world():
    return generate_world(TINY_WORLD)


def test_tokenizer_end_token_is_the_argmax() -> None:
    tokenizer = WorldTokenizer(context_length=24)
    tokens = tokenizer(["a small red circle on the left", "a big blue box"])
    assert tokens.shape == (2, 24)
    assert tokens[0, 0].item() == tokenizer.start_id
    # open_clip's argmax pooling reads the text feature at the end token
    assert tokens[0].argmax().item() == 8
    assert tokens[1].argmax().item() == 5
    assert tokenizer.vocab_size == len(VOCABULARY) + 3


def test_tokenizer_rejects_unknown_word() -> None:
    with pytest.raises(ValueError, match="'zebra' .* not in the world vocabulary"):
        WorldTokenizer(context_length=24)(["a small zebra"])


def test_tokenizer_rejects_long_caption() -> None:
    with pytest.raises(ValueError, match="more than context_length - 2 = 2"):
        WorldTokenizer(context_length=4)(["a small red circle"])


def test_world_clip_starts_at_logit_scale_100() -> None:
    model = build_world_clip(WorldClipConfig(), WorldTokenizer(24).vocab_size)
    assert model.logit_scale.item() == pytest.approx(math.log(100.0))


def test_encoders_return_embed_dim_features(tiny_world) -> None:
    tokenizer = WorldTokenizer(24)
    model = build_world_clip(WorldClipConfig(), tokenizer.vocab_size)
    images = encode_images(model, tiny_world.splits["val"].images[:5])
    texts = encode_texts(model, tokenizer, tiny_world.splits["val"].captions[0])
    assert images.shape == (5, 64)
    assert texts.shape == (5, 64)
    assert images.dtype == np.float32


def test_training_is_deterministic(tiny_world) -> None:
    first, first_losses = train_world_clip(tiny_world, TINY_CLIP)
    second, second_losses = train_world_clip(tiny_world, TINY_CLIP)
    assert first_losses == second_losses
    for name, tensor in first.state_dict().items():
        assert torch.equal(tensor, second.state_dict()[name]), name


def test_clip_diagnostics_on_aligned_features() -> None:
    images = np.eye(3, 4, dtype=np.float32) * 2.0
    texts = np.repeat(np.eye(3, 4, dtype=np.float32), 2, axis=0)
    diagnostics = clip_diagnostics(images, texts, np.repeat(np.arange(3), 2), ["a", "b", "c"])
    assert diagnostics["i2t_top1"] == 1.0
    assert diagnostics["i2t_top1_content"] == 1.0
    assert diagnostics["i2t_chance_content"] == pytest.approx(1 / 3)
    assert diagnostics["modality_gap"] == pytest.approx(0.0, abs=1e-6)
    assert diagnostics["matched_cosine"] == pytest.approx(1.0)


def test_clip_diagnostics_counts_same_content_as_correct() -> None:
    # image 0 is nearest to the caption of image 1, which shows the same content
    images = np.asarray([[1.0, 0.0], [1.0, 0.1]], dtype=np.float32)
    texts = np.asarray([[0.0, 1.0], [1.0, 0.0]], dtype=np.float32)
    diagnostics = clip_diagnostics(images, texts, np.asarray([0, 1]), ["same", "same"])
    assert diagnostics["i2t_top1"] == 0.5
    assert diagnostics["i2t_top1_content"] == 1.0


def test_modality_offset_is_difference_of_normalised_means() -> None:
    images = np.asarray([[2.0, 0.0], [0.0, 3.0]])
    texts = np.asarray([[0.0, -1.0]])
    assert np.allclose(modality_offset(images, texts), [0.5, 1.5])


def test_settings_hash_changes_with_settings() -> None:
    base = settings_hash(TINY_WORLD, TINY_CLIP)
    assert base == settings_hash(
        TINY_WORLD, WorldClipConfig(epochs=1, batch_size=64, warmup_steps=1)
    )
    assert base != settings_hash(
        WorldConfig(num_train=128, num_val=32, num_test=32, seed=1), TINY_CLIP
    )
    assert base != settings_hash(
        TINY_WORLD, WorldClipConfig(epochs=2, batch_size=64, warmup_steps=1)
    )


def test_default_cache_dir_follows_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / "capdec-study" / "world-clip"


def test_cached_clip_is_reused(
    tiny_world, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = load_or_train_world_clip(tiny_world, TINY_CLIP, cache_dir=tmp_path)
    assert first.trained
    assert first.checkpoint == tmp_path / first.settings_hash / CHECKPOINT_FILE
    assert (first.checkpoint.parent / DIAGNOSTICS_FILE).is_file()
    written = first.checkpoint.stat().st_mtime_ns

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("the cached world CLIP was trained again")

    monkeypatch.setattr(world_clip, "train_world_clip", fail)
    second = load_or_train_world_clip(tiny_world, TINY_CLIP, cache_dir=tmp_path)
    assert not second.trained
    assert second.checkpoint.stat().st_mtime_ns == written
    assert second.record == first.record
    for name, tensor in first.model.state_dict().items():
        assert torch.equal(tensor, second.model.state_dict()[name]), name


def test_cache_leaves_no_staging_folders(tiny_world, tmp_path: Path) -> None:
    load_or_train_world_clip(tiny_world, TINY_CLIP, cache_dir=tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [settings_hash(TINY_WORLD, TINY_CLIP)]


def test_broken_cached_checkpoint_names_the_fix(tiny_world, tmp_path: Path) -> None:
    first = load_or_train_world_clip(tiny_world, TINY_CLIP, cache_dir=tmp_path)
    first.checkpoint.write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match="delete .* and rerun"):
        load_or_train_world_clip(tiny_world, TINY_CLIP, cache_dir=tmp_path)
