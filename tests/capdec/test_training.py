"""CapDecRun: training, validation, checkpoint continuation and data checks."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import capdec.training as training
from capdec.config import RunConfig
from capdec.training import CapDecRun, NonFiniteLossError
from tests.conftest import TOY_RUN


def _config(data: Path, **overrides) -> RunConfig:
    return RunConfig.from_dict({"data": str(data), "train_text": "both", "epochs": 3, **TOY_RUN, **overrides})


def test_loss_falls_over_epochs(toy_dataset: Path) -> None:
    run = CapDecRun(_config(toy_dataset, epsilon=0.05, lr=3e-3))
    losses = [run.run_epoch()["train/loss"] for _ in range(3)]
    assert losses[2] < losses[0]
    assert run.epoch == 3


def test_epoch_metrics_are_complete(toy_dataset: Path) -> None:
    run = CapDecRun(_config(toy_dataset))
    metrics = run.run_epoch()
    for key in ("train/loss", "val/cider", "val/cider_best", "val/bleu_4", "val/rouge_l", "epoch"):
        assert key in metrics
    assert math.isfinite(metrics["train/loss"])
    assert metrics["epoch"] == 1
    assert metrics["val/cider_best"] == metrics["val/cider"]


def test_checkpoint_continues_at_right_epoch(toy_dataset: Path, tmp_path: Path) -> None:
    config = _config(toy_dataset, epsilon=0.1, image_ratio=0.25, fgsm_epsilon=0.01)
    original = CapDecRun(config)
    original.run_epoch()
    original.save_checkpoint(tmp_path)
    saved_optimizer = copy.deepcopy(original.optimizer.state_dict()["state"])
    saved_lr = original.scheduler.get_last_lr()
    # the global torch RNG (dropout) is shared in-process, so the original trains its next
    # epoch before the resumed run restores the saved RNG state
    original_loss = original.train_epoch()["train/loss"]

    resumed = CapDecRun(config)
    resumed.load_checkpoint(tmp_path)
    assert resumed.epoch == 1
    assert resumed.best_epoch == 1
    assert resumed.best_cider == original.best_cider
    # the optimiser state is the one saved: same step count and moment estimates
    loaded_optimizer = resumed.optimizer.state_dict()["state"]
    assert saved_optimizer.keys() == loaded_optimizer.keys()
    for key in saved_optimizer:
        assert torch.equal(saved_optimizer[key]["exp_avg"], loaded_optimizer[key]["exp_avg"])
        assert torch.equal(saved_optimizer[key]["step"], loaded_optimizer[key]["step"])
    assert resumed.scheduler.get_last_lr() == saved_lr

    # the next epoch continues the same random streams, so both runs train identically
    assert resumed.train_epoch()["train/loss"] == original_loss


def test_checkpoint_from_other_data_is_rejected(toy_dataset: Path, tmp_path: Path) -> None:
    run = CapDecRun(_config(toy_dataset))
    run.run_epoch()
    run.save_checkpoint(tmp_path)
    state = torch.load(tmp_path / training.CHECKPOINT_FILE, weights_only=True)
    state["dataset_hash"] = "0" * 64
    torch.save(state, tmp_path / training.CHECKPOINT_FILE)
    with pytest.raises(ValueError, match="checkpoint was trained on prepared data 000000000000"):
        CapDecRun(_config(toy_dataset)).load_checkpoint(tmp_path)


def test_best_model_kept_when_cider_drops(toy_dataset: Path, tmp_path: Path) -> None:
    run = CapDecRun(_config(toy_dataset))
    run.run_epoch()
    best_weights = {k: v.clone() for k, v in run.best_model_state.items()}
    run.best_cider = math.inf  # no later epoch can beat this one
    run.run_epoch()
    run.save_checkpoint(tmp_path)
    saved = torch.load(tmp_path / training.BEST_MODEL_FILE, weights_only=True)
    assert saved["epoch"] == 1
    for key, value in best_weights.items():
        assert torch.equal(saved["model"][key], value)


def test_nan_loss_stops_run(toy_dataset: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = CapDecRun(_config(toy_dataset))
    monkeypatch.setattr(training, "caption_loss", lambda *args: torch.tensor(float("nan")))
    with pytest.raises(NonFiniteLossError, match="training loss became nan at epoch 1, batch 1"):
        run.train_epoch()


def test_image_fraction_is_exact_under_interleave(toy_dataset: Path) -> None:
    run = CapDecRun(_config(toy_dataset, image_ratio=0.25, image_mixing="interleave"))
    metrics = run.train_epoch()
    num_samples = len(run.train_rows)
    assert metrics["train/image_fraction"] == round(num_samples * 0.25) / num_samples


def test_learned_offset_moves(toy_dataset: Path) -> None:
    run = CapDecRun(_config(toy_dataset, modality_offset="learned", lr=1e-2))
    metrics = run.train_epoch()
    assert metrics["train/offset_norm"] > 0


def test_fixed_offset_needs_manifest_entry(toy_dataset: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    copy.mkdir()
    for item in toy_dataset.iterdir():
        (copy / item.name).write_bytes(item.read_bytes())
    manifest = json.loads((copy / "manifest.json").read_text())
    del manifest["source"]["modality_offset"]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="modality_offset='fixed' needs 'modality_offset'"):
        CapDecRun(_config(copy, modality_offset="fixed"))


def test_image_mixing_needs_paired_photos(tmp_path: Path) -> None:
    from capdec.prepared import CaptionRecord, ImageRecord, write_prepared

    captions = [CaptionRecord("a red circle", "train", -1, "corpus")] * 4
    captions += [CaptionRecord("a red circle", "val", 0, "paired")]
    data = write_prepared(
        tmp_path / "textonly",
        captions=captions,
        images=[ImageRecord("0", "", "val")],
        text_embeddings=np.ones((5, 8)),
        image_embeddings=np.ones((1, 8)),
        clip={"model": "toy"},
        source={},
    )
    with pytest.raises(ValueError, match="image_ratio=0.5 needs paired training photos"):
        CapDecRun(_config(data, train_text="corpus", image_ratio=0.5))


def test_validation_subset_is_fixed(toy_dataset: Path) -> None:
    first = CapDecRun(_config(toy_dataset, val_max_images=5))
    second = CapDecRun(_config(toy_dataset, val_max_images=5, seed=3))
    assert len(first.val_rows) == 5
    assert first.val_rows.tolist() == second.val_rows.tolist()


def test_study_reference_cache_gives_same_scores(toy_dataset: Path, tmp_path: Path) -> None:
    # a study tokenises the whole split once, and a trial scoring a subset reads from that file
    from capdec.metrics import CaptionScorer
    from capdec.prepared import load_prepared

    cache = CaptionScorer(load_prepared(toy_dataset).references("val")).save(tmp_path / "val.json")
    own = CapDecRun(_config(toy_dataset, val_max_images=5))
    cached = CapDecRun(_config(toy_dataset, val_max_images=5, val_references=str(cache)))
    assert cached.scorer.tokenized_references == own.scorer.tokenized_references
    predictions = {int(r): "a small red square" for r in own.val_rows}
    assert cached.scorer.score(predictions) == own.scorer.score(predictions)


def test_reference_cache_of_other_data_is_rejected(toy_dataset: Path, tmp_path: Path) -> None:
    from capdec.metrics import CaptionScorer
    from capdec.prepared import load_prepared

    references = load_prepared(toy_dataset).references("val")
    other = {key: [f"{texts[0]} and more"] for key, texts in references.items()}
    cache = CaptionScorer(other).save(tmp_path / "val.json")
    with pytest.raises(ValueError, match="contains other reference captions"):
        CapDecRun(_config(toy_dataset, val_references=str(cache)))


def test_long_captions_truncated_with_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from capdec.prepared import CaptionRecord, ImageRecord, write_prepared

    long_caption = " ".join(["a red circle next to a blue square"] * 20)
    captions = [CaptionRecord(long_caption, "train", -1, "corpus")] * 3
    captions += [CaptionRecord("a red circle", "train", -1, "corpus")] * 5
    captions += [CaptionRecord("a red circle", "val", 0, "paired")]
    data = write_prepared(
        tmp_path / "long",
        captions=captions,
        images=[ImageRecord("0", "", "val")],
        text_embeddings=np.ones((9, 8)),
        image_embeddings=np.ones((1, 8)),
        clip={"model": "toy"},
        source={},
    )
    with caplog.at_level("WARNING", logger="capdec.training"):
        run = CapDecRun(_config(data, train_text="corpus", max_caption_tokens=12))
    assert "3 of 8 training captions were longer than max_caption_tokens=12" in caplog.text
    # truncated captions still train: the run completes an epoch with a finite loss
    assert math.isfinite(run.train_epoch()["train/loss"])
    assert max(len(tokens) for tokens in run.tokens_by_row.values()) == 12
