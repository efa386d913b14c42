"""GenEval scoring with the benchmark's own clause rules and pluggable detector / colour backends.

Re-implements the rules of GenEval's `evaluation/evaluate_images.py` and `summary_scores.py`
(djghosh13/geneval; SNAPGEN_SPEC.md section 8), in our own code:

* detections per class are kept when their score is *strictly* above 0.3 (0.9 for `counting`
  prompts), most confident first, at most 16 per class, with optional greedy NMS (off by default);
* `include` clauses are ANDed: the first `count` detections of the class must exist, have the
  clause's colour (all of them) and hold the clause's relative position to every object of the
  target clause's group (box-centre offset less 0.1 x summed box sizes);
* `exclude` clauses are ORed: `count` or more detections of the class fail the image;
* one JSON line per image (filename, tag, prompt, correct, reason, metadata, details) in
  `results.jsonl`; the summary is the per-task mean of `correct`, overall = mean of the task means.

Images live in GenEval's folder layout: `<root>/<index:05d>/metadata.jsonl` (one JSON object) and
`<root>/<index:05d>/samples/<n:04d>.png`, so GenEval's own scripts read our folders and results.

Beside the official score, `summarize` reports an exact-object-count diagnostic (TOY_CALIBRATION
pitfalls): an image passes it when it is correct *and* holds no detection beyond the objects the
prompt asks for (single_object and two_object have no "no extra objects" clause).
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image, ImageOps

from snapgen_model.data.shapes import geneval_relations
from snapgen_model.evaluation import atomic

from snapgen_model.config_base import ConfigBase, check

COLORS: tuple[str, ...] = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
GENEVAL_TASKS: tuple[str, ...] = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
RESULT_FIELDS: tuple[str, ...] = ("filename", "tag", "prompt", "correct", "reason", "metadata", "details")
_SAMPLE_RE = re.compile(r"\d+\.png")


@dataclass(frozen=True, kw_only=True)
class GenEvalConfig(ConfigBase):
    """GenEval's scoring options (the defaults are the official ones)."""

    threshold: float = 0.3  # keep detections with score > threshold
    counting_threshold: float = 0.9  # the same for prompts tagged "counting"
    max_objects: int = 16  # most detections kept per class
    nms_threshold: float = 1.0  # drop a detection overlapping a kept one at IoU >= this (1 = no NMS)
    position_threshold: float = 0.1  # relative-position margin, as a fraction of the summed box sizes

    def __post_init__(self) -> None:
        for name in ("threshold", "counting_threshold", "nms_threshold"):
            value = getattr(self, name)
            check(0.0 <= value <= 1.0, f"GenEvalConfig.{name}", f"must be in [0, 1], got {value}")
        check(self.max_objects >= 1, "GenEvalConfig.max_objects", f"must be >= 1, got {self.max_objects}")
        check(0.0 <= self.position_threshold < 0.5, "GenEvalConfig.position_threshold",
              f"must be in [0, 0.5), got {self.position_threshold}")


@dataclass(frozen=True)
class Detection:
    """One detected object of a class."""

    box: tuple[float, float, float, float]  # (x0, y0, x1, y1) in pixels
    score: float  # detector confidence in [0, 1]
    mask: np.ndarray | None = None  # (H, W) bool instance mask, if the detector gives one
    colour: str | None = None  # colour name, when the detector already knows it (scene parser)


Detections = dict[str, list[Detection]]


class Detector(Protocol):
    """Finds objects: class name -> every detection (unthresholded; the rules threshold)."""

    @property
    def name(self) -> str: ...

    def detect(self, image: Image.Image) -> Detections: ...


class ColourClassifier(Protocol):
    """Names the colour (one of COLORS) of each detection of `classname` in `image`."""

    @property
    def name(self) -> str: ...

    def classify(self, image: Image.Image, detections: Sequence[Detection], classname: str) -> list[str]: ...


@dataclass(frozen=True)
class GenEvalBackend:
    """The pair of models GenEval scores with."""

    detector: Detector  # the object detector (Mask2Former; the scene parser in the toy world)
    colours: ColourClassifier  # the colour classifier (CLIP zero-shot; the scene parser's colours)

    @property
    def name(self) -> str:
        return f"{self.detector.name}+{self.colours.name}"


# ----------------------------------------------------------------------------- rules

def box_iou_inclusive(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU with GenEval's inclusive pixel convention (areas use x1 - x0 + 1), used by its NMS."""
    def area(box: Sequence[float]) -> float:
        return max(box[2] - box[0] + 1, 0) * max(box[3] - box[1] + 1, 0)
    inter = area([max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])])
    union = area(a) + area(b) - inter
    return inter / union if union else 0.0


