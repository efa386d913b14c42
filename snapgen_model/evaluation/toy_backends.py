"""Toy-world stand-ins for the benchmark models: the exact scene parser as GenEval's detector and
colour classifier, an oracle yes/no VQA for DPG-Bench, DPG-style question graphs for shapes-world
prompts, and scenes drawn to satisfy a given prompt (the "clean render" reference).

The rule code (`geneval.py`, `dpg.py`) is the same for the toy world and the real benchmarks; only
these backends differ (DESIGN.md stage 5).
"""
from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from snapgen_model.data.shapes import (
    NUMBER_WORDS,
    PLURALS,
    Scene,
    SceneObject,
    ShapesWorldConfig,
    object_mask,
    relation_is_clear,
)
from snapgen_model.evaluation.dpg import DPGQuestion
from snapgen_model.evaluation.geneval import Detection, Detections, GenEvalBackend, relative_position
from snapgen_model.evaluation.scene_parser import SceneParserConfig, parse_scene

_TUPLE_RE = re.compile(r"^(?P<category>[^(]+)\((?P<args>.*)\)\s*$")


# ----------------------------------------------------------------------------- GenEval backend

@dataclass(frozen=True)
class SceneParserDetector:
    """The exact scene parser as a GenEval detector; each detection carries its parsed colour."""

    world: ShapesWorldConfig  # the world whose shapes are the classes
    parser: SceneParserConfig = field(default_factory=SceneParserConfig)  # parser tuning
    name: str = "scene-parser"

    def detect(self, image: Image.Image) -> Detections:
        found: Detections = {}
        for obj in parse_scene(image, self.world, self.parser):
            x0, y0, x1, y1 = map(float, obj.box)
            found.setdefault(obj.shape, []).append(Detection((x0, y0, x1, y1), obj.confidence, colour=obj.colour))
        return found


@dataclass(frozen=True)
class ParsedColours:
    """Colour classifier that reads the colour the scene parser attached to each detection."""

    name: str = "parsed-colour"

    def classify(self, image: Image.Image, detections: Sequence[Detection], classname: str) -> list[str]:
        if any(d.colour is None for d in detections):
            raise ValueError("ParsedColours needs detections with a colour (use the scene-parser detector)")
        return [str(d.colour) for d in detections]


def scene_parser_backend(world: ShapesWorldConfig, parser: SceneParserConfig | None = None) -> GenEvalBackend:
    """GenEval backend of the toy world: scene parser for boxes and colours."""
    return GenEvalBackend(SceneParserDetector(world, parser or SceneParserConfig()), ParsedColours())


# ----------------------------------------------------------------------------- DPG questions

def _plural(shape: str) -> str:
    return PLURALS.get(shape, shape + "s")


def _prompt_objects(metadata: Mapping[str, Any]) -> list[tuple[str, str | None, int]]:
    """(shape, colour or None, count) per include clause."""
    return [(r["class"], r.get("color"), int(r["count"])) for r in metadata.get("include", [])]


def toy_questions(item_id: str, metadata: Mapping[str, Any]) -> list[DPGQuestion]:
    """A DPG-style question graph for one shapes-world prompt: an entity question per object,
    colour and count questions depending on it, a spatial relation depending on both entities."""
    rows: list[tuple[tuple[int, ...], str, str, str, str]] = []  # deps, L1, L2, tuple, question
    entity_ids: dict[str, int] = {}
    for shape, colour, count in _prompt_objects(metadata):
        if shape not in entity_ids:
            rows.append(((0,), "entity", "whole", f"entity - whole ({shape})", f"Is there a {shape}?"))
            entity_ids[shape] = len(rows)
        parent = (entity_ids[shape],)
        if colour:
            rows.append((parent, "attribute", "color", f"attribute - color ({shape}, {colour})",
                         f"Is the {shape} {colour}?"))
        if metadata["tag"] == "counting":
            word = NUMBER_WORDS.get(count, str(count))
            rows.append((parent, "other", "count", f"other - count ({shape}, =={count})",
                         f"Are there {word} {_plural(shape)}?"))
    for req in metadata.get("include", []):
        if "position" in req:
            relation, target = req["position"]
            ref = metadata["include"][target]["class"]
            rows.append(((entity_ids[req["class"]], entity_ids[ref]), "relation", "spatial",
                         f"relation - spatial ({req['class']}, {ref}, {relation})",
                         f"Is the {req['class']} {relation} the {ref}?"))
    return [DPGQuestion(item_id=item_id, proposition_id=i, dependency=deps, question=question, tuple=tup,
                        category_broad=l1, category_detailed=f"{l1} - {l2}", text=metadata["prompt"],
                        keywords=metadata["tag"])
            for i, (deps, l1, l2, tup, question) in enumerate(rows, start=1)]


def parse_tuple(text: str) -> tuple[str, list[str]]:
    """("attribute - color", ["circle", "red"]) from "attribute - color (circle, red)"."""
    match = _TUPLE_RE.match(text.strip())
    if not match:
        raise ValueError(f"not a DPG proposition tuple: {text!r}")
    return match["category"].strip(), [a.strip() for a in match["args"].split(",")]


