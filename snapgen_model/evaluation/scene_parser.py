"""Exact scene parser for the shapes world: the toy stand-in for GenEval's detector and colour model.

Pipeline per image (about 1 ms at 64 px):
1. colour class per pixel from a 6-bit-per-channel lookup table. A pixel belongs to colour i if
   it lies closest to the segment background -> palette[i] and more than halfway along it, so
   anti-aliased or blurred edge pixels (object/background mixtures) keep their object's colour
   instead of snapping to an unrelated palette entry; otherwise it is background;
2. a conservative 3x3 majority filter: a pixel that agrees with at most `filter_keep_below - 1`
   of its 8 neighbours takes the most common class around it (removes speckle, keeps star tips);
3. 8-connected components per colour (scipy.ndimage.label); components smaller than
   `min_area_frac` of the world's smallest object area are dropped;
4. shape = the world shape whose template of the component's tight-box size (the shape painted
   as the renderer paints it) has the highest IoU with the component mask. Confidence combines
   the fit, the margin over the second best shape, the aspect ratio and the size relative to the
   world's object sizes; zero-confidence components are not reported.

`to_detections` gives the GenEval view: class -> [(box, confidence)], most confident first;
`detection_colours` gives the colours in the same order. Boxes are (x0, y0, x1, y1), x1/y1 exclusive.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage

from snapgen_model.data.shapes import (
    BACKGROUND_RGB,
    PALETTE,
    SceneObject,
    ShapesWorldConfig,
    object_mask,
    shape_coverage,
)

COLOUR_NAMES: tuple[str, ...] = tuple(PALETTE)  # class k of the label map is COLOUR_NAMES[k - 1]
_EIGHT: np.ndarray = np.ones((3, 3), dtype=bool)
Box = tuple[int, int, int, int]


@dataclass(frozen=True, kw_only=True)
class SceneParserConfig:
    """Tuning of the parser; the defaults reach >= 99% object accuracy on clean renders."""

    majority_filter: bool = True  # apply the conservative 3x3 majority filter
    filter_keep_below: int = 2  # a pixel changes class if fewer than this many of its 3x3 agree
    min_area_frac: float = 0.3  # drop components below this fraction of the smallest object area
    fit_floor: float = 0.5  # template IoU that maps to zero confidence
    fit_full: float = 0.85  # template IoU that maps to full confidence
    margin_full: float = 0.08  # IoU margin over the runner-up shape that keeps full confidence

    def __post_init__(self) -> None:
        if not 1 <= self.filter_keep_below <= 9:
            raise ValueError(f"SceneParserConfig.filter_keep_below: must be in 1..9, got {self.filter_keep_below}")
        if not 0.0 < self.min_area_frac <= 1.0:
            raise ValueError(f"SceneParserConfig.min_area_frac: must be in (0, 1], got {self.min_area_frac}")
        if not 0.0 <= self.fit_floor < self.fit_full <= 1.0:
            raise ValueError("SceneParserConfig.fit_floor/fit_full: need 0 <= fit_floor < fit_full <= 1, "
                             f"got {self.fit_floor}, {self.fit_full}")
        if self.margin_full <= 0:
            raise ValueError(f"SceneParserConfig.margin_full: must be > 0, got {self.margin_full}")


@dataclass(frozen=True)
class DetectedObject:
    """One object found in an image."""

    shape: str  # best-fitting world shape (the GenEval class)
    colour: str  # GenEval colour name of the component
    box: Box  # tight box (x0, y0, x1, y1), x1/y1 exclusive
    pixel_count: int  # pixels in the component
    confidence: float  # in [0, 1]: template fit x margin x aspect x size factors
    fit: float  # soft IoU of the component with the best shape template


@functools.lru_cache(maxsize=4)
def _colour_lut(background: tuple[int, int, int] = BACKGROUND_RGB) -> np.ndarray:
    """(64**3,) uint8 class per 6-bit RGB cell: 0 background, k = COLOUR_NAMES[k - 1]."""
    levels = np.arange(64, dtype=np.float32) * 4 + 1.5
    grid = np.stack(np.meshgrid(levels, levels, levels, indexing="ij"), -1).reshape(-1, 3)
    x = grid - np.asarray(background, np.float32)  # (N, 3) offsets from the background
    ends = np.asarray([PALETTE[c] for c in COLOUR_NAMES], np.float32) - np.asarray(background, np.float32)
    dots, lengths = x @ ends.T, (ends * ends).sum(1)  # (N, K), (K,)
    t = np.clip(dots / lengths, 0.0, 1.0)  # (N, K) position along each segment
    dist2 = (x * x).sum(1, keepdims=True) - 2 * t * dots + t * t * lengths  # squared distance to it
    best = dist2.argmin(1)
    along = t[np.arange(len(best)), best]
    lut = np.where(along >= 0.5, best + 1, 0).astype(np.uint8)
    lut.setflags(write=False)
    return lut


def colour_labels(image: np.ndarray) -> np.ndarray:
    """(H, W) uint8 colour class per pixel (0 background) of an (H, W, 3) uint8 image."""
    q = (image >> 2).astype(np.int32)
    return _colour_lut()[(q[..., 0] << 12) | (q[..., 1] << 6) | q[..., 2]]


def majority_filter(labels: np.ndarray, keep_below: int = 3, classes: int = len(COLOUR_NAMES) + 1) -> np.ndarray:
    """Give a pixel the most common class of its 3x3 window if fewer than `keep_below` agree with it."""
    h, w = labels.shape
    padded = np.pad(labels, 1, mode="edge")
    onehot = padded[None] == np.arange(classes, dtype=labels.dtype)[:, None, None]  # (K, H+2, W+2)
    counts = np.zeros((classes, h, w), np.uint8)
    for dy in range(3):
        for dx in range(3):
            counts += onehot[:, dy:dy + h, dx:dx + w]
    own = np.take_along_axis(counts, labels[None].astype(np.intp), 0)[0]
    return np.where(own < keep_below, counts.argmax(0).astype(labels.dtype), labels)


@functools.lru_cache(maxsize=64)
def _world_sizes(cfg: ShapesWorldConfig) -> tuple[float, float, float]:
    """(smallest object area in px, min side, max side) of the world."""
    lo, hi = cfg.object_size_px
    return float(min(object_mask(s, lo).sum() for s in cfg.shapes)), float(lo), float(hi)


def _ramp(value: float, zero: float, one: float) -> float:
    """Linear 0 -> 1 between `zero` and `one` (either order), clipped."""
    return float(np.clip((value - zero) / (one - zero), 0.0, 1.0))


@functools.lru_cache(maxsize=16384)
def _tight_mask(shape: str, height: int, width: int) -> np.ndarray:
    """Painted pixels (coverage >= 1/2) of a shape stretched to a (height, width) box, tight-cropped."""
    mask = shape_coverage(shape, height, width) >= 0.5
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    return mask[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]


@functools.lru_cache(maxsize=8192)
def _templates(shape: str, height: int, width: int) -> tuple[np.ndarray, ...]:
    """Binary templates whose tight box is (height, width): the shape painted in nominal boxes up
    to 3 px larger (thin tips and apexes may paint no pixel), or stretched to the box if none is."""
    found: list[np.ndarray] = []
    for dh in range(4):
        for dw in range(4):
            mask = _tight_mask(shape, height + dh, width + dw)
            if mask.shape == (height, width):
                found.append(mask.astype(np.float32))
    if not found:
        found.append((shape_coverage(shape, height, width) >= 0.5).astype(np.float32))
    unique = {t.tobytes(): t for t in found}
    return tuple(unique.values())


def _shape_fit(mask: np.ndarray, shapes: Sequence[str]) -> list[tuple[float, str]]:
    """Best IoU of a tight component mask with each shape's templates of its size, best first."""
    m: np.ndarray = mask.astype(np.float32)
    area = float(m.sum())
    fits = []
    for shape in shapes:
        best = 0.0
        for t in _templates(shape, *mask.shape):
            inter = float((m * t).sum())
            best = max(best, inter / (area + float(t.sum()) - inter))
        fits.append((best, shape))
    return sorted(fits, reverse=True)


