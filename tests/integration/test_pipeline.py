"""snapgen_pipeline end to end on the toy-smoke preset, against a real MLflow server and Prefect's API:
every stage runs and is recorded, a rerun with unchanged inputs is a no-op, a stage that fails for
real (a missing FID weights file) is resumed at that stage once the file exists, the registry holds
the candidate with lineage and checksums, and the run report is logged."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

STAGES = ["teacher", "curate", "cache_teacher", "train_decoder", "pretrain", "distill_steps", "evaluate", "export",
          "register", "promote"]


@pytest.fixture(scope="module")
def pipeline_env(tmp_path_factory, mlflow_server, prefect_harness):
    home = tmp_path_factory.mktemp("pipeline")
    mp = pytest.MonkeyPatch()
    mp.setenv("SNAPGEN_HOME", str(home / "home"))
    mp.setenv("SNAPGEN_STORAGE_ROOT", f"file://{home}/storage")
    mp.setenv("SNAPGEN_MLFLOW_TRACKING_URI", mlflow_server.uri)
    mp.setattr("tasks.tracking.SYSTEM_METRICS_INTERVAL_S", 1.0)
    yield {"home": home, "mlflow": mlflow_server}
    mp.undo()


@pytest.fixture(scope="module")
def first_run(pipeline_env):
    from flows.pipeline import snapgen_pipeline

    return snapgen_pipeline(preset="toy-smoke")


def _status(summary):
    return {r["name"]: r["status"] for r in summary["stages"]}


def test_every_stage_runs_registers_and_promotes(first_run, pipeline_env):
    from mlflow.tracking import MlflowClient

    assert [r["name"] for r in first_run["stages"]] == STAGES
    assert set(_status(first_run).values()) == {"completed"}
    client = MlflowClient(pipeline_env["mlflow"].uri)
    reg = first_run["results"]["register"]
    assert first_run["aliases"] == {"candidate": reg["version"], "champion": reg["version"]}
    mv = client.get_model_version("snapgen", reg["version"])
    tags = mv.tags
    assert tags["snapgen.checkpoint_uri"] == first_run["results"]["distill_steps"]["student_uri"]
    assert tags["snapgen.dataset_hash"] == first_run["results"]["curate"]["dataset_hash"]
    assert tags["snapgen.teacher_id"] == first_run["results"]["teacher"]["bundle_id"]
    assert tags["snapgen.export_parity"] == "passed" and "snapgen.metric.geneval/overall" in tags
    sha = [k for k in tags if k.startswith("snapgen.sha256.")]
    assert "snapgen.sha256.unet_ema.safetensors" in sha and any(k.startswith("snapgen.sha256.export/") for k in sha)
    decision = json.loads(tags["snapgen.promotion.decision"])
    assert decision["passed"] and decision["promoted"] and decision["champion_before"] is None

    # every stage run is nested under the pipeline run, in the one experiment stand-alone stages use too
    pipeline_run = client.get_run(first_run["mlflow_run_id"])
    experiment = client.get_experiment(pipeline_run.info.experiment_id)
    assert experiment.name == "snapgen" == first_run["config"]["experiment"]
    assert pipeline_run.info.run_name == "pipeline toy-smoke"
    # run names say what ran; the pipeline run carries each model's headline metrics
    evaluations = {m: first_run["results"]["evaluate"]["models"][m]["mlflow_run_id"] for m in ("teacher", "distilled")}
    assert client.get_run(evaluations["teacher"]).info.run_name == "evaluate teacher"
    steps = first_run["results"]["evaluate"]["models"]["distilled"]["generation"]["sampler"]["steps"]
    assert client.get_run(evaluations["distilled"]).info.run_name == f"evaluate student {steps}-step"
    names = {client.get_run(r["mlflow_run_id"]).info.run_name for r in first_run["stages"] if r["mlflow_run_id"]}
    assert not [n for n in names if "-" in n.split(" ")[0]], names  # no "evaluate-<hash>"
    headline = pipeline_run.data.metrics
    for model in ("teacher", "pretrained", "distilled"):
        geneval = first_run["results"]["evaluate"]["models"][model]["benchmarks"]["geneval"]["overall"]
        assert headline[f"{model}/geneval/overall"] == pytest.approx(geneval), model
        assert f"{model}/dpg/overall" in headline and f"{model}/fid" in headline
    assert "reference/floor/geneval" in headline
    stage_runs = [r["mlflow_run_id"] for r in first_run["stages"] if r["mlflow_run_id"]
                  and r["mlflow_run_id"] != first_run["mlflow_run_id"]]
    assert len(stage_runs) >= 6
    for run_id in stage_runs:
        run = client.get_run(run_id)
        assert run.data.tags.get("mlflow.parentRunId") == first_run["mlflow_run_id"], run.data.tags.get("snapgen.stage")
        assert run.info.experiment_id == pipeline_run.info.experiment_id

    # training stages log preview grids (student beside teacher) and system metrics; so does the pipeline run
    pretrain_run = first_run["results"]["pretrain"]["mlflow_run_id"]
    previews = [a.path for a in client.list_artifacts(pretrain_run, "previews")]
    assert any(p.endswith(".png") for p in previews) and "previews/prompts.txt" in previews
    assert any(k.startswith("system/") for k in client.get_run(first_run["mlflow_run_id"]).data.metrics)

    # the report: a self-contained HTML file, logged beside the summary table
    html = Path(first_run["report"]["html"]).read_text()
    assert "student, few-step" in html and "data:image/png;base64," in html and 'id="exports"' in html
    assert "teacher (top) beside the student (bottom)" in html
    logged = {a.path for a in client.list_artifacts(first_run["mlflow_run_id"], "report")}
    assert any(p.endswith(".html") for p in logged) and "report/summary.md" in logged

    # the table carries the three models and the reference rows; the evaluation used the student's text path
    evaluated = first_run["results"]["evaluate"]["models"]
    assert set(evaluated) == {"teacher", "pretrained", "distilled"}
    assert evaluated["distilled"]["generation"]["kind"] == "student"
    assert evaluated["distilled"]["generation"]["conditioning"].startswith("text:clip")
    assert evaluated["teacher"]["model"]["kind"] == "teacher"
    assert {"clean", "floor", "noise", "blank"} <= set(evaluated["teacher"]["reference_rows"])
    assert "ref: prompt-blind floor" in first_run["report"]["markdown"]


def test_champion_loads_as_a_pyfunc_that_follows_prompts(first_run, pipeline_env, monkeypatch):
    """`mlflow.pyfunc.load_model("models:/snapgen@champion").predict(prompts)` against the real server: the
    registered version carries the student, its conditioner and the bundle's text encoders and VAE, and gives
    the evaluation's own images (same generator, same seeds)."""
    import mlflow
    import numpy as np

    from snapgen_model.evaluation.bundle_generators import BundleStudentGenerator
    from tasks.cache import local_folder

    monkeypatch.setenv("MLFLOW_TRACKING_URI", pipeline_env["mlflow"].uri)
    mlflow.set_tracking_uri(pipeline_env["mlflow"].uri)
    model = mlflow.pyfunc.load_model("models:/snapgen@champion")
    prompts = ["a red circle left of a blue square", "two green triangles"]
    images = model.predict(prompts, params={"seed": 7})
    assert images.dtype == np.uint8 and images.shape[0] == 2 and images.shape[-1] == 3
    final = first_run["results"]["distill_steps"]
    bundle = local_folder(first_run["results"]["teacher"]["bundle_uri"])
    expected = BundleStudentGenerator(local_folder(final["student_uri"]), bundle)(prompts, [7, 8])
    assert np.array_equal(images, expected)
    # the pipeline's trained tiny decoder travels with the version: params={"decoder": "tiny"} decodes with it
    from flows.sampling import local_path

    tiny_ckpt = local_path(first_run["results"]["train_decoder"]["checkpoint"])
    tiny = model.predict(prompts, params={"seed": 7, "decoder": "tiny"})
    assert np.array_equal(tiny, BundleStudentGenerator(local_folder(final["student_uri"]), bundle,
                                                       decoder_path=tiny_ckpt)(prompts, [7, 8]))
    # (that prompts change the images is tested on a student whose weights depend on them,
    # tests/integration/test_pyfunc_model.py: a toy-smoke student trained 2 steps from zero init is prompt-blind)


