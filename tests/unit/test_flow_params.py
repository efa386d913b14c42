"""The training flows parse their stage config once, at the flow boundary, and hand the tasks the typed
config: `PretrainParams.config()` / `DistillParams.config()`. The flows' bodies run undecorated here
(`.fn`) with their tasks replaced by recorders: what is tested is the flow's wiring (what it parses, how
often, and what it passes on), not the tasks, which the integration suite runs against real servers."""
from __future__ import annotations

import pytest

from snapgen_model.config_base import ConfigBase, ConfigError
from snapgen_model.training.distill_steps import StepDistillConfig
from snapgen_model.training.pretrain import PretrainConfig


@pytest.fixture
def parses(monkeypatch):
    """Counts ConfigBase.with_overrides calls per config class (the override parser every stage config uses)."""
    counts: dict[str, int] = {}
    original = ConfigBase.with_overrides

    def counting(self, overrides):
        counts[type(self).__name__] = counts.get(type(self).__name__, 0) + 1
        return original(self, overrides)

    monkeypatch.setattr(ConfigBase, "with_overrides", counting)
    return counts


def test_pretrain_flow_parses_once_and_passes_the_typed_config(monkeypatch, parses):
    import flows.pretrain as fp

    seen: dict = {}
    monkeypatch.setattr(fp, "fetch_cache", lambda uri, download: seen.update(download=download) or ("/c", {"k": 1}))
    monkeypatch.setattr(fp, "train_student", lambda *a: seen.update(args=a) or {"key": "k", "step": 3, "checkpoints": "x",
                                                                             "mlflow_run_id": "r"})
    monkeypatch.setattr(fp, "create_markdown_artifact", lambda *a, **k: None)
    params = fp.PretrainParams(cache_uri="file:///c", preset="toy-smoke", pretrain=["steps=3", "data=stream"])
    fp.pretrain_flow.fn(params)
    cfg = seen["args"][4]
    assert isinstance(cfg, PretrainConfig) and cfg.steps == 3 and cfg.data == "stream"
    assert seen["download"] is False  # the streamed data path reads the shards where they are
    assert parses == {"PretrainConfig": 1}
    assert params.config() is cfg and parses == {"PretrainConfig": 1}  # parsed once, kept


def test_distill_flow_parses_once_and_passes_the_typed_config(monkeypatch, parses):
    import flows.distill as fd

    seen: dict = {}
    monkeypatch.setattr(fd, "fetch_cache", lambda uri, download: seen.update(download=download) or ("/c", {"k": 1}))
    monkeypatch.setattr(fd, "fetch_folder", lambda uri, names=None: "/folder")
    result = {"key": "k", "step": 2, "sampler": {"steps": 4, "kind": "few_step", "shift": 1.0, "guidance": 1.0},
              "student": {"unet": "u"}, "mlflow_run_id": "r", "metrics": {}}
    monkeypatch.setattr(fd, "distill_student", lambda *a: seen.update(args=a) or result)
    monkeypatch.setattr(fd, "create_markdown_artifact", lambda *a, **k: None)
    params = fd.DistillParams(cache_uri="file:///c", student_uri="file:///s", bundle_uri="file:///b",
                              distill=["steps=2", "sampler_steps=4"])
    fd.distill_steps_flow.fn(params)
    cfg = seen["args"][5]
    assert isinstance(cfg, StepDistillConfig) and cfg.steps == 2 and cfg.sampler_steps == 4
    assert seen["download"] is True
    assert parses == {"StepDistillConfig": 1}


@pytest.mark.parametrize("module, params", [
    ("flows.pretrain", {"cache_uri": "c", "pretrain": ["stepz=3"]}),
    ("flows.distill", {"cache_uri": "c", "student_uri": "s", "bundle_uri": "b", "distill": ["steps=-1"]}),
])
def test_a_bad_stage_override_fails_at_the_flow_boundary_naming_it(monkeypatch, module, params):
    """Before any task runs (no cache fetched, nothing trained): the error names the override."""
    import importlib

    mod = importlib.import_module(module)
    called: list[str] = []
    monkeypatch.setattr(mod, "fetch_cache", lambda *a, **k: called.append("fetch"))
    flow = mod.pretrain_flow if module == "flows.pretrain" else mod.distill_steps_flow
    model = mod.PretrainParams if module == "flows.pretrain" else mod.DistillParams
    with pytest.raises(ConfigError, match="stepz|steps"):
        flow.fn(model(**params))
    assert called == []


