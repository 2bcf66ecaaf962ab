"""Fixtures shared by every test folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

_REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """Turn skips into failures when CAPDEC_REQUIRE_ALL=1, as CI sets it.

    Tests skip when the coco-mini data or Java is missing on a user's machine; CI has both, so
    a skip there means a test that silently stopped running.
    """
    outcome = yield
    report = outcome.get_result()
    if report.skipped and os.environ.get("CAPDEC_REQUIRE_ALL") == "1":
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped, but CAPDEC_REQUIRE_ALL=1 requires every test to run: {reason}"


@pytest.fixture(scope="session")
def coco_mini() -> Path:
    """Return the coco-mini data folder (257 COCO photos), or skip the test when it is absent.

    The folder is ``$CAPDEC_COCO_MINI``, by default ``../shared/data/coco-mini`` next to the
    repository. Treat it as read-only.
    """
    default = _REPO_ROOT.parent / "shared" / "data" / "coco-mini"
    path = Path(os.environ.get("CAPDEC_COCO_MINI", default))
    if not (path / "dataset_coco.json").is_file():
        pytest.skip(f"coco-mini data not found at {path}; set CAPDEC_COCO_MINI")
    return path


def write_toy_dataset(folder: Path, *, dim: int = 32, seed: int = 0) -> Path:
    """Write a small prepared dataset of coloured-shape captions with random CLIP-like vectors.

    Each (colour, shape) pair has its own centre; text embeddings sit near it and image
    embeddings near it plus a constant shift, a crude modality gap.
    """
    import numpy as np

    from capdec.prepared import CaptionRecord, ImageRecord, write_prepared

    rng = np.random.default_rng(seed)
    pairs = [(c, s) for c in ("red", "blue", "green", "yellow") for s in ("circle", "square", "triangle")]
    centres = {pair: rng.normal(size=dim) for pair in pairs}
    captions, images, text_embeddings, image_embeddings = [], [], [], []
    for row, (colour, shape) in enumerate(pairs * 4):
        if row < 24:
            split = "train"
        elif row < 36:
            split = "val"
        else:
            split = "test"
        images.append(ImageRecord(image_id=str(row), file="", split=split))
        image_embeddings.append(centres[colour, shape] + 1.0 + rng.normal(size=dim) * 0.3)
        for text in (f"a {colour} {shape}", f"the {shape} is {colour}", f"one {colour} {shape} here"):
            captions.append(CaptionRecord(text=text, split=split, image=row, source="paired"))
            text_embeddings.append(centres[colour, shape] + rng.normal(size=dim) * 0.1)
    for index in range(40):
        colour, shape = pairs[index % len(pairs)]
        captions.append(CaptionRecord(text=f"a small {colour} {shape}", split="train", image=-1, source="corpus"))
        text_embeddings.append(centres[colour, shape] + rng.normal(size=dim) * 0.1)
    paired_text = np.asarray(text_embeddings[: 24 * 3])
    train_images = np.asarray(image_embeddings[:24])

    def unit(x):
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    offset = (unit(train_images).mean(0) - unit(paired_text).mean(0)).tolist()
    offset_raw = (train_images.mean(0) - paired_text.mean(0)).tolist()
    return write_prepared(
        folder,
        captions=captions,
        images=images,
        text_embeddings=np.asarray(text_embeddings),
        image_embeddings=np.asarray(image_embeddings),
        clip={"model": "toy", "pretrained": None, "checkpoint": None, "embed_dim": dim},
        source={"generator": "tests", "modality_offset": offset, "modality_offset_raw": offset_raw},
    )


@pytest.fixture(scope="session")
def toy_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A prepared dataset of 48 images (24 train, 12 val, 12 test) and 184 captions."""
    return write_toy_dataset(tmp_path_factory.mktemp("toy") / "prepared")


# small decoder and training settings that keep a run to about a second per epoch
TOY_RUN = {
    "tiny_vocab_size": 300,
    "tiny_layers": 1,
    "tiny_width": 32,
    "tiny_heads": 2,
    "prefix_length": 2,
    "batch_size": 16,
    "max_new_tokens": 8,
    "warmup_steps": 2,
    "lr": 3e-3,
    "num_threads": 1,
}


@pytest.fixture(scope="session")
def local_ray():
    """Start a 2-CPU local Ray once for all study tests and shut it down at the end."""
    import ray

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, log_to_driver=True)
    yield ray
    ray.shutdown()
