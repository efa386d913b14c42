"""DPG-Bench scoring with the benchmark's own rules and a pluggable yes/no VQA backend.

Re-implements the logic of DPG-Bench's `compute_dpg_bench.py` (TencentQQGYLab/ELLA;
SNAPGEN_SPEC.md section 8), in our own code:

* questions come from `dpg_bench.csv` (item_id, text, keywords, proposition_id, dependency,
  category_broad, category_detailed, tuple, question_natural_language); `dependency` lists parent
  proposition ids ("0" = none);
* each item's image is a 2x2 grid of four samples, read row-major ((0,0), (r,0), (0,r), (r,r));
  every question is asked of every tile, and scores 1 if the answer is exactly "yes";
* the dependency rule: walking the questions in file order, a question whose parent scored 0
  scores 0 (so a zeroed parent zeroes its children too);
* item score = mean over tiles of the mean question score; overall = mean of item scores;
* category scores pool the per-question answers of the *last* tile, before the dependency rule,
  keyed by the tuple's prefix ("entity - whole (...)" -> L2 "entity - whole", L1 "entity"), as
  the official script does.

The official loader skips the CSV's first data row (`if i == 0: continue`); `official_first_row`
reproduces that (default) so numbers match published ones.

Scores are fractions in [0, 1] (the official script prints them x100).
"""
from __future__ import annotations

import csv
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image

from snapgen_model.config_base import ConfigBase, check

CSV_COLUMNS: tuple[str, ...] = ("item_id", "text", "keywords", "proposition_id", "dependency", "category_broad",
                                "category_detailed", "tuple", "question_natural_language")


@dataclass(frozen=True, kw_only=True)
class DPGConfig(ConfigBase):
    """DPG-Bench scoring options (the defaults are the official ones)."""

    tiles: int = 4  # images per item, tiled 2x2 (the official --pic-num; 4 in published numbers)
    official_first_row: bool = True  # skip the CSV's first data row as the official loader does

    def __post_init__(self) -> None:
        check(1 <= self.tiles <= 4, "DPGConfig.tiles", f"must be in 1..4, got {self.tiles}")


@dataclass(frozen=True)
class DPGQuestion:
    """One row of `dpg_bench.csv`: a yes/no question about an item's image."""

    item_id: str  # the item (prompt) id; the image file is `<item_id>.png`
    proposition_id: int  # question id within the item (1-based)
    dependency: tuple[int, ...]  # parent proposition ids; 0 means no parent
    question: str  # question_natural_language, asked of the VQA model
    tuple: str  # the proposition, e.g. "attribute - color (circle, red)"; its prefix is the category
    category_broad: str = ""  # L1 category column (entity, attribute, relation, global, other)
    category_detailed: str = ""  # L2 category column
    text: str = ""  # the prompt
    keywords: str = ""  # keywords column (unused by the score)

    @property
    def category(self) -> str:
        """L2 category as the official script derives it: the tuple before its first '('."""
        return self.tuple.split("(")[0].strip()

    @property
    def category_l1(self) -> str:
        """L1 category: the L2 category before its first '-'."""
        return self.category.split("-")[0].strip()

    def to_row(self) -> dict[str, str]:
        """The CSV row of this question."""
        return {"item_id": self.item_id, "text": self.text, "keywords": self.keywords,
                "proposition_id": str(self.proposition_id), "dependency": ",".join(map(str, self.dependency)),
                "category_broad": self.category_broad, "category_detailed": self.category_detailed,
                "tuple": self.tuple, "question_natural_language": self.question}


class VQABackend(Protocol):
    """Answers a yes/no question about an image ("yes" or anything else)."""

    name: str

    def answer(self, image: Image.Image, question: DPGQuestion) -> str: ...


# ----------------------------------------------------------------------------- CSV

def load_questions(path: str | os.PathLike, cfg: DPGConfig | None = None) -> dict[str, list[DPGQuestion]]:
    """Questions per item, in file order, from a `dpg_bench.csv`-format file."""
    cfg = cfg or DPGConfig()
    path = Path(path)
    if not path.is_file() or path.stat().st_size == 0:
        raise FileNotFoundError(f"DPG-Bench question CSV {str(path)!r} is missing or empty; supply dpg_bench.csv "
                                "(from TencentQQGYLab/ELLA dpg_bench/) by path")
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in CSV_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: DPG-Bench CSV lacks columns {missing}; expected {list(CSV_COLUMNS)}")
        rows = list(reader)
    items: dict[str, list[DPGQuestion]] = {}
    for i, row in enumerate(rows):
        if i == 0 and cfg.official_first_row:
            continue
        items.setdefault(row["item_id"], []).append(_question(row, path, i))
    return items


def _question(row: Mapping[str, str], path: Path, line: int) -> DPGQuestion:
    try:
        deps = tuple(int(d.strip()) for d in str(row["dependency"]).split(","))
        pid = int(float(row["proposition_id"]))
    except ValueError as exc:
        raise ValueError(f"{path}: data row {line}: bad proposition_id/dependency ({exc})") from exc
    return DPGQuestion(item_id=str(row["item_id"]), proposition_id=pid, dependency=deps,
                       question=row["question_natural_language"], tuple=row["tuple"],
                       category_broad=row["category_broad"], category_detailed=row["category_detailed"],
                       text=row["text"], keywords=row["keywords"])


