"""The procedural "shapes world": the toy-scale text-to-image dataset (DESIGN.md, TOY_CALIBRATION.md).

Scenes hold 1-4 flat-coloured, non-overlapping shapes on a light-grey background. Each scene comes
with a caption built from GenEval's six task templates (SNAPGEN_SPEC.md section 8) and the GenEval
metadata record of that prompt (tag / include / exclude / prompt, with shapes as the classes), so
the official GenEval rules can score generated images with the exact scene parser
(`snapgen_model.evaluation.scene_parser`) standing in for the detector and the colour classifier.

Sample ``i`` of a split is a pure function of ``(cfg, split, i)``: it is seeded by
``(cfg.seed, split, i)``, never by a shared stream, so any sharding of the indices over workers
yields the same scenes. Boxes are ``(x0, y0, x1, y1)`` pixel edges, ``x1``/``y1`` exclusive, and are
the tight boxes of the painted pixels.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "diamond", "cross")
# GenEval's ten colour names with well-separated RGB values: every pair differs by >= 86 (L2), and
# every colour is >= 87 from the background, so nearest-palette parsing is exact on clean renders.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35), "orange": (245, 135, 15), "yellow": (250, 220, 30),
    "green": (35, 150, 55), "blue": (35, 75, 215), "purple": (125, 45, 165),
    "pink": (245, 125, 200), "brown": (125, 75, 35), "black": (15, 15, 15),
    "white": (250, 250, 250),
}
BACKGROUND_RGB: tuple[int, int, int] = (180, 180, 180)  # mid-light grey: far from white and black
TASKS: tuple[str, ...] = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
SPLITS: tuple[str, ...] = ("train", "heldout", "all")
GENEVAL_POSITION_THRESHOLD = 0.1  # GenEval's margin, as a fraction of the summed box sizes
NUMBER_WORDS: dict[int, str] = {1: "one", 2: "two", 3: "three", 4: "four"}
PLURALS: dict[str, str] = {s: s + "s" for s in SHAPES} | {"cross": "crosses"}
_INVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
_PREFIXES = ("a photo of {}", "an image of {}", "an image with {}", "a picture of {}", "{}")
_SPLIT_CODE = {"train": 0, "heldout": 1, "all": 2}
_TWO_PLUS = ("two_object", "counting", "position", "color_attr")  # tasks with >= 2 objects
_STAR_INNER = 0.45  # inner / outer radius of the star (0.38 is regular; fatter reads at 14 px)
_CROSS_ARM = 0.38  # arm width of the cross as a fraction of its side


def _err(name: str, msg: str) -> ValueError:
    return ValueError(f"ShapesWorldConfig.{name}: {msg}")


@dataclass(frozen=True, kw_only=True)
class ShapesWorldConfig:
    """Size and vocabulary of the shapes world; validated at construction."""

    resolution: int = 64  # image side in pixels (square images), any int >= 32
    shapes: tuple[str, ...] = ("circle", "square", "triangle")  # the classes, a subset of SHAPES
    colours: tuple[str, ...] = ("red", "yellow", "green", "blue", "white")  # subset of PALETTE
    object_size_px: tuple[int, int] = (14, 22)  # (min, max) side of an object's box, in pixels
    max_objects: int = 4  # most objects in a scene (1-4); counting prompts use 2..max_objects
    min_gap_px: int = 2  # empty pixels kept between two objects and between objects and the border
    background: str = "plain"  # "plain" (flat grey) or "textured" (grey, mild gradient + noise)
    # sampling weight of each GenEval task; a mapping or (task, weight) pairs, missing tasks get 0
    task_weights: Mapping[str, float] | tuple[tuple[str, float], ...] = tuple((t, 1.0) for t in TASKS)
    # (colour, shape) pairs the train split never renders; prompts naming one form the heldout split
    held_out_pairs: tuple[tuple[str, str], ...] = ()
    # GenEval-template prompts the train split never produces; they join the heldout split
    held_out_prompts: tuple[str, ...] = ()
    paraphrase_prob: float = 0.5  # train split: chance of a varied phrasing instead of the template
    counting_same_colour_prob: float = 0.5  # counting scenes: chance that all objects share a colour
    seed: int = 0  # world seed; sample i of a split is seeded by (seed, split, i)

    def __post_init__(self) -> None:
        self._check_sizes()
        self._check_vocabulary()
        self._check_task_weights()
        self._check_held_out()
        for name in ("paraphrase_prob", "counting_same_colour_prob"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise _err(name, f"must be a probability in [0, 1], got {value!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise _err("seed", f"must be an int >= 0, got {self.seed!r}")

    def _check_sizes(self) -> None:
        if not isinstance(self.resolution, int) or isinstance(self.resolution, bool) or self.resolution < 32:
            raise _err("resolution", f"must be an int >= 32 (e.g. 64 or 128), got {self.resolution!r}")
        if not isinstance(self.max_objects, int) or not 1 <= self.max_objects <= 4:
            raise _err("max_objects", f"must be an int in 1..4, got {self.max_objects!r}")
        if not isinstance(self.min_gap_px, int) or self.min_gap_px < 1:
            raise _err("min_gap_px", f"must be an int >= 1, got {self.min_gap_px!r}")
        size = tuple(self.object_size_px)
        if len(size) != 2 or not all(isinstance(v, int) for v in size) or not 8 <= size[0] <= size[1]:
            raise _err("object_size_px", f"must be (min, max) ints with 8 <= min <= max, got {self.object_size_px!r}")
        object.__setattr__(self, "object_size_px", size)
        side = math.ceil(math.sqrt(max(self.max_objects, 2)))
        if side * (size[1] + self.min_gap_px) + self.min_gap_px > self.resolution:
            raise _err("object_size_px", f"max {size[1]} px: {self.max_objects} objects with gap "
                       f"{self.min_gap_px} do not fit a {self.resolution} px image")
        if self.background not in ("plain", "textured"):
            raise _err("background", f"must be 'plain' or 'textured', got {self.background!r}")

    def _check_vocabulary(self) -> None:
        for name, allowed in (("shapes", SHAPES), ("colours", tuple(PALETTE))):
            values = (getattr(self, name),) if isinstance(getattr(self, name), str) else tuple(getattr(self, name))
            bad = [v for v in values if v not in allowed]
            if not values or bad or len(set(values)) != len(values):
                raise _err(name, f"must be a non-empty tuple of distinct names from {', '.join(allowed)}; "
                           f"got {values!r}" + (f" (unknown: {bad})" if bad else ""))
            object.__setattr__(self, name, values)

    def _check_task_weights(self) -> None:
        items = self.task_weights.items() if isinstance(self.task_weights, Mapping) else self.task_weights
        weights = dict.fromkeys(TASKS, 0.0)
        for task, weight in items:
            if task not in TASKS:
                raise _err("task_weights", f"unknown task {task!r}; allowed: {', '.join(TASKS)}")
            if not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
                raise _err("task_weights", f"weight of {task!r} must be finite and >= 0, got {weight!r}")
            weights[task] = float(weight)
        if sum(weights.values()) <= 0:
            raise _err("task_weights", "at least one task needs a positive weight")
        needs = {"two_object": 2, "position": 2, "color_attr": 2}
        for task, weight in weights.items():
            if weight > 0 and task in _TWO_PLUS and self.max_objects < 2:
                raise _err("task_weights", f"{task!r} needs max_objects >= 2 (got {self.max_objects})")
            if weight > 0 and len(self.shapes) < needs.get(task, 1):
                raise _err("task_weights", f"{task!r} needs >= 2 shapes (got {len(self.shapes)})")
            if weight > 0 and task == "color_attr" and len(self.colours) < 2:
                raise _err("task_weights", "'color_attr' needs >= 2 colours")
        object.__setattr__(self, "task_weights", tuple(weights.items()))

    def _check_held_out(self) -> None:
        pairs = tuple(tuple(p) for p in self.held_out_pairs)
        for pair in pairs:
            if len(pair) != 2 or pair[0] not in self.colours or pair[1] not in self.shapes:
                raise _err("held_out_pairs", f"{pair!r} is not a (colour, shape) pair of this world "
                           f"(colours {self.colours}, shapes {self.shapes})")
        for shape in self.shapes:
            if all((c, shape) in pairs for c in self.colours):
                raise _err("held_out_pairs", f"every colour of {shape!r} is held out; keep at least one")
        object.__setattr__(self, "held_out_pairs", pairs)
        prompts = (self.held_out_prompts,) if isinstance(self.held_out_prompts, str) else tuple(self.held_out_prompts)
        known = {s.prompt for s in _enumerate_specs(self)}
        unknown = [p for p in prompts if p not in known]
        if unknown:
            raise _err("held_out_prompts", f"not GenEval-template prompts of this world: {unknown[:3]} "
                       "(see enumerate_prompts(cfg, 'all'))")
        object.__setattr__(self, "held_out_prompts", prompts)
        weights = dict(self.task_weights)
        if not any(weights[t] > 0 and specs for t, specs in _split_specs(self, "train").items()):
            raise _err("held_out_prompts", "every prompt of the weighted tasks is held out; the train split is empty")

    @property
    def weights(self) -> dict[str, float]:
        """Task weights as a dict in TASKS order."""
        return dict(self.task_weights)


@dataclass(frozen=True)
class SceneObject:
    """One painted object."""

    shape: str  # class name, one of SHAPES
    colour: str  # colour name, one of PALETTE
    size: int  # nominal side in pixels (the tight box may be a pixel smaller)
    box: tuple[int, int, int, int]  # tight box (x0, y0, x1, y1) of the painted pixels, x1/y1 exclusive


@dataclass(frozen=True)
class Scene:
    """A caption, its GenEval metadata and the objects that satisfy it."""

    caption: str  # the text paired with the image (template or a paraphrase)
    prompt: str  # the GenEval-template prompt of the same content (equals caption unless paraphrased)
    tag: str  # GenEval task, one of TASKS
    metadata: dict[str, Any]  # GenEval record: tag, include, [exclude], prompt (= caption)
    objects: tuple[SceneObject, ...]  # every object in the image
    texture_seed: int = 0  # seeds the textured background


@dataclass(frozen=True)
class PromptSpec:
    """The content of one GenEval-template prompt."""

    tag: str  # GenEval task
    shapes: tuple[str, ...]  # classes in prompt order (position: (subject, reference))
    colours: tuple[str | None, ...]  # colour named per class, None where the prompt names none
    count: int = 1  # counting: the number of objects
    relation: str | None = None  # position: the subject's relation to the reference

    @property
    def prompt(self) -> str:
        """The GenEval-template prompt."""
        return "a photo of " + _phrases(self)[0]

    def metadata(self, prompt: str | None = None) -> dict[str, Any]:
        """The GenEval metadata record (same keys as evaluation_metadata.jsonl)."""
        s, c = self.shapes, self.colours
        if self.tag == "counting":
            return {"tag": self.tag, "include": [{"class": s[0], "count": self.count}],
                    "exclude": [{"class": s[0], "count": self.count + 1}], "prompt": prompt or self.prompt}
        if self.tag == "position":
            include = [{"class": s[1], "count": 1}, {"class": s[0], "count": 1, "position": [self.relation, 0]}]
        else:
            include = [{"class": k, "count": 1} | ({"color": col} if col else {}) for k, col in zip(s, c)]
        return {"tag": self.tag, "include": include, "prompt": prompt or self.prompt}

    def names_pair(self, pairs: Iterable[tuple[str, str]]) -> bool:
        """Whether the prompt names any of the (colour, shape) pairs."""
        named = {(c, s) for c, s in zip(self.colours, self.shapes) if c}
        return bool(named & set(pairs))


def _a(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _phrases(spec: PromptSpec, shared_colour: str | None = None) -> tuple[str, ...]:
    """Object phrases of a prompt; the first is GenEval's template, the rest paraphrases."""
    s, c = spec.shapes, spec.colours
    if spec.tag == "single_object":
        return (_a(s[0]), "one " + s[0])
    if spec.tag == "two_object":
        return (f"{_a(s[0])} and {_a(s[1])}", f"{_a(s[1])} and {_a(s[0])}")
    if spec.tag == "counting":
        word, plural = NUMBER_WORDS[spec.count], PLURALS[s[0]]
        extra = (f"{word} {shared_colour} {plural}",) if shared_colour else ()
        return (f"{word} {plural}", f"{spec.count} {plural}") + extra
    if spec.tag == "colors":
        return (_a(f"{c[0]} {s[0]}"), f"one {c[0]} {s[0]}", f"{_a(s[0])} that is {c[0]}")
    if spec.tag == "position":
        rel = spec.relation or ""
        verb = f"to the {rel}" if rel in ("left of", "right of") else f"placed {rel}"
        to_the = f"{_a(s[0])} {verb} {_a(s[1])}"
        return (f"{_a(s[0])} {rel} {_a(s[1])}", to_the, f"{_a(s[1])} {_INVERSE[rel]} {_a(s[0])}")
    first, second = _a(f"{c[0]} {s[0]}"), _a(f"{c[1]} {s[1]}")
    return (f"{first} and {second}", f"{second} and {first}")