class OracleVQA:
    """Yes/no answers read off the scene parser's objects (toy DPG-Bench): entity, colour, count
    and spatial-relation propositions; detections above `threshold` count as present."""

    name = "oracle-vqa"

    def __init__(self, world: ShapesWorldConfig, threshold: float = 0.3, position_threshold: float = 0.1) -> None:
        self.world = world  # the world of the images
        self.threshold = threshold  # detection confidence needed (strictly above), as GenEval's
        self.position_threshold = position_threshold  # relation margin, as GenEval's
        self._last: tuple[bytes, list] = (b"", [])  # parse of the last image (questions come per tile)

    def _objects(self, image: Image.Image) -> list:
        key = image.tobytes() + repr(image.size).encode()
        if key != self._last[0]:
            self._last = (key, [o for o in parse_scene(image, self.world) if o.confidence > self.threshold])
        return self._last[1]

    def answer(self, image: Image.Image, question: DPGQuestion) -> str:
        objects = self._objects(image)
        category, args = parse_tuple(question.tuple)
        of = {s: [o for o in objects if o.shape == s] for s in {o.shape for o in objects}}
        if category == "entity - whole":
            ok = bool(of.get(args[0]))
        elif category == "attribute - color":
            ok = any(o.colour == args[1] for o in of.get(args[0], []))
        elif category == "other - count":
            ok = len(of.get(args[0], [])) == int(args[1].lstrip("="))
        elif category == "relation - spatial":
            ok = any(args[2] in relative_position(a.box, b.box, self.position_threshold)
                     for a in of.get(args[0], []) for b in of.get(args[1], []))
        else:
            raise ValueError(f"OracleVQA: unsupported proposition category {category!r} ({question.tuple})")
        return "yes" if ok else "no"


# ----------------------------------------------------------------------------- scenes for a prompt

def _wanted_objects(metadata: Mapping[str, Any], cfg: ShapesWorldConfig,
                    rng: np.random.Generator) -> list[tuple[str, str]]:
    """(shape, colour) of each object the prompt asks for; unnamed colours drawn from the world."""
    def colour_for(shape: str, named: str | None) -> str:
        free = [c for c in cfg.colours if (c, shape) not in cfg.held_out_pairs]
        return named or free[int(rng.integers(len(free)))]
    return [(shape, colour_for(shape, colour)) for shape, colour, count in _prompt_objects(metadata)
            for _ in range(count)]


def _random_boxes(dims: Sequence[tuple[int, int]], cfg: ShapesWorldConfig,
                  rng: np.random.Generator) -> list[tuple[int, int, int, int]]:
    """Boxes at random positions, dropped at the first overlap (the caller retries)."""
    res, gap = cfg.resolution, cfg.min_gap_px
    boxes: list[tuple[int, int, int, int]] = []
    for h, w in dims:
        x0, y0 = int(rng.integers(gap, res - gap - w + 1)), int(rng.integers(gap, res - gap - h + 1))
        if any(x0 < b[2] + gap and b[0] < x0 + w + gap and y0 < b[3] + gap and b[1] < y0 + h + gap for b in boxes):
            break
        boxes.append((x0, y0, x0 + w, y0 + h))
    return boxes


def _grid_boxes(dims: Sequence[tuple[int, int]], cfg: ShapesWorldConfig,
                rng: np.random.Generator) -> list[tuple[int, int, int, int]]:
    """Fallback for crowded scenes: one object per random cell of a 2x2 grid, jittered inside it."""
    gap, cell = cfg.min_gap_px, (cfg.resolution - cfg.min_gap_px) // 2
    boxes = []
    for (h, w), c in zip(dims, rng.permutation(4)):
        x0 = gap + (c % 2) * cell + int(rng.integers(0, max(1, cell - gap - w + 1)))
        y0 = gap + (c // 2) * cell + int(rng.integers(0, max(1, cell - gap - h + 1)))
        boxes.append((x0, y0, x0 + w, y0 + h))
    return boxes


def _place(dims: Sequence[tuple[int, int]], cfg: ShapesWorldConfig, rng: np.random.Generator,
           relation: tuple[str, int, int] | None) -> list[tuple[int, int, int, int]]:
    """Non-overlapping boxes; `relation` (name, subject, reference) must hold clearly."""
    for attempt in range(400):
        boxes = _random_boxes(dims, cfg, rng) if attempt < 200 else _grid_boxes(dims, cfg, rng)
        if len(boxes) == len(dims) and (relation is None or
                                        relation_is_clear(boxes[relation[1]], boxes[relation[2]], relation[0])):
            return boxes
    raise RuntimeError(f"could not lay out {len(dims)} objects in a {cfg.resolution} px image")


def scene_for_prompt(metadata: Mapping[str, Any], cfg: ShapesWorldConfig, rng: np.random.Generator) -> Scene:
    """A scene that satisfies a shapes-world GenEval prompt exactly (no extra objects)."""
    wanted = _wanted_objects(metadata, cfg, rng)
    lo, hi = cfg.object_size_px
    sizes = [int(rng.integers(lo, hi + 1)) for _ in wanted]
    dims = [object_mask(shape, size).shape for (shape, _), size in zip(wanted, sizes)]
    relation = None
    for i, req in enumerate(metadata.get("include", [])):
        if "position" in req:
            relation = (req["position"][0], i, int(req["position"][1]))  # one object per clause here
    boxes = _place(dims, cfg, rng, relation)
    objects = tuple(SceneObject(s, c, n, b) for (s, c), n, b in zip(wanted, sizes, boxes))
    return Scene(caption=metadata["prompt"], prompt=metadata["prompt"], tag=metadata["tag"],
                 metadata=dict(metadata), objects=objects, texture_seed=int(rng.integers(2**31)))