def test_rerun_with_unchanged_inputs_is_a_no_op(first_run, pipeline_env):
    from mlflow.tracking import MlflowClient

    from flows.pipeline import snapgen_pipeline

    again = snapgen_pipeline(preset="toy-smoke")
    assert set(_status(again).values()) == {"cached"}
    from flows.pipeline_report import run_links

    links = run_links(again)  # every reused stage links to the Prefect run that ran it (the first pipeline run)
    cached = [r for r in links if r["name"].endswith("(cached)") or r["name"].startswith("evaluate ")]
    assert len(cached) >= 8 and all(r["flow_run_id"] == first_run["flow_run_id"] for r in cached), cached
    assert all(r["prefect"] and r["prefect"].endswith(first_run["flow_run_id"]) for r in cached)
    assert again["results"]["register"]["version"] == first_run["results"]["register"]["version"]
    versions = MlflowClient(pipeline_env["mlflow"].uri).search_model_versions("name = 'snapgen'")
    assert len(versions) == 1


def test_failed_stage_is_resumed_there(first_run, pipeline_env, tmp_path):
    """A real failure (the FID weights file a setting points at does not exist yet), then the same
    command again once it exists: the finished stages are skipped, the pipeline resumes at evaluate."""
    from flows.pipeline import snapgen_pipeline
    from snapgen_model.evaluation.fid import default_weights_path

    weights = tmp_path / "weights" / "inception.pt"
    overrides = [f"evaluate.options.fid_weights={weights}"]
    with pytest.raises(Exception) as failure:
        snapgen_pipeline(preset="toy-smoke", overrides=overrides)
    assert "inception.pt" in str(failure.value) or "weights" in str(failure.value).lower()
    weights.parent.mkdir(parents=True)
    shutil.copy(default_weights_path(), weights)
    resumed = snapgen_pipeline(preset="toy-smoke", overrides=overrides)
    status = _status(resumed)
    assert all(status[s] == "cached" for s in STAGES[:6]), status
    assert status["evaluate"] == "completed" and status["export"] == "cached"
    assert status["register"] == "completed" and status["promote"] == "completed"
    assert resumed["results"]["register"]["version"] != first_run["results"]["register"]["version"]


