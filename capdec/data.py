"""Readers of the real inputs of ``capdec-study prepare``: Karpathy files, caption corpora, photos.

Everything here checks its input and fails with an error that names the file, the entry and the
fix, so a bad dataset stops before any CLIP encoding starts. Captions are cleaned with
``clean_caption`` (whitespace collapsed) and otherwise kept as written; the decoder tokenises and
truncates them later.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

logger = logging.getLogger(__name__)

KARPATHY_SPLITS = ("train", "val", "test", "restval")
_WHITESPACE = re.compile(r"\s+")
_MAX_LISTED_PROBLEMS = 10


@dataclass(frozen=True)
class KarpathyImage:
    """One photo of a Karpathy split file with its cleaned, non-empty captions."""

    image_id: str  # cocoid when present, else imgid
    filepath: str  # folder below the images root, e.g. "val2014"; "" when the file has none
    filename: str
    split: str  # train | val | test ("restval" is folded into train or dropped on reading)
    captions: list[str]

    @property
    def relative_path(self) -> str:
        """Path of the photo below the images root, with forward slashes."""
        return f"{self.filepath}/{self.filename}" if self.filepath else self.filename


def clean_caption(text: str) -> str:
    """Collapse each run of whitespace (spaces, tabs, newlines) to one space and strip the ends."""
    return _WHITESPACE.sub(" ", text).strip()


def read_karpathy(
    json_path: str | os.PathLike,
    *,
    restval_as_train: bool = True,
    required_splits: Sequence[str] = ("train", "val"),
) -> list[KarpathyImage]:
    """Read a Karpathy split file (``dataset_coco.json`` and its Flickr siblings).

    The file contains ``{"images": [{"filepath", "filename", "split", "sentences": [{"raw"}]}]}``.
    Empty captions are dropped with one counted warning.

    Args:
        json_path: the Karpathy JSON file.
        restval_as_train: fold the ``restval`` split into ``train`` (the usual Karpathy training
            set); when False, restval photos are dropped and counted in the log.
        required_splits: splits that must contain at least one photo after reading.

    Returns:
        The photos in file order, each with split train, val or test.

    Raises:
        FileNotFoundError: when the file does not exist.
        ValueError: on invalid JSON, a missing ``images`` list, an entry without filename, split
            or sentences, an unknown split, a duplicate image id, a photo with no non-empty
            caption, or a required split with no photos.
    """
    path = Path(json_path)
    document = _load_json(path)
    entries = document.get("images") if isinstance(document, dict) else None
    if not isinstance(entries, list):
        raise ValueError(
            f"{path} has no 'images' list; a Karpathy split file looks like "
            '{"images": [{"filename": ..., "split": ..., "sentences": [{"raw": ...}]}]}'
        )

    images: list[KarpathyImage] = []
    seen_ids: dict[str, int] = {}
    dropped_restval = 0
    empty_captions = 0
    for position, entry in enumerate(entries):
        image, n_empty = _parse_entry(path, position, entry, restval_as_train)
        empty_captions += n_empty
        if image is None:
            dropped_restval += 1
            continue
        if image.image_id in seen_ids:
            raise ValueError(
                f"{path}: images[{position}] repeats image id {image.image_id} of "
                f"images[{seen_ids[image.image_id]}]; each photo must appear once"
            )
        seen_ids[image.image_id] = position
        images.append(image)

    if empty_captions:
        logger.warning("%s: dropped %d empty caption(s)", path, empty_captions)
    if dropped_restval:
        logger.info(
            "%s: dropped %d restval photo(s) (restval_as_train=False)", path, dropped_restval
        )
    counts = Counter(image.split for image in images)
    for split in required_splits:
        if not counts[split]:
            raise ValueError(
                f"{path} has no photos in split {split!r} (found {dict(counts)}); "
                f"training needs photos in each of {', '.join(required_splits)}, so fix the "
                "'split' fields or use another Karpathy file"
            )
    logger.info("read %s: %d photos %s", path, len(images), dict(sorted(counts.items())))
    return images


def _load_json(path: Path) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"Karpathy split file not found: {path}")
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(
            f"{path} is not valid UTF-8 JSON ({error}); pass the Karpathy dataset_*.json file"
        ) from error


def _parse_entry(
    path: Path, position: int, entry: Any, restval_as_train: bool
) -> tuple[KarpathyImage | None, int]:
    """Parse ``images[position]``; return (None, n_empty) for a dropped restval photo."""
    where = f"{path}: images[{position}]"
    if not isinstance(entry, dict):
        raise ValueError(f"{where} is a {type(entry).__name__}, expected an object")
    missing = [key for key in ("filename", "split", "sentences") if key not in entry]
    if missing:
        raise ValueError(f"{where} is missing {', '.join(missing)}; every photo needs all three")
    split = entry["split"]
    if split not in KARPATHY_SPLITS:
        raise ValueError(f"{where} has unknown split {split!r}; expected one of {KARPATHY_SPLITS}")
    image_id = entry.get("cocoid", entry.get("imgid"))
    if image_id is None:
        raise ValueError(f"{where} has neither 'cocoid' nor 'imgid'; one is needed as image id")
    if not isinstance(entry["sentences"], list):
        raise ValueError(f"{where}: 'sentences' must be a list of {{'raw': caption}} objects")

    raw = [s.get("raw", "") if isinstance(s, dict) else "" for s in entry["sentences"]]
    captions = [clean_caption(text) for text in raw if isinstance(text, str)]
    captions = [text for text in captions if text]
    n_empty = len(raw) - len(captions)
    if not captions:
        raise ValueError(
            f"{where} ({entry['filename']}) has no non-empty caption in sentences[].raw; "
            "remove the photo or add its captions"
        )
    if split == "restval":
        if not restval_as_train:
            return None, n_empty
        split = "train"
    image = KarpathyImage(
        image_id=str(image_id),
        filepath=str(entry.get("filepath") or ""),
        filename=str(entry["filename"]),
        split=split,
        captions=captions,
    )
    return image, n_empty


def read_caption_corpus(path: str | os.PathLike) -> list[str]:
    """Read a text-only caption corpus: JSON lines with a ``caption`` field, or plain text.

    The format is decided by the first non-empty line: a JSON object means JSON lines (one object
    per line), anything else means plain text with one caption per line. Captions are cleaned with
    ``clean_caption``, and empty ones are skipped with one counted warning.

    Args:
        path: a ``.jsonl``/``.json`` lines file or a text file, UTF-8.

    Returns:
        The cleaned captions in file order.

    Raises:
        FileNotFoundError: when the file does not exist.
        ValueError: when the file is not UTF-8, is one JSON document spread over several lines,
            or has a JSON line that is invalid or has no string ``caption``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"caption corpus not found: {path}")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as error:
        raise ValueError(
            f"{path} is not UTF-8 text ({error}); save the corpus as UTF-8"
        ) from error

    first = next((line.strip() for line in lines if line.strip()), "")
    as_json = _is_json_object(first)
    if not as_json and first[:1] in ("{", "["):
        raise ValueError(
            f"{path} looks like JSON but its first line is not a complete JSON object; "
            'write one object per line (JSON lines) such as {"caption": "a dog on a sofa"}'
        )

    captions: list[str] = []
    skipped = 0
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            skipped += 1
            continue
        text = _json_caption(path, number, line) if as_json else line
        text = clean_caption(text)
        if text:
            captions.append(text)
        else:
            skipped += 1
    if skipped:
        logger.warning("%s: skipped %d empty line(s) or caption(s)", path, skipped)
    logger.info(
        "read %s: %d captions (%s)", path, len(captions), "JSON lines" if as_json else "text"
    )
    return captions


