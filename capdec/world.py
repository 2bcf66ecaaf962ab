"""The synthetic captioning world of the demo: scenes, rendered images, captions and splits.

A scene is one coloured shape at one of five positions, or two shapes side by side, on a dark,
gray or light background. Each scene is rendered as a 32x32 RGB image with pixel noise and
described by five distinct captions drawn from eight templates per layout with synonyms.

Validation and test scenes use object-and-position combinations that never occur in training: the
combinations of each layout are shuffled with the world seed and split into disjoint train, val
and test sets. Every held-out combination is made of parts seen in training (a held-out
"small red circle on the left" has its triple seen at other positions), so the task stays
learnable while the decoder still has to compose.

``attribute_f1`` scores a generated caption by the size-colour-shape triples it names, a check
that templated captions cannot inflate the way they inflate CIDEr.
"""

from __future__ import annotations

import itertools
import logging
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

logger = logging.getLogger(__name__)

IMAGE_SIZE = 32  # pixels per side; the positions and radii below are laid out for it
SPLITS = ("train", "val", "test")
LAYOUTS = ("single", "pair")

SIZES = ("small", "large")
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")
SHAPES = ("circle", "square", "triangle", "diamond")
POSITIONS = ("left", "center", "right", "top", "bottom")
BACKGROUNDS = ("dark", "gray", "light")

Triple = tuple[str, str, str]  # (size, colour, shape), canonical words

# caption words per canonical value; the first entry is the canonical word itself
_SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big")}
_SHAPE_WORDS = {
    "circle": ("circle", "disk"),
    "square": ("square", "box"),
    "triangle": ("triangle",),
    "diamond": ("diamond", "rhombus"),
}
_POSITION_PHRASES = {
    "left": ("on the left", "at the left"),
    "center": ("in the center", "in the middle"),
    "right": ("on the right", "at the right"),
    "top": ("at the top", "near the top"),
    "bottom": ("at the bottom", "near the bottom"),
}
_BACKGROUND_WORDS = {
    "dark": ("dark", "black"),
    "gray": ("gray", "grey"),
    "light": ("light", "white"),
}

# {obj}, {left} and {right} are "size colour shape" phrases; {pos} a position phrase; {bg} a colour
_SINGLE_TEMPLATES = (
    "a {obj} {pos}",
    "there is a {obj} {pos}",
    "{pos} there is a {obj}",
    "an image of a {obj} {pos}",
    "a picture of a {obj} {pos} on a {bg} background",
    "a {obj} on a {bg} background",
    "a single {obj} {pos}",
    "one {obj} placed {pos}",
)
_PAIR_TEMPLATES = (
    "a {left} and a {right}",
    "a {left} next to a {right}",
    "a {left} on the left and a {right} on the right",
    "a {right} on the right and a {left} on the left",
    "there is a {left} beside a {right}",
    "a picture of a {left} and a {right} side by side on a {bg} background",
    "a {left} to the left of a {right}",
    "a {right} to the right of a {left}",
)

_SHAPE_OF_WORD = {word: shape for shape, words in _SHAPE_WORDS.items() for word in words}
_SIZE_OF_WORD = {word: size for size, words in _SIZE_WORDS.items() for word in words}
_COLOUR_WORDS = frozenset(COLOURS)

_RGB = {
    "red": (0.90, 0.10, 0.10),
    "green": (0.10, 0.75, 0.20),
    "blue": (0.15, 0.30, 0.95),
    "yellow": (0.95, 0.90, 0.10),
    "purple": (0.60, 0.20, 0.80),
    "orange": (1.00, 0.55, 0.05),
}
_BACKGROUND_RGB = {
    "dark": (0.08, 0.08, 0.10),
    "gray": (0.50, 0.50, 0.50),
    "light": (0.92, 0.92, 0.90),
}
_CENTRES = {
    "left": (9.0, 16.0),
    "center": (16.0, 16.0),
    "right": (23.0, 16.0),
    "top": (16.0, 9.0),
    "bottom": (16.0, 23.0),
}
_RADII = {"small": 3.5, "large": 6.0}  # pixels; a large shape at "left" spans columns 3-15


