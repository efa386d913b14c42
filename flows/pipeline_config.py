"""Parameters of the end-to-end pipeline: one pydantic model per stage, named presets (functions that
return a typed `PipelineConfig`, setting only what differs from the defaults), and `--set` overrides
validated before any work starts (an error names the field and what it allows).

`--set` paths address fields (`pretrain.preset=toy-gpu`, `evaluate.options.images_per_prompt=4`,
`promotion.tolerance=0.05`). A stage's `*_overrides`/`train` list holds the `key=value` overrides of
its library config; a path through such a list sets one key in it (`pretrain.train.steps=300`
replaces or appends `steps=300`), so every knob of every stage is reachable from the command line.
"""
from __future__ import annotations

import copy
import dataclasses
import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal, cast

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from snapgen_model.config_base import ConfigError, parse_override

if TYPE_CHECKING:
    from snapgen_model.export.config import ExportConfig
    from snapgen_model.training.decoder import DecoderTrainConfig
    from snapgen_model.training.distill_steps import StepDistillConfig
    from snapgen_model.training.pretrain import PretrainConfig


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TeacherStage(_Strict):
    bundle_uri: str | None = Field(None, description="an existing teacher bundle folder (file:// or s3://); "
                                                     "None = the shipped `release` when set, else bootstrap the toy teacher")
    release: str | None = Field(None, description="a shipped toy teacher under releases/ (e.g. toy-teacher/v1), "
                                                  "verified and registered instead of training one; null = train "
                                                  "with bootstrap_preset")
    bootstrap_preset: str = Field("toy", description="toy teacher bootstrap preset (toy-smoke, toy, toy-gpu)")
    bootstrap_overrides: list[str] = Field(default_factory=list, description="ToyBootstrapConfig overrides k=v")


class CurateStage(_Strict):
    scenes: int = Field(2000, ge=1, description="shapes-world scenes (toy); ignored when sources are given")
    sources: list[dict[str, Any]] = Field(default_factory=list, description="curation sources (full scale)")
    overrides: list[str] = Field(default_factory=lambda: ["samples_per_shard=500"],
                                 description="CurationConfig overrides k=v")


# Toy-scale caching: K = 8 teacher (t, noise) pairs per image (pretraining draws one of them per sample
# and step; one pair per image for the whole run overfits the KD terms to a single x_t), and teacher
# features, so the multi-level KD of pretraining (output + feature) is what runs. The full-scale preset
# sets its own (features at 1024^2 are too large to cache).
TOY_CACHE_OVERRIDES = ("targets_per_sample=8", "store_features=true")


class CacheStage(_Strict):
    overrides: list[str] = Field(default_factory=lambda: list(TOY_CACHE_OVERRIDES), description="CacheConfig k=v")
    feature_layers: list[int] = Field(default_factory=lambda: [-1], description="teacher blocks to capture")
    encoders: list[dict[str, Any]] | None = Field(None, description="TextEncoderSpec dicts (default: the toy CLIP)")


class DecoderStage(_Strict):
    enabled: bool = True
    train: list[str] = Field(default_factory=lambda: ["steps=150"], description="DecoderTrainConfig overrides")


class PretrainStage(_Strict):
    preset: str = Field("toy", description="student architecture preset")
    overrides: list[str] = Field(default_factory=list, description="preset overrides k=v")
    train: list[str] = Field(default_factory=list,
                             description="PretrainConfig overrides k=v (its defaults otherwise; presets set their own)")


class DistillStage(_Strict):
    enabled: bool = True
    train: list[str] = Field(default_factory=list,
                             description="StepDistillConfig overrides k=v (its defaults: the paper's 4 steps, 500 updates)")


class EvaluateStage(_Strict):
    benchmarks: list[str] = Field(default_factory=lambda: ["geneval", "dpg", "fid", "clip"])
    models: list[Literal["teacher", "pretrained", "distilled"]] = Field(
        default_factory=lambda: ["teacher", "pretrained", "distilled"], description="which models to score")
    options: dict[str, Any] = Field(default_factory=dict,
                                    description="other EvaluateParams fields (their defaults otherwise)")

    @field_validator("benchmarks")
    @classmethod
    def _known(cls, value: list[str]) -> list[str]:
        from snapgen_model.evaluation.suite import check_benchmarks

        return check_benchmarks(value)


