"""GenEval clause rules on hand-built detections, the folder/results format, the official summary."""
from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from snapgen_model.data.shapes import ShapesWorld, ShapesWorldConfig
from snapgen_model.evaluation import geneval
from snapgen_model.evaluation.geneval import (
    Detection,
    GenEvalBackend,
    GenEvalConfig,
    evaluate_metadata,
    filter_detections,
    relative_position,
    summarize,
)
from snapgen_model.evaluation.toy_backends import ParsedColours, scene_parser_backend

IMAGE = Image.new("RGB", (64, 64), (180, 180, 180))
CFG = GenEvalConfig()


class FixedDetector:
    """Returns the same detections for every image."""

    name = "fixed"

    def __init__(self, dets: dict[str, list[Detection]]) -> None:
        self.dets = dets

    def detect(self, image: Image.Image) -> dict[str, list[Detection]]:
        return self.dets


class RecordingColours(ParsedColours):
    """ParsedColours that records what it was asked."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []

    def classify(self, image: Image.Image, detections: Sequence[Detection], classname: str) -> list[str]:
        self.calls.append((classname, len(detections)))
        return super().classify(image, detections, classname)


def det(x0: float, y0: float, x1: float, y1: float, score: float = 0.95, colour: str = "red") -> Detection:
    return Detection((x0, y0, x1, y1), score, colour=colour)


def judge(raw: dict[str, list[Detection]], metadata: dict, colours: RecordingColours | None = None) -> tuple[bool, str]:
    kept = filter_detections(raw, metadata["tag"], CFG)
    return evaluate_metadata(IMAGE, kept, metadata, colours or RecordingColours(), CFG)


# ----------------------------------------------------------------------------- thresholds

def test_threshold_is_strict_and_counting_uses_point_nine() -> None:
    raw = {"circle": [det(0, 0, 10, 10, 0.3), det(20, 0, 30, 10, 0.31), det(40, 0, 50, 10, 0.9)]}
    assert [d.score for d in filter_detections(raw, "single_object", CFG)["circle"]] == [0.9, 0.31]
    assert filter_detections(raw, "counting", CFG) == {}  # 0.9 is not > 0.9
    raw["circle"].append(det(0, 20, 10, 30, 0.91))
    assert [d.score for d in filter_detections(raw, "counting", CFG)["circle"]] == [0.91]


def test_sorted_capped_and_nms_only_when_enabled() -> None:
    raw = {"square": [det(i, i, i + 10, i + 10, 0.4 + i / 100) for i in range(20)]}
    kept = filter_detections(raw, "two_object", CFG)["square"]
    assert len(kept) == 16 and [d.score for d in kept] == sorted((d.score for d in kept), reverse=True)
    nms = filter_detections(raw, "two_object", GenEvalConfig(nms_threshold=0.5))["square"]
    assert len(nms) < 16 and all(geneval.box_iou_inclusive(a.box, b.box) < 0.5 for a in nms for b in nms if a is not b)


def test_config_validation_names_the_field() -> None:
    with pytest.raises(ValueError, match="GenEvalConfig.threshold"):
        GenEvalConfig(threshold=1.5)


# ----------------------------------------------------------------------------- clauses

SINGLE = {"tag": "single_object", "include": [{"class": "circle", "count": 1}], "prompt": "a photo of a circle"}
TWO = {"tag": "two_object", "include": [{"class": "circle", "count": 1}, {"class": "square", "count": 1}],
       "prompt": "a photo of a circle and a square"}
COUNT3 = {"tag": "counting", "include": [{"class": "square", "count": 3}], "exclude": [{"class": "square", "count": 4}],
          "prompt": "a photo of three squares"}
COLOR = {"tag": "colors", "include": [{"class": "circle", "count": 1, "color": "blue"}],
         "prompt": "a photo of a blue circle"}
POS = {"tag": "position", "include": [{"class": "square", "count": 1},
                                      {"class": "circle", "count": 1, "position": ["left of", 0]}],
       "prompt": "a photo of a circle left of a square"}


def test_include_count_pass_and_fail() -> None:
    assert judge({"circle": [det(0, 0, 10, 10)]}, SINGLE) == (True, "")
    ok, reason = judge({"square": [det(0, 0, 10, 10)]}, SINGLE)
    assert not ok and reason == "expected circle>=1, found 0"
    assert judge({"circle": [det(0, 0, 10, 10)], "square": [det(30, 0, 40, 10)]}, TWO)[0]
    ok, reason = judge({"circle": [det(0, 0, 10, 10)]}, TWO)
    assert not ok and reason == "expected square>=1, found 0"


def test_counting_needs_exact_count_via_exclude_and_ignores_low_confidence() -> None:
    three = [det(i * 15, 0, i * 15 + 10, 10) for i in range(3)]
    assert judge({"square": three}, COUNT3)[0]
    ok, reason = judge({"square": three + [det(0, 30, 10, 40)]}, COUNT3)
    assert not ok and reason == "expected square<4, found 4"
    assert not judge({"square": three[:2]}, COUNT3)[0]
    assert judge({"square": three + [det(0, 30, 10, 40, score=0.6)]}, COUNT3)[0]  # below 0.9: not counted


def test_colour_clause_pass_fail_and_reason() -> None:
    assert judge({"circle": [det(0, 0, 10, 10, colour="blue")]}, COLOR)[0]
    ok, reason = judge({"circle": [det(0, 0, 10, 10, colour="red")]}, COLOR)
    assert not ok and reason == "expected blue circle>=1, found 0 blue; and 1 red"


def test_colour_checks_only_the_most_confident_objects() -> None:
    colours = RecordingColours()
    raw = {"circle": [det(0, 0, 10, 10, 0.5, "red"), det(20, 0, 30, 10, 0.99, "blue")]}
    assert judge(raw, COLOR, colours)[0]
    assert colours.calls == [("circle", 1)]  # only the top-`count` detection is classified
    raw = {"circle": [det(0, 0, 10, 10, 0.99, "red"), det(20, 0, 30, 10, 0.5, "blue")]}
    assert not judge(raw, COLOR)[0]  # a blue circle exists, but not the most confident one


def test_position_clause_pass_fail_margin_and_missing_target() -> None:
    square = det(40, 20, 50, 30)
    assert judge({"square": [square], "circle": [det(5, 20, 15, 30)]}, POS) == (True, "")
    ok, reason = judge({"square": [square], "circle": [det(50, 20, 60, 30)]}, POS)
    assert not ok and reason == "expected circle left of target, found right of target"
    # centres 1.5 px apart horizontally: inside the 0.1 x (10 + 10) = 2 px margin -> no relation at all
    ok, reason = judge({"square": [square], "circle": [det(38.5, 20, 48.5, 30)]}, POS)
    assert not ok and reason == "expected circle left of target, found  target"
    ok, reason = judge({"circle": [det(5, 20, 15, 30)]}, POS)
    assert not ok and reason.splitlines() == ["expected square>=1, found 0", "no target for circle to be left of"]


def test_relative_position_by_hand() -> None:
    """GenEval's rule on hand-worked boxes (the generator and the scorer share this implementation)."""
    assert relative_position((0, 0, 10, 10), (30, 30, 40, 40)) == {"left of", "above"}
    # offset (-20, 0), sizes 20 x 20: margin 0.1 * 20 = 2 -> revised (-18, 0): left only
    assert relative_position((0, 0, 10, 10), (20, 0, 30, 10)) == {"left of"}
    # centres 1.5 px apart with a 2 px margin: no relation
    assert relative_position((0, 0, 10, 10), (1.5, 0, 11.5, 10)) == set()
    # a wider margin removes a relation that the default keeps
    assert relative_position((0, 0, 10, 10), (12, 0, 22, 10)) == {"left of"}
    assert relative_position((0, 0, 10, 10), (12, 0, 22, 10), threshold=0.7) == set()