def _confidence(fits: list[tuple[float, str]], hw: tuple[int, int], cfg: ShapesWorldConfig,
                pcfg: SceneParserConfig) -> float:
    """Fit x margin x aspect x size factors, each in [0, 1]."""
    best = fits[0][0]
    second = fits[1][0] if len(fits) > 1 else 0.0
    fit = _ramp(best, pcfg.fit_floor, pcfg.fit_full)
    margin = _ramp(best - second, 0.0, pcfg.margin_full)
    h, w = hw
    aspect = _ramp(abs(math.log(h / w)), 0.65, 0.2)  # world shapes are square-ish (<= 1.22:1)
    _, lo, hi = _world_sizes(cfg)
    side = max(h, w)
    size = min(_ramp(side, 0.3 * lo, 0.6 * lo), _ramp(side, 2.5 * hi, 1.4 * hi))
    return fit * margin * aspect * size


def _as_array(image: Image.Image | np.ndarray) -> np.ndarray:
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
        raise ValueError(f"image must be PIL or an (H, W, 3) uint8 array, got {arr.dtype} {arr.shape}")
    return arr


def _components(labels: np.ndarray, min_px: float) -> list[tuple[int, tuple[slice, slice], np.ndarray]]:
    """(colour class, slices, tight mask) of every 8-connected same-colour component >= min_px."""
    found = []
    counts = np.bincount(labels.ravel(), minlength=len(COLOUR_NAMES) + 1)
    for k in np.flatnonzero(counts[1:] >= min_px) + 1:
        comp, _ = ndimage.label(labels == k, structure=_EIGHT)
        sizes = np.bincount(comp.ravel())
        for j, sl in enumerate(ndimage.find_objects(comp), start=1):
            if sl is not None and sizes[j] >= min_px:
                found.append((int(k), sl, comp[sl] == j))
    return found