class ExportStage(_Strict):
    enabled: bool = True
    formats: list[Literal["onnx", "coreml"]] = Field(default_factory=lambda: ["onnx", "coreml"])
    parts: list[Literal["unet", "decoder", "text_encoder"]] = Field(
        default_factory=lambda: ["unet", "decoder", "text_encoder"])
    overrides: list[str] = Field(default_factory=lambda: ["dynamic_batch=false"], description="ExportConfig k=v")


class Gate(_Strict):
    metric: str = Field(description="flat evaluation metric, as logged: geneval/overall, dpg/overall, fid, geneval/split/heldout ...")
    higher_is_better: bool = True
    threshold: float | None = Field(None, description="absolute bound: min if higher_is_better, else max")


class PromotionStage(_Strict):
    enabled: bool = True
    model_name: str = Field("snapgen", min_length=1, description="MLflow registered model")
    gates: list[Gate] = Field(default_factory=lambda: [Gate(metric="geneval/overall", threshold=0.0),
                                                       Gate(metric="dpg/overall", threshold=0.0),
                                                       Gate(metric="fid", higher_is_better=False, threshold=None)])
    tolerance: float = Field(0.02, ge=0.0, description="allowed regression against the current champion")
    require_export_parity: bool = True
    demo_thresholds: bool = Field(False, description="thresholds are demo values (stated in every report)")
    pyfunc: bool = Field(True, description="register a loadable MLflow pyfunc (prompts -> images): copies the "
                                           "student and the teacher bundle's VAE and text encoders into MLflow")


class PipelineConfig(_Strict):
    preset: str = "toy"
    experiment: str | None = Field(None, min_length=1, description="MLflow experiment of the pipeline and its stage "
                                   "runs (default: the settings' experiment_name, where stage commands log too)")
    scale: Literal["toy", "full"] = "toy"
    teacher: TeacherStage = Field(default_factory=TeacherStage)
    curate: CurateStage = Field(default_factory=CurateStage)
    cache: CacheStage = Field(default_factory=CacheStage)
    decoder: DecoderStage = Field(default_factory=DecoderStage)
    pretrain: PretrainStage = Field(default_factory=PretrainStage)
    distill: DistillStage = Field(default_factory=DistillStage)
    evaluate: EvaluateStage = Field(default_factory=EvaluateStage)
    export: ExportStage = Field(default_factory=ExportStage)
    promotion: PromotionStage = Field(default_factory=PromotionStage)


# Named presets: functions returning a typed PipelineConfig (as torchtitan's recipes are); each sets only
# what differs from the stage defaults (tests/unit/test_pipeline_config.py checks that). `toy` fits the
# 2-core CPU demo budget of TOY_CALIBRATION.md; `toy-gpu` is the quality run; `toy-smoke` is for tests.
def _plus(defaults: list[str], *items: str) -> list[str]:
    """A stage's default library overrides with `items` added (the default stays declared once)."""
    return [*defaults, *items]


def toy_smoke() -> PipelineConfig:
    return PipelineConfig(
        preset="toy-smoke",
        teacher=TeacherStage(bootstrap_preset="toy-smoke"),
        curate=CurateStage(scenes=24, overrides=["samples_per_shard=12"]),
        decoder=DecoderStage(train=["steps=4", "batch_size=4", "heldout=4"]),
        # output KD only (kd.feature_kd=false, so no features are cached; the run says so in its log and tags)
        cache=CacheStage(overrides=["targets_per_sample=8"]),
        pretrain=PretrainStage(preset="toy-smoke", train=["steps=4", "batch_size=4", "checkpoint_every=2", "log_every=1",
                                                          "accelerator=cpu", "kd.feature_kd=false"]),
        distill=DistillStage(train=["steps=2", "batch_size=2", "log_every=1", "accelerator=cpu", "sampler_steps=2",
                                    "discriminator.head_width=8", "discriminator.feature_layers=[0,1]"]),
        evaluate=EvaluateStage(options={"images_per_prompt": 1, "max_prompts_per_task": 1, "chunk_size": 8,
                                        "fid_images": 8, "fid_reference_images": 8, "steps": 2}),
        export=ExportStage(formats=["onnx"], overrides=_plus(ExportStage().overrides, "text_length=16")),
        promotion=PromotionStage(demo_thresholds=True),
    )


