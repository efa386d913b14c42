"""Pipeline presets and `--set` overrides (errors name the field and what it allows), and the pure
promotion gate logic."""
from __future__ import annotations

import json

import pytest

from flows.pipeline_config import PRESETS, PipelineConfigError, build_config, validate_stage_configs


@pytest.mark.parametrize("preset", [p for p in PRESETS if p != "snapgen-1024"])
def test_every_toy_preset_builds_and_its_stage_configs_validate(preset):
    cfg = build_config(preset)
    validate_stage_configs(cfg)
    assert cfg.preset == preset and cfg.scale == "toy"


def test_full_preset_needs_a_teacher_bundle():
    with pytest.raises(PipelineConfigError, match="teacher.bundle_uri"):
        build_config("snapgen-1024")
    cfg = build_config("snapgen-1024", ["teacher.bundle_uri=s3://models/sd35-large"])
    assert cfg.scale == "full" and cfg.pretrain.preset == "snapgen-1024" and "teacher" not in cfg.evaluate.models


def test_overrides_reach_fields_library_lists_and_free_dicts():
    cfg = build_config("toy", ["pretrain.train.steps=300", "pretrain.train.lr=0.002", "evaluate.options.steps=3",
                               "promotion.tolerance=0.1", "export.formats=[\"onnx\"]", "distill.enabled=false"])
    assert "steps=300" in cfg.pretrain.train and "steps=400" not in cfg.pretrain.train and "lr=0.002" in cfg.pretrain.train
    assert cfg.evaluate.options["steps"] == 3 and cfg.evaluate.options["images_per_prompt"] == 2
    assert cfg.promotion.tolerance == 0.1 and cfg.export.formats == ["onnx"] and cfg.distill.enabled is False


@pytest.mark.parametrize("override, message", [
    ("pretrain.trian=3", "pretrain has no field 'trian'; allowed: preset, overrides, train"),
    ("nosuchstage.x=1", "the pipeline config has no field 'nosuchstage'"),
    ("promotion.tolerance=-1", "promotion.tolerance: Input should be greater than or equal to 0"),
    ("export.formats=[\"tflite\"]", "export.formats.0: Input should be 'onnx' or 'coreml'"),
    ("evaluate.benchmarks=[\"imagenet\"]", "unknown benchmarks ['imagenet']"),
    ("curate.scenes=many", "curate.scenes: Input should be a valid integer"),
    ("steps", "expected KEY=VALUE"),
])
def test_bad_overrides_name_the_field(override, message):
    with pytest.raises(PipelineConfigError) as exc:
        build_config("toy", [override])
    assert message in str(exc.value)


def test_bad_library_keys_fail_before_any_stage():
    with pytest.raises(PipelineConfigError, match=r"pretrain.train: .*stepz.*allowed keys"):
        validate_stage_configs(build_config("toy", ["pretrain.train.stepz=3"]))
    with pytest.raises(PipelineConfigError, match="unknown pipeline preset 'toyy'; choose from toy-smoke, toy"):
        build_config("toyy")


def test_gate_logic():
    from tasks.registry import evaluate_gates

    gates = [{"metric": "geneval/overall", "higher_is_better": True, "threshold": 0.5},
             {"metric": "fid", "higher_is_better": False, "threshold": 200.0}]
    ok = evaluate_gates({"geneval/overall": 0.6, "fid": 150.0}, None, gates, 0.02, parity="passed",
                        require_parity=True, checksum_problems=[])
    assert ok["passed"] and not ok["reasons"] and len(ok["checks"]) == 4
    worse = evaluate_gates({"geneval/overall": 0.6, "fid": 150.0}, {"geneval/overall": 0.65, "fid": 140.0}, gates,
                           0.02, parity="passed", require_parity=True, checksum_problems=[])
    assert not worse["passed"] and len(worse["reasons"]) == 2  # both metrics regressed beyond 0.02
    within = evaluate_gates({"geneval/overall": 0.64, "fid": 140.01}, {"geneval/overall": 0.65, "fid": 140.0}, gates,
                            0.02, parity="passed", require_parity=True, checksum_problems=[])
    assert within["passed"]
    blocked = evaluate_gates({"fid": 250.0}, None, gates, 0.0, parity="absent", require_parity=True,
                             checksum_problems=["unet: modified"])
    assert [r.split(":")[0] for r in blocked["reasons"]] == ["geneval/overall present", "fid <= 200",
                                                              "export parity passed", "artifact checksums verified"]


def test_unknown_evaluation_option_fails_before_any_stage():
    with pytest.raises(PipelineConfigError, match="evaluate.options: images_per_promt: unknown field"):
        validate_stage_configs(build_config("toy", ["evaluate.options.images_per_promt=4"]))


