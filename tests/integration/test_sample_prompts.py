"""`snapgen sample --model M --prompt P` draws what the prompt says with the model's own conditioner, text
encoders and decoder: different prompts give different images, the same prompt and seed the same image, and
the pixels are those of the model's evaluation generator (not the null condition, not a fresh TinyDecoder).
Run through the CLI, on a student folder, a checkpoint inside it, and a models:/ ref on a real MLflow server."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from tests.fixtures.tiny_student import tiny_decoder, tiny_student  # noqa: F401  (fixtures)

pytestmark = pytest.mark.integration

PROMPT = "a red circle left of a blue square"


def _sample(tmp_path: Path, name: str, *args: str) -> dict:
    from flows.cli import app

    result = CliRunner().invoke(app, ["sample", *args, "--out", str(tmp_path / f"{name}.png"), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout[result.stdout.index("{"):])
    return summary


def _pixels(summary: dict) -> list[np.ndarray]:
    return [np.asarray(Image.open(s["path"]).convert("RGB")) for s in summary["samples"]]


def test_sample_follows_the_prompt_with_the_models_own_generator(tmp_path, tiny_student, tiny_bundle):  # noqa: F811
    from snapgen_model.evaluation.bundle_generators import BundleStudentGenerator
    from snapgen_model.evaluation.runner import CheckpointGenerator

    red = _sample(tmp_path, "red", "--model", str(tiny_student), "--prompt", PROMPT, "--seeds", "0,1")
    assert red["kind"] == "student" and "vae" in red["decoder"] and red["conditioning"].startswith("text:clip")
    assert [(s["prompt"], s["seed"]) for s in red["samples"]] == [(PROMPT, 0), (PROMPT, 1)]
    green = _sample(tmp_path, "green", "--model", str(tiny_student), "--prompt", "three green triangles",
                    "--seeds", "0,1")
    again = _sample(tmp_path, "again", "--model", str(tiny_student / "unet_ema.safetensors"), "--prompt", PROMPT,
                    "--seeds", "0,1")
    a, b, c = _pixels(red), _pixels(green), _pixels(again)
    assert all(np.array_equal(x, y) for x, y in zip(a, c))                 # same prompt + seed: same image
    assert all(np.abs(x.astype(int) - y.astype(int)).mean() > 0.5 for x, y in zip(a, b))  # the prompt matters
    assert not np.array_equal(a[0], a[1])                                  # the seed matters
    # exactly the student's own generator: its conditioner, the bundle's text encoder and VAE decoder
    expected = BundleStudentGenerator(tiny_student, tiny_bundle)([PROMPT, PROMPT], [0, 1])
    assert all(np.array_equal(x, y) for x, y in zip(a, expected))
    # ... and not what `sample` did before: the UNet with the null condition through a fresh TinyDecoder
    blind = CheckpointGenerator(tiny_student / "unet_ema.safetensors", conditioner=None)([PROMPT], [0])[0]
    assert blind.shape != a[0].shape or not np.array_equal(blind, a[0])
    grid = Image.open(red["path"])
    assert grid.width > 2 * 32 and grid.height >= 32


def test_sample_from_a_registry_ref(tmp_path, monkeypatch, mlflow_server, tiny_student, tiny_bundle,  # noqa: F811
                                   tiny_decoder):  # noqa: F811
    """models:/NAME@ALIAS on a real server: the registered pyfunc's own artifacts are sampled, with the bundle
    VAE by default and with the tiny decoder the version carries under --decoder tiny."""
    from mlflow.tracking import MlflowClient

    from tasks import mlflow_model, registry, tracking
    from tasks.settings import get_settings

    monkeypatch.setenv("SNAPGEN_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("SNAPGEN_MLFLOW_TRACKING_URI", mlflow_server.uri)
    settings = get_settings()
    with tracking.start_run(settings, "register tiny student for sample") as run:
        source = mlflow_model.log_pyfunc(run, tiny_student, tiny_bundle, decoder=tiny_decoder)
    version = registry.register_model_version(settings, "snapgen-sample-test", source, run_id=run.run_id)
    MlflowClient(mlflow_server.uri).set_registered_model_alias("snapgen-sample-test", "champion", version)
    ref = _sample(tmp_path, "ref", "--model", "models:/snapgen-sample-test@champion", "--prompt", PROMPT, "--seeds", "3")
    direct = _sample(tmp_path, "direct", "--model", str(tiny_student), "--prompt", PROMPT, "--seeds", "3")
    assert ref["kind"] == "student" and "artifacts/student" in ref["source"]
    assert np.array_equal(_pixels(ref)[0], _pixels(direct)[0])
    tiny = _sample(tmp_path, "ref-tiny", "--model", "models:/snapgen-sample-test@champion", "--prompt", PROMPT,
                   "--seeds", "3", "--decoder", "tiny")
    direct_tiny = _sample(tmp_path, "direct-tiny", "--model", str(tiny_student), "--prompt", PROMPT, "--seeds", "3",
                          "--decoder", str(tiny_decoder))
    assert "artifacts/decoder/tiny_decoder.safetensors" in tiny["decoder"]
    assert np.array_equal(_pixels(tiny)[0], _pixels(direct_tiny)[0])
    assert not np.array_equal(_pixels(tiny)[0], _pixels(ref)[0])


@pytest.mark.parametrize("args, message", [
    (["--prompt", PROMPT], "--prompt needs --model"),
    (["--model", "/nonexistent/student"], "no such file or folder"),
    (["--model", "models:/nope"], "malformed"),
])
def test_bad_sample_inputs_name_the_input(tmp_path, args, message):
    from flows.cli import app

    result = CliRunner().invoke(app, ["sample", *args, "--out", str(tmp_path / "x.png")])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output


def test_student_without_prompt_and_bare_checkpoint_with_prompt_are_refused(tmp_path, tiny_student):  # noqa: F811
    from flows.cli import app
    from tests.fixtures.checkpoints import save_toy_checkpoint

    result = CliRunner().invoke(app, ["sample", "--model", str(tiny_student), "--out", str(tmp_path / "x.png")])
    assert result.exit_code == 2 and "--prompt" in result.output, result.output
    bare = save_toy_checkpoint(tmp_path / "bare", preset="toy-smoke") / "unet.safetensors"
    result = CliRunner().invoke(app, ["sample", "--model", str(bare), "--prompt", PROMPT, "--out", str(tmp_path / "y.png")])
    assert result.exit_code == 2 and "bare UNet checkpoint" in result.output, result.output
    blind = _sample(tmp_path, "blind", "--model", str(bare), "--seeds", "0")
    assert blind["kind"] == "checkpoint" and blind["decoder"].endswith("decoder.safetensors")


def test_sample_with_the_tiny_decoder(tmp_path, tiny_student, tiny_bundle, tiny_decoder):  # noqa: F811
    """--decoder PATH decodes the student's latents with that TinyDecoder (the phone's decoder), not the VAE."""
    from snapgen_model.evaluation.bundle_generators import BundleStudentGenerator

    vae = _sample(tmp_path, "vae", "--model", str(tiny_student), "--prompt", PROMPT, "--seeds", "5")
    tiny = _sample(tmp_path, "tiny", "--model", str(tiny_student), "--prompt", PROMPT, "--seeds", "5",
                   "--decoder", str(tiny_decoder))
    assert tiny["decoder"].startswith("tiny decoder") and str(tiny_decoder) in tiny["decoder"]
    expected = BundleStudentGenerator(tiny_student, tiny_bundle, decoder_path=tiny_decoder)([PROMPT], [5])[0]
    assert np.array_equal(_pixels(tiny)[0], expected)
    assert not np.array_equal(_pixels(tiny)[0], _pixels(vae)[0])


@pytest.mark.parametrize("extra, message", [
    (["--decoder", "tiny"], "--decoder tiny:"),                 # a student folder carries no tiny decoder
    (["--decoder", "/nonexistent/tiny_decoder.safetensors"], "--decoder /nonexistent"),
    (["--decoder", "STUDENT_UNET"], "expected a TinyDecoder"),  # a checkpoint of another kind
])
def test_bad_decoder_choices_name_the_input(tmp_path, tiny_student, extra, message):  # noqa: F811
    from flows.cli import app

    extra = [str(tiny_student / "unet_ema.safetensors") if e == "STUDENT_UNET" else e for e in extra]
    result = CliRunner().invoke(app, ["sample", "--model", str(tiny_student), "--prompt", PROMPT, *extra,
                                      "--out", str(tmp_path / "x.png")])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    result = CliRunner().invoke(app, ["sample", "--decoder", "vae", "--out", str(tmp_path / "y.png")])
    assert result.exit_code == 2 and "--decoder needs --model" in result.output, result.output