def _is_json_object(line: str) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except json.JSONDecodeError:
        return False


def _json_caption(path: Path, number: int, line: str) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}, line {number}: invalid JSON ({error})") from error
    if not isinstance(record, dict) or not isinstance(record.get("caption"), str):
        raise ValueError(
            f"{path}, line {number}: expected a JSON object with a string 'caption' field; "
            f"got {line.strip()[:80]}"
        )
    return record["caption"]


def resolve_image_path(image: KarpathyImage, images_root: str | os.PathLike) -> Path:
    """Return where a photo lies: ``images_root/filepath/filename``, else ``images_root/filename``.

    The second form lets ``images_root`` point straight at a folder of photos. When neither file
    exists, the first form is returned so that the error names the expected location.
    """
    root = Path(images_root)
    preferred = root / image.relative_path
    if not preferred.exists() and image.filepath and (root / image.filename).exists():
        return root / image.filename
    return preferred


def load_rgb_image(
    path: str | os.PathLike, *, images_root: str | os.PathLike | None = None
) -> Image.Image:
    """Open a photo and return it as an RGB image, fully decoded.

    Grayscale, palette and CMYK photos are converted. Photos with transparency (RGBA, LA, or a
    palette with a transparent colour) are composited on white, because a plain conversion would
    turn transparent pixels into whatever colour they happen to store.

    Args:
        path: the image file.
        images_root: only used to name the root folder in the error for a missing file.

    Raises:
        FileNotFoundError: when the file does not exist.
        ValueError: when the file is not a readable image or is truncated.
    """
    path = Path(path)
    if not path.is_file():
        hint = f" (images root {images_root})" if images_root is not None else ""
        raise FileNotFoundError(
            f"image not found: {path}{hint}; check --images-root, the folder that contains "
            "the Karpathy 'filepath' folders"
        )
    try:
        with Image.open(path) as opened:
            opened.load()
            image = convert_to_rgb(opened)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise ValueError(
            f"cannot decode image {path} ({error}); the file is corrupt or truncated"
        ) from error
    return image


