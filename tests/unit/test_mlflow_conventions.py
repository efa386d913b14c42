"""MLflow's own conventions: its env vars (and AWS's region) are honoured when the SNAPGEN_ ones are unset,
and run names say what ran."""
from __future__ import annotations

import pytest

from tasks.settings import get_settings

STANDARD = ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "AWS_DEFAULT_REGION")
OURS = ("SNAPGEN_MLFLOW_TRACKING_URI", "SNAPGEN_EXPERIMENT_NAME", "SNAPGEN_S3_REGION", "SNAPGEN_CONFIG_FILE")


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    for key in STANDARD + OURS:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("SNAPGEN_HOME", str(tmp_path))
    return monkeypatch


def test_standard_env_vars_are_honoured_when_ours_are_unset(clean_env, tmp_path):
    s = get_settings()
    assert s.mlflow_tracking_uri == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert (s.experiment_name, s.s3_region) == ("snapgen", "us-east-1")
    clean_env.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    clean_env.setenv("MLFLOW_EXPERIMENT_NAME", "team-exp")
    clean_env.setenv("AWS_DEFAULT_REGION", "eu-central-1")
    s = get_settings()
    assert (s.mlflow_tracking_uri, s.experiment_name, s.s3_region) == ("http://127.0.0.1:5999", "team-exp",
                                                                       "eu-central-1")


def test_snapgen_env_vars_win_over_the_standard_ones(clean_env):
    clean_env.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    clean_env.setenv("MLFLOW_EXPERIMENT_NAME", "team-exp")
    clean_env.setenv("AWS_DEFAULT_REGION", "eu-central-1")
    clean_env.setenv("SNAPGEN_MLFLOW_TRACKING_URI", "http://127.0.0.1:6000")
    clean_env.setenv("SNAPGEN_EXPERIMENT_NAME", "ours")
    clean_env.setenv("SNAPGEN_S3_REGION", "us-west-2")
    s = get_settings()
    assert (s.mlflow_tracking_uri, s.experiment_name, s.s3_region) == ("http://127.0.0.1:6000", "ours", "us-west-2")


def test_blank_standard_env_vars_are_ignored(clean_env, tmp_path):
    clean_env.setenv("MLFLOW_TRACKING_URI", "  ")
    clean_env.setenv("MLFLOW_EXPERIMENT_NAME", "")
    s = get_settings()
    assert s.mlflow_tracking_uri.startswith("sqlite:///") and s.experiment_name == "snapgen"


def test_configuring_mlflow_does_not_pass_for_the_users_choice(clean_env, tmp_path):
    """mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI; a later home must still get its own database."""
    import os

    from tasks.tracking import configure_mlflow

    configure_mlflow(get_settings(home=tmp_path / "a"))
    assert "MLFLOW_TRACKING_URI" not in os.environ
    assert get_settings(home=tmp_path / "b").mlflow_tracking_uri == f"sqlite:///{tmp_path / 'b' / 'mlflow.db'}"
    clean_env.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    configure_mlflow(get_settings(home=tmp_path / "a", mlflow_tracking_uri=f"sqlite:///{tmp_path / 'c.db'}"))
    assert os.environ["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:5999"


def test_pipeline_logs_to_the_settings_experiment_by_default():
    from flows.pipeline_config import build_config

    assert build_config("toy-smoke", []).experiment is None  # the flow fills in settings.experiment_name
    assert build_config("toy-smoke", ["experiment=separate"]).experiment == "separate"


@pytest.mark.parametrize("model, steps, expected", [
    ({"kind": "teacher", "ref": "/b"}, 28, "evaluate teacher"),
    ({"kind": "student", "ref": "/s"}, 4, "evaluate student 4-step"),
    ({"kind": "student", "ref": "models:/snapgen@champion", "version": "3"}, 24, "evaluate student 24-step (snapgen v3)"),
    ({"kind": "checkpoint", "ref": "/c/unet.safetensors"}, 8, "evaluate checkpoint 8-step"),
])
def test_evaluation_run_names_say_what_ran(model, steps, expected):
    from tasks.evaluate import evaluation_run_name

    assert evaluation_run_name({"model": model, "generation": {"sampler": {"steps": steps}}}) == expected


def test_headline_metrics_per_model():
    from flows.pipeline_report import headline_metrics

    models = {"teacher": {"benchmarks": {"geneval": {"overall": 0.25, "exact_count": {"overall": 0.5}},
                                         "dpg": {"overall": 0.4}, "fid": {"fid": 80.0}},
                          "reference_rows": {"floor": {"geneval": {"overall": 0.1}}}},
              "distilled": {"benchmarks": {"geneval": {"overall": 0.125}, "dpg": {"overall": None}}}}
    assert headline_metrics(models) == {"teacher/geneval/overall": 0.25, "teacher/geneval/exact_count": 0.5,
                                        "teacher/dpg/overall": 0.4, "teacher/fid": 80.0,
                                        "reference/floor/geneval": 0.1, "distilled/geneval/overall": 0.125}


def test_report_links_never_carry_credentials(clean_env, tmp_path):
    from tasks.tracking import ui_base_url

    assert ui_base_url(get_settings()) == "http://127.0.0.1:5000"  # local store: the UI `snapgen ui` serves
    s = get_settings(mlflow_tracking_uri="https://alice:s3cret@mlflow.example:8443/?token=abc")
    assert ui_base_url(s) == "https://mlflow.example:8443"
