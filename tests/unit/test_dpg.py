"""DPG-Bench: CSV format, 2x2 tiles, the dependency rule, scores and categories, toy question graphs."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from snapgen_model.data.shapes import BACKGROUND_RGB, ShapesWorldConfig, render_array
from snapgen_model.evaluation import dpg
from snapgen_model.evaluation.dpg import DPGConfig, DPGQuestion, apply_dependencies, score_item, tile_2x2
from snapgen_model.evaluation.toy_backends import OracleVQA, parse_tuple, scene_for_prompt, toy_questions
from snapgen_model.evaluation.toy_reference import toy_prompts

SHARED_PROMPTS = Path(__file__).resolve().parents[3] / "shared" / "data" / "dpg_bench" / "prompts"


def q(pid: int, deps: tuple[int, ...] = (0,), tup: str = "entity - whole (cat)", item: str = "7") -> DPGQuestion:
    return DPGQuestion(item_id=item, proposition_id=pid, dependency=deps, question=f"q{pid}?", tuple=tup)


class TableVQA:
    """Answers from a table keyed by (tile index, proposition id); tiles told apart by colour."""

    name = "table"

    def __init__(self, answers: dict[tuple[int, int], str]) -> None:
        self.answers, self.asked = answers, []

    def answer(self, image: Image.Image, question: DPGQuestion) -> str:
        tile = int(np.asarray(image)[0, 0, 0]) // 50  # tile k is painted 50 * k
        self.asked.append((tile, question.proposition_id))
        return self.answers.get((tile, question.proposition_id), "no")


def painted_grid(tiles: int = 4) -> Image.Image:
    return tile_2x2(np.stack([np.full((8, 8, 3), 50 * k, np.uint8) for k in range(tiles)]))


# ----------------------------------------------------------------------------- CSV

def test_csv_round_trip_and_official_first_row_quirk(tmp_path) -> None:
    questions = [q(1), q(2, (1,), "attribute - color (cat, black)"), q(1, item="8")]
    path = dpg.write_questions(questions, tmp_path / "dpg_bench.csv")
    with open(path, newline="") as f:
        assert csv.DictReader(f).fieldnames == list(dpg.CSV_COLUMNS)
    loaded = dpg.load_questions(path, DPGConfig(official_first_row=False))
    assert loaded == {"7": questions[:2], "8": questions[2:]}
    official = dpg.load_questions(path)  # the official loader skips the first data row
    assert [x.proposition_id for x in official["7"]] == [2]


def test_csv_errors_name_the_problem(tmp_path) -> None:
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(FileNotFoundError, match="missing or empty"):
        dpg.load_questions(tmp_path / "empty.csv")
    (tmp_path / "bad.csv").write_text("item_id,text\n1,x\n")
    with pytest.raises(ValueError, match="lacks columns"):
        dpg.load_questions(tmp_path / "bad.csv")


@pytest.mark.skipif(not SHARED_PROMPTS.is_dir(), reason="shared DPG-Bench prompts not present")
def test_loads_the_1065_shared_prompts() -> None:
    prompts = dpg.load_prompts(SHARED_PROMPTS.parent)
    assert len(prompts) == 1065 and all(prompts.values())


# ----------------------------------------------------------------------------- rules

def test_dependency_rule_zeroes_children_of_failed_parents_in_file_order() -> None:
    questions = [q(1), q(2, (1,)), q(3, (2,)), q(4, (0,)), q(5, (1, 4))]
    assert apply_dependencies({1: 1, 2: 1, 3: 1, 4: 1, 5: 1}, questions) == {1: 1, 2: 1, 3: 1, 4: 1, 5: 1}
    assert apply_dependencies({1: 0, 2: 1, 3: 1, 4: 1, 5: 1}, questions) == {1: 0, 2: 0, 3: 0, 4: 1, 5: 0}
    assert apply_dependencies({1: 1, 2: 1, 3: 1, 4: 0, 5: 1}, questions)[5] == 0


def test_tiles_are_row_major_and_item_score_averages_tiles() -> None:
    questions = [q(1), q(2, (1,))]
    vqa = TableVQA({(0, 1): "yes", (0, 2): "yes", (1, 1): "yes", (2, 2): "yes", (3, 1): "yes", (3, 2): "Yes"})
    item = score_item(painted_grid(), questions, vqa)
    # tile 0: 1, 1 -> 1; tile 1: 1, 0 -> .5; tile 2: parent no -> 0, 0; tile 3: "Yes" is not "yes" -> .5
    assert item.tile_scores == [1.0, 0.5, 0.0, 0.5] and item.score == pytest.approx(0.5)
    assert [t for t, _ in vqa.asked] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert score_item(painted_grid(2), questions, vqa, DPGConfig(tiles=2)).tile_scores == [1.0, 0.5]


def test_summary_categories_use_last_tile_answers_before_the_rule() -> None:
    questions = {"7": [q(1), q(2, (1,), "attribute - color (cat, black)")]}
    vqa = TableVQA({(3, 2): "yes"})  # last tile: entity no, colour yes (zeroed by the rule for the score)
    item = score_item(painted_grid(), questions["7"], vqa)
    summary = dpg.summarize([item], questions)
    assert summary["overall"] == 0.0
    assert summary["categories"] == {"entity": 0.0, "attribute": 1.0}
    assert summary["categories_detailed"] == {"attribute - color": 1.0, "entity - whole": 0.0}


def test_score_grids_reads_item_pngs_and_reports_missing(tmp_path) -> None:
    questions = {"7": [q(1)], "8": [q(1, item="8")]}
    painted_grid().save(tmp_path / "7.png")
    with pytest.raises(FileNotFoundError, match="8"):
        dpg.score_grids(tmp_path, questions, TableVQA({}))
    painted_grid().save(tmp_path / "8.png")
    items = dpg.score_grids(tmp_path, questions, TableVQA({(k, 1): "yes" for k in range(4)}))
    assert [i.score for i in items] == [1.0, 1.0]


# ----------------------------------------------------------------------------- toy questions + oracle

def test_toy_question_graphs_follow_the_dpg_format() -> None:
    by_tag = {p["tag"]: p for p in toy_prompts(ShapesWorldConfig())}
    pos = toy_questions("00001", by_tag["position"])
    assert [parse_tuple(x.tuple)[0] for x in pos] == ["entity - whole", "entity - whole", "relation - spatial"]
    assert set(pos[2].dependency) == {1, 2} and pos[0].dependency == (0,)
    count = toy_questions("00002", by_tag["counting"])
    assert count[1].tuple.startswith("other - count") and count[1].dependency == (1,)
    attr = toy_questions("00003", by_tag["color_attr"])
    assert [x.category_l1 for x in attr] == ["entity", "attribute", "entity", "attribute"]


def test_oracle_answers_yes_on_clean_renders_and_no_on_blank() -> None:
    world = ShapesWorldConfig()
    blank = Image.new("RGB", (64, 64), BACKGROUND_RGB)
    for i, meta in enumerate(toy_prompts(world, max_per_task=3)):
        image = Image.fromarray(render_array(scene_for_prompt(meta, world, np.random.default_rng(i)), world))
        vqa = OracleVQA(world)
        questions = toy_questions("x", meta)
        assert all(vqa.answer(image, x) == "yes" for x in questions), meta["prompt"]
        assert all(vqa.answer(blank, x) == "no" for x in questions)


def test_oracle_detects_wrong_colour_count_and_relation() -> None:
    world = ShapesWorldConfig()
    meta = {"tag": "position", "include": [{"class": "square", "count": 1},
                                           {"class": "circle", "count": 1, "position": ["left of", 0]}],
            "prompt": "a photo of a circle left of a square"}
    image = Image.fromarray(render_array(scene_for_prompt(meta, world, np.random.default_rng(0)), world))
    vqa = OracleVQA(world)
    flipped = DPGQuestion("x", 3, (1, 2), "?", "relation - spatial (circle, square, right of)")
    assert vqa.answer(image, flipped) == "no"
    assert vqa.answer(image, DPGQuestion("x", 1, (0,), "?", "other - count (circle, ==2)")) == "no"
    with pytest.raises(ValueError, match="unsupported"):
        vqa.answer(image, DPGQuestion("x", 1, (0,), "?", "global - style (photo)"))
