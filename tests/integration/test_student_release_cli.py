"""`snapgen release-student` end to end: a toy-smoke student of a shipped (toy-smoke) teacher release, scored
by the real evaluation flow (real Prefect and MLflow servers), packaged as an fp16 release, then evaluated
again through its `release://` URI, as `snapgen eval --model release://...` and `pretrain.init` name it."""
from __future__ import annotations

import json

import pytest

from tests.fixtures.tiny_student import build_tiny_student

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def teacher_release(tmp_path_factory):
    """A toy-smoke bootstrap bundle (seconds of training), shipped as toy-teacher/v7 in a test releases dir."""
    from snapgen_model.training import release as rel
    from tests.fixtures.smoke_bundle import build_smoke_bundle

    root = tmp_path_factory.mktemp("teacher")
    build_smoke_bundle(root / "bundle")
    releases = root / "releases"
    rel.package_release(root / "bundle", "toy-teacher/v7", card="# teacher\n", releases_dir=releases)
    return releases


def _student(tmp_path, releases, bundle_id: str):
    from snapgen_model.artifacts import student as st

    folder = build_tiny_student(tmp_path / "student", releases / "toy-teacher" / "v7")
    st.write_card(folder, st.read_card(folder) | {"stage": "pretrain", "bundle_id": bundle_id})
    return folder


def test_release_student_scores_packages_and_loads_through_its_uri(tmp_path, monkeypatch, teacher_release,
                                                                   mlflow_server, prefect_harness):
    import typer
    from typer.testing import CliRunner

    from flows.cli_release_student import release_student
    from flows.evaluate import EvaluateParams, evaluate_flow
    from snapgen_model.artifacts import student as st
    from snapgen_model.training import release as rel

    monkeypatch.setenv("SNAPGEN_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("SNAPGEN_MLFLOW_TRACKING_URI", mlflow_server.uri)
    monkeypatch.setattr(rel, "RELEASES_DIR", teacher_release)  # never the repository's releases/
    teacher_hash = rel.read_index(teacher_release)["releases"]["toy-teacher/v7"]["config_hash"]
    student = _student(tmp_path, teacher_release, teacher_hash)
    # its pretraining, resumed once: two MLflow runs of one config hash, each with its own steps
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_server.uri)
    experiment = client.create_experiment("release-student-test")
    for first in (0, 10):
        run = client.create_run(experiment, tags={"snapgen.config_hash": "tiny-0", "snapgen.stage": "pretrain"})
        client.log_param(run.info.run_id, "pretrain.steps", "20")
        for step in range(first, first + 10):
            client.log_metric(run.info.run_id, "loss/total", 1.0 / (step + 1), step=step)
        client.set_terminated(run.info.run_id)
    app = typer.Typer()
    app.command("release-student")(release_student)
    app.command("noop")(lambda: None)
    result = CliRunner().invoke(app, ["release-student", "--student", str(student), "--name", "toy-student/v7",
                                      "--guidances", "1,3", "--images", "1", "--max-prompts-per-task", "1",
                                      "--rebuild", "snapgen run --preset test"])
    assert result.exit_code == 0, result.output
    reported = json.loads(result.stdout.strip().splitlines()[-1])
    folder = rel.verify_release("toy-student/v7", teacher_release)
    assert reported["release"] == "toy-student/v7" and reported["guidance"] in (1.0, 3.0)
    card = (folder / "MODEL_CARD.md").read_text()
    assert "| 1 |" in card and "| 3 |" in card and "prompt-blind floor" in card and "snapgen run --preset test" in card
    assert (folder / "card" / "samples_per_task.png").is_file()
    assert (folder / "card" / "loss_curve.png").is_file() and "20 steps x batch" in card  # both runs' history
    assert json.loads((folder / rel.STUDENT_RECORD).read_text())["final_loss"] == pytest.approx(1.0 / 20)
    record = json.loads((folder / rel.STUDENT_RECORD).read_text())
    assert record["teacher"] == "release://toy-teacher/v7" and set(record["guidance_sweep"]) == {"1.0", "3.0"}
    preset, _, _ = st.load_student(folder)
    assert preset.sampler.guidance == reported["guidance"]  # the release samples at its best guidance
    assert st.read_card(folder)["bundle_uri"] == "release://toy-teacher/v7"

    shipped = evaluate_flow(EvaluateParams(model="release://toy-student/v7", benchmarks=["geneval"],
                                           images_per_prompt=1, max_prompts_per_task=1, reference_rows=False))
    assert shipped["model"]["kind"] == "student" and shipped["model"]["folder"] == str(folder)
    assert shipped["generation"]["sampler"]["guidance"] == reported["guidance"]
    assert 0.0 <= shipped["benchmarks"]["geneval"]["overall"] <= 1.0

    from tasks.export import resolve_model_ref  # export takes it too: the UNet, and the text encoder of its teacher

    parts = resolve_model_ref.fn("release://toy-student/v7")
    assert parts["unet"] == str(folder / st.UNET)
    assert parts["text_encoder"] == str(teacher_release / "toy-teacher" / "v7" / "text_encoder")

    again = CliRunner().invoke(app, ["release-student", "--student", str(student), "--name", "toy-student/v7",
                                     "--rebuild", "x"])
    assert again.exit_code == 2 and "already exists" in again.output


def test_release_student_refuses_a_student_of_an_unshipped_teacher(tmp_path, monkeypatch, teacher_release,
                                                                  prefect_harness):
    import typer
    from typer.testing import CliRunner

    from flows.cli_release_student import release_student
    from snapgen_model.training import release as rel

    monkeypatch.setenv("SNAPGEN_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(rel, "RELEASES_DIR", teacher_release)
    student = _student(tmp_path, teacher_release, "not-a-shipped-teacher")
    app = typer.Typer()
    app.command("release-student")(release_student)
    app.command("noop")(lambda: None)
    result = CliRunner().invoke(app, ["release-student", "--student", str(student), "--name", "toy-student/v8",
                                      "--rebuild", "x"])
    assert result.exit_code == 2 and "not-a-shipped-teacher) is not a shipped release" in result.output
    assert "toy-student/v8" not in rel.read_index(teacher_release)["releases"]
