"""Fixtures shared by every test folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

_REPO_ROOT = Path(__file__).resolve().parent.parent


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