# ----------------------------------------------------------------------------- files and summary

def _write_folder(root, prompts: list[dict], images: list[np.ndarray]) -> None:
    for i, (meta, ims) in enumerate(zip(prompts, images)):
        geneval.write_samples(root, i, ims)
        geneval.write_metadata(root, i, meta)


def official_summary(path) -> dict:
    """A pandas re-implementation of GenEval's summary_scores.py."""
    df = pd.read_json(path, orient="records", lines=True)
    tasks = {tag: g["correct"].mean() for tag, g in df.groupby("tag", sort=False)}
    return {"tasks": tasks, "overall": float(np.mean(list(tasks.values()))),
            "correct_images": df["correct"].mean(), "correct_prompts": df.groupby("metadata")["correct"].any().mean()}


def test_folder_layout_results_jsonl_and_official_summary(tmp_path) -> None:
    world = ShapesWorldConfig()
    scenes = [ShapesWorld(world).sample(i, "all") for i in range(12)]
    renders = [ShapesWorld(world).image(i, "all")[0] for i in range(12)]
    prompts = [s.metadata | {"prompt": s.prompt} for s in scenes]
    blank = np.full((64, 64, 3), 180, np.uint8)
    images = [np.stack([np.asarray(r), blank]) for r in renders]  # one right, one blank per prompt
    _write_folder(tmp_path, prompts, images)
    assert json.load(open(tmp_path / "00003" / "metadata.jsonl")) == prompts[3]
    assert (tmp_path / "00011" / "samples" / "0001.png").is_file()
    rows = geneval.score_folder(tmp_path, scene_parser_backend(world), outfile=tmp_path / "results.jsonl")
    df = pd.read_json(tmp_path / "results.jsonl", orient="records", lines=True)
    assert list(df.columns) == list(geneval.RESULT_FIELDS) and len(df) == 24
    assert isinstance(json.loads(df["details"][0]), dict) and json.loads(df["metadata"][0]) == prompts[0]
    ours, theirs = summarize(rows), official_summary(tmp_path / "results.jsonl")
    assert ours["overall"] == pytest.approx(theirs["overall"]) and ours["tasks"] == pytest.approx(theirs["tasks"])
    assert ours["correct_images"] == pytest.approx(0.5) and ours["correct_prompts"] == pytest.approx(1.0)
    assert list(ours["tasks"]) == list(theirs["tasks"])  # task order of first appearance


