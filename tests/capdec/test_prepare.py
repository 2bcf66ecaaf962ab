"""Tests of capdec.prepare on small generated datasets and on coco-mini, with the tiny CLIP."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import capdec.prepare
from capdec.embedding import load_clip
from capdec.prepare import modality_offsets, prepare_dataset
from capdec.prepared import CaptionRecord, ImageRecord, content_hash, load_prepared

CORPUS_SUBSET = 2000  # keeps the coco-mini test to a few seconds; the full corpus is a slow test


def _small_dataset(tmp_path: Path) -> tuple[Path, Path]:
    """Write 3 photos (RGB, grayscale, RGBA) and a Karpathy file; return (json, images root)."""
    folder = tmp_path / "photos" / "images"
    folder.mkdir(parents=True)
    Image.new("RGB", (40, 30), (10, 200, 30)).save(folder / "1.jpg")
    Image.linear_gradient("L").save(folder / "2.jpg")
    Image.new("RGBA", (20, 20), (0, 0, 255, 128)).save(folder / "3.png")
    entries = [
        {
            "filepath": "images",
            "filename": name,
            "imgid": i,
            "split": split,
            "sentences": [{"raw": f"photo {i} caption {k}"} for k in range(2)],
        }
        for i, (name, split) in enumerate(
            [("1.jpg", "train"), ("2.jpg", "val"), ("3.png", "restval")]
        )
    ]
    path = tmp_path / "dataset.json"
    path.write_text(json.dumps({"images": entries}), encoding="utf-8")
    return path, tmp_path / "photos"


def test_prepare_small_dataset_layout(tmp_path: Path) -> None:
    karpathy, root = _small_dataset(tmp_path)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("a green square\n\na gray gradient\n", encoding="utf-8")

    out = prepare_dataset(
        karpathy_json=karpathy,
        images_root=root,
        out=tmp_path / "prepared",
        text_corpus=corpus,
        clip_model="tiny",
        clip_pretrained=None,
        progress=False,
    )
    data = load_prepared(out)

    assert [im.file for im in data.images] == ["images/1.jpg", "images/2.jpg", "images/3.png"]
    assert [im.split for im in data.images] == ["train", "val", "train"]
    assert [c.image for c in data.captions] == [0, 0, 1, 1, 2, 2, -1, -1]
    assert [c.source for c in data.captions[-2:]] == ["corpus", "corpus"]
    assert data.captions[-1] == CaptionRecord("a gray gradient", "train", -1, "corpus")
    assert data.text_embeddings.shape == (8, 64)
    assert data.image_embeddings.shape == (3, 64)
    assert data.manifest["source"]["text_corpus"] == str(corpus.resolve())
    assert len(data.manifest["source"]["modality_offset"]) == 64


def test_prepare_checks_photos_before_clip(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    karpathy, root = _small_dataset(tmp_path)
    (root / "images" / "2.jpg").unlink()

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("CLIP was loaded before the photos were checked")

    monkeypatch.setattr(capdec.prepare, "load_clip", fail)
    with pytest.raises(
        ValueError, match=r"1 of 3 photos .* missing or unreadable:\n  .*2\.jpg: missing"
    ):
        prepare_dataset(
            karpathy_json=karpathy, images_root=root, out=tmp_path / "out", clip_model="tiny"
        )
    assert not (tmp_path / "out").exists()


def test_prepare_rejects_foreign_out_folder(tmp_path: Path) -> None:
    karpathy, root = _small_dataset(tmp_path)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine", encoding="utf-8")

    with pytest.raises(FileExistsError, match="is not a prepared dataset; choose another --out"):
        prepare_dataset(
            karpathy_json=karpathy, images_root=root, out=tmp_path / "out", clip_model="tiny"
        )


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"text_batch_size": 0}, "text_batch_size must be >= 1; got 0"),
        ({"image_batch_size": -1}, "image_batch_size must be >= 1; got -1"),
        ({"max_corpus_captions": 0}, "max_corpus_captions must be >= 1 or None"),
        ({"num_workers": -1}, "num_workers must be >= 0; got -1"),
    ],
)
def test_prepare_rejects_bad_settings(tmp_path: Path, setting: dict, message: str) -> None:
    karpathy, root = _small_dataset(tmp_path)

    with pytest.raises(ValueError, match=message):
        prepare_dataset(karpathy_json=karpathy, images_root=root, out=tmp_path / "out", **setting)


def test_modality_offsets_without_train_photos_are_none() -> None:
    captions = [CaptionRecord("a dog", "val", 0, "paired")]
    images = [ImageRecord("1", "1.jpg", "val")]

    offsets = modality_offsets(
        captions, np.ones((1, 4), np.float32), images, np.ones((1, 4), np.float32)
    )

    assert offsets == {"modality_offset": None, "modality_offset_raw": None}


def test_modality_offsets_use_normalised_train_means() -> None:
    captions = [
        CaptionRecord("a", "train", 0, "paired"),
        CaptionRecord("b", "train", -1, "corpus"),
        CaptionRecord("c", "val", 1, "paired"),
    ]
    images = [ImageRecord("1", "1.jpg", "train"), ImageRecord("2", "2.jpg", "val")]
    text = np.array([[3.0, 0.0], [0.0, 9.0], [0.0, 9.0]], np.float32)
    image = np.array([[0.0, 2.0], [5.0, 5.0]], np.float32)

    offsets = modality_offsets(captions, text, images, image)

    # only the train photo and its paired caption count, corpus and val rows do not
    assert offsets["modality_offset"] == pytest.approx([-1.0, 1.0])
    assert offsets["modality_offset_raw"] == pytest.approx([-3.0, 2.0])


@pytest.fixture(scope="module")
def coco_prepared(coco_mini: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return prepare_dataset(
        karpathy_json=coco_mini / "dataset_coco.json",
        images_root=coco_mini,
        out=tmp_path_factory.mktemp("coco") / "prepared",
        text_corpus=coco_mini / "text_corpus.jsonl",
        clip_model="tiny",
        clip_pretrained=None,
        max_corpus_captions=CORPUS_SUBSET,
        progress=False,
    )


@pytest.mark.coco
def test_prepare_coco_mini_counts(coco_prepared: Path) -> None:
    counts = load_prepared(coco_prepared).manifest["counts"]

    assert counts["train_images"] == 79
    assert counts["val_images"] == 138
    assert counts["test_images"] == 40
    assert counts["val_captions"] == 690
    assert counts["test_captions"] == 200
    assert counts["corpus_captions"] == CORPUS_SUBSET
    assert counts["train_captions"] == 395 + CORPUS_SUBSET


@pytest.mark.coco
def test_prepare_coco_mini_embeddings(coco_prepared: Path) -> None:
    data = load_prepared(coco_prepared)

    assert data.text_embeddings.shape == (1285 + CORPUS_SUBSET, 64)
    assert data.image_embeddings.shape == (257, 64)
    assert np.isfinite(data.text_embeddings).all()
    assert np.isfinite(data.image_embeddings).all()
    assert data.images[0].file == "images/COCO_000000000139.jpg"
    assert data.images[0].image_id == "139"


@pytest.mark.coco
def test_prepare_coco_mini_manifest(coco_prepared: Path, coco_mini: Path) -> None:
    data = load_prepared(coco_prepared)
    source = data.manifest["source"]

    assert data.clip == load_clip("tiny", None).identity
    assert source["images_root"] == str(coco_mini.resolve())
    assert source["max_corpus_captions"] == CORPUS_SUBSET
    assert np.isfinite(source["modality_offset"]).all()
    assert len(source["modality_offset_raw"]) == 64


@pytest.mark.coco
def test_prepare_coco_mini_hash_is_stable(coco_prepared: Path) -> None:
    first = load_prepared(coco_prepared)
    second = load_prepared(coco_prepared)

    assert first.content_hash == second.content_hash
    assert content_hash(coco_prepared) == first.content_hash


@pytest.mark.coco
def test_prepare_coco_mini_grayscale_photo(coco_prepared: Path, coco_mini: Path) -> None:
    data = load_prepared(coco_prepared)
    row = next(i for i, im in enumerate(data.images) if im.file.endswith("COCO_000000431848.jpg"))
    with Image.open(coco_mini / data.images[row].file) as photo:
        assert photo.mode == "L"

    assert np.isfinite(data.image_embeddings[row]).all()
    assert np.linalg.norm(data.image_embeddings[row]) > 0


@pytest.mark.coco
@pytest.mark.slow
def test_prepare_coco_mini_full_corpus(coco_mini: Path, tmp_path: Path) -> None:
    out = prepare_dataset(
        karpathy_json=coco_mini / "dataset_coco.json",
        images_root=coco_mini,
        out=tmp_path / "prepared",
        text_corpus=coco_mini / "text_corpus.jsonl",
        clip_model="tiny",
        clip_pretrained=None,
        progress=False,
    )
    data = load_prepared(out)

    assert data.manifest["counts"]["corpus_captions"] == 24209
    assert data.text_embeddings.shape == (1285 + 24209, 64)


def test_prepared_folder_follows_umask(tmp_path: Path) -> None:
    from tests.conftest import write_toy_dataset

    previous = os.umask(0o022)
    try:
        folder = write_toy_dataset(tmp_path / "toy")
    finally:
        os.umask(previous)
    # a private (0700) folder would be unreadable to other users of a shared cluster folder
    assert folder.stat().st_mode & 0o777 == 0o755
    assert not list(tmp_path.glob(".toy.*"))