def test_pipeline_report_renders_in_chromium(first_run):
    """The real run report (not synthetic data): loads in headless Chromium with no console error,
    every image decoded, every chart drawn."""
    import os

    if not os.path.exists("/usr/bin/chromium"):
        pytest.skip("/usr/bin/chromium is absent (make test installs Debian's chromium)")
    from playwright.sync_api import sync_playwright

    args = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run", "--disable-quic"]
    problems: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path="/usr/bin/chromium", args=args)
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.on("console", lambda m: problems.append(f"{m.type}: {m.text}") if m.type in ("error", "warning") else None)
        page.on("pageerror", lambda e: problems.append(f"pageerror: {e}"))
        page.on("requestfailed", lambda r: problems.append(f"requestfailed: {r.url}"))
        page.goto(Path(first_run["report"]["html"]).as_uri())
        images = page.eval_on_selector_all("img", "els => els.map(e => [e.complete, e.naturalWidth])")
        charts = page.eval_on_selector_all("svg", "els => els.map(e => e.getBoundingClientRect().width * "
                                                  "e.querySelectorAll('polyline,path,rect,circle').length)")
        summary = page.inner_text("#summary")
        browser.close()
    assert not problems, problems
    assert len(images) >= 4 and all(done and width > 0 for done, width in images), images
    assert len(charts) >= 4 and all(c > 0 for c in charts), charts
    assert "student, few-step" in summary and "ref: prompt-blind floor" in summary


def test_a_run_can_start_from_another_runs_student(first_run, pipeline_env):
    """`pretrain.train.init`: pretraining starts from the first run's student (its URI, as a shipped release
    is named by release://), the run says so in its results, its table and its MLflow tags, and the data
    stages are reused."""
    from mlflow.tracking import MlflowClient

    from flows.pipeline import snapgen_pipeline
    from flows.pipeline_report import summary_rows

    student = first_run["results"]["pretrain"]["student_uri"]
    run = snapgen_pipeline(preset="toy-smoke", overrides=[
        f"pretrain.train.init={student}", "export.enabled=false", "promotion.enabled=false",
        "evaluate.models=[\"pretrained\"]", "evaluate.benchmarks=[\"geneval\"]"])
    status = _status(run)
    assert all(status[s] == "cached" for s in ("teacher", "curate", "cache_teacher", "train_decoder")), status
    assert status["pretrain"] == "completed"
    pre = run["results"]["pretrain"]
    assert pre["init"] == student and pre["key"] != first_run["results"]["pretrain"]["key"]
    assert "init" not in first_run["results"]["pretrain"]  # a random-init run records none
    assert summary_rows(run)[0][0] == f"student, KD-pretrained (from {student}, +{pre['step']} steps here)"
    tags = MlflowClient(pipeline_env["mlflow"].uri).get_run(pre["mlflow_run_id"]).data.tags
    assert tags["snapgen.init"] == student
