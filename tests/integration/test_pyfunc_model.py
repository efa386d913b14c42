"""The registered model is loadable as MLflow users expect: `mlflow.pyfunc.load_model("models:/NAME@champion")
.predict(prompts)` turns prompts into images, against a real `mlflow server` (artifacts proxied by the server),
with the student's own conditioner and the bundle's text encoders and VAE decoder."""
from __future__ import annotations

import json

import numpy as np
import pytest

from tests.fixtures.tiny_student import tiny_decoder, tiny_student  # noqa: F401  (fixtures)

pytestmark = pytest.mark.integration

NAME = "snapgen-pyfunc-test"


@pytest.fixture(scope="module")
def champion(tmp_path_factory, mlflow_server, tiny_student, tiny_bundle, tiny_decoder):  # noqa: F811
    from mlflow.tracking import MlflowClient

    from tasks import mlflow_model, registry, tracking
    from tasks.settings import get_settings

    settings = get_settings(home=tmp_path_factory.mktemp("pyfunc-home"), mlflow_tracking_uri=mlflow_server.uri)
    with tracking.start_run(settings, "register tiny student") as run:
        source = mlflow_model.log_pyfunc(run, tiny_student, tiny_bundle, decoder=tiny_decoder)
    version = registry.register_model_version(settings, NAME, source, run_id=run.run_id)
    MlflowClient(mlflow_server.uri).set_registered_model_alias(NAME, "champion", version)
    return {"uri": mlflow_server.uri, "run_id": run.run_id, "version": version}


@pytest.fixture(scope="module")
def loaded(champion, tiny_student):  # noqa: F811
    import mlflow

    with pytest.MonkeyPatch.context() as mp:  # what a user with a server has exported
        mp.setenv("MLFLOW_TRACKING_URI", champion["uri"])
        mlflow.set_tracking_uri(champion["uri"])
        return mlflow.pyfunc.load_model(f"models:/{NAME}@champion")


def test_champion_predicts_images_from_prompts(loaded, tiny_student, tiny_bundle):  # noqa: F811
    import pandas as pd

    from snapgen_model.evaluation.bundle_generators import BundleStudentGenerator

    prompts = ["a red circle left of a blue square", "three green triangles"]
    images = loaded.predict(prompts, params={"seed": 3})
    assert images.dtype == np.uint8 and images.shape == (2, 32, 32, 3)
    # the student's own generator, conditioner and decoder: the same pixels as sampling the folder directly
    expected = BundleStudentGenerator(tiny_student, tiny_bundle)(prompts, [3, 4])
    assert np.array_equal(images, expected)
    # the prompt matters; the same prompt and seed give the same image, whatever the input's shape
    a = loaded.predict([prompts[0]], params={"seed": 3})[0]
    b = loaded.predict([prompts[1]], params={"seed": 3})[0]
    assert np.abs(a.astype(int) - b.astype(int)).mean() > 0.5
    assert np.array_equal(a, loaded.predict(prompts[0], params={"seed": 3})[0])
    assert np.array_equal(a, loaded.predict(pd.DataFrame({"prompt": [prompts[0]]}), params={"seed": 3})[0])
    assert not np.array_equal(a, loaded.predict([prompts[0]], params={"seed": 4})[0])


def test_version_carries_its_artifacts_and_signature(champion, mlflow_server):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_server.uri)
    files = {a.path for a in client.list_artifacts(champion["run_id"], "model")}
    assert {"model/MLmodel", "model/artifacts"} <= files
    student = {a.path.rsplit("/", 1)[1] for a in client.list_artifacts(champion["run_id"], "model/artifacts/student")}
    assert student == {"unet_ema.safetensors", "conditioner.safetensors", "student.json"}
    bundle = {a.path.rsplit("/", 1)[1] for a in client.list_artifacts(champion["run_id"], "model/artifacts/bundle")}
    assert {"vae", "text_encoder"} <= bundle and "transformer" not in bundle  # no teacher weights shipped
    decoder = {a.path.rsplit("/", 1)[1] for a in client.list_artifacts(champion["run_id"], "model/artifacts/decoder")}
    assert decoder == {"tiny_decoder.safetensors"}
    mlmodel = client.download_artifacts(champion["run_id"], "model/MLmodel")
    text = open(mlmodel).read()
    assert "python_function" in text and "signature" in text and '"seed"' in text and '"decoder"' in text


def test_bad_inputs_are_named(loaded):
    with pytest.raises(Exception, match="non-empty"):
        loaded.predict(["a red circle", " "])


def test_student_card_without_encoders_is_refused(tmp_path, tiny_student, tiny_bundle):  # noqa: F811
    import shutil

    from tasks.mlflow_model import package_student

    broken = tmp_path / "student"
    shutil.copytree(tiny_student, broken)
    card = json.loads((broken / "student.json").read_text())
    (broken / "student.json").write_text(json.dumps(card | {"encoders": []}))
    with pytest.raises(ValueError, match="encoders"):
        package_student(broken, tiny_bundle, tmp_path / "out")


def test_tiny_decoder_param(loaded, tmp_path, tiny_student, tiny_bundle, tiny_decoder):  # noqa: F811
    """params={"decoder": "tiny"} decodes with the tiny decoder the version carries; "vae" (the default) with
    the bundle VAE; anything else, or "tiny" on a version without one, is refused by name."""
    import mlflow

    from snapgen_model.evaluation.bundle_generators import BundleStudentGenerator
    from tasks.mlflow_model import save_pyfunc

    prompt = ["a red circle left of a blue square"]
    tiny = loaded.predict(prompt, params={"seed": 2, "decoder": "tiny"})
    vae = loaded.predict(prompt, params={"seed": 2, "decoder": "vae"})
    assert np.array_equal(tiny, BundleStudentGenerator(tiny_student, tiny_bundle, decoder_path=tiny_decoder)(prompt, [2]))
    assert np.array_equal(vae, loaded.predict(prompt, params={"seed": 2}))
    assert not np.array_equal(tiny, vae)
    with pytest.raises(Exception, match="decoder='taesd'"):
        loaded.predict(prompt, params={"decoder": "taesd"})
    bare = mlflow.pyfunc.load_model(str(save_pyfunc(tiny_student, tiny_bundle, tmp_path / "no-decoder")))
    with pytest.raises(Exception, match="carries no tiny decoder"):
        bare.predict(prompt, params={"decoder": "tiny"})