def caption_variants(spec: PromptSpec, shared_colour: str | None = None) -> tuple[str, ...]:
    """Every caption of a prompt: the GenEval template first, then the paraphrases."""
    return tuple(prefix.format(p) for p in _phrases(spec, shared_colour) for prefix in _PREFIXES)


def _enumerate_specs(cfg: ShapesWorldConfig) -> list[PromptSpec]:
    """All distinct GenEval-template prompts of a world (every split), in a fixed order."""
    shapes, colours = cfg.shapes, cfg.colours
    ordered = [(a, b) for a in shapes for b in shapes if a != b]
    specs = [PromptSpec("single_object", (s,), (None,)) for s in shapes]
    if cfg.max_objects >= 2:
        specs += [PromptSpec("two_object", p, (None, None)) for p in ordered]
        specs += [PromptSpec("counting", (s,), (None,), count=n) for s in shapes for n in range(2, cfg.max_objects + 1)]
    specs += [PromptSpec("colors", (s,), (c,)) for s in shapes for c in colours]
    if cfg.max_objects >= 2:
        specs += [PromptSpec("position", p, (None, None), relation=r) for p in ordered for r in RELATIONS]
        specs += [PromptSpec("color_attr", p, (c1, c2))
                  for p in ordered for c1 in colours for c2 in colours if c1 != c2]
    return specs