def convert_to_rgb(image: Image.Image) -> Image.Image:
    """Return an RGB copy of a loaded PIL image, with transparent pixels composited on white."""
    if image.mode == "RGB":
        return image.copy()
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def check_image_files(
    images: Sequence[KarpathyImage], images_root: str | os.PathLike
) -> list[Path]:
    """Check that every photo exists and decodes, before any encoding starts.

    Each file is opened, its structure verified with PIL, and decoded. JPEGs are decoded at 1/8
    scale (PIL draft mode), which still reads the whole compressed stream and so detects
    truncation at a fraction of the cost of a full decode.

    Args:
        images: photos from ``read_karpathy``.
        images_root: folder that contains each photo's ``filepath`` folder.

    Returns:
        The resolved path of each photo, in the order of ``images``.

    Raises:
        FileNotFoundError: when the images root is not a folder.
        ValueError: listing the first bad files and the total count, when any photo is missing
            or does not decode.
    """
    root = Path(images_root)
    if not root.is_dir():
        raise FileNotFoundError(
            f"images root is not a folder: {root}; pass the folder that contains the Karpathy "
            "'filepath' folders (for COCO: the one containing train2014/ and val2014/)"
        )
    paths = [resolve_image_path(image, root) for image in images]
    problems = [problem for path in paths if (problem := _image_problem(path))]
    if problems:
        listed = "\n  ".join(problems[:_MAX_LISTED_PROBLEMS])
        more = (
            f"\n  ... and {len(problems) - _MAX_LISTED_PROBLEMS} more"
            if len(problems) > _MAX_LISTED_PROBLEMS
            else ""
        )
        raise ValueError(
            f"{len(problems)} of {len(paths)} photos under {root} are missing or unreadable:\n  "
            f"{listed}{more}\nfix --images-root or remove these photos from the Karpathy file"
        )
    logger.info("checked %d photos under %s", len(paths), root)
    return paths


def _image_problem(path: Path) -> str | None:
    """Return a one-line description of what is wrong with an image file, or None."""
    if not path.is_file():
        return f"{path}: missing"
    try:
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:
            if image.format == "JPEG":
                image.draft(image.mode, (max(1, image.width // 8), max(1, image.height // 8)))
            image.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        return f"{path}: {error}"
    return None
