"""Bad inputs fail fast with messages that name the field (and what is allowed): configs with
unknown keys, wrong types, out-of-range values, unknown presets; malformed model refs and storage
URIs; checkpoints and training states that are truncated, of another architecture, or pickles.
And: every torch.load in the code base passes weights_only=True."""
from __future__ import annotations

import ast
import pickle
import re
import shutil
from pathlib import Path

import pytest
import torch

from snapgen_model.config_base import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def _pretrain(**kw):
    from snapgen_model.training.pretrain import PretrainConfig

    return PretrainConfig.from_dict(kw)


def _distill(**kw):
    from snapgen_model.training.distill_steps import StepDistillConfig

    return StepDistillConfig.from_dict(kw)


def _curation(**kw):
    from snapgen_model.data.curation import CurationConfig

    return CurationConfig.from_dict(kw)


def _cache(**kw):
    from snapgen_model.distill.cache import CacheConfig

    return CacheConfig.from_dict(kw)


def _source(**kw):
    from snapgen_model.data.sources import SourceSpec

    return SourceSpec.from_dict(kw)


def _preset(name="toy-smoke", *overrides):
    from snapgen_model.presets import get_preset

    return get_preset(name, list(overrides))


def _pretrain_override(*overrides):
    from snapgen_model.training.pretrain import PretrainConfig

    return PretrainConfig().with_overrides(list(overrides))


# (build, expected error: every fragment must appear in the message)
CONFIG_CASES = {
    # unknown keys: the key and the allowed keys
    "pretrain unknown key": (lambda: _pretrain(stepz=3), ["stepz", "unknown key", "allowed keys", "steps"]),
    "nested unknown key": (lambda: _pretrain(kd={"feature_kdd": True}), ["kd.feature_kdd", "allowed keys", "feature_kd"]),
    "override unknown key": (lambda: _pretrain_override("kd.bogus=1"), ["kd.bogus", "allowed keys here", "feature_kd"]),
    "override without =": (lambda: _pretrain_override("steps"), ["steps", "key=value"]),
    "preset override unknown": (lambda: _preset("toy-smoke", "unet.chanels=[8]"), ["unet.chanels", "channels"]),
    "curation unknown key": (lambda: _curation(min_sid=3), ["min_sid", "min_side"]),
    # wrong types: the field and the expected type
    "string for int": (lambda: _pretrain(steps="ten"), ["steps", "expected int", "'ten'"]),
    "bool for int": (lambda: _pretrain(batch_size=True), ["batch_size", "expected int"]),
    "string for float": (lambda: _pretrain(lr="fast"), ["lr", "expected float"]),
    "list for bool": (lambda: _cache(store_features=[1]), ["store_features", "expected bool"]),
    "scalar for tuple": (lambda: _preset("toy-smoke", "unet.channels=16"), ["unet.channels", "expected a list"]),
    "scalar for section": (lambda: _pretrain(kd=3), ["kd", "expected a mapping"]),
    # out-of-range values and choices: the field and the allowed range / values
    "steps 0": (lambda: _pretrain(steps=0), ["pretrain.steps", ">= 1"]),
    "lr negative": (lambda: _pretrain(lr=-1.0), ["pretrain.lr", "> 0"]),
    "ema decay 1": (lambda: _pretrain(ema_decay=1.0), ["pretrain.ema_decay", "[0, 1)"]),
    "log_every 0": (lambda: _pretrain(log_every=0), ["pretrain.log_every", ">= 1"]),
    "warmup negative": (lambda: _pretrain(warmup_steps=-1), ["pretrain.warmup_steps", ">= 0"]),
    "checkpoint_every negative": (lambda: _pretrain(checkpoint_every=-5), ["pretrain.checkpoint_every", ">= 0"]),
    "keep_checkpoints 0": (lambda: _pretrain(keep_checkpoints=0), ["pretrain.keep_checkpoints", ">= 1"]),
    "min_lr_ratio 2": (lambda: _pretrain(min_lr_ratio=2.0), ["pretrain.min_lr_ratio", "[0, 1]"]),
    "grad_clip negative": (lambda: _pretrain(grad_clip=-1.0), ["pretrain.grad_clip", ">= 0"]),
    "devices 0": (lambda: _pretrain(devices=0), ["pretrain.devices", ">= 1"]),
    "precision choice": (lambda: _pretrain(precision="fp8"), ["precision", "'fp8'", "32-true", "bf16-mixed"]),
    "mode choice": (lambda: _pretrain(mode="offline"), ["mode", "'offline'", "cached", "online"]),
    "distill sampler steps": (lambda: _distill(sampler_steps=0), ["distill.sampler_steps", "[1, 64]"]),
    "distill lr_d": (lambda: _distill(lr_d=0.0), ["distill.lr_d", "> 0"]),
    "distill kd_weight": (lambda: _distill(kd_weight=-1.0), ["distill.kd_weight", ">= 0"]),
    "distill keep_checkpoints": (lambda: _distill(keep_checkpoints=0), ["distill.keep_checkpoints", ">= 1"]),
    "distill checkpoint_every": (lambda: _distill(checkpoint_every=-1), ["distill.checkpoint_every", ">= 0"]),
    "distill shift": (lambda: _distill(shift=0.0), ["distill.shift", "> 0"]),
    "distill backprop": (lambda: _distill(backprop="all"), ["backprop", "random_step", "last_step"]),
    "curation jpeg quality": (lambda: _curation(jpeg_quality=101), ["curation.jpeg_quality", "[1, 100]"]),
    "cache dtype": (lambda: _cache(feature_dtype="int8"), ["cache.feature_dtype", "float16", "float32"]),
    "source kind": (lambda: _source(kind="ftp", uri="x"), ["kind", "'ftp'", "folder", "shapes"]),
    "shapes count": (lambda: _source(kind="shapes"), ["source.count", ">= 1"]),
    "latent downsample": (lambda: _preset("toy-smoke", "latent.downsample=3"), ["latent.downsample", "[1, 2, 4, 8, 16]"]),
    # presets
    "unknown preset": (lambda: _preset("toy-large"), ["preset", "'toy-large'", "toy-smoke", "snapgen-1024"]),
}


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_bad_config_names_the_field_and_allowed_values(case):
    build, fragments = CONFIG_CASES[case]
    with pytest.raises(ConfigError) as info:
        build()
    message = str(info.value)
    missing = [f for f in fragments if f not in message]
    assert not missing, f"{case}: {missing} not in {message!r}"


