"""bench/toy_evidence.py end to end on the toy-smoke preset (real Prefect API, real MLflow server): the first
run computes every pipeline and evaluation and writes its tables, JSON and grid; a rerun with the same home
recomputes nothing and reports the same figures; `--status` lists finished and missing pipelines."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def evidence(tmp_path_factory, mlflow_server, prefect_harness):
    sys.path.insert(0, str(ROOT))
    from bench import toy_evidence

    tmp = tmp_path_factory.mktemp("evidence")
    mp = pytest.MonkeyPatch()
    mp.setenv("SNAPGEN_HOME", str(tmp / "home"))
    mp.setenv("SNAPGEN_STORAGE_ROOT", f"file://{tmp}/storage")
    mp.setenv("SNAPGEN_MLFLOW_TRACKING_URI", mlflow_server.uri)
    argv = ["--preset", "toy-smoke", "--seeds", "0", "--guidances", "1,2", "--images", "1", "--replicates", "200",
            "--home", str(tmp / "home"), "--out", str(tmp / "RESULTS.md"), "--json", str(tmp / "evidence.json"),
            "--grid", str(tmp / "grid.png")]
    first = toy_evidence.main(argv)
    again = toy_evidence.main(argv)
    yield {"first": first, "again": again, "tmp": tmp, "argv": argv, "module": toy_evidence}
    mp.undo()


def test_first_run_computes_every_piece_and_reports_it(evidence):
    first, tmp = evidence["first"], evidence["tmp"]
    assert {"pipeline task_only seed 0", "pipeline weighted seed 0", "pipeline scaled seed 0", "teacher"} \
        <= set(first["computed"])
    assert any("distilled 4-step" in c for c in first["computed"])
    assert any("undistilled 4-step few_step" in c for c in first["computed"])
    stats = first["stats"]
    for v in ("task_only", "weighted", "scaled"):
        ci = stats["ablation"][v]["overall"]
        assert ci["lo"] <= ci["value"] <= ci["hi"]
    assert set(stats["sweep"]["full"]) == {"1", "2"} and set(stats["sweep"]["distilled"]) == {"1", "2"}
    section = (tmp / "RESULTS.md").read_text()
    assert "## Toy evidence" in section and "Scaled KD minus task-only (paired)" in section
    assert json.loads((tmp / "evidence.json").read_text())["verdicts"] == first["verdicts"]
    from PIL import Image

    with Image.open(tmp / "grid.png") as grid:
        assert grid.size[0] > 150 and grid.size[1] > 6 * 96  # six model rows, captions below


def test_rerun_recomputes_nothing_and_reports_the_same_figures(evidence):
    first, again = evidence["first"], evidence["again"]
    assert again["computed"] == []
    assert len(again["reused"]) == len(first["computed"])
    assert again["stats"] == first["stats"] and again["verdicts"] == first["verdicts"]


def test_status_lists_finished_and_missing_pipelines_without_computing(evidence, capsys):
    mod, argv = evidence["module"], evidence["argv"]
    mod.main([*argv, "--status"])
    out = capsys.readouterr().out
    assert out.count(": finished") == 3 and "to do" not in out
    mod.main([*argv, "--status", "--seeds", "0,1"])
    assert capsys.readouterr().out.count("to do") == 3  # seed 1: three pipelines not run yet


def test_a_committed_ledger_alone_finishes_the_report_on_a_fresh_machine(evidence):
    """The ledger and the pictures kept beside it are all a finished piece needs: with the run's home gone
    (models, evaluation folders, stage records: a fresh machine), a rerun from a copied ledger computes
    nothing, reports the same figures and still draws every model's pictures into the grid."""
    import shutil

    from PIL import Image

    mod, argv, tmp, first = evidence["module"], evidence["argv"], evidence["tmp"], evidence["first"]
    home = tmp / "home"
    moved = tmp / "committed"
    shutil.copytree(home / "evidence", moved)
    assert any((moved / "pictures").rglob("*.png"))
    gone = tmp / "home-elsewhere"
    home.rename(gone)
    try:
        again = mod.main([*argv, "--ledger", str(moved / "ledger-toy-smoke.json"), "--grid", str(tmp / "grid2.png"),
                          "--json", "", "--out", str(tmp / "RESULTS2.md")])
        assert not home.exists() or not any(home.rglob("*.safetensors"))  # nothing was retrained
    finally:
        shutil.rmtree(home, ignore_errors=True)
        gone.rename(home)
    assert again["computed"] == [] and again["stats"] == first["stats"]
    with Image.open(tmp / "grid2.png") as grid:
        rgb = grid.convert("RGB")
        size, label_w = 96, 150
        for row in range(6):  # teacher, three students, undistilled and distilled few-step
            cell = rgb.crop((label_w, row * (size + 4), label_w + size, row * (size + 4) + size))
            assert cell.getextrema() != ((255, 255), (255, 255), (255, 255)), f"row {row} has no picture"


def test_finished_only_reports_the_ledger_so_far_and_computes_nothing(evidence, tmp_path):
    """A run spread over sessions reports what it has: with the task-only student not finished (its pipeline
    taken out of a copy of the ledger) and seed 1 not started, `--finished-only` computes nothing, reports the
    finished students with the same figures as the full report, marks the comparisons it cannot make, and
    names what is left."""
    import shutil

    mod, argv, tmp, first = evidence["module"], evidence["argv"], evidence["tmp"], evidence["first"]
    ledger = tmp_path / "ledger.json"
    shutil.copytree(tmp / "home" / "evidence" / "pictures", tmp_path / "pictures")
    entries = json.loads((tmp / "home" / "evidence" / "ledger-toy-smoke.json").read_text())
    args = mod.parse_args(argv)
    task_only = mod.pipeline_key("toy-smoke", mod.pipeline_overrides(args, "task_only", 0, "toy-smoke"))
    del entries["entries"][task_only]
    ledger.write_text(json.dumps(entries))
    report = mod.main([*argv, "--seeds", "0,1", "--ledger", str(ledger), "--finished-only",
                       "--out", str(tmp_path / "RESULTS.md"), "--json", str(tmp_path / "partial.json"),
                       "--grid", str(tmp_path / "grid.png")])
    assert report["computed"] == []
    stats = report["stats"]
    assert stats["ablation"]["scaled"] == first["stats"]["ablation"]["scaled"]
    assert stats["ablation"]["task_only"]["overall"] is None and stats["ablation"]["task_only"]["images"] == 0
    assert stats["scaled_minus_task_only"]["overall"] is None
    assert stats["weighted_minus_task_only"]["overall"] is None
    assert stats["finished_seeds"] == {"task_only": [], "weighted": [0], "scaled": [0]}
    assert stats["sweep"]["distilled"] == first["stats"]["sweep"]["distilled"]
    text = (tmp_path / "RESULTS.md").read_text()
    assert "**Partial report**" in text and "still to do task_only seed 0, scaled seed 1" in text
    assert "scaled KD - task-only at equal guidance" in " ".join(report["verdicts"])
    assert json.loads(ledger.read_text()) == entries  # the ledger is read, never written

