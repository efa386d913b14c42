"""The snapgen CLI: help on every command, JSON output, clear errors."""
from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from flows.cli import app

runner = CliRunner()


@pytest.mark.parametrize("command", ["inspect", "sample", "settings", "demo", "run", "promote", "rollback", "ui", "eval",
                                     "export", "distill", "bootstrap-teacher", "release-teacher", "release-student",
                                     "release-card"])
def test_help_on_every_command(command):
    result = runner.invoke(app, [command, "--help"])
    assert result.exit_code == 0 and "Usage" in result.output


def test_inspect_json_has_per_stage_rows():
    result = runner.invoke(app, ["inspect", "--preset", "snapgen-1024", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    stages = [r["stage"] for r in report["rows"]]
    assert stages[:2] == ["embed", "down0"] and "mid" in stages and stages[-1] == "decoder"
    assert abs(report["unet_params"] / 379e6 - 1) < 0.03
    assert report["rows"][3]["attention"].startswith("self+cross+FFN x4")


def test_inspect_bad_override_exits_2_naming_field():
    result = runner.invoke(app, ["inspect", "--preset", "toy", "--set", "unet.ffn_ratio=abc"])
    assert result.exit_code == 2
    assert "unet.ffn_ratio" in result.output


def test_unknown_preset_lists_choices():
    result = runner.invoke(app, ["inspect", "--preset", "huge"])
    assert result.exit_code == 2 and "toy-smoke" in result.output


def test_sample_writes_a_png(tmp_path):
    out = tmp_path / "grid.png"
    result = runner.invoke(app, ["sample", "--preset", "toy-smoke", "--seeds", "0,1", "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["images"] == 2 and out.stat().st_size > 0
    from PIL import Image
    assert Image.open(out).size[0] > 2 * 32


def test_run_bad_override_exits_2_naming_the_field():
    result = runner.invoke(app, ["run", "--preset", "toy", "--set", "pretrain.trian=3"])
    assert result.exit_code == 2 and "pretrain has no field 'trian'" in result.output


def test_run_unknown_preset_lists_choices():
    result = runner.invoke(app, ["run", "--preset", "huge"])
    assert result.exit_code == 2 and "toy-smoke, toy, toy-student-release, toy-gpu, snapgen-1024" in result.output


@pytest.mark.parametrize("command", [["run"], ["inspect"], ["demo"], ["bootstrap-teacher"]])
def test_unknown_preset_is_one_line_naming_the_option(command):
    result = runner.invoke(app, [*command, "--preset", "huge"])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert lines[0].startswith("error: --preset 'huge': unknown") and "toy-smoke" in lines[0]


def test_run_json_names_the_students_the_run_trained():
    from flows.cli_pipeline import run_json

    summary = {"preset": "toy", "stages": [{"name": "pretrain"}], "aliases": {}, "mlflow_run_id": "r1", "seconds": 3.0,
               "summary_uri": "file:///s.json", "report": {"html": "/r.html"}, "config": {"big": 1},
               "results": {"pretrain": {"student_uri": "file:///runs/pretrain-k/student", "step": 300},
                           "distill_steps": {"student_uri": "file:///runs/distill-k/student"}}}
    out = run_json(summary)
    assert out["students"] == {"pretrain": "file:///runs/pretrain-k/student",
                               "distill_steps": "file:///runs/distill-k/student"}
    assert out["report"] == "/r.html" and "config" not in out and "results" not in out
    no_distill = run_json(summary | {"results": {"pretrain": summary["results"]["pretrain"], "distill_steps": None}})
    assert no_distill["students"] == {"pretrain": "file:///runs/pretrain-k/student"}