def filter_detections(raw: Mapping[str, Sequence[Detection]], tag: str, cfg: GenEvalConfig) -> Detections:
    """Threshold (strict >), sort by score, cap per class, greedy NMS: GenEval's kept detections."""
    threshold = cfg.counting_threshold if tag == "counting" else cfg.threshold
    kept: Detections = {}
    for classname, dets in raw.items():
        order = sorted((d for d in dets if d.score > threshold), key=lambda d: -d.score)[:cfg.max_objects]
        chosen: list[Detection] = []
        while order:
            best = order.pop(0)
            chosen.append(best)
            if cfg.nms_threshold < 1.0:
                order = [d for d in order if box_iou_inclusive(best.box, d.box) < cfg.nms_threshold]
        if chosen:
            kept[classname] = chosen
    return kept


def relative_position(box_a: Sequence[float], box_b: Sequence[float], threshold: float = 0.1) -> set[str]:
    """Relations of A to B by GenEval's rule: centre offset shrunk by threshold x (size A + size B) per
    axis, then the direction of what is left must be mostly (> 0.5 of the offset's norm) along an axis.
    One implementation serves the generator and the scorer (`snapgen_model.data.shapes`)."""
    return geneval_relations(box_a, box_b, threshold)


def _colour_clause(image: Image.Image, found: list[Detection], req: Mapping[str, Any],
                   colours: ColourClassifier) -> str | None:
    """Failure reason of a colour clause, or None when enough found objects have the colour."""
    named = colours.classify(image, found, req["class"])
    wanted, count = req["color"], req["count"]
    if named.count(wanted) >= count:
        return None
    others = ", ".join(f"{named.count(c)} {c}" for c in COLORS if c in named)
    return f"expected {wanted} {req['class']}>={count}, found {named.count(wanted)} {wanted}; and {others}"


def _position_clause(found: list[Detection], req: Mapping[str, Any], groups: list[list[Detection] | None],
                     threshold: float) -> str | None:
    """Failure reason of a position clause: every found object must hold the relation to every
    object of the target group (an earlier include clause that matched)."""
    relation, target = req["position"]
    if target >= len(groups) or groups[target] is None:
        return f"no target for {req['class']} to be {relation}"
    for obj in found:
        for other in groups[target]:
            held = relative_position(obj.box, other.box, threshold)
            if relation not in held:
                return f"expected {req['class']} {relation} target, found {' and '.join(sorted(held))} target"
    return None


def evaluate_metadata(image: Image.Image, detected: Detections, metadata: Mapping[str, Any],
                      colours: ColourClassifier, cfg: GenEvalConfig) -> tuple[bool, str]:
    """GenEval's clause rules on kept detections: (correct, reasons joined by newlines)."""
    reasons: list[str] = []
    groups: list[list[Detection] | None] = []
    for req in metadata.get("include", []):
        found = detected.get(req["class"], [])[:req["count"]]
        failure = None
        if len(found) < req["count"]:
            failure = f"expected {req['class']}>={req['count']}, found {len(found)}"
        else:
            if "color" in req:
                failure = _colour_clause(image, found, req, colours)
            if "position" in req and failure is None:
                failure = _position_clause(found, req, groups, cfg.position_threshold)
        if failure:
            reasons.append(failure)
        groups.append(None if failure else found)
    for req in metadata.get("exclude", []):
        have = len(detected.get(req["class"], []))
        if have >= req["count"]:
            reasons.append(f"expected {req['class']}<{req['count']}, found {have}")
    return not reasons, "\n".join(reasons)


def score_pil(image: Image.Image, metadata: Mapping[str, Any], backend: GenEvalBackend,
              cfg: GenEvalConfig | None = None, filename: str = "") -> dict[str, Any]:
    """One `results.jsonl` row (GenEval's fields, JSON-encoded where it does) for an RGB image."""
    cfg = cfg or GenEvalConfig()
    detected = filter_detections(backend.detector.detect(image), metadata["tag"], cfg)
    correct, reason = evaluate_metadata(image, detected, metadata, backend.colours, cfg)
    details = {k: [[*map(float, d.box), float(d.score)] for d in v] for k, v in detected.items()}
    return {"filename": filename, "tag": metadata["tag"], "prompt": metadata["prompt"], "correct": bool(correct),
            "reason": reason, "metadata": json.dumps(dict(metadata)), "details": json.dumps(details)}


def score_image(path: str | os.PathLike, metadata: Mapping[str, Any], backend: GenEvalBackend,
                cfg: GenEvalConfig | None = None) -> dict[str, Any]:
    """The row of the image file at `path` (EXIF orientation applied, as GenEval does)."""
    with Image.open(path) as raw:
        image = ImageOps.exif_transpose(raw).convert("RGB")
    return score_pil(image, metadata, backend, cfg, filename=str(path))


# ----------------------------------------------------------------------------- folder layout

def prompt_folder(root: str | os.PathLike, index: int) -> Path:
    """`<root>/<index:05d>`: one prompt's folder."""
    return Path(root) / f"{index:05d}"


