"""The release card of a shipped toy teacher (issue 14): a bundle rebuilt from a training checkpoint (EMA
or raw weights), the guidance sweep and full score report with the reference rows, the per-task table,
the loss-curve and per-task sample pictures, MODEL_CARD.md, and `snapgen release-teacher` end to end
(dry run, then a release written into a temporary releases folder, never the repository's)."""
from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from snapgen_model.training import bootstrap as bs
from snapgen_model.training import release as rel
from snapgen_model.training import release_card as rc


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A toy-smoke teacher trained with a checkpoint folder: (config, bundle folder, teacher_state.pt)."""
    cfg = bs.get_bootstrap_config("toy-smoke")
    root = tmp_path_factory.mktemp("release-card")
    vae, ae = bs.train_autoencoder(cfg)
    models, teacher = bs.train_teacher(cfg, None, vae, checkpoint_dir=root / "state")
    folder = bs.save_bundle(root / "bundle", cfg, vae, models.transformer, models.text_model, models.tokenizer,
                            ae.metrics | teacher.metrics, {"autoencoder": ae.curve, "teacher": teacher.curve})
    return cfg, folder, root / "state" / bs.TEACHER_STATE


def _weights(folder, part):
    from safetensors.torch import load_file

    return load_file(str(next((folder / part).glob("*.safetensors"))))


def test_bundle_from_checkpoint_rebuilds_the_ema_or_the_raw_weights(trained, tmp_path):
    cfg, bundle, state = trained
    ema = rc.bundle_from_checkpoint(cfg, bundle / "vae", state, tmp_path / "ema", weights="ema")
    raw = rc.bundle_from_checkpoint(cfg, bundle / "vae", state, tmp_path / "raw", weights="raw")
    shipped, from_ema, from_raw = (_weights(f, "transformer") for f in (bundle, ema, raw))
    assert all(torch.equal(shipped[k], from_ema[k]) for k in shipped)  # the bundle is the EMA pair
    assert any(not torch.equal(shipped[k], from_raw[k]) for k in shipped)  # raw: the last step's weights
    record = bs.read_bundle_record(raw)
    assert record["metrics"]["teacher_weights"] == "raw" and record["metrics"]["teacher_steps"] == cfg.teacher_steps
    assert record["config_hash"] == cfg.content_hash() and record["curves"]["teacher"]
    bs.load_bundle(raw)  # a loadable bundle (production from_pretrained path)
    with pytest.raises(ValueError, match="'ema' or 'raw'"):
        rc.bundle_from_checkpoint(cfg, bundle / "vae", state, tmp_path / "x", weights="best")
    other = bs.get_bootstrap_config("toy-smoke", ["teacher_steps=41"])
    with pytest.raises(ValueError, match="checkpoint of config"):
        rc.bundle_from_checkpoint(other, bundle / "vae", state, tmp_path / "y")


def test_report_sweeps_guidance_then_scores_every_prompt_with_the_reference_rows(trained, tmp_path):
    cfg, bundle, state = trained
    loaded = bs.load_bundle(bundle)
    raw = bs.load_bundle(rc.bundle_from_checkpoint(cfg, bundle / "vae", state, tmp_path / "raw", weights="raw"))
    lines: list[str] = []
    report = rc.release_report(loaded, guidances=(1.0, 3.0), images_per_prompt=2, other_bundle=raw, log=lines.append)
    assert set(report["sweep"]) == {"1", "3"}
    best = max(report["sweep"], key=lambda g: (report["sweep"][g]["overall"], report["sweep"][g]["exact_count"]))
    assert report["guidance"] == float(best) and report["evaluation"]["guidance"] == float(best)
    prompts = len(bs.evaluation_prompts(cfg))
    assert report["evaluation"]["images"] == 2 * prompts and report["headline"]["images"] == 2 * prompts
    assert set(report["headline"]["splits"]) == {"seen", "heldout"}  # seen and held-out apart
    assert set(report["headline"]["tasks"]) == set(rc.TASK_ORDER)
    assert list(report["reference"]) == [k for k in rc.REFERENCE_ORDER if k in report["evaluation"]["reference"]]
    assert "floor" in report["reference"] and report["other"]["images"] == 2 * prompts
    assert report["other"]["weights"] == "raw"
    assert any("raw weights" in line for line in lines) and any(line.startswith("guidance 3") for line in lines)


def test_task_table_curves_grid_and_card(trained, tmp_path):
    cfg, bundle, _ = trained
    loaded = bs.load_bundle(bundle)
    table = rc.task_table({"teacher": {"overall": 0.5, "exact_count": 0.25, "tasks": {"counting": 0.125}},
                           "floor": {"overall": 0.2, "exact_count": 0.1}})
    head, rule, teacher, floor = table.splitlines()
    assert head.split(" | ")[3:] == list(rc.TASK_ORDER[:-1]) + [rc.TASK_ORDER[-1] + " |"]
    assert teacher.startswith("| teacher | 0.500 | 0.250 |") and "0.125" in teacher and floor.count("| - ") == 6
    picture = rc.curve_picture(loaded.record["curves"], tmp_path / "curves.png")
    assert Image.open(picture).size == (900, 320)
    grid, records = rc.task_grid(loaded, per_task=2)
    tags = [r["tag"] for r in records]
    assert set(tags) == set(rc.TASK_ORDER) and all(tags.count(t) <= 2 for t in rc.TASK_ORDER)
    assert grid.width >= 2 * cfg.resolution * 2  # two columns, upscaled 2x
    report = rc.release_report(loaded, guidances=(2.0,), images_per_prompt=1)
    card = rc.card_markdown("toy-teacher/v7", loaded.record, report, "snapgen bootstrap-teacher --preset toy-smoke")
    assert "# Toy teacher release `toy-teacher/v7`" in card and loaded.record["config_hash"] in card
    assert "`snapgen bootstrap-teacher --preset toy-smoke`" in card
    assert 'load_release("toy-teacher/v7")' in card and "card/loss_curves.png" in card
    assert "| prompt-blind floor |" in card and "teacher (EMA, shipped, guidance 2)" in card
    assert "| 2 | " in card  # the sweep table


def test_release_teacher_cli_dry_run_then_writes_a_verified_release(trained, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from flows.cli import app

    cfg, bundle, state = trained
    releases = tmp_path / "releases"
    monkeypatch.setattr(rel, "RELEASES_DIR", releases)  # never the repository's releases/
    args = ["release-teacher", "--bundle", str(bundle), "--name", "toy-teacher/v8", "--guidances", "1,2",
            "--images", "1", "--rebuild", "snapgen bootstrap-teacher --preset toy-smoke"]
    dry = CliRunner().invoke(app, [*args, "--dry-run", "--report-json", str(tmp_path / "dry.json")])
    assert dry.exit_code == 0, dry.output
    assert not releases.exists() and json.loads((tmp_path / "dry.json").read_text())["name"] == "toy-teacher/v8"
    out = CliRunner().invoke(app, [*args, "--state", str(state)])
    assert out.exit_code == 0, out.output
    folder = rel.verify_release("toy-teacher/v8", releases)
    record = json.loads((folder / "bundle.json").read_text())
    assert {"card/loss_curves.png", "card/samples_per_task.png", "MODEL_CARD.md"} <= set(record["files"])
    assert set(record["guidance_sweep"]) == {"1", "2"} and record["other_weights"]["images"] > 0
    assert record["config"]["eval_guidance"] == record["evaluation"]["guidance"]
    assert "toy-teacher/v8" in (folder / "MODEL_CARD.md").read_text()
    assert record["metrics"]["teacher_weights"] == "ema" and record["other_weights"]["weights"] == "raw"
    bad = CliRunner().invoke(app, [*args[:4], "toy-teacher/v9", *args[5:], "--ship", "raw"])
    assert bad.exit_code == 2 and "--ship 'raw'" in bad.output and "--state" in bad.output
    raw = CliRunner().invoke(app, [*args[:4], "toy-teacher/v9", *args[5:], "--ship", "raw", "--state", str(state)])
    assert raw.exit_code == 0, raw.output
    raw_record = json.loads((rel.verify_release("toy-teacher/v9", releases) / "bundle.json").read_text())
    assert raw_record["metrics"]["teacher_weights"] == "raw" and raw_record["other_weights"]["weights"] == "ema"
    assert raw_record["metrics"]["ae_psnr_heldout"] == record["metrics"]["ae_psnr_heldout"]  # the run's AE figures
    assert raw_record["curves"].keys() == record["curves"].keys()  # and its AE curve
    shipped = _weights(folder, "transformer")
    assert any(not torch.equal(shipped[k], v) for k, v in _weights(folder.parent / "v9", "transformer").items())
    assert "raw weights, shipped" in (folder.parent / "v9" / "MODEL_CARD.md").read_text()
    again = CliRunner().invoke(app, args)  # releases are immutable: a second write is refused
    assert again.exit_code == 2 and "already exists" in again.output
    bad = CliRunner().invoke(app, ["release-teacher", "--bundle", str(tmp_path / "nowhere"), "--name", "x/v1"])
    assert bad.exit_code == 2