def test_a_shipped_teacher_release_is_checked_before_any_stage_and_registered_instead_of_trained(tmp_path,
                                                                                                monkeypatch):
    import json

    import flows.bootstrap
    from flows.pipeline import _teacher
    from snapgen_model.training import release as rel

    monkeypatch.setattr(rel, "RELEASES_DIR", tmp_path)  # an empty releases folder, not the repository's
    cfg = build_config("toy", ["teacher.release=toy-teacher/v99", "pretrain.train.init="])  # the student: random init
    with pytest.raises(PipelineConfigError, match="teacher.release: release 'toy-teacher/v99' is not in"):
        validate_stage_configs(cfg)
    (tmp_path / "index.json").write_text(json.dumps({"releases": {"toy-teacher/v99": {}}}))
    validate_stage_configs(cfg)

    calls = []
    out = {"bundle_uri": "file:///b", "config_hash": "abc", "cache_hit": False}
    monkeypatch.setattr(flows.bootstrap, "register_teacher_release_flow", lambda name: calls.append(("release", name)) or out)
    monkeypatch.setattr(flows.bootstrap, "bootstrap_teacher_flow",
                        lambda preset, overrides: calls.append(("bootstrap", preset)) or out)
    shipped = _teacher(cfg)
    assert calls == [("release", "toy-teacher/v99")]
    assert shipped["bootstrapped"] is False and shipped["release"] == "toy-teacher/v99" and shipped["bundle_id"] == "abc"
    # one setting trains a teacher from scratch instead
    trained = _teacher(build_config("toy", ["teacher.release=null"]))
    assert calls[-1] == ("bootstrap", "toy") and trained["bootstrapped"] is True and trained["release"] is None


def test_the_toy_demo_uses_the_shipped_teacher_and_scores_every_prompt():
    from snapgen_model.training.release import verify_release

    cfg = build_config("toy")
    assert cfg.teacher.release == "toy-teacher/v2"
    verify_release(cfg.teacher.release)  # the repository's release: every sha256 checks out
    validate_stage_configs(cfg)
    assert cfg.evaluate.options["max_prompts_per_task"] == 0 and cfg.evaluate.options["images_per_prompt"] >= 2
    assert build_config("toy", ["teacher.release=null"]).teacher.release is None


def test_the_toy_students_distil_from_the_teacher_run_online():
    """The toy preset's KD runs online (fresh targets every step, one student row per image), so its cache
    holds no targets; the cached route stays the library default and the small test preset's."""
    from snapgen_model.distill.cache import CacheConfig
    from snapgen_model.training.pretrain import PretrainConfig

    toy = build_config("toy")
    pre = PretrainConfig().with_overrides(toy.pretrain.train)
    cache = CacheConfig().with_overrides(toy.cache.overrides)
    assert pre.mode == "online" and pre.precision == "bf16-mixed" and pre.kd.combine == "scaled"
    assert cache.targets_per_sample == 0 and not cache.store_features
    smoke = build_config("toy-smoke")
    assert PretrainConfig().with_overrides(smoke.pretrain.train).mode == "cached"
    assert CacheConfig().with_overrides(smoke.cache.overrides).targets_per_sample == 8