# the toy student's pretraining recipe (batch, learning rate and warm-up, online teacher, bf16), shared by the
# shipped student's run and the demo's continuation of it; the evidence (bench/toy_evidence.py) trains with it too
STUDENT_RECIPE = ("batch_size=32", "lr=0.002", "warmup_steps=100", "mode=online", "precision=bf16-mixed")
SHIPPED_STUDENT = "toy-student/v1"


def toy() -> PipelineConfig:
    return PipelineConfig(
        preset="toy",
        # the demo's teacher: the shipped release (releases/toy-teacher/v2, trained once with the toy-release
        # recipe), verified and registered instead of trained. `--set teacher.release=null --set pretrain.train.init=`
        # trains one from scratch instead (and the student from random weights: the shipped student reads the
        # shipped teacher's text encoder): the `toy` bootstrap with a budget that fits the demo (step-starved on 2 cores).
        teacher=TeacherStage(release="toy-teacher/v2",
                             bootstrap_overrides=["ae_steps=400", "pool_size=4096", "teacher_time_budget_s=200"]),
        curate=CurateStage(scenes=8000),
        # the teacher's time goes to the students. KD runs online: the teacher (8x cheaper per image than the
        # student's step on this CPU) gives every step fresh (t, noise) targets for the task and both KD terms
        # on one student forward, so the cache holds latents and text states only (no targets to cache)
        cache=CacheStage(overrides=["targets_per_sample=0", "store_features=false"]),
        # the student starts from the shipped one (releases/toy-student/v1: 16,000 x 32 steps of this recipe,
        # `toy-student-release`, ~80 min on 2 cores), as the teacher does: from scratch, the demo's eight
        # minutes reach blobs below the prompt-blind floor (bench/RESULTS.md "The demo's student"). The demo
        # continues it on its own data at the shipped run's final learning rate, samples it at guidance 2
        # (its best), and spends the rest on step distillation. `--set pretrain.train.init=` starts from
        # random weights instead.
        pretrain=PretrainStage(overrides=["sampler.guidance=2.0"],
                               train=[f"init=release://{SHIPPED_STUDENT}", "steps=300",
                                      *_set_kv(_set_kv(list(STUDENT_RECIPE), "lr", 2e-4), "warmup_steps", 20)]),
        distill=DistillStage(train=["steps=300"]),
        # every toy prompt x 2 images for every model
        evaluate=EvaluateStage(options={"images_per_prompt": 2, "max_prompts_per_task": 0, "fid_images": 64,
                                        "fid_reference_images": 64}),
        export=ExportStage(overrides=_plus(ExportStage().overrides, "text_length=16")),
        promotion=PromotionStage(demo_thresholds=True),
    )


def toy_student_release() -> PipelineConfig:
    """The recipe of the shipped student (releases/toy-student/v1): the demo's pipeline with the student
    pretrained from random weights for 16,000 x 32 steps, compiled (~80 min of pretraining on 2 cores),
    distilled for 300 updates, and every model scored on every toy prompt x 4 images. Then
    `snapgen release-student --student <its pretrained student> --name toy-student/vN`."""
    demo = toy()
    return demo.model_copy(update={
        "preset": "toy-student-release",
        # batch 32: at equal wall time the toy student learns far more from more, smaller steps than from
        # batch 128's higher images/s (bench/RESULTS.md "KD objective probe": held-out flow loss 0.45 after
        # 600 x 32 in 145 s, 0.59 after 300 x 128 in 200 s)
        "pretrain": PretrainStage(train=["steps=16000", *STUDENT_RECIPE, "compile=true"]),
        "evaluate": EvaluateStage(options=demo.evaluate.options | {"images_per_prompt": 4}),
    })


