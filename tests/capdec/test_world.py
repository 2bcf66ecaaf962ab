"""Tests of the synthetic demo world: determinism, captions, held-out splits and attribute F1."""

from __future__ import annotations

import numpy as np
import pytest

from capdec.world import (
    SPLITS,
    VOCABULARY,
    WorldConfig,
    attribute_f1,
    generate_world,
    mean_attribute_f1,
    parse_attributes,
    split_combinations,
)

SMALL = WorldConfig(num_train=300, num_val=60, num_test=60)


@pytest.fixture(scope="module")
def world():
    return generate_world(SMALL)


def test_world_same_seed_is_identical(world) -> None:
    again = generate_world(SMALL)
    for split in SPLITS:
        assert np.array_equal(world.splits[split].images, again.splits[split].images)
        assert world.splits[split].captions == again.splits[split].captions


def test_world_other_seed_differs(world) -> None:
    other = generate_world(WorldConfig(num_train=300, num_val=60, num_test=60, seed=1))
    assert not np.array_equal(world.splits["train"].images, other.splits["train"].images)
    assert world.splits["train"].captions != other.splits["train"].captions
    assert split_combinations(SMALL)["val"] != split_combinations(other.config)["val"]


def test_world_split_sizes_and_image_shape(world) -> None:
    assert world.splits["train"].images.shape == (300, 32, 32, 3)
    assert world.splits["train"].images.dtype == np.uint8
    assert len(world.splits["val"].scenes) == 60
    assert len(world.splits["test"].captions) == 60


def test_world_heldout_splits_ignore_train_size(world) -> None:
    larger = generate_world(WorldConfig(num_train=500, num_val=60, num_test=60))
    assert np.array_equal(world.splits["val"].images, larger.splits["val"].images)
    assert world.splits["test"].captions == larger.splits["test"].captions


def test_captions_are_distinct_and_in_vocabulary(world) -> None:
    vocabulary = set(VOCABULARY)
    for split in SPLITS:
        for captions in world.splits[split].captions:
            assert len(captions) == 5
            assert len(set(captions)) == 5
            for caption in captions:
                assert set(caption.split()) <= vocabulary, caption


def test_captions_name_the_scene_objects(world) -> None:
    for scene, captions in zip(
        world.splits["train"].scenes, world.splits["train"].captions, strict=True
    ):
        for caption in captions:
            assert attribute_f1(caption, scene.attributes) == 1.0, caption


def test_heldout_combinations_absent_from_train(world) -> None:
    combinations = split_combinations(SMALL)
    assert not combinations["train"] & combinations["val"]
    assert not combinations["train"] & combinations["test"]
    assert not combinations["val"] & combinations["test"]
    train_seen = {scene.combination for scene in world.splits["train"].scenes}
    for split in ("val", "test"):
        used = {scene.combination for scene in world.splits[split].scenes}
        assert used <= combinations[split]
        assert not used & train_seen


def test_heldout_triples_are_seen_in_train() -> None:
    # each held-out combination is built from object triples that training shows elsewhere
    combinations = split_combinations(SMALL)
    train_triples = {obj[:3] for combo in combinations["train"] for obj in combo[1:]}
    for split in ("val", "test"):
        for combo in combinations[split]:
            for obj in combo[1:]:
                assert obj[:3] in train_triples


def test_both_layouts_in_every_split(world) -> None:
    for split in SPLITS:
        layouts = {scene.layout for scene in world.splits[split].scenes}
        assert layouts == {"single", "pair"}


def test_parse_attributes_maps_synonyms() -> None:
    parsed = parse_attributes("a tiny red disk next to a big blue box")
    assert parsed == [("small", "red", "circle"), ("large", "blue", "square")]


def test_parse_attributes_marks_missing_parts() -> None:
    assert parse_attributes("a red triangle") == [(None, "red", "triangle")]
    assert parse_attributes("a big rhombus") == [("large", None, "diamond")]


GOLD_PAIR = [("small", "red", "circle"), ("large", "blue", "square")]


def test_attribute_f1_exact() -> None:
    assert (
        attribute_f1("a little red circle on the left and a big blue box on the right", GOLD_PAIR)
        == 1.0
    )


def test_attribute_f1_partial() -> None:
    # one of two objects named, correctly: precision 1, recall 1/2
    assert attribute_f1("a small red circle on the left", GOLD_PAIR) == pytest.approx(2 / 3)
    # two objects named, one right: precision 1/2, recall 1/2
    assert attribute_f1("a small red circle and a small blue square", GOLD_PAIR) == pytest.approx(
        0.5
    )


def test_attribute_f1_wrong_colour() -> None:
    assert attribute_f1("a small green circle at the top", [("small", "red", "circle")]) == 0.0


def test_attribute_f1_empty_prediction() -> None:
    assert attribute_f1("", GOLD_PAIR) == 0.0


def test_attribute_f1_repeated_object_counts_once() -> None:
    # the gold circle appears once, so naming it twice leaves one false positive
    assert attribute_f1(
        "a small red circle and a small red circle", [("small", "red", "circle")]
    ) == pytest.approx(2 / 3)


def test_attribute_f1_rejects_empty_gold() -> None:
    with pytest.raises(ValueError, match="at least one"):
        attribute_f1("a small red circle", [])


def test_mean_attribute_f1_averages() -> None:
    gold = [[("small", "red", "circle")], [("large", "blue", "square")]]
    assert mean_attribute_f1(["a small red circle", "a small red circle"], gold) == pytest.approx(
        0.5
    )


def test_mean_attribute_f1_rejects_length_mismatch() -> None:
    with pytest.raises(ValueError, match="1 predictions but 2"):
        mean_attribute_f1(["a small red circle"], [[("small", "red", "circle")]] * 2)


def test_world_config_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="captions_per_image must be in"):
        WorldConfig(captions_per_image=9)
    with pytest.raises(ValueError, match="heldout_fraction"):
        WorldConfig(heldout_fraction=0.6)
