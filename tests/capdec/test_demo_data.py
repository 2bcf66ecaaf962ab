"""Tests of the demo's prepared dataset, built once from the quick world and its quick CLIP."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from capdec import world_clip
from capdec.demo_data import build_demo_dataset, demo_configs, image_attributes
from capdec.prepared import load_prepared
from capdec.world import attribute_f1


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("world-clip-cache")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path):
    out = tmp_path_factory.mktemp("demo") / "prepared"
    return load_prepared(build_demo_dataset(out, quick=True, cache_dir=cache_dir, num_threads=1))


def test_demo_dataset_counts(dataset) -> None:
    world, _ = demo_configs(quick=True)
    counts = dataset.manifest["counts"]
    assert counts["train_images"] == world.num_train
    assert counts["val_images"] == world.num_val
    assert counts["test_images"] == world.num_test
    assert counts["train_captions"] == 5 * world.num_train
    assert counts["val_captions"] == 5 * world.num_val
    assert counts["corpus_captions"] == 0
    assert dataset.embed_dim == 64


def test_demo_captions_are_paired_with_their_images(dataset) -> None:
    assert {c.source for c in dataset.captions} == {"paired"}
    for caption in dataset.captions[::97]:
        assert dataset.images[caption.image].split == caption.split
    assert (
        len(dataset.training_caption_indices("train"))
        == dataset.manifest["counts"]["train_captions"]
    )


def test_demo_clip_identity(dataset, cache_dir: Path) -> None:
    clip = dataset.clip
    assert clip["model"] == "capdec-world-clip"
    assert clip["pretrained"] is None
    assert clip["random_init"] is False
    assert clip["embed_dim"] == 64
    assert Path(clip["checkpoint"]).is_file()
    assert Path(clip["checkpoint"]).parent == cache_dir / clip["settings_hash"]


def test_demo_modality_offset_matches_train_embeddings(dataset) -> None:
    train_images = dataset.image_indices("train")
    train_captions = dataset.training_caption_indices("train")
    images = dataset.image_embeddings[train_images]
    texts = dataset.text_embeddings[train_captions]
    expected = world_clip.modality_offset(images, texts)
    offset = np.asarray(dataset.manifest["source"]["modality_offset"])
    assert offset.shape == (64,)
    assert np.allclose(offset, expected, atol=1e-5)


def test_demo_image_attributes_cover_val_and_test(dataset) -> None:
    attributes = image_attributes(dataset)
    evaluated = set(dataset.image_indices("val")) | set(dataset.image_indices("test"))
    assert set(attributes) == {int(row) for row in evaluated}
    # every reference caption names exactly its image's objects
    for row, references in list(dataset.references("val").items())[:20]:
        for reference in references:
            assert attribute_f1(reference, attributes[row]) == 1.0


def test_demo_clip_retrieval_above_chance(dataset) -> None:
    diagnostics = dataset.manifest["source"]["clip_diagnostics"]
    assert diagnostics["i2t_top1_content"] > 5 * diagnostics["i2t_chance_content"]
    assert diagnostics["i2t_top1_content"] > 0.2


def test_demo_clip_keeps_a_modality_gap(dataset) -> None:
    diagnostics = dataset.manifest["source"]["clip_diagnostics"]
    assert diagnostics["modality_gap"] > 0.3
    assert diagnostics["matched_cosine"] < 0.9


def test_demo_rebuild_reuses_cache(
    dataset, cache_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("the cached world CLIP was trained again")

    monkeypatch.setattr(world_clip, "train_world_clip", fail)
    again = load_prepared(
        build_demo_dataset(tmp_path / "again", quick=True, cache_dir=cache_dir, num_threads=1)
    )
    assert again.content_hash == dataset.content_hash
    assert again.manifest["source"]["clip_loaded_from_cache"] is True
    assert dataset.manifest["source"]["clip_loaded_from_cache"] is False


def test_demo_build_restores_thread_count(dataset, cache_dir: Path, tmp_path: Path) -> None:
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        build_demo_dataset(tmp_path / "threads", quick=True, cache_dir=cache_dir, num_threads=1)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_demo_build_rejects_zero_threads(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="num_threads must be >= 1"):
        build_demo_dataset(tmp_path / "out", quick=True, num_threads=0)


def test_image_attributes_requires_demo_dataset(dataset) -> None:
    coco_like = dataclasses.replace(
        dataset, manifest={**dataset.manifest, "source": {"karpathy_json": "x"}}
    )
    with pytest.raises(ValueError, match="no image attributes"):
        image_attributes(coco_like)