def _vocabulary() -> tuple[str, ...]:
    words: set[str] = set(COLOURS)
    for groups in (_SIZE_WORDS, _SHAPE_WORDS, _POSITION_PHRASES, _BACKGROUND_WORDS):
        for phrases in groups.values():
            for phrase in phrases:
                words.update(phrase.split())
    for template in _SINGLE_TEMPLATES + _PAIR_TEMPLATES:
        words.update(w for w in template.split() if not w.startswith("{"))
    return tuple(sorted(words))


VOCABULARY = _vocabulary()  # every word a caption of this world can contain


@dataclass(frozen=True)
class WorldConfig:
    """Size and randomness of a generated world."""

    num_train: int = 10_000  # training images
    num_val: int = 500  # validation images, all with held-out combinations
    num_test: int = 500  # test images, held-out combinations disjoint from validation's
    captions_per_image: int = (
        5  # distinct captions per image, at most 8 (the templates per layout)
    )
    pair_fraction: float = 0.5  # probability that a scene has two objects
    heldout_fraction: float = (
        0.1  # share of each layout's combinations kept for val, and again for test
    )
    pixel_noise: float = 0.06  # standard deviation of Gaussian pixel noise, intensities in [0, 1]
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("num_train", "num_val", "num_test"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1; got {getattr(self, name)}")
        if not 1 <= self.captions_per_image <= len(_SINGLE_TEMPLATES):
            raise ValueError(
                f"captions_per_image must be in [1, {len(_SINGLE_TEMPLATES)}]; "
                f"got {self.captions_per_image}"
            )
        if not 0.0 <= self.pair_fraction <= 1.0:
            raise ValueError(f"pair_fraction must be in [0, 1]; got {self.pair_fraction}")
        if not 0.0 < self.heldout_fraction < 0.5:
            raise ValueError(f"heldout_fraction must be in (0, 0.5); got {self.heldout_fraction}")
        if self.pixel_noise < 0:
            raise ValueError(f"pixel_noise must be >= 0; got {self.pixel_noise}")

    def to_dict(self) -> dict[str, int | float]:
        return asdict(self)


@dataclass(frozen=True)
class WorldObject:
    size: str
    colour: str
    shape: str
    position: str

    @property
    def triple(self) -> Triple:
        return (self.size, self.colour, self.shape)


@dataclass(frozen=True)
class Scene:
    objects: tuple[WorldObject, ...]  # one object, or two ordered left then right
    background: str

    @property
    def layout(self) -> str:
        return "single" if len(self.objects) == 1 else "pair"

    @property
    def attributes(self) -> list[Triple]:
        """The size-colour-shape triples of the scene's objects, gold set of ``attribute_f1``."""
        return [obj.triple for obj in self.objects]

    @property
    def combination(self) -> tuple:
        """The object-and-position combination that decides the scene's split (no background)."""
        return (self.layout,) + tuple(
            (o.size, o.colour, o.shape, o.position) for o in self.objects
        )


@dataclass
class WorldSplit:
    """The scenes of one split with their rendered images and captions, in the same order."""

    name: str
    scenes: list[Scene]
    images: np.ndarray  # (N, 32, 32, 3) uint8 RGB
    captions: list[list[str]]  # captions_per_image distinct captions per scene


@dataclass
class World:
    config: WorldConfig
    splits: dict[str, WorldSplit]
    combinations: dict[str, frozenset[tuple]]  # split name -> the combinations it may use


def _all_combinations(layout: str) -> list[tuple]:
    triples = list(itertools.product(SIZES, COLOURS, SHAPES))
    if layout == "single":
        return [("single", t + (p,)) for t in triples for p in POSITIONS]
    return [("pair", a + ("left",), b + ("right",)) for a, b in itertools.permutations(triples, 2)]


def split_combinations(config: WorldConfig) -> dict[str, frozenset[tuple]]:
    """Assign every object-and-position combination to exactly one split.

    The combinations of each layout are shuffled with the world seed. The first
    ``heldout_fraction`` of them go to val, the next ``heldout_fraction`` to test and the rest to
    train. Pairs never repeat a triple, so a pair caption never has to say "two".

    Returns:
        Split name -> frozenset of ``Scene.combination`` tuples.
    """
    rng = np.random.default_rng([config.seed, 0])
    assigned: dict[str, set[tuple]] = {split: set() for split in SPLITS}
    for layout in LAYOUTS:
        combos = _all_combinations(layout)
        order = rng.permutation(len(combos))
        n_heldout = max(1, round(config.heldout_fraction * len(combos)))
        assigned["val"].update(combos[i] for i in order[:n_heldout])
        assigned["test"].update(combos[i] for i in order[n_heldout : 2 * n_heldout])
        assigned["train"].update(combos[i] for i in order[2 * n_heldout :])
    return {split: frozenset(combos) for split, combos in assigned.items()}


def _scene_of(combination: tuple, background: str) -> Scene:
    return Scene(tuple(WorldObject(*parts) for parts in combination[1:]), background)


def _sample_scenes(
    n: int, combinations: frozenset[tuple], config: WorldConfig, rng: np.random.Generator
) -> list[Scene]:
    by_layout = {layout: sorted(c for c in combinations if c[0] == layout) for layout in LAYOUTS}
    scenes = []
    for _ in range(n):
        layout = "pair" if rng.random() < config.pair_fraction else "single"
        pool = by_layout[layout]
        combination = pool[rng.integers(len(pool))]
        scenes.append(_scene_of(combination, BACKGROUNDS[rng.integers(len(BACKGROUNDS))]))
    return scenes


def _shape_mask(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    if shape == "circle":
        return dx**2 + dy**2 <= r**2
    if shape == "square":
        return np.maximum(np.abs(dx), np.abs(dy)) <= 0.85 * r
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= 1.2 * r
    # triangle pointing up: apex at dy = -r, base at dy = 0.8 r with half-width r
    return (dy <= 0.8 * r) & (np.abs(dx) <= (dy + r) / 1.8)


def render_scene(scene: Scene, rng: np.random.Generator, pixel_noise: float) -> np.ndarray:
    """Render one scene as a (32, 32, 3) uint8 RGB image.

    Colours, centres (up to 1.5 px) and radii (up to 7 %) are jittered, then Gaussian pixel noise
    of standard deviation ``pixel_noise`` is added.
    """
    ys, xs = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float32) + 0.5
    background = np.asarray(_BACKGROUND_RGB[scene.background]) + rng.uniform(-0.05, 0.05, 3)
    image = np.broadcast_to(background, (IMAGE_SIZE, IMAGE_SIZE, 3)).copy()
    for obj in scene.objects:
        cx, cy = np.asarray(_CENTRES[obj.position]) + rng.uniform(-1.5, 1.5, 2)
        radius = _RADII[obj.size] * rng.uniform(0.93, 1.07)
        mask = _shape_mask(obj.shape, xs - cx, ys - cy, radius)
        image[mask] = np.asarray(_RGB[obj.colour]) + rng.uniform(-0.06, 0.06, 3)
    image += rng.normal(0.0, pixel_noise, image.shape)
    return np.round(np.clip(image, 0.0, 1.0) * 255).astype(np.uint8)


def _object_phrase(obj: WorldObject, rng: np.random.Generator) -> str:
    size_words, shape_words = _SIZE_WORDS[obj.size], _SHAPE_WORDS[obj.shape]
    size = size_words[rng.integers(len(size_words))]
    return f"{size} {obj.colour} {shape_words[rng.integers(len(shape_words))]}"


def describe_scene(scene: Scene, count: int, rng: np.random.Generator) -> list[str]:
    """Write ``count`` distinct captions of a scene, each from a different template.

    Args:
        scene: the scene to describe.
        count: captions to write, 1 to 8.
        rng: source of the template order and synonym choices.

    Returns:
        Lower-case captions without punctuation, made only of ``VOCABULARY`` words.
    """
    templates = _SINGLE_TEMPLATES if scene.layout == "single" else _PAIR_TEMPLATES
    background_words = _BACKGROUND_WORDS[scene.background]
    captions = []
    for index in rng.permutation(len(templates))[:count]:
        fields = {"bg": background_words[rng.integers(len(background_words))]}
        if scene.layout == "single":
            phrases = _POSITION_PHRASES[scene.objects[0].position]
            fields["obj"] = _object_phrase(scene.objects[0], rng)
            fields["pos"] = phrases[rng.integers(len(phrases))]
        else:
            fields["left"] = _object_phrase(scene.objects[0], rng)
            fields["right"] = _object_phrase(scene.objects[1], rng)
        captions.append(templates[index].format(**fields))
    return captions


def generate_world(config: WorldConfig) -> World:
    """Generate all splits of a world; the same configuration gives identical images and captions.

    Each split draws from its own random stream derived from the seed, so changing ``num_train``
    leaves the validation and test scenes unchanged.
    """
    combinations = split_combinations(config)
    sizes = {"train": config.num_train, "val": config.num_val, "test": config.num_test}
    splits = {}
    for split_index, split in enumerate(SPLITS, start=1):
        rng = np.random.default_rng([config.seed, split_index])
        scenes = _sample_scenes(sizes[split], combinations[split], config, rng)
        images = np.stack([render_scene(scene, rng, config.pixel_noise) for scene in scenes])
        captions = [describe_scene(scene, config.captions_per_image, rng) for scene in scenes]
        splits[split] = WorldSplit(split, scenes, images, captions)
    logger.info(
        "generated world: %d train, %d val, %d test images, %d captions each",
        config.num_train,
        config.num_val,
        config.num_test,
        config.captions_per_image,
    )
    return World(config, splits, combinations)


def parse_attributes(caption: str) -> list[tuple[str | None, str | None, str]]:
    """Read the objects a caption names as canonical (size, colour, shape) triples.

    Every shape word starts an object. Its colour is the word just before it, and its size the
    word before the colour, or before the shape when no colour is named. A missing part is None,
    so such an object matches no gold triple.
    """
    words = re.findall(r"[a-z]+", caption.lower())
    objects = []
    for i, word in enumerate(words):
        if word not in _SHAPE_OF_WORD:
            continue
        j = i - 1
        colour = None
        if j >= 0 and words[j] in _COLOUR_WORDS:
            colour = words[j]
            j -= 1
        size = _SIZE_OF_WORD.get(words[j]) if j >= 0 else None
        objects.append((size, colour, _SHAPE_OF_WORD[word]))
    return objects


def attribute_f1(prediction: str, attributes: Sequence[Sequence[str]]) -> float:
    """Score a caption by the F1 of the size-colour-shape triples it names against the gold ones.

    Triples are matched as multisets. A named object with a wrong or missing size, colour or
    shape counts as a false positive, and a gold object that is not named as a false negative.

    Args:
        prediction: a generated caption.
        attributes: the gold (size, colour, shape) triples of the image, canonical words as in
            ``Scene.attributes``.

    Returns:
        F1 in [0, 1]; 0 when the caption names no object.

    Raises:
        ValueError: when ``attributes`` is empty or an entry is not a triple.
    """
    if not attributes:
        raise ValueError(
            "attributes must name at least one (size, colour, shape) triple; got none"
        )
    gold = Counter()
    for triple in attributes:
        if len(triple) != 3:
            raise ValueError(
                f"each attribute must be a (size, colour, shape) triple; got {triple!r}"
            )
        gold[tuple(triple)] += 1
    predicted = Counter(parse_attributes(prediction))
    matched = sum((predicted & gold).values())
    if matched == 0:
        return 0.0
    precision = matched / sum(predicted.values())
    recall = matched / sum(gold.values())
    return 2 * precision * recall / (precision + recall)


def mean_attribute_f1(
    predictions: Sequence[str], attributes: Sequence[Sequence[Sequence[str]]]
) -> float:
    """Return the mean ``attribute_f1`` over a corpus of captions, one per image.

    Raises:
        ValueError: when the two sequences differ in length or are empty.
    """
    if len(predictions) != len(attributes):
        raise ValueError(
            f"{len(predictions)} predictions but {len(attributes)} attribute lists; "
            "pass one per image"
        )
    if not predictions:
        raise ValueError("mean_attribute_f1 needs at least one prediction; got none")
    return float(
        np.mean([attribute_f1(p, a) for p, a in zip(predictions, attributes, strict=True)])
    )
