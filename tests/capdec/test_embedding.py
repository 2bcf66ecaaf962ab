"""Tests of capdec.embedding with real open_clip models built from the small ``tiny`` config."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from capdec.embedding import ClipEncoder, encode_images, encode_texts, load_clip

CAPTIONS = ["a dog on a sofa", "two people ride bicycles down a busy street", "a red kite", "x"]


@pytest.fixture(scope="module")
def tiny() -> ClipEncoder:
    return load_clip("tiny", None, seed=1)


def _photos() -> list[Image.Image]:
    return [
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (60, 80, 3), dtype=np.uint8)),
        Image.new("RGB", (50, 90), (200, 30, 30)),
        Image.linear_gradient("L").convert("RGB"),
    ]


def test_load_clip_tiny_identity(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="capdec.embedding"):
        encoder = load_clip("tiny", None)

    assert encoder.identity == {
        "model": "tiny",
        "pretrained": None,
        "checkpoint": None,
        "checkpoint_sha256": None,
        "embed_dim": 64,
        "quick_gelu": False,
        "random_init": True,
    }
    assert encoder.embed_dim == 64
    assert not encoder.model.training
    assert "random-initialised" in caplog.text


def test_load_clip_tiny_is_seeded(tiny: ClipEncoder) -> None:
    same = load_clip("tiny", None, seed=1)
    other = load_clip("tiny", None, seed=2)

    for name, value in tiny.model.state_dict().items():
        assert torch.equal(same.model.state_dict()[name], value), f"{name} differs for seed 1"
    assert not torch.equal(tiny.model.visual.conv1.weight, other.model.visual.conv1.weight)


def test_load_clip_leaves_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    load_clip("tiny", None, seed=5)

    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_load_clip_reads_checkpoint_file(tiny: ClipEncoder, tmp_path: Path, suffix: str) -> None:
    checkpoint = tmp_path / f"tiny{suffix}"
    state = {k: v.contiguous() for k, v in tiny.model.state_dict().items()}
    if suffix == ".pt":
        torch.save(state, checkpoint)
    else:
        save_file(state, checkpoint)

    # a different seed proves the weights come from the file, not from the initialisation
    loaded = load_clip("tiny", pretrained=checkpoint, seed=7)

    for name, value in tiny.model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], value), f"{name} differs after loading"
    assert loaded.identity["checkpoint"] == str(checkpoint.resolve())
    assert (
        loaded.identity["checkpoint_sha256"] == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    )
    assert loaded.identity["pretrained"] is None
    assert loaded.identity["random_init"] is False
    np.testing.assert_array_equal(
        encode_texts(loaded, CAPTIONS, progress=False),
        encode_texts(tiny, CAPTIONS, progress=False),
    )
    np.testing.assert_array_equal(
        encode_images(loaded, _photos(), progress=False),
        encode_images(tiny, _photos(), progress=False),
    )


def test_load_clip_rejects_unknown_model() -> None:
    with pytest.raises(
        ValueError, match=r"unknown CLIP model 'ViT-B-23' \(close names: .*ViT-B-32"
    ):
        load_clip("ViT-B-23", None)


def test_load_clip_rejects_unknown_tag() -> None:
    with pytest.raises(
        ValueError, match=r"unknown pretrained tag 'opneai' .* known tags: openai, "
    ):
        load_clip("ViT-B-32", "opneai")


def test_load_clip_tiny_has_no_tags() -> None:
    with pytest.raises(ValueError, match="known tags: none. Pass one of them, a checkpoint file"):
        load_clip("tiny", "openai")


def test_load_clip_rejects_missing_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"CLIP checkpoint file not found: .*absent\.pt"):
        load_clip("tiny", tmp_path / "absent.pt")


def test_load_clip_openai_tag_uses_quick_gelu(
    monkeypatch: pytest.MonkeyPatch, tiny: ClipEncoder
) -> None:
    calls: list[dict[str, Any]] = []

    def fake_create(model: str, **kwargs: Any) -> tuple[Any, Any, Any]:
        calls.append({"model": model, **kwargs})
        return tiny.model, None, tiny.preprocess

    # replaces the weight download, which needs network
    monkeypatch.setattr(open_clip, "create_model_and_transforms", fake_create)
    encoder = load_clip("ViT-B-32", "openai")

    assert calls[0]["model"] == "ViT-B-32"
    assert calls[0]["pretrained"] == "openai"
    assert calls[0]["force_quick_gelu"] is True
    assert encoder.identity["pretrained"] == "openai"
    assert encoder.identity["embed_dim"] == 512
    assert encoder.identity["random_init"] is False


def test_encode_texts_returns_unnormalised_float32(tiny: ClipEncoder) -> None:
    features = encode_texts(tiny, CAPTIONS, batch_size=3, progress=False)
    with torch.no_grad():
        expected = tiny.model.encode_text(tiny.tokenizer(CAPTIONS)).numpy()

    assert features.dtype == np.float32
    assert features.shape == (4, 64)
    np.testing.assert_allclose(features, expected, rtol=1e-5, atol=1e-6)
    assert not np.allclose(np.linalg.norm(features, axis=1), 1.0)


def test_encode_texts_truncates_long_captions(tiny: ClipEncoder) -> None:
    features = encode_texts(tiny, ["a dog " * 200], progress=False)

    assert features.shape == (1, 64)
    assert np.isfinite(features).all()


def test_encode_texts_handles_empty_input(tiny: ClipEncoder) -> None:
    assert encode_texts(tiny, [], progress=False).shape == (0, 64)


def test_encode_images_paths_match_pil(tiny: ClipEncoder, tmp_path: Path) -> None:
    photos = _photos()
    paths = []
    for i, photo in enumerate(photos):
        paths.append(tmp_path / f"{i}.png")
        photo.save(paths[-1])

    from_pil = encode_images(tiny, photos, batch_size=2, progress=False)
    from_paths = encode_images(tiny, paths, batch_size=64, progress=False, num_workers=1)

    assert from_pil.dtype == np.float32
    assert from_pil.shape == (3, 64)
    np.testing.assert_allclose(from_paths, from_pil, rtol=1e-5, atol=1e-6)


def test_encode_images_rejects_bad_batch_size(tiny: ClipEncoder) -> None:
    with pytest.raises(ValueError, match="batch_size must be >= 1; got 0"):
        encode_images(tiny, _photos(), batch_size=0)