def test_overall_is_the_mean_of_task_means_not_of_images() -> None:
    rows = [_row("single_object", True)] * 9 + [_row("single_object", False)] + [_row("counting", False)]
    s = summarize(rows)
    assert s["tasks"] == {"single_object": 0.9, "counting": 0.0}
    assert s["overall"] == pytest.approx(0.45) and s["correct_images"] == pytest.approx(9 / 11)


def _row(tag: str, correct: bool, details: dict | None = None, metadata: dict | None = None) -> dict:
    meta = metadata or {"tag": tag, "include": [{"class": "circle", "count": 1}], "prompt": tag}
    return {"filename": "x.png", "tag": tag, "prompt": meta["prompt"], "correct": correct, "reason": "",
            "metadata": json.dumps(meta), "details": json.dumps(details or {"circle": [[0, 0, 1, 1, 1.0]]})}


def test_exact_count_diagnostic_flags_extra_objects() -> None:
    extra = {"circle": [[0, 0, 1, 1, 1.0]], "square": [[5, 5, 9, 9, 0.8], [10, 10, 14, 14, 0.7]]}
    rows = [_row("single_object", True), _row("single_object", True, extra), _row("single_object", False)]
    s = summarize(rows)
    assert s["tasks"]["single_object"] == pytest.approx(2 / 3)
    assert s["exact_count"]["tasks"]["single_object"] == pytest.approx(1 / 3)


def test_splits_are_reported_per_prompt_group() -> None:
    rows = [_row("single_object", True, metadata={"tag": "single_object", "include": [], "prompt": "seen one"}),
            _row("single_object", False, metadata={"tag": "single_object", "include": [], "prompt": "held one"})]
    s = summarize(rows, {"seen one": "seen", "held one": "heldout"})
    assert s["splits"] == {"heldout": 0.0, "seen": 1.0}


def test_scene_parser_backend_scores_clean_renders_correct_and_blank_wrong() -> None:
    world = ShapesWorldConfig()
    backend: GenEvalBackend = scene_parser_backend(world)
    for i in range(40):
        image, scene = ShapesWorld(world).image(i, "all")
        meta = scene.metadata | {"prompt": scene.prompt}
        assert geneval.score_pil(image, meta, backend)["correct"], (scene.prompt, scene.objects)
        assert not geneval.score_pil(IMAGE, meta, backend)["correct"]