def parse_scene(image: Image.Image | np.ndarray, cfg: ShapesWorldConfig,
                pcfg: SceneParserConfig | None = None) -> list[DetectedObject]:
    """Objects in an image of the world `cfg`, most confident first.

    Colours are classified over GenEval's ten colour names; shapes over the world's shapes.
    Components with zero confidence (e.g. a frame-filling blob, a thin streak) are not returned.
    """
    pcfg = pcfg or SceneParserConfig()
    labels = colour_labels(_as_array(image))
    if pcfg.majority_filter:
        labels = majority_filter(labels, pcfg.filter_keep_below)
    min_px = max(4.0, pcfg.min_area_frac * _world_sizes(cfg)[0])
    found = []
    for k, (ys, xs), mask in _components(labels, min_px):
        fits = _shape_fit(mask, cfg.shapes)
        conf = _confidence(fits, mask.shape, cfg, pcfg)
        if conf <= 0.0:
            continue
        box = (xs.start, ys.start, xs.stop, ys.stop)
        found.append(DetectedObject(fits[0][1], COLOUR_NAMES[k - 1], box, int(mask.sum()), conf, fits[0][0]))
    return sorted(found, key=lambda o: (-o.confidence, o.box))


def to_detections(objects: Sequence[DetectedObject], min_confidence: float = 0.0) -> dict[str, list[tuple[Box, float]]]:
    """GenEval detector view: class -> [(box, confidence)], most confident first."""
    out: dict[str, list[tuple[Box, float]]] = {}
    for obj in sorted(objects, key=lambda o: -o.confidence):
        if obj.confidence >= min_confidence:
            out.setdefault(obj.shape, []).append((obj.box, obj.confidence))
    return out


def detection_colours(objects: Sequence[DetectedObject], min_confidence: float = 0.0) -> dict[str, list[str]]:
    """Colour of every detection, in the same order as `to_detections` (GenEval's colour step)."""
    out: dict[str, list[str]] = {}
    for obj in sorted(objects, key=lambda o: -o.confidence):
        if obj.confidence >= min_confidence:
            out.setdefault(obj.shape, []).append(obj.colour)
    return out


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU of two (x0, y0, x1, y1) boxes with exclusive x1/y1."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


@dataclass(frozen=True)
class MatchResult:
    """Object-level agreement of detections with the truth of one or more scenes."""

    matched: int  # true objects found with the right shape and colour at box IoU > threshold
    truth: int  # true objects
    detections: int  # detections at or above the confidence threshold
    min_confidence: float = 0.0  # detections below this were ignored

    @property
    def recall(self) -> float:
        """matched / truth (the object accuracy)."""
        return self.matched / self.truth if self.truth else 1.0

    @property
    def precision(self) -> float:
        """matched / detections."""
        return self.matched / self.detections if self.detections else 1.0

    def __add__(self, other: MatchResult) -> MatchResult:
        return MatchResult(self.matched + other.matched, self.truth + other.truth,
                           self.detections + other.detections, self.min_confidence)


def match_objects(detected: Sequence[DetectedObject], truth: Sequence[SceneObject],
                  iou_threshold: float = 0.5, min_confidence: float = 0.3) -> MatchResult:
    """Greedy one-to-one matching: same shape and colour, box IoU > threshold."""
    dets = [d for d in detected if d.confidence >= min_confidence]
    used: set[int] = set()
    matched = 0
    for obj in truth:
        for i, det in enumerate(dets):
            if i not in used and det.shape == obj.shape and det.colour == obj.colour \
                    and box_iou(det.box, obj.box) > iou_threshold:
                used.add(i)
                matched += 1
                break
    return MatchResult(matched, len(truth), len(dets), min_confidence)