def write_questions(questions: Iterable[DPGQuestion], path: str | os.PathLike) -> Path:
    """Write questions in the `dpg_bench.csv` format."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(CSV_COLUMNS))
        writer.writeheader()
        writer.writerows(q.to_row() for q in questions)
    return path


def load_prompts(folder: str | os.PathLike) -> dict[str, str]:
    """item_id -> prompt text from DPG-Bench's `prompts/<item_id>.txt` files (folder or its parent)."""
    folder = Path(folder)
    if (folder / "prompts").is_dir():
        folder = folder / "prompts"
    files = sorted(folder.glob("*.txt"), key=lambda p: (len(p.stem), p.stem))
    if not files:
        raise FileNotFoundError(f"no DPG-Bench prompts (<item_id>.txt) under {str(folder)!r}")
    return {p.stem: p.read_text(encoding="utf-8").strip() for p in files}


# ----------------------------------------------------------------------------- tiles

def tile_2x2(images: Sequence[np.ndarray] | np.ndarray) -> Image.Image:
    """Tile up to 4 (H, W, 3) uint8 images into a 2x2 grid, row-major (missing tiles stay black)."""
    arr = np.asarray(images)
    if arr.ndim != 4 or not 1 <= len(arr) <= 4:
        raise ValueError(f"tile_2x2: expected 1-4 (H, W, 3) images, got shape {arr.shape}")
    n, h, w, _ = arr.shape
    grid = np.zeros((2 * h, 2 * w, 3), np.uint8)
    for i in range(n):
        grid[(i // 2) * h:(i // 2 + 1) * h, (i % 2) * w:(i % 2 + 1) * w] = arr[i]
    return Image.fromarray(grid)


def split_tiles(grid: Image.Image, count: int = 4) -> list[Image.Image]:
    """The first `count` tiles of a 2x2 grid, in the official crop order."""
    r = grid.width // 2
    boxes = [(0, 0, r, r), (r, 0, 2 * r, r), (0, r, r, 2 * r), (r, r, 2 * r, 2 * r)]
    return [grid.crop(box) for box in boxes[:count]]


# ----------------------------------------------------------------------------- scoring

def apply_dependencies(scores: dict[int, float], questions: Sequence[DPGQuestion]) -> dict[int, float]:
    """The dependency rule, in file order: a question with a parent scoring 0 scores 0."""
    out = dict(scores)
    for q in questions:
        if any(parent != 0 and out.get(parent, 1.0) == 0 for parent in q.dependency):
            out[q.proposition_id] = 0.0
    return out


@dataclass
class ItemScore:
    """The score of one DPG item."""

    item_id: str  # the item
    score: float  # mean over tiles of the dependency-ruled question mean
    tile_scores: list[float]  # per tile
    answers: list[dict[int, str]]  # per tile: proposition id -> raw answer
    category_scores: dict[int, float] = field(default_factory=dict)  # last tile, before the rule

    def to_dict(self) -> dict[str, Any]:
        return {"item_id": self.item_id, "score": self.score, "tile_scores": self.tile_scores,
                "answers": [{str(k): v for k, v in a.items()} for a in self.answers],
                "category_scores": {str(k): v for k, v in self.category_scores.items()}}


def score_item(grid: Image.Image, questions: Sequence[DPGQuestion], vqa: VQABackend,
               cfg: DPGConfig | None = None) -> ItemScore:
    """Ask every question of every tile; apply the dependency rule per tile."""
    cfg = cfg or DPGConfig()
    if not questions:
        raise ValueError("score_item: the item has no questions")
    tile_scores, answers, raw = [], [], {}
    for tile in split_tiles(grid.convert("RGB"), cfg.tiles):
        answer = {q.proposition_id: vqa.answer(tile, q) for q in questions}
        raw = {pid: float(a == "yes") for pid, a in answer.items()}
        ruled = apply_dependencies(raw, questions)
        tile_scores.append(sum(ruled.values()) / len(ruled))
        answers.append(answer)
    return ItemScore(questions[0].item_id, float(np.mean(tile_scores)), tile_scores, answers, raw)


def summarize(items: Sequence[ItemScore], questions: Mapping[str, Sequence[DPGQuestion]]) -> dict[str, Any]:
    """Overall (mean item score), L1 and L2 category scores (pooled last-tile raw answers)."""
    if not items:
        raise ValueError("DPG summary: no scored items")
    l1: dict[str, list[float]] = {}
    l2: dict[str, list[float]] = {}
    for item in items:
        for q in questions[item.item_id]:
            value = item.category_scores.get(q.proposition_id, 0.0)
            l1.setdefault(q.category_l1, []).append(value)
            l2.setdefault(q.category, []).append(value)
    return {"overall": float(np.mean([i.score for i in items])), "items": len(items),
            "categories": {k: float(np.mean(v)) for k, v in l1.items()},
            "categories_detailed": {k: float(np.mean(v)) for k, v in sorted(l2.items())}}


def score_grids(folder: str | os.PathLike, questions: Mapping[str, Sequence[DPGQuestion]], vqa: VQABackend,
                cfg: DPGConfig | None = None) -> list[ItemScore]:
    """Score every `<item_id>.png` grid in `folder` that has questions (others are reported)."""
    folder = Path(folder)
    grids = {p.stem: p for p in folder.glob("*.png")}
    missing = sorted(set(questions) - set(grids))
    if missing:
        raise FileNotFoundError(f"DPG-Bench: {len(missing)} items have no grid image in {folder} "
                                f"(first: {missing[:3]})")
    out = []
    for item_id in questions:
        with Image.open(grids[item_id]) as grid:
            out.append(score_item(grid.convert("RGB"), questions[item_id], vqa, cfg))
    return out