def toy_gpu() -> PipelineConfig:
    return PipelineConfig(
        preset="toy-gpu",
        teacher=TeacherStage(bootstrap_preset="toy-gpu"),
        curate=CurateStage(scenes=20000),
        decoder=DecoderStage(train=["steps=2000"]),
        pretrain=PretrainStage(preset="toy-gpu", train=["steps=6000", "batch_size=128", "accelerator=auto"]),
        distill=DistillStage(train=["steps=1500", "accelerator=auto"]),
        evaluate=EvaluateStage(options={"images_per_prompt": 4, "max_prompts_per_task": 0, "fid_images": 0,
                                        "fid_reference_images": 1000}),
        export=ExportStage(overrides=_plus(ExportStage().overrides, "text_length=16")),
        promotion=PromotionStage(gates=[Gate(metric="geneval/overall", threshold=0.5),
                                        Gate(metric="dpg/overall", threshold=0.5),
                                        Gate(metric="fid", higher_is_better=False)]),
    )


def snapgen_1024() -> PipelineConfig:
    return PipelineConfig(
        preset="snapgen-1024",
        scale="full",
        teacher=TeacherStage(bootstrap_preset="none"),
        # one cached pair per image and no cached features (TB-scale otherwise): output KD from the cache
        cache=CacheStage(overrides=["targets_per_sample=1"]),
        pretrain=PretrainStage(preset="snapgen-1024", train=["accelerator=auto", "precision=bf16-mixed"]),
        evaluate=EvaluateStage(models=["pretrained", "distilled"], options={"images_per_prompt": 4}),
        promotion=PromotionStage(gates=[Gate(metric="geneval/overall", threshold=0.6),
                                        Gate(metric="dpg/overall", threshold=0.8)]),
    )


PRESETS: dict[str, Callable[[], PipelineConfig]] = {
    "toy-smoke": toy_smoke, "toy": toy, "toy-student-release": toy_student_release, "toy-gpu": toy_gpu,
    "snapgen-1024": snapgen_1024,
}


class PipelineConfigError(ValueError):
    """A bad preset or override; the message names the field and what it allows."""


def _set_kv(items: list[str], key: str, value: Any) -> list[str]:
    """Replace or append `key=value` in a list of library-config overrides."""
    rendered = json.dumps(value) if not isinstance(value, str) else value
    kept = [x for x in items if x.split("=", 1)[0].strip() != key]
    return kept + [f"{key}={rendered}"]


def _fields(model: type[BaseModel]) -> list[str]:
    return list(model.model_fields)


def apply_override(data: dict[str, Any], override: str) -> dict[str, Any]:
    """One `path=value` on a config dict (not yet validated), in the library's override grammar
    (`config_base.parse_override`): the path walks the pipeline config's fields, and a list of library
    overrides (e.g. `pretrain.train`) takes the rest of the path as one `key=value` of its own."""
    if "=" not in override:
        raise PipelineConfigError(f"--set {override!r}: expected KEY=VALUE (e.g. pretrain.train.steps=300)")
    try:
        path, value = parse_override(override)
    except ConfigError as exc:
        raise PipelineConfigError(f"--set {exc}") from None
    keys = [k for k in path.split(".") if k]
    if not keys:
        raise PipelineConfigError(f"--set {override!r}: empty key")
    model: Any = PipelineConfig
    node = data
    for depth, key in enumerate(keys):
        last = depth == len(keys) - 1
        if isinstance(model, type) and issubclass(model, BaseModel):
            fields = cast("type[BaseModel]", model).model_fields  # pydantic is Any to mypy: issubclass does not narrow
            if key not in fields:
                where = ".".join(keys[:depth]) or "the pipeline config"
                raise PipelineConfigError(f"--set {path}: {where} has no field {key!r}; allowed: "
                                          f"{', '.join(_fields(model))}")
            if last:
                node[key] = value
                return data
            annotation = fields[key].annotation
            node = node.setdefault(key, {})
            if isinstance(node, list):  # a list of k=v library overrides: the rest of the path is one key
                sub = ".".join(keys[depth + 1:])
                parent = data
                for k in keys[:depth]:
                    parent = parent[k]
                parent[key] = _set_kv(node, sub, value)
                return data
            model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else dict
        else:  # a free-form dict (evaluate.options): plain nesting
            if last:
                node[key] = value
                return data
            node = node.setdefault(key, {})
    return data