def test_run_dry_run_prints_every_stage_config_resolved_and_runs_nothing(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from flows.cli import app

    monkeypatch.setenv("SNAPGEN_HOME", str(tmp_path / "home"))
    result = CliRunner().invoke(app, ["run", "--preset", "toy", "--set", "pretrain.train.steps=7",
                                      "--set", "distill.train.lr_g=0.0003", "--dry-run", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    stages = out["stages"]
    assert stages["pretrain"]["steps"] == 7 and stages["pretrain"]["batch_size"] == 32  # override, preset
    assert stages["pretrain"]["kd"]["combine"] == "scaled" and stages["pretrain"]["weight_decay"] == 0.0  # defaults
    assert stages["distill"]["lr_g"] == 0.0003 and stages["cache"]["targets_per_sample"] == 0
    assert stages["teacher"]["release"] == "toy-teacher/v2" and stages["student"]["unet"]["channels"] == [32, 64, 64]
    assert stages["student"]["sampler"]["guidance"] == 2.0  # the shipped student samples best at guidance 2
    assert not (tmp_path / "home").exists()  # nothing ran, nothing was written
    bad = CliRunner().invoke(app, ["run", "--preset", "toy", "--set", "pretrain.train.stepz=7", "--dry-run"])
    assert bad.exit_code != 0 and "pretrain.train" in bad.output and "stepz" in bad.output


def test_the_full_size_student_resolves_with_fsdp_and_a_one_process_fsdp_is_named():
    """FSDP (torch FSDP2, run on CPU by tests/integration/test_pretrain_fsdp.py) resolves for the full-size
    student on GPU nodes; FSDP on a single process, or with torch.compile, is a config error naming the key."""
    from flows.pipeline_config import resolved_stage_configs

    cfg = build_config("snapgen-1024", ["teacher.bundle_uri=s3://models/sd35", "pretrain.train.strategy=fsdp",
                                        "pretrain.train.devices=8", "pretrain.train.num_nodes=4"])
    stages = resolved_stage_configs(cfg)
    assert stages["pretrain"]["strategy"] == "fsdp" and stages["pretrain"]["precision"] == "bf16-mixed"
    assert stages["student"]["name"] == "snapgen-1024"
    validate_stage_configs(build_config("toy", ["pretrain.train.strategy=fsdp", "pretrain.train.devices=2",
                                                "pretrain.train.accelerator=cpu"]))  # runs on CPU (gloo)
    with pytest.raises(PipelineConfigError, match="pretrain.strategy.*fsdp shards over several processes"):
        validate_stage_configs(build_config("toy", ["pretrain.train.strategy=fsdp", "pretrain.train.accelerator=cpu"]))
    with pytest.raises(PipelineConfigError, match="pretrain.compile.*strategy=fsdp"):
        validate_stage_configs(build_config("toy", ["pretrain.train.strategy=fsdp", "pretrain.train.devices=2",
                                                    "pretrain.train.compile=true"]))


def test_the_few_step_count_is_declared_once():
    """The student's sampler steps come from StepDistillConfig's default (the paper's 4): no preset or stage
    default repeats it, and every preset still resolves to it (toy-smoke sets its own 2 for speed)."""
    from pathlib import Path

    from flows.pipeline_config import build_config, resolved_stage_configs
    from snapgen_model.training.distill_steps import StepDistillConfig

    source = (Path(__file__).resolve().parents[2] / "flows" / "pipeline_config.py").read_text()
    assert "sampler_steps=4" not in source
    default = StepDistillConfig().sampler_steps
    for preset, extra in (("toy", []), ("toy-gpu", []), ("snapgen-1024", ["teacher.bundle_uri=/nowhere"])):
        assert resolved_stage_configs(build_config(preset, extra))["distill"]["sampler_steps"] == default == 4
    assert resolved_stage_configs(build_config("snapgen-1024", ["teacher.bundle_uri=/nowhere"]))["distill"]["steps"] \
        == StepDistillConfig().steps


def test_the_cache_draws_its_pairs_from_the_students_timestep_density():
    """KD's timestep density comes from the student preset's flow config, once: the cache stage of a
    shifted preset (snapgen-1024, shift 3) draws its (t, noise) pairs with that shift; presets on the
    default density add nothing (their cache keys stay); an explicit cache override still wins."""
    from flows.pipeline_config import cache_overrides, flow_overrides, resolved_stage_configs
    from snapgen_model.presets import get_preset

    full = build_config("snapgen-1024", ["teacher.bundle_uri=/nowhere"])
    assert flow_overrides(full) == ["flow.shift=3.0"]
    assert resolved_stage_configs(full)["cache"]["flow"] == get_preset("snapgen-1024").flow.to_dict()
    for preset in ("toy", "toy-smoke", "toy-gpu"):
        cfg = build_config(preset)
        assert cache_overrides(cfg) == cfg.cache.overrides
        assert resolved_stage_configs(cfg)["cache"]["flow"] == get_preset(preset).flow.to_dict()
    explicit = build_config("snapgen-1024", ["teacher.bundle_uri=/nowhere", "cache.overrides.flow.shift=2.0"])
    assert resolved_stage_configs(explicit)["cache"]["flow"]["shift"] == 2.0


def _restated_defaults(model, where: str = "") -> list[str]:
    """Fields a preset set explicitly to the value the field has by default (recursively)."""
    from pydantic import BaseModel

    found = []
    for name in model.model_fields_set:
        value, field = getattr(model, name), type(model).model_fields[name]
        path = f"{where}{name}"
        if isinstance(value, BaseModel):
            found += _restated_defaults(value, path + ".")
        elif name != "preset" and value == field.get_default(call_default_factory=True):
            found.append(f"{path}={value!r}")
    return found


def test_presets_are_typed_functions_that_set_only_what_differs():
    """Pipeline presets are functions returning a typed PipelineConfig, and every default is declared once:
    no preset sets a field to the value it has by default (restating it, or its stage's default list)."""
    from flows import pipeline_config
    from flows.pipeline_config import PipelineConfig, PromotionStage

    for name, make in pipeline_config.PRESETS.items():
        cfg = make()
        assert isinstance(cfg, PipelineConfig) and cfg.preset == name
        assert _restated_defaults(cfg) == [], f"preset {name} restates defaults: {_restated_defaults(cfg)}"
    # the check can fail: a preset restating the default demo thresholds flag is caught
    restating = PipelineConfig(preset="x", promotion=PromotionStage(demo_thresholds=False))
    assert _restated_defaults(restating) == ["promotion.demo_thresholds=False"]