def _is_held_out(spec: PromptSpec, cfg: ShapesWorldConfig) -> bool:
    return spec.prompt in cfg.held_out_prompts or spec.names_pair(cfg.held_out_pairs)


def _split_specs(cfg: ShapesWorldConfig, split: str) -> dict[str, tuple[PromptSpec, ...]]:
    """Prompts of a split, per task (train: not held out; heldout: only held out; all: every one)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    keep = {"train": lambda s: not _is_held_out(s, cfg), "heldout": lambda s: _is_held_out(s, cfg),
            "all": lambda s: True}[split]
    specs = [s for s in _enumerate_specs(cfg) if keep(s)]
    return {task: tuple(s for s in specs if s.tag == task) for task in TASKS}


@functools.lru_cache(maxsize=64)
def _catalogue(cfg: ShapesWorldConfig, split: str
               ) -> tuple[tuple[str, ...], np.ndarray, dict[str, tuple[PromptSpec, ...]]]:
    """Cached (tasks, probabilities, prompts per task) of a split; tasks without prompts dropped."""
    specs = _split_specs(cfg, split)
    weights = cfg.weights
    tasks = tuple(t for t in TASKS if weights[t] > 0 and specs[t])
    if not tasks:
        raise ValueError(f"split {split!r} has no prompts for the weighted tasks of this world "
                         "(set held_out_pairs or held_out_prompts for a heldout split)")
    probs = np.array([weights[t] for t in tasks])
    return tasks, probs / probs.sum(), specs


def enumerate_prompts(cfg: ShapesWorldConfig, split: str = "all") -> list[dict[str, Any]]:
    """GenEval metadata records of every distinct template prompt of a split, in a fixed order."""
    return [spec.metadata() for task_specs in _split_specs(cfg, split).values() for spec in task_specs]


def describe(cfg: ShapesWorldConfig) -> dict[str, dict[str, int]]:
    """Distinct template captions per task for each split, and distinct train captions with paraphrases."""
    out: dict[str, dict[str, int]] = {}
    for split in SPLITS:
        counts = {t: len(v) for t, v in _split_specs(cfg, split).items()}
        out[split] = counts | {"total": sum(counts.values())}
    phrased: dict[str, int] = {}
    for task, specs in _split_specs(cfg, "train").items():
        texts: set[str] = set()
        for spec in specs:
            shared = [None] + ([c for c in _free_colours(spec.shapes[0], cfg)] if task == "counting" else [])
            for colour in shared:
                texts.update(caption_variants(spec, colour))
        phrased[task] = len(texts)
    out["train_phrasings"] = phrased | {"total": sum(phrased.values())}
    return out


# ----------------------------------------------------------------------------- geometry

def _polygon_inside(verts: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Even-odd point-in-polygon test, vectorised over (broadcast) points."""
    x, y = np.broadcast_arrays(x, y)
    inside = np.zeros(x.shape, dtype=bool)
    for (x1, y1), (x2, y2) in zip(verts, np.roll(verts, -1, axis=0)):
        if y1 == y2:
            continue
        crosses = (y1 > y) != (y2 > y)
        x_cross = x1 + (y - y1) * (x2 - x1) / (y2 - y1)
        inside ^= crosses & (x < x_cross)
    return inside