def _format_errors(exc: ValidationError, source: str) -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err["loc"])
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown field"
        elif err["type"] in ("literal_error", "enum"):
            msg = f"{msg} (got {err.get('input')!r})"
        lines.append(f"{loc}: {msg}")
    return f"{source}: " + "; ".join(lines)


def build_config(preset: str = "toy", overrides: list[str] | tuple[str, ...] = ()) -> PipelineConfig:
    """The preset's typed config, then the caller's `--set` overrides, validated as a whole."""
    if preset not in PRESETS:
        raise PipelineConfigError(f"unknown pipeline preset {preset!r}; choose from {', '.join(PRESETS)}")
    try:
        base = PRESETS[preset]()
    except ValidationError as exc:  # a preset function's own mistake, named as such
        raise PipelineConfigError(_format_errors(exc, "preset " + preset)) from None
    data: dict[str, Any] = base.model_dump()
    for item in overrides:
        data = apply_override(copy.deepcopy(data), item)
    try:
        cfg = PipelineConfig.model_validate(data)
    except ValidationError as exc:
        raise PipelineConfigError(_format_errors(exc, "--set")) from None
    if cfg.teacher.bundle_uri is None and cfg.teacher.bootstrap_preset == "none":
        raise PipelineConfigError("teacher.bundle_uri: the preset needs a teacher bundle (a local SD3 snapshot "
                                  "folder with vae/, transformer/, text encoders); pass --set teacher.bundle_uri=...")
    return cfg


def flow_overrides(cfg: PipelineConfig) -> list[str]:
    """The student preset's timestep density as CacheConfig overrides (`flow.shift=3.0`): the cached
    (t, noise) pairs must come from the density that pretraining's task term and KD scaling a_t assume
    (pretraining refuses a cache drawn from another). Empty while the preset's density is CacheConfig's
    default, so such caches keep their keys."""
    from snapgen_model.configs import FlowMatchingConfig
    from snapgen_model.presets import get_preset

    flow, default = get_preset(cfg.pretrain.preset, cfg.pretrain.overrides).flow.to_dict(), FlowMatchingConfig().to_dict()
    return [f"flow.{k}={json.dumps(v)}" for k, v in flow.items() if default.get(k) != v]


def cache_overrides(cfg: PipelineConfig) -> list[str]:
    """The cache stage's CacheConfig overrides: the preset's density (`flow_overrides`), then the stage's
    own `cache.overrides` (which win)."""
    return flow_overrides(cfg) + list(cfg.cache.overrides)


def validate_stage_configs(cfg: PipelineConfig) -> StageConfigs:
    """Build every library config the stages will build, so a bad key fails before any stage runs; returns
    the typed configs the pipeline hands to the training and export flows."""
    return _resolve(cfg)[1]


@dataclasses.dataclass(frozen=True)
class StageConfigs:
    """The library configs of the training and export stages, typed and validated once from the pipeline
    config; the pipeline hands these objects to the stage flows (their parameters accept them), so no stage
    parses its overrides a second time."""

    pretrain: PretrainConfig
    distill: StepDistillConfig
    decoder: DecoderTrainConfig
    export: ExportConfig


def _build(name: str, build: Callable[[], Any]) -> Any:
    """`build()`, with a bad key or value raised as a `PipelineConfigError` naming the stage field `name`."""
    try:
        return build()
    except (ValueError, KeyError, TypeError) as exc:
        message = _format_errors(exc, name) if isinstance(exc, ValidationError) else f"{name}: {exc}"
        raise PipelineConfigError(message) from None


def typed_stage_configs(cfg: PipelineConfig) -> StageConfigs:
    """`StageConfigs` of `cfg` (a bad override is a `PipelineConfigError` naming the stage field)."""
    from snapgen_model.export.config import ExportConfig
    from snapgen_model.training.decoder import DecoderTrainConfig
    from snapgen_model.training.distill_steps import StepDistillConfig
    from snapgen_model.training.pretrain import PretrainConfig

    return StageConfigs(
        pretrain=_build("pretrain.train", lambda: PretrainConfig().with_overrides(cfg.pretrain.train)),
        distill=_build("distill.train", lambda: StepDistillConfig().with_overrides(cfg.distill.train)),
        decoder=_build("decoder.train", lambda: DecoderTrainConfig().with_overrides(cfg.decoder.train)),
        export=_build("export.overrides", lambda: ExportConfig().with_overrides(cfg.export.overrides)))