def sample_path(root: str | os.PathLike, index: int, sample: int) -> Path:
    """`<root>/<index:05d>/samples/<sample:04d>.png`."""
    return prompt_folder(root, index) / "samples" / f"{sample:04d}.png"


def write_metadata(root: str | os.PathLike, index: int, metadata: Mapping[str, Any]) -> Path:
    """Write `<index>/metadata.jsonl` (one JSON object, as GenEval's generation script does)."""
    return atomic.write_text(prompt_folder(root, index) / "metadata.jsonl", json.dumps(dict(metadata)))


def write_samples(root: str | os.PathLike, index: int, images: np.ndarray, start: int = 0) -> list[Path]:
    """Save (N, H, W, 3) uint8 images as `<index>/samples/NNNN.png` (atomic per file)."""
    paths = []
    for n, image in enumerate(np.asarray(images), start=start):
        paths.append(atomic.save_image(Image.fromarray(image), sample_path(root, index, n)))
    return paths


def iter_prompt_folders(root: str | os.PathLike) -> Iterator[tuple[int, dict[str, Any], list[Path]]]:
    """(index, metadata, sample paths) of every `<digits>/` folder, like GenEval's evaluator walks it."""
    root = Path(root)
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and p.name.isdigit()):
        metadata = json.loads((folder / "metadata.jsonl").read_text())
        samples = folder / "samples"
        paths = sorted(p for p in samples.iterdir() if p.is_file() and _SAMPLE_RE.fullmatch(p.name)) \
            if samples.is_dir() else []
        yield int(folder.name), metadata, paths


def score_folder(root: str | os.PathLike, backend: GenEvalBackend, cfg: GenEvalConfig | None = None,
                 outfile: str | os.PathLike | None = None) -> list[dict[str, Any]]:
    """Score every sample under `root`; write `results.jsonl` to `outfile` if given."""
    rows = [score_image(path, metadata, backend, cfg)
            for _, metadata, paths in iter_prompt_folders(root) for path in paths]
    if outfile is not None:
        write_results(rows, outfile)
    return rows


def write_results(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike) -> Path:
    """`results.jsonl`: one JSON object per image (pandas `read_json(lines=True)` reads it)."""
    return atomic.write_text(path, "".join(json.dumps({k: row[k] for k in RESULT_FIELDS}) + "\n" for row in rows))


def read_results(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of a `results.jsonl`."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


# ----------------------------------------------------------------------------- summary

def expected_objects(metadata: Mapping[str, Any]) -> int:
    """How many objects the prompt asks for (the sum of its include counts)."""
    return sum(int(req["count"]) for req in metadata.get("include", []))


def exact_count(row: Mapping[str, Any]) -> bool:
    """Diagnostic: the image is correct and holds no detection beyond the requested objects."""
    details = json.loads(row["details"]) if isinstance(row["details"], str) else row["details"]
    metadata = json.loads(row["metadata"]) if isinstance(row["metadata"], str) else row["metadata"]
    return bool(row["correct"]) and sum(len(v) for v in details.values()) == expected_objects(metadata)


def _task_means(rows: Sequence[Mapping[str, Any]], value: Any) -> dict[str, float]:
    """Per-task mean of value(row), tasks in order of first appearance (GenEval's groupby sort=False)."""
    groups: dict[str, list[float]] = {}
    for row in rows:
        groups.setdefault(row["tag"], []).append(float(value(row)))
    return {tag: float(np.mean(v)) for tag, v in groups.items()}


def summarize(rows: Sequence[Mapping[str, Any]], splits: Mapping[str, str] | None = None) -> dict[str, Any]:
    """GenEval's summary (per-task means, overall = mean of task means) plus the exact-count
    diagnostic and, given `splits` (prompt -> split name), the overall score per split."""
    if not rows:
        raise ValueError("GenEval summary: no scored images (is the sample folder empty?)")
    tasks = _task_means(rows, lambda r: r["correct"])
    exact = _task_means(rows, exact_count)
    by_prompt: dict[str, list[bool]] = {}
    for row in rows:
        by_prompt.setdefault(row["metadata"], []).append(bool(row["correct"]))
    out = {"overall": float(np.mean(list(tasks.values()))), "tasks": tasks,
           "exact_count": {"overall": float(np.mean(list(exact.values()))), "tasks": exact},
           "images": len(rows), "prompts": len(by_prompt),
           "correct_images": float(np.mean([bool(r["correct"]) for r in rows])),
           "correct_prompts": float(np.mean([any(v) for v in by_prompt.values()]))}
    if splits:
        names = sorted({splits.get(r["prompt"], "unknown") for r in rows})
        out["splits"] = {name: summarize([r for r in rows if splits.get(r["prompt"], "unknown") == name])["overall"]
                         for name in names}
    return out
