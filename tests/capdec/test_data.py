"""Tests of capdec.data: Karpathy files, caption corpora and photo decoding."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from capdec.data import (
    KarpathyImage,
    check_image_files,
    clean_caption,
    load_rgb_image,
    read_caption_corpus,
    read_karpathy,
    resolve_image_path,
)


def _entry(image_id: int, split: str, *captions: str, **extra: Any) -> dict[str, Any]:
    entry = {
        "filepath": "images",
        "filename": f"{image_id}.jpg",
        "imgid": image_id,
        "split": split,
        "sentences": [{"raw": text} for text in captions],
    }
    entry.update(extra)
    return entry


def _write_karpathy(tmp_path: Path, entries: list[Any]) -> Path:
    path = tmp_path / "dataset.json"
    path.write_text(json.dumps({"images": entries}), encoding="utf-8")
    return path


def _basic_entries() -> list[dict[str, Any]]:
    return [
        _entry(1, "train", "a dog"),
        _entry(2, "val", "a cat"),
        _entry(3, "test", "a bird"),
        _entry(4, "restval", "a horse"),
    ]


def test_clean_caption_collapses_whitespace() -> None:
    assert clean_caption("  A dog\n\tsits   on\r\na sofa. ") == "A dog sits on a sofa."
    assert clean_caption(" \n\t ") == ""


def test_read_karpathy_folds_restval_into_train(tmp_path: Path) -> None:
    images = read_karpathy(_write_karpathy(tmp_path, _basic_entries()))

    assert [image.split for image in images] == ["train", "val", "test", "train"]
    assert images[3].image_id == "4"
    assert images[3].captions == ["a horse"]


def test_read_karpathy_drops_restval_when_asked(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="capdec.data"):
        images = read_karpathy(_write_karpathy(tmp_path, _basic_entries()), restval_as_train=False)

    assert [image.image_id for image in images] == ["1", "2", "3"]
    assert "dropped 1 restval photo" in caplog.text


def test_read_karpathy_prefers_cocoid_and_builds_paths(tmp_path: Path) -> None:
    entries = [
        _entry(0, "train", "a dog", cocoid=139),
        _entry(1, "val", "a cat", filepath=""),
    ]
    images = read_karpathy(_write_karpathy(tmp_path, entries))

    assert images[0].image_id == "139"
    assert images[0].relative_path == "images/0.jpg"
    assert images[1].relative_path == "1.jpg"


def test_read_karpathy_cleans_and_drops_empty_captions(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    entries = [_entry(1, "train", "  a\n dog\tsits ", "   ", ""), _entry(2, "val", "a cat")]
    with caplog.at_level(logging.WARNING, logger="capdec.data"):
        images = read_karpathy(_write_karpathy(tmp_path, entries))

    assert images[0].captions == ["a dog sits"]
    assert "dropped 2 empty caption(s)" in caplog.text


def test_read_karpathy_rejects_invalid_json(tmp_path: Path) -> None:
    path = tmp_path / "dataset.json"
    path.write_text("{not json", encoding="utf-8")

    with pytest.raises(ValueError, match=r"dataset\.json is not valid UTF-8 JSON"):
        read_karpathy(path)


def test_read_karpathy_rejects_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="Karpathy split file not found"):
        read_karpathy(tmp_path / "absent.json")


def test_read_karpathy_rejects_missing_images(tmp_path: Path) -> None:
    path = tmp_path / "dataset.json"
    path.write_text(json.dumps({"annotations": []}), encoding="utf-8")

    with pytest.raises(ValueError, match="has no 'images' list"):
        read_karpathy(path)


@pytest.mark.parametrize("key", ["filename", "split", "sentences"])
def test_read_karpathy_rejects_entry_missing_key(tmp_path: Path, key: str) -> None:
    entries = _basic_entries()
    del entries[1][key]

    with pytest.raises(ValueError, match=rf"images\[1\] is missing {key}"):
        read_karpathy(_write_karpathy(tmp_path, entries))


def test_read_karpathy_rejects_unknown_split(tmp_path: Path) -> None:
    entries = _basic_entries() + [_entry(5, "training", "a cow")]

    with pytest.raises(ValueError, match=r"images\[4\] has unknown split 'training'"):
        read_karpathy(_write_karpathy(tmp_path, entries))


def test_read_karpathy_rejects_duplicate_ids(tmp_path: Path) -> None:
    entries = _basic_entries() + [_entry(2, "train", "another cat")]

    with pytest.raises(ValueError, match=r"images\[4\] repeats image id 2 of images\[1\]"):
        read_karpathy(_write_karpathy(tmp_path, entries))


def test_read_karpathy_rejects_photo_without_captions(tmp_path: Path) -> None:
    entries = _basic_entries() + [_entry(5, "train", " ", "\n")]

    with pytest.raises(ValueError, match=r"images\[4\] \(5\.jpg\) has no non-empty caption"):
        read_karpathy(_write_karpathy(tmp_path, entries))


@pytest.mark.parametrize("split", ["train", "val"])
def test_read_karpathy_rejects_empty_required_split(tmp_path: Path, split: str) -> None:
    entries = [e for e in _basic_entries() if e["split"] != split and e["split"] != "restval"]

    with pytest.raises(ValueError, match=f"has no photos in split '{split}'"):
        read_karpathy(_write_karpathy(tmp_path, entries))


def test_read_karpathy_reads_coco_mini(coco_mini: Path) -> None:
    images = read_karpathy(coco_mini / "dataset_coco.json")

    assert len(images) == 257
    assert sum(image.split == "train" for image in images) == 79
    assert sum(image.split == "val" for image in images) == 138
    assert sum(image.split == "test" for image in images) == 40
    assert all(len(image.captions) == 5 for image in images if image.split != "train")


def test_read_caption_corpus_reads_json_lines(tmp_path: Path) -> None:
    path = tmp_path / "corpus.jsonl"
    lines = ['{"caption": " A dog\\n on a sofa ", "cocoid": 1}', "", '{"caption": "A cat"}']
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")

    assert read_caption_corpus(path) == ["A dog on a sofa", "A cat"]


def test_read_caption_corpus_reads_plain_text(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "corpus.txt"
    path.write_text("A dog on a sofa\n\n   \nA  cat\t sleeps\n", encoding="utf-8")

    with caplog.at_level(logging.WARNING, logger="capdec.data"):
        captions = read_caption_corpus(path)

    assert captions == ["A dog on a sofa", "A cat sleeps"]
    assert "skipped 2 empty line(s)" in caplog.text


def test_read_caption_corpus_names_line_without_caption(tmp_path: Path) -> None:
    path = tmp_path / "corpus.jsonl"
    path.write_text('{"caption": "A dog"}\n{"text": "A cat"}\n', encoding="utf-8")

    with pytest.raises(
        ValueError, match=r"corpus\.jsonl, line 2: expected a JSON object with a string 'caption'"
    ):
        read_caption_corpus(path)


def test_read_caption_corpus_rejects_multiline_json(tmp_path: Path) -> None:
    path = tmp_path / "corpus.json"
    path.write_text('[\n  {"caption": "A dog"}\n]\n', encoding="utf-8")

    with pytest.raises(ValueError, match="write one object per line"):
        read_caption_corpus(path)


def test_read_caption_corpus_counts_coco_mini(coco_mini: Path) -> None:
    assert len(read_caption_corpus(coco_mini / "text_corpus.jsonl")) == 24209


def _save(image: Image.Image, path: Path, **kwargs: Any) -> Path:
    image.save(path, **kwargs)
    return path


@pytest.mark.parametrize(
    ("mode", "suffix"),
    [
        ("L", ".jpg"),
        ("P", ".png"),
        ("CMYK", ".jpg"),
        ("RGBA", ".png"),
        ("LA", ".png"),
        ("1", ".png"),
    ],
)
def test_load_rgb_image_converts_modes(tmp_path: Path, mode: str, suffix: str) -> None:
    path = _save(Image.new(mode, (8, 6)), tmp_path / f"image{suffix}")
    with Image.open(path) as stored:
        assert stored.mode == mode

    image = load_rgb_image(path)

    assert image.mode == "RGB"
    assert image.size == (8, 6)


def test_load_rgb_image_composites_alpha_on_white(tmp_path: Path) -> None:
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    rgba.putpixel((0, 0), (0, 0, 255, 255))
    path = _save(rgba, tmp_path / "alpha.png")

    image = load_rgb_image(path)

    # a transparent pixel shows the white background, not its stored red
    assert image.getpixel((1, 1)) == (255, 255, 255)
    assert image.getpixel((0, 0)) == (0, 0, 255)


def test_load_rgb_image_composites_palette_transparency(tmp_path: Path) -> None:
    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    path = _save(palette, tmp_path / "palette.png", transparency=1)

    image = load_rgb_image(path)

    assert image.getpixel((0, 0)) == (255, 255, 255)


def _truncated_jpeg(tmp_path: Path) -> Path:
    path = _save(Image.effect_noise((64, 64), 50).convert("RGB"), tmp_path / "broken.jpg")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def test_load_rgb_image_names_truncated_jpeg(tmp_path: Path) -> None:
    path = _truncated_jpeg(tmp_path)

    with pytest.raises(ValueError, match=r"cannot decode image .*broken\.jpg"):
        load_rgb_image(path)


def test_load_rgb_image_names_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"image not found: .*absent\.jpg \(images root"):
        load_rgb_image(tmp_path / "absent.jpg", images_root=tmp_path)


def _karpathy_image(image_id: int, filepath: str = "images") -> KarpathyImage:
    return KarpathyImage(str(image_id), filepath, f"{image_id}.jpg", "train", ["a dog"])


def test_check_image_files_lists_every_problem(tmp_path: Path) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    _save(Image.new("L", (16, 16)), folder / "1.jpg")
    _truncated_jpeg(folder).rename(folder / "2.jpg")
    images = [_karpathy_image(i) for i in range(1, 15)]

    with pytest.raises(ValueError, match="13 of 14 photos") as error:
        check_image_files(images, tmp_path)

    message = str(error.value)
    assert f"{folder / '2.jpg'}: " in message
    assert f"{folder / '3.jpg'}: missing" in message
    assert "and 3 more" in message
    assert f"{folder / '1.jpg'}:" not in message


def test_check_image_files_returns_resolved_paths(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    _save(Image.new("RGB", (8, 8)), tmp_path / "images" / "1.jpg")
    _save(Image.new("RGB", (8, 8)), tmp_path / "2.jpg")
    images = [_karpathy_image(1), _karpathy_image(2, filepath="val2014")]

    paths = check_image_files(images, tmp_path)

    assert paths == [tmp_path / "images" / "1.jpg", tmp_path / "2.jpg"]
    assert resolve_image_path(_karpathy_image(3), tmp_path) == tmp_path / "images" / "3.jpg"


def test_check_image_files_rejects_missing_root(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="images root is not a folder"):
        check_image_files([_karpathy_image(1)], tmp_path / "absent")