def resolved_stage_configs(cfg: PipelineConfig) -> dict[str, Any]:
    """Every library config the stages will build from `cfg`, built here (typed and validated, every default
    filled in) and returned as plain data: what `snapgen run --dry-run` prints. A bad key or value is a
    `PipelineConfigError` naming the stage field."""
    return _resolve(cfg)[0]


def _resolve(cfg: PipelineConfig) -> tuple[dict[str, Any], StageConfigs]:
    """(`resolved_stage_configs`, `typed_stage_configs`), each config built once."""
    from snapgen_model.artifacts.teacher_recipe import get_bootstrap_config
    from snapgen_model.distill.cache import CacheConfig
    from snapgen_model.presets import get_preset

    student = _build("pretrain.preset/overrides", lambda: get_preset(cfg.pretrain.preset, cfg.pretrain.overrides))
    typed = typed_stage_configs(cfg)
    builds: list[tuple[str, str, Callable[[], Any]]] = [
        ("student", "pretrain.preset/overrides", student.to_dict),
        ("pretrain", "pretrain.train", typed.pretrain.to_dict),
        ("distill", "distill.train", typed.distill.to_dict),
        ("decoder", "decoder.train", typed.decoder.to_dict),
        ("export", "export.overrides", typed.export.to_dict),
        ("cache", "cache.overrides", lambda: CacheConfig().with_overrides(cache_overrides(cfg)).to_dict()),
    ]
    if cfg.teacher.bundle_uri is not None:
        builds.append(("teacher", "teacher.bundle_uri", lambda: {"bundle_uri": cfg.teacher.bundle_uri}))
    elif cfg.teacher.release:
        def _release() -> dict[str, Any]:
            from snapgen_model.training.release import release_kind, release_path

            name = cast(str, cfg.teacher.release)
            if release_kind(name) != "teacher":
                raise ValueError(f"release {name} holds a {release_kind(name)}, not a teacher")
            return {"release": name, "path": str(release_path(name))}

        builds.append(("teacher", "teacher.release", _release))
    else:
        builds.append(("teacher", "teacher.bootstrap_*", lambda: {"bootstrap": get_bootstrap_config(
            cfg.teacher.bootstrap_preset, cfg.teacher.bootstrap_overrides).to_dict()}))

    if typed.pretrain.init.startswith("release://"):
        def _init() -> dict[str, Any]:
            from snapgen_model.training.release import STUDENT_RECORD, release_kind, release_name, release_path

            name = release_name(typed.pretrain.init)
            if release_kind(name) != "student":
                raise ValueError(f"release {name} holds a {release_kind(name)}, not a student")
            # the student's conditioner reads its teacher's text encoder: another teacher's would not fit its weights
            # in meaning even where it fits in shape
            trained_on = json.loads((release_path(name) / STUDENT_RECORD).read_text()).get("teacher")
            ours = f"release://{cfg.teacher.release}" if cfg.teacher.release and cfg.teacher.bundle_uri is None else None
            if cfg.teacher.bundle_uri is None and trained_on and ours != trained_on:
                raise ValueError(f"release {name} was trained with the teacher {trained_on}, but this pipeline's teacher "
                                 f"is {ours or 'bootstrapped (teacher.release=null)'}: set pretrain.train.init= as well "
                                 "to pretrain from random weights, or start from a student of this teacher")
            return {"init": typed.pretrain.init}

        builds.append(("pretrain_init", "pretrain.train init", _init))

    def _evaluate_options() -> dict[str, Any]:
        from flows.params import EvaluateParams

        params = EvaluateParams(model="-", benchmarks=cfg.evaluate.benchmarks, **cfg.evaluate.options)
        return params.model_dump(exclude={"model"}) | {"models": cfg.evaluate.models}

    builds.append(("evaluate", "evaluate.options", _evaluate_options))
    return {key: _build(name, build) for key, name, build in builds}, typed