@pytest.mark.parametrize("field,value,fragment", [
    ("s3_max_attempts", 99, "s3_max_attempts"),
    ("s3_retry_mode", "yolo", "s3_retry_mode"),
    ("storage_root", "ftp://host/x", "storage_root"),
    ("s3_endpoint_url", "not a url", "s3_endpoint_url"),
])
def test_bad_settings_name_the_field(field, value, fragment, tmp_path):
    from tasks.settings import get_settings

    with pytest.raises(ValueError) as info:
        get_settings(home=tmp_path, **{field: value})
    assert fragment in str(info.value)


@pytest.mark.parametrize("ref", ["snapgen@champion", "models:/", "models:/snapgen", "models:/snapgen@",
                                 "models:/snapgen/v3", "models:/a/b/3", "runs:/abc/model", "models:/x@bad alias"])
def test_malformed_model_refs(ref):
    from tasks.registry import parse_model_ref

    with pytest.raises(ValueError) as info:
        parse_model_ref(ref)
    message = str(info.value)
    assert repr(ref) in message and "models:/NAME@ALIAS" in message and "models:/NAME/VERSION" in message


@pytest.mark.parametrize("uri,fragment", [
    ("  ", "non-empty"), ("bucket/key", "no scheme"), ("gs://bucket/key", "unknown scheme 'gs' (allowed: file, s3)"),
    ("s3://", "no bucket"), ("s3:///key", "no bucket"), ("s3://Bad_Bucket/key", "invalid bucket name"),
    ("s3://user:secret99@bucket/key", "credentials or ports"), ("file://", "no path"),
])
def test_malformed_storage_uris(uri, fragment):
    from tasks.storage import Storage, parse_uri

    with pytest.raises(ValueError) as info:
        parse_uri(uri)
    assert fragment in str(info.value) and "secret99" not in str(info.value)
    with pytest.raises(ValueError):
        Storage(root=uri)
    with pytest.raises(ValueError, match=r"'\.\.'"):
        Storage().join("file:///tmp/x", "../../etc/passwd")


# ------------------------------------------------------------------------------------------ checkpoints
@pytest.fixture(scope="module")
def unet_checkpoint(tmp_path_factory) -> Path:
    from snapgen_model.nn.unet import SnapGenUNet
    from snapgen_model.storage.checkpoint import save_model

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("ckpt")
    return save_model(SnapGenUNet(_preset().unet), folder / "unet.safetensors", preset=_preset())