def test_decoder_flow_passes_the_typed_config(monkeypatch, parses):
    import flows.decoder as fdec
    from snapgen_model.training.decoder import DecoderTrainConfig

    seen: dict = {}
    report = {"params": 1, "vae_decoder_params": 2, "psnr_vs_images": 1.0, "vae_psnr_vs_images": 2.0, "batch": 1,
              "latency_ms": 1.0, "vae_latency_ms": 2.0, "psnr_vs_vae_decoder": 3.0, "ssim_vs_vae_decoder": 0.5}
    monkeypatch.setattr(fdec, "train_decoder_task", lambda *a: seen.update(args=a) or {"report": report})
    monkeypatch.setattr(fdec, "create_markdown_artifact", lambda *a, **k: None)
    fdec.train_decoder_flow.fn(fdec.DecoderParams(cache_uri="c", bundle_uri="b", train_overrides=["steps=7"],
                                                  track=False))
    cfg = seen["args"][4]
    assert isinstance(cfg, DecoderTrainConfig) and cfg.steps == 7 and parses == {"DecoderTrainConfig": 1}


def test_export_params_parse_the_export_config_with_palettization():
    from flows.export import ExportParams
    from snapgen_model.export import ExportConfig

    cfg = ExportParams(model="m", formats=["onnx", "coreml"], palettize=6, export_overrides=["opset=18"]).config()
    assert isinstance(cfg, ExportConfig) and cfg.palettize_bits == 6 and cfg.opset == 18
    with pytest.raises(ConfigError, match="opsett"):
        ExportParams(model="m", export_overrides=["opsett=18"]).config()


@pytest.mark.parametrize("argv", [["pretrain", "--cache", "/nonexistent", "--set", "stepz=3"],
                                  ["distill", "--cache", "/c", "--student", "/s", "--bundle", "/b", "--set", "stepz=3"]])
def test_the_cli_names_a_bad_stage_override_before_any_flow_run(argv):
    """What a user with a typo reads: one error line naming the key, exit code 2, no traceback and no
    flow run started (the config is parsed at the boundary before the flow is called)."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-m", "flows.cli", *argv], cwd=root, capture_output=True, text=True,
                          timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    assert "stepz: unknown key" in out and "Traceback" not in out and "Flow run" not in out, out


def test_the_pipeline_parses_each_stage_config_once_and_hands_the_flows_the_typed_objects(monkeypatch, parses):
    """`validate_stage_configs` builds each stage's library config once; the pipeline's stage calls pass those
    objects as the flows' parameters, and the flows use them without parsing again."""
    import flows.decoder as fdec
    import flows.distill as fd
    import flows.pretrain as fp
    from flows.pipeline import _decoder, _distill, _pretrain
    from flows.pipeline_config import build_config, validate_stage_configs

    cfg = build_config("toy-smoke", ["pretrain.train.steps=7", "distill.train.steps=5", "decoder.train.steps=3"])
    parses.clear()
    typed = validate_stage_configs(cfg)
    assert (typed.pretrain.steps, typed.distill.steps, typed.decoder.steps) == (7, 5, 3)
    once = dict(parses)
    assert once["PretrainConfig"] == once["StepDistillConfig"] == once["DecoderTrainConfig"] == 1

    received: dict = {}

    def recorder(name, result):
        def flow(params):
            received[name] = params.config()
            return result
        return flow

    monkeypatch.setattr(fp, "pretrain_flow", recorder("pretrain", {"student_uri": "s"}))
    monkeypatch.setattr(fd, "distill_steps_flow", recorder("distill", {"student_uri": "d"}))
    monkeypatch.setattr(fdec, "train_decoder_flow", recorder("decoder", {"checkpoint": "c", "report": {}}))
    _pretrain(cfg, typed, {"cache_uri": "file:///c"})
    _distill(typed, {"bundle_uri": "file:///b"}, {"cache_uri": "file:///c"}, {"student_uri": "file:///s"})
    _decoder(cfg, typed, {"bundle_uri": "file:///b"}, {"cache_uri": "file:///c"})
    assert received["pretrain"] is typed.pretrain and received["distill"] is typed.distill
    assert received["decoder"] is typed.decoder
    assert parses == once  # nothing parsed after the pipeline's one pass


def test_flow_parameters_carrying_a_typed_config_survive_json(parses):
    """A deployment stores flow parameters as JSON: a typed config round-trips to an equal config."""
    import flows.export as fe
    import flows.pretrain as fp
    from snapgen_model.export.config import ExportConfig

    cfg = PretrainConfig().with_overrides(["steps=9", "kd.combine=weighted"])
    params = fp.PretrainParams(cache_uri="file:///c", pretrain=cfg)
    again = fp.PretrainParams.model_validate_json(params.model_dump_json())
    assert isinstance(again.pretrain, PretrainConfig) and again.config() == cfg
    export = fe.ExportParams(model="m", formats=["onnx", "coreml"], export_overrides=ExportConfig(), palettize=6)
    assert export.config().palettize_bits == 6  # palettize applies to a typed config too