def _star_vertices(points: int = 5, inner: float = _STAR_INNER) -> np.ndarray:
    angles = -np.pi / 2 + np.arange(2 * points) * np.pi / points
    radii = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    v = np.stack([np.cos(angles) * radii, np.sin(angles) * radii], axis=1)
    return (v - v.min(0)) / (v.max(0) - v.min(0))  # stretched to fill the unit box


def _unit_polygon(shape: str) -> np.ndarray:
    lo, hi = (1 - _CROSS_ARM) / 2, (1 + _CROSS_ARM) / 2
    return {
        "square": np.array([[0, 0], [1, 0], [1, 1], [0, 1]], float),
        "triangle": np.array([[0.5, 0], [1, 1], [0, 1]], float),
        "diamond": np.array([[0.5, 0], [1, 0.5], [0.5, 1], [0, 0.5]], float),
        "star": _star_vertices(),
        "cross": np.array([[lo, 0], [hi, 0], [hi, lo], [1, lo], [1, hi], [hi, hi], [hi, 1], [lo, 1],
                           [lo, hi], [0, hi], [0, lo], [lo, lo]], float),
    }[shape]


def unit_shape_inside(shape: str, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Whether points (x, y) of the unit box [0, 1]^2 (y down) lie inside the shape."""
    if shape == "circle":
        return (x - 0.5) ** 2 + (y - 0.5) ** 2 <= 0.25
    return _polygon_inside(_unit_polygon(shape), x, y)


@functools.lru_cache(maxsize=4096)
def shape_coverage(shape: str, height: int, width: int, oversample: int = 4) -> np.ndarray:
    """Fraction of each pixel of a (height, width) box covered by the shape stretched to fill it."""
    k = oversample
    ys = (np.arange(height * k) + 0.5) / (height * k)
    xs = (np.arange(width * k) + 0.5) / (width * k)
    inside: np.ndarray = unit_shape_inside(shape, xs[None, :], ys[:, None]).astype(np.float32)
    cov = inside.reshape(height, k, width, k).mean(axis=(1, 3))
    cov.setflags(write=False)
    return cov


@functools.lru_cache(maxsize=1024)
def object_mask(shape: str, size: int) -> np.ndarray:
    """Painted pixels of a shape of nominal side `size` (coverage >= 1/2), cropped to its tight box."""
    mask = shape_coverage(shape, size, size) >= 0.5
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    mask = np.ascontiguousarray(mask[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1])
    mask.setflags(write=False)
    return mask


def geneval_relations(box_a: Sequence[float], box_b: Sequence[float],
                      threshold: float = GENEVAL_POSITION_THRESHOLD) -> set[str]:
    """Relations of box A to box B by GenEval's rule: centre offset less threshold x summed sizes."""
    a, b = np.asarray(box_a[:4], float), np.asarray(box_b[:4], float)
    offset = (a[:2] + a[2:]) / 2 - (b[:2] + b[2:]) / 2
    dims = (a[2:] - a[:2]) + (b[2:] - b[:2])
    revised = np.maximum(np.abs(offset) - threshold * dims, 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    rels = {"left of": dx < -0.5, "right of": dx > 0.5, "above": dy < -0.5, "below": dy > 0.5}
    return {r for r, holds in rels.items() if holds}


def relation_is_clear(box_a: Sequence[float], box_b: Sequence[float], relation: str) -> bool:
    """A holds `relation` to B with 2.5x GenEval's margin, and no other relation at zero margin."""
    return relation in geneval_relations(box_a, box_b, 2.5 * GENEVAL_POSITION_THRESHOLD) and \
        geneval_relations(box_a, box_b, 0.0) == {relation}


# ----------------------------------------------------------------------------- sampling

def _free_colours(shape: str, cfg: ShapesWorldConfig) -> list[str]:
    """Colours a shape may take where the prompt names none (never a held-out pair)."""
    return [c for c in cfg.colours if (c, shape) not in cfg.held_out_pairs]


def _objects_for(spec: PromptSpec, rng: np.random.Generator,
                 cfg: ShapesWorldConfig) -> tuple[list[tuple[str, str]], str | None]:
    """(shape, colour) of every object a prompt asks for, and the shared colour of a counting scene."""
    def pick(shape: str, colour: str | None) -> str:
        free = _free_colours(shape, cfg)
        return colour or free[int(rng.integers(len(free)))]

    if spec.tag == "counting":
        shape = spec.shapes[0]
        if rng.random() < cfg.counting_same_colour_prob:
            colour = pick(shape, None)
            return [(shape, colour)] * spec.count, colour
        return [(shape, pick(shape, None)) for _ in range(spec.count)], None
    return [(s, pick(s, c)) for s, c in zip(spec.shapes, spec.colours)], None


def _overlaps(box: tuple[int, int, int, int], boxes: list[tuple[int, int, int, int]], gap: int) -> bool:
    x0, y0, x1, y1 = box
    return any(x0 < b[2] + gap and b[0] < x1 + gap and y0 < b[3] + gap and b[1] < y1 + gap for b in boxes)


def _random_layout(rng: np.random.Generator, dims: list[tuple[int, int]],
                   cfg: ShapesWorldConfig) -> list[tuple[int, int, int, int]] | None:
    """Boxes placed one by one at random positions without overlap, or None if one did not fit."""
    res, gap = cfg.resolution, cfg.min_gap_px
    boxes: list[tuple[int, int, int, int]] = []
    for h, w in dims:
        for _ in range(30):
            x0 = int(rng.integers(gap, res - gap - w + 1))
            y0 = int(rng.integers(gap, res - gap - h + 1))
            box = (x0, y0, x0 + w, y0 + h)
            if not _overlaps(box, boxes, gap):
                boxes.append(box)
                break
        else:
            return None
    return boxes


def _grid_layout(rng: np.random.Generator, dims: list[tuple[int, int]], cfg: ShapesWorldConfig,
                 relation: str | None) -> list[tuple[int, int, int, int]]:
    """Fallback: objects centred in random cells of a 2x2 grid (position: along the relation's axis).

    Each cell keeps `min_gap_px` free on its far side; config validation guarantees the fit.
    """
    gap = cfg.min_gap_px
    cell = (cfg.resolution - gap) / 2
    cells: list[tuple[float, float]] = [[(0, 0), (1, 0), (0, 1), (1, 1)][i] for i in rng.permutation(4)]
    if relation is not None:  # subject first, reference second, across the image centre
        by_relation: dict[str, list[tuple[float, float]]] = {
            "left of": [(0, .5), (1, .5)], "right of": [(1, .5), (0, .5)],
            "above": [(.5, 0), (.5, 1)], "below": [(.5, 1), (.5, 0)]}
        cells = by_relation[relation]
    boxes: list[tuple[int, int, int, int]] = []
    for (h, w), (cx, cy) in zip(dims, cells):
        x0 = int(gap + cx * cell + (cell - gap - w) / 2)
        y0 = int(gap + cy * cell + (cell - gap - h) / 2)
        boxes.append((x0, y0, x0 + w, y0 + h))
    return boxes


def _layout(rng: np.random.Generator, dims: list[tuple[int, int]], cfg: ShapesWorldConfig,
            relation: str | None) -> list[tuple[int, int, int, int]]:
    """Non-overlapping in-bounds boxes; for position prompts box 0 holds `relation` to box 1."""
    for _ in range(200):
        boxes = _random_layout(rng, dims, cfg)
        if boxes is not None and (relation is None or relation_is_clear(boxes[0], boxes[1], relation)):
            return boxes
    return _grid_layout(rng, dims, cfg, relation)


def _choose_caption(spec: PromptSpec, shared: str | None, rng: np.random.Generator,
                    cfg: ShapesWorldConfig, phrasing: str) -> str:
    variants = caption_variants(spec, shared)
    if phrasing == "varied" and rng.random() < cfg.paraphrase_prob:
        return variants[1 + int(rng.integers(len(variants) - 1))]
    return variants[0]


def sample_scene(rng: np.random.Generator | int, cfg: ShapesWorldConfig, split: str = "train",
                 phrasing: str | None = None) -> Scene:
    """Draw one scene of a split: a task by weight, a prompt of it uniformly, then a layout.

    phrasing: "template" (GenEval's) or "varied" (paraphrases with prob. cfg.paraphrase_prob);
    default "varied" for the train split and "template" otherwise.
    """
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    phrasing = phrasing or ("varied" if split == "train" else "template")
    if phrasing not in ("varied", "template"):
        raise ValueError(f"phrasing must be 'varied' or 'template', got {phrasing!r}")
    tasks, probs, specs = _catalogue(cfg, split)
    task = tasks[int(rng.choice(len(tasks), p=probs))]
    spec = specs[task][int(rng.integers(len(specs[task])))]
    wanted, shared = _objects_for(spec, rng, cfg)
    lo, hi = cfg.object_size_px
    sizes = [int(rng.integers(lo, hi + 1)) for _ in wanted]
    dims = [object_mask(s, n).shape for (s, _), n in zip(wanted, sizes)]
    boxes = _layout(rng, dims, cfg, spec.relation)
    objects = tuple(SceneObject(s, c, n, b) for (s, c), n, b in zip(wanted, sizes, boxes))
    caption = _choose_caption(spec, shared, rng, cfg, phrasing)
    return Scene(caption=caption, prompt=spec.prompt, tag=spec.tag, metadata=spec.metadata(caption),
                 objects=objects, texture_seed=int(rng.integers(2**31)))


# ----------------------------------------------------------------------------- rendering

def _background(cfg: ShapesWorldConfig, texture_seed: int) -> np.ndarray:
    """(H, W, 3) uint8 background: flat grey, or grey with a mild gradient and fine noise."""
    res = cfg.resolution
    if cfg.background == "plain":
        return np.broadcast_to(np.array(BACKGROUND_RGB, np.uint8), (res, res, 3))
    rng = np.random.default_rng(texture_seed)
    angle, amplitude = rng.uniform(0, 2 * np.pi), rng.uniform(-6.0, 6.0)
    coords = (np.arange(res) - (res - 1) / 2) / (res / 2)
    ramp = amplitude * (np.cos(angle) * coords[None, :] + np.sin(angle) * coords[:, None])
    grey = BACKGROUND_RGB[0] + ramp + rng.normal(0.0, 2.0, (res, res))
    return np.repeat(np.clip(np.rint(grey), 0, 255).astype(np.uint8)[..., None], 3, axis=2)


def paint_scene(out: np.ndarray, scene: Scene, cfg: ShapesWorldConfig) -> np.ndarray:
    """Render a scene into `out` ((H, W, 3) uint8, overwritten) and return it."""
    out[...] = _background(cfg, scene.texture_seed)
    for obj in scene.objects:
        x0, y0, x1, y1 = obj.box
        out[y0:y1, x0:x1][object_mask(obj.shape, obj.size)] = PALETTE[obj.colour]
    return out


def render_array(scene: Scene, cfg: ShapesWorldConfig) -> np.ndarray:
    """Render a scene to an (H, W, 3) uint8 array."""
    return paint_scene(np.empty((cfg.resolution, cfg.resolution, 3), np.uint8), scene, cfg)


def render_scene(scene: Scene, cfg: ShapesWorldConfig) -> Image.Image:
    """Render a scene to an RGB PIL image."""
    return Image.fromarray(render_array(scene, cfg), mode="RGB")


@dataclass(frozen=True)
class ShapesWorld:
    """Indexed access to a world: sample i of a split depends only on (cfg, split, i)."""

    cfg: ShapesWorldConfig = field(default_factory=ShapesWorldConfig)  # the world

    def rng(self, index: int, split: str = "train") -> np.random.Generator:
        """The generator of sample `index` of `split`, seeded by (cfg.seed, split, index)."""
        if split not in _SPLIT_CODE:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        return np.random.default_rng([self.cfg.seed, _SPLIT_CODE[split], int(index)])

    def sample(self, index: int, split: str = "train", phrasing: str | None = None) -> Scene:
        """Scene `index` of `split` (see sample_scene for phrasing)."""
        return sample_scene(self.rng(index, split), self.cfg, split, phrasing)

    def image(self, index: int, split: str = "train") -> tuple[Image.Image, Scene]:
        """Rendered image and scene of sample `index`."""
        scene = self.sample(index, split)
        return render_scene(scene, self.cfg), scene

    def batch(self, indices: Iterable[int], split: str = "train",
              phrasing: str | None = None) -> tuple[np.ndarray, list[Scene]]:
        """(N, H, W, 3) uint8 images and their scenes for the given sample indices."""
        indices = list(indices)
        res = self.cfg.resolution
        images: np.ndarray = np.empty((len(indices), res, res, 3), np.uint8)
        scenes = [self.sample(i, split, phrasing) for i in indices]
        for out, scene in zip(images, scenes):
            paint_scene(out, scene, self.cfg)
        return images, scenes