def _variants(good: Path, tmp: Path) -> dict[str, tuple[Path, list[str]]]:
    """Bad checkpoint files and the fragments their error must contain."""
    from snapgen_model.nn.decoder import TinyDecoder
    from snapgen_model.nn.unet import SnapGenUNet
    from snapgen_model.storage.checkpoint import save_model

    data = good.read_bytes()
    out: dict[str, tuple[Path, list[str]]] = {}
    (tmp / "half.safetensors").write_bytes(data[: len(data) // 2])
    out["truncated in the tensor data"] = (tmp / "half.safetensors", ["truncated"])
    (tmp / "head.safetensors").write_bytes(data[:20])
    out["truncated in the header"] = (tmp / "head.safetensors", ["truncated"])
    (tmp / "empty.safetensors").write_bytes(b"")
    out["empty file"] = (tmp / "empty.safetensors", ["not a safetensors file"])
    torch.save(SnapGenUNet(_preset().unet).state_dict(), tmp / "zip.safetensors")  # torch's zip pickle format
    out["torch.save zip pickle"] = (tmp / "zip.safetensors", ["pickle", "safetensors only"])
    (tmp / "legacy.safetensors").write_bytes(pickle.dumps({"w": [1.0]}, protocol=2))
    out["plain pickle"] = (tmp / "legacy.safetensors", ["pickle", "safetensors only"])
    bigger = _preset("toy-smoke", "unet.channels=[32,32,64]", "unet.norm_groups=8")
    save_model(SnapGenUNet(bigger.unet), tmp / "wider.safetensors")
    out["another architecture (other widths)"] = (tmp / "wider.safetensors", ["do not fit", "shape mismatch"])
    save_model(TinyDecoder(_preset().decoder), tmp / "decoder.safetensors")
    out["another component"] = (tmp / "decoder.safetensors", ["holds a TinyDecoder", "expected a SnapGenUNet"])
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, tmp / "foreign.safetensors")
    out["safetensors without snapgen metadata"] = (tmp / "foreign.safetensors", ["without snapgen metadata"])
    out["missing file"] = (tmp / "nope.safetensors", ["does not exist"])
    return out


def test_bad_checkpoints_are_refused_with_a_clear_message(unet_checkpoint, tmp_path):
    from snapgen_model.storage.checkpoint import CheckpointError, load_model, load_weights
    from snapgen_model.nn.unet import SnapGenUNet

    assert type(load_model(unet_checkpoint, expected_kind="SnapGenUNet")).__name__ == "SnapGenUNet"
    for case, (path, fragments) in _variants(unet_checkpoint, tmp_path).items():
        with pytest.raises(CheckpointError) as info:
            if "architecture" in case:
                load_weights(SnapGenUNet(_preset().unet), path)
            else:
                load_model(path, expected_kind="SnapGenUNet")
        message = str(info.value)
        assert str(path) in message and all(f in message for f in fragments), f"{case}: {message!r}"


def _train_state(tmp_path: Path) -> tuple[Path, object]:
    """A real training state folder from a 2-step run, and a module to load it into."""
    from tests.reliability.train_child import run, write_cache

    cache = write_cache(tmp_path / "cache")
    spec = {"stage": "pretrain", "cache_dir": str(cache), "steps": 2, "checkpoint_every": 2,
            "state_root": str(tmp_path / "state")}
    run(spec)
    return tmp_path / "state" / "step-00000002", spec


@pytest.mark.parametrize("damage", ["truncated modules", "pickle instead of modules", "other architecture",
                                    "truncated optimizer"])
def test_bad_training_state_is_refused_on_resume(damage, tmp_path):
    """Resuming from a damaged state folder fails with an error naming the file, not a torch traceback."""
    from snapgen_model.storage.checkpoint import CheckpointError
    from tests.reliability.train_child import run

    state, spec = _train_state(tmp_path)
    target = state / ("optimizer.safetensors" if "optimizer" in damage else "modules.safetensors")
    data = target.read_bytes()
    if damage.startswith("truncated"):
        target.write_bytes(data[: len(data) * 2 // 3])
    elif damage.startswith("pickle"):
        torch.save({"student/x": torch.zeros(1)}, target)
    else:
        from safetensors.torch import load_file, save_file

        weights = load_file(str(target))
        key = next(k for k in weights if k.startswith("student/") and weights[k].ndim == 4)
        weights[key] = torch.zeros(*weights[key].shape[:-1], weights[key].shape[-1] + 2)
        save_file(weights, target)
    shutil.rmtree(tmp_path / "state" / "step-00000002.tmp", ignore_errors=True)
    with pytest.raises(CheckpointError) as info:
        run(spec | {"steps": 4})
    message = str(info.value)
    assert str(target) in message or target.name in message, message
    expect = {"truncated modules": "truncated", "truncated optimizer": "truncated",
              "pickle instead of modules": "pickle", "other architecture": "do not fit"}[damage]
    assert expect in message, message


# ------------------------------------------------------------------------------------------ torch.load
def torch_load_calls(source: str) -> list[tuple[int, bool]]:
    """(line, passes weights_only=True) for every call of torch.load / torch.serialization.load /
    a bare ``load`` imported from torch in ``source``."""
    tree = ast.parse(source)
    aliases = {"torch"}
    bare = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            aliases |= {a.asname or a.name for a in node.names if a.name == "torch"}
        elif isinstance(node, ast.ImportFrom) and node.module in ("torch", "torch.serialization"):
            bare |= {a.asname or a.name for a in node.names if a.name == "load"}
    calls = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        is_load = (isinstance(func, ast.Attribute) and func.attr == "load" and (
            (isinstance(func.value, ast.Name) and func.value.id in aliases) or
            (isinstance(func.value, ast.Attribute) and func.value.attr == "serialization"))) or \
            (isinstance(func, ast.Name) and func.id in bare)
        if is_load:
            safe = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                       for k in node.keywords)
            calls.append((node.lineno, safe))
    return calls


def test_the_torch_load_scanner_catches_unsafe_calls():
    src = ("import torch\nimport torch as T\nfrom torch import load as L\n"
           "torch.load('a', weights_only=True)\ntorch.load('b')\nT.load('c', weights_only=False)\n"
           "L('d')\ntorch.serialization.load('e')\nnp.load('f')\n")
    assert torch_load_calls(src) == [(4, True), (5, False), (6, False), (7, False), (8, False)] or \
        sorted(torch_load_calls(src)) == [(4, True), (5, False), (6, False), (7, False), (8, False)]


def test_every_torch_load_uses_weights_only():
    files = [p for top in ("snapgen_model", "tasks", "flows", "bench", "infra", "tests") if (ROOT / top).exists()
             for p in (ROOT / top).rglob("*.py")]
    assert len(files) > 50
    unsafe, seen = [], 0
    for path in files:
        text = path.read_text(errors="replace")
        if "load" not in text or path.name == Path(__file__).name:
            continue
        for line, safe in torch_load_calls(text):
            seen += 1
            if not safe:
                unsafe.append(f"{path.relative_to(ROOT)}:{line}")
    grep = [f"{p.relative_to(ROOT)}" for p in files if p.name != Path(__file__).name and
            re.search(r"torch\.load\((?![^)]*weights_only\s*=\s*True)", p.read_text(errors="replace"))]
    assert not unsafe and not grep, f"torch.load without weights_only=True: {unsafe or grep}"


# ------------------------------------------------------------------------------------------ flow parameters
def flow_parameter_models() -> dict[str, type]:
    """Every pydantic parameter model defined in flows/ (what deployments and the CLI validate)."""
    import importlib
    import pkgutil

    from pydantic import BaseModel

    import flows

    found = {}
    for info in pkgutil.iter_modules(flows.__path__):
        module = importlib.import_module(f"flows.{info.name}")
        for name, obj in vars(module).items():
            if isinstance(obj, type) and issubclass(obj, BaseModel) and obj is not BaseModel and \
                    obj.__module__ == module.__name__:
                found[f"{module.__name__}.{name}"] = obj
    return found


def test_flow_parameters_reject_unknown_keys():
    from pydantic import ValidationError

    models = flow_parameter_models()
    assert len(models) >= 4
    silent = []
    for name, model in models.items():
        try:
            model.model_validate({"surely_not_a_field": 1})
        except ValidationError as exc:
            if "surely_not_a_field" not in str(exc):
                silent.append(name)  # failed for missing required fields only: the unknown key was ignored
        else:
            silent.append(name)
    assert not silent, f"unknown keys silently ignored by: {silent}"
