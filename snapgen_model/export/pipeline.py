"""The export stage as one library call (DESIGN.md 6, STYLE.md 9): load the parts, export them to
ONNX and/or Core ML, gate every artifact on numeric parity, check a whole few-step generation
through ONNX Runtime, write the report, and move the folder into place only when every gate passed.

Idempotence: the export key hashes the weights (checkpoint sha256s), the resolved preset, the
`ExportConfig`, the formats and parts, `EXPORT_CODE_VERSION` and the exporter library versions. An
output folder whose `manifest.json` (written last) carries the same key is a cache hit: nothing is
exported again. Gating: all work happens in a hidden temp folder beside the output; a failed gate
raises `ParityError` (or `SpecCheckError`) naming part, metric, value and threshold, and the temp
folder is deleted, so a failed part is never left looking like a finished export.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import platform
import shutil
import sys
import time
import uuid
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from torch import nn

from snapgen_model.keys import content_key
from snapgen_model.config_base import ConfigError
from snapgen_model.configs import SnapGenConfig
from snapgen_model.diffusion.generate import conditioner_null, null_condition, split_tokens
from snapgen_model.export import coreml_export, onnx_export, runtime
from snapgen_model.export.config import EXPORT_CODE_VERSION, FORMATS, PARTS, ExportConfig
from snapgen_model.export.parity import (
    ParityError,
    ParityFailure,
    Thresholds,
    compare,
    compare_all,
    parity_record,
    psnr,
    thresholds,
)
from snapgen_model.export.parts import ExportPart, decoder_part, text_encoder_part, unet_part
from snapgen_model.export.report import paper_budget, write_report
from snapgen_model.nn.decoder import TinyDecoder
from snapgen_model.presets import get_preset
from snapgen_model.storage.checkpoint import load_model, read_preset

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"
TOOLS = ("torch", "onnx", "onnxruntime", "onnxscript", "coremltools", "transformers")


@dataclasses.dataclass
class ExportInputs:
    """The modules to export, the preset that fixes their resolution, and where each came from."""

    preset: SnapGenConfig
    unet: nn.Module | None = None
    decoder: nn.Module | None = None
    text_encoder: nn.Module | None = None
    sources: dict[str, dict] = dataclasses.field(default_factory=dict)  # part -> {kind, path?, sha256}
    # the student's TextConditioner (not exported): its null condition is the unconditional branch of
    # the generation check, as in training (None: a UNet without its conditioner, all-zero null)
    conditioner: nn.Module | None = None


# ---------------------------------------------------------------------------------------------- hashing
def file_sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def folder_sha256(path: str | os.PathLike) -> str:
    """sha256 over (relative path, file sha256) of every file under `path`, in sorted order."""
    root = Path(path)
    digest = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(f"{f.relative_to(root).as_posix()}\0{file_sha256(f)}\n".encode())
    return digest.hexdigest()


def module_sha256(module: nn.Module) -> str:
    """sha256 of a module's class, config (if any) and state dict bytes (for modules given in memory)."""
    digest = hashlib.sha256(type(module).__name__.encode())
    config = getattr(module, "config", None)
    if config is not None:
        text = config.to_json() if hasattr(config, "to_json") else json.dumps(str(config))
        digest.update(str(text).encode())
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def tool_versions() -> dict[str, str]:
    versions = {}
    for name in TOOLS:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "missing"
    return versions


def export_key(inputs: ExportInputs, cfg: ExportConfig, formats: Sequence[str], parts: Sequence[str]) -> str:
    """Content hash of everything that determines the export's bytes (see module doc)."""
    payload = {"sources": {k: v.get("sha256") for k, v in sorted(inputs.sources.items())
                           if k in parts or k == "conditioner"},
               "preset": inputs.preset.to_dict(), "config": cfg.to_dict(), "formats": sorted(formats),
               "parts": sorted(parts), "code": EXPORT_CODE_VERSION, "tools": tool_versions()}
    return content_key(payload)


# ---------------------------------------------------------------------------------------------- loading
def load_inputs(unet: str | os.PathLike | nn.Module, *, preset: SnapGenConfig | str | None = None,
                overrides: Iterable[str] = (), decoder: str | os.PathLike | nn.Module | None = None,
                text_encoder: str | os.PathLike | nn.Module | None = None,
                conditioner: str | os.PathLike | nn.Module | None = None) -> ExportInputs:
    """Load the parts: the UNet checkpoint (its config wins), the preset (given, else the one stored
    with the checkpoint), an optional decoder checkpoint (else a seeded fresh-init decoder, labelled
    so), an optional text encoder (a CLIPTextModelWithProjection, or a local folder for it) and the
    student's text conditioner (given, else the checkpoint's sibling `conditioner.safetensors`)."""
    sources: dict[str, dict] = {}
    if isinstance(unet, nn.Module):
        unet_model, sources["unet"] = unet.eval(), {"kind": "module", "sha256": module_sha256(unet)}
    else:
        unet_model = load_model(unet, expected_kind="SnapGenUNet").eval()
        sources["unet"] = {"kind": "checkpoint", "path": str(unet), "sha256": file_sha256(unet)}
    cfg = _resolve_preset(preset, unet, overrides)
    cfg = dataclasses.replace(cfg, unet=unet_model.config)  # validated again: latent channels, conditioning
    decoder_model, sources["decoder"] = _load_decoder(decoder, cfg)
    cfg = dataclasses.replace(cfg, decoder=decoder_model.config)
    encoder, source = _load_text_encoder(text_encoder)
    if source:
        sources["text_encoder"] = source
    cond_model, source = _load_conditioner(conditioner, unet, cfg)
    if source:
        sources["conditioner"] = source
    return ExportInputs(preset=cfg, unet=unet_model, decoder=decoder_model, text_encoder=encoder, sources=sources,
                        conditioner=cond_model)


def _load_conditioner(conditioner, unet, cfg: SnapGenConfig) -> tuple[nn.Module | None, dict | None]:
    if cfg.unet.conditioning != "text":
        return None, None
    if isinstance(conditioner, nn.Module):
        return conditioner.eval(), {"kind": "module", "sha256": module_sha256(conditioner)}
    from snapgen_model.artifacts.student import CONDITIONER, load_conditioner

    if conditioner is None:
        if isinstance(unet, nn.Module) or not (Path(unet).parent / CONDITIONER).is_file():
            return None, None
        conditioner = Path(unet).parent / CONDITIONER

    return load_conditioner(conditioner).eval(), {"kind": "checkpoint", "path": str(conditioner),
                                                   "sha256": file_sha256(conditioner)}


def unconditional(inputs: ExportInputs, batch: int, tokens: int) -> dict[str, torch.Tensor]:
    """The generation check's unconditional branch: the student's training null (its conditioner with
    every encoder dropped, `tokens` context tokens shared out over its encoders), else all zeros."""
    if inputs.conditioner is not None:
        with torch.no_grad():
            return conditioner_null(inputs.conditioner, batch, split_tokens(tokens, inputs.conditioner.names))
    return null_condition(inputs.preset, batch, tokens=tokens)


def _resolve_preset(preset: SnapGenConfig | str | None, unet, overrides: Iterable[str]) -> SnapGenConfig:
    overrides = list(overrides)
    if isinstance(preset, SnapGenConfig):
        return preset.with_overrides(overrides) if overrides else preset
    if isinstance(preset, str):
        return get_preset(preset, overrides)
    stored = None if isinstance(unet, nn.Module) else read_preset(unet)
    if stored is None:
        raise ConfigError("preset: the checkpoint stores no preset; pass one (e.g. --preset toy)")
    return stored.with_overrides(overrides) if overrides else stored


def _load_decoder(decoder, cfg: SnapGenConfig) -> tuple[nn.Module, dict]:
    if isinstance(decoder, nn.Module):
        return decoder.eval(), {"kind": "module", "sha256": module_sha256(decoder)}
    if decoder is not None:
        model = load_model(decoder, expected_kind="TinyDecoder").eval()
        return model, {"kind": "checkpoint", "path": str(decoder), "sha256": file_sha256(decoder)}
    torch.manual_seed(cfg.seed)
    model = TinyDecoder(cfg.decoder).eval()
    return model, {"kind": f"fresh init (seed {cfg.seed}, untrained: no decoder checkpoint given)",
                   "sha256": module_sha256(model)}


def load_text_encoder(encoder: str | os.PathLike | nn.Module) -> nn.Module:
    """A CLIPTextModelWithProjection (SnapGen's on-device encoder class, any size), in eval mode:
    the module itself, or loaded from a local `save_pretrained` folder (never downloaded)."""
    if isinstance(encoder, nn.Module):
        return encoder.eval()
    from transformers import CLIPTextModelWithProjection

    path = Path(encoder)
    if not path.is_dir():
        raise FileNotFoundError(f"text encoder {str(encoder)!r}: expected a local save_pretrained folder")
    # float32 whatever the files hold: a shipped release stores fp16 weights, and the ONNX graph (and its
    # parity reference) is exported in float32; the FP16 variant is converted from it afterwards
    return CLIPTextModelWithProjection.from_pretrained(str(path), local_files_only=True, dtype=torch.float32).eval()


def _load_text_encoder(encoder) -> tuple[nn.Module | None, dict | None]:
    if encoder is None:
        return None, None
    model = load_text_encoder(encoder)
    if isinstance(encoder, nn.Module):
        return model, {"kind": "module", "class": type(encoder).__name__, "sha256": module_sha256(encoder)}
    return model, {"kind": "pretrained folder", "path": str(encoder), "sha256": folder_sha256(encoder)}


# ---------------------------------------------------------------------------------------------- export
def build_parts(inputs: ExportInputs, cfg: ExportConfig, parts: Sequence[str]) -> tuple[list[ExportPart], dict]:
    """The ExportParts to write, and the requested parts that cannot be (with the reason)."""
    built, skipped = [], {}
    for name in parts:
        if name not in PARTS:
            raise ConfigError(f"parts: unknown part {name!r}; choose from {list(PARTS)}")
        if name == "unet" and inputs.unet is not None:
            built.append(unet_part(inputs.unet, inputs.preset, cfg.text_length))
        elif name == "decoder" and inputs.decoder is not None:
            built.append(decoder_part(inputs.decoder, inputs.preset))
        elif name == "text_encoder" and inputs.text_encoder is not None:
            built.append(text_encoder_part(inputs.text_encoder, cfg.text_length))
        else:
            skipped[name] = "no module given (pass a text encoder folder)" if name == "text_encoder" else "no module"
    return built, skipped


def read_manifest(out_dir: str | os.PathLike) -> dict | None:
    path = Path(out_dir) / MANIFEST
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _intact(out_dir: Path, manifest: dict) -> bool:
    """Every file the manifest lists exists with its recorded size."""
    return all((out_dir / name).is_file() and (out_dir / name).stat().st_size == size
               for name, size in manifest.get("sizes", {}).items())


def export_model(inputs: ExportInputs, out_dir: str | os.PathLike, cfg: ExportConfig = ExportConfig(), *,
                 formats: Sequence[str] = ("onnx",), parts: Sequence[str] = PARTS, force: bool = False) -> dict:
    """Export, gate and report (see module doc). Returns the report (`skipped` True on a cache hit)."""
    for fmt in formats:
        if fmt not in FORMATS:
            raise ConfigError(f"formats: unknown format {fmt!r}; choose from {list(FORMATS)}")
    out_dir = Path(out_dir)
    key = export_key(inputs, cfg, formats, parts)
    manifest = read_manifest(out_dir)
    if manifest and manifest.get("export_key") == key and not force and _intact(out_dir, manifest):
        log.info("export %s is up to date in %s: skipped", key[:16], out_dir)
        return json.loads((out_dir / "report.json").read_text()) | {"skipped": True}
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads or threads)
    try:
        report, failures = _export_all(inputs, tmp, cfg, list(formats), list(parts), key)
        if failures:
            raise ParityError(failures, report)
        write_report(report, tmp)
        _write_manifest(tmp, key, report)
        _move_into_place(tmp, out_dir)
    finally:
        torch.set_num_threads(threads)
        shutil.rmtree(tmp, ignore_errors=True)
    return report | {"skipped": False}


def _export_all(inputs: ExportInputs, tmp: Path, cfg: ExportConfig, formats: list[str], parts: list[str],
                key: str) -> tuple[dict, list[ParityFailure]]:
    start = time.perf_counter()
    built, skipped = build_parts(inputs, cfg, parts)
    p = inputs.preset
    report: dict[str, Any] = {
        "export_key": key, "code_version": EXPORT_CODE_VERSION, "preset": p.name,
        "resolution": f"{p.image_size}px, latent {p.latent_size}x{p.latent_size}x{p.latent.channels}",
        "formats": formats, "config": cfg.to_dict(), "tools": tool_versions(),
        "platform": f"{sys.platform} {platform.machine()}, {torch.get_num_threads()} torch threads",
        "sources": inputs.sources, "parts": {}, "skipped_parts": skipped,
        "coreml_note": _coreml_note(formats)}
    failures: list[ParityFailure] = []
    for part in built:
        log.info("exporting %s (%s)", part.name, part.resolution)
        entry = {"params": part.params(), "macs": part.macs(), "resolution": part.resolution,
                 "source": inputs.sources.get(part.name, {}), "inputs": list(part.input_names),
                 "outputs": list(part.output_names)}
        if "onnx" in formats:
            entry["onnx"], found = _export_onnx_part(part, tmp, cfg)
            failures += found
        if "coreml" in formats:
            artifact, found = coreml_export.convert(part, tmp, cfg)
            entry["coreml"] = artifact.to_dict() if artifact else {"converted": False}
            failures += found
        report["parts"][part.name] = entry
    names = {part.name for part in built}
    if "onnx" in formats and {"unet", "decoder"} <= names:
        report["generation"], found = generation_check(inputs, tmp, cfg)
        failures += found
    report["paper_budget"] = paper_budget(report["parts"])
    report["seconds"] = round(time.perf_counter() - start, 2)
    report["passed"] = not failures
    return report, failures


def _coreml_note(formats: list[str]) -> str:
    if "coreml" not in formats:
        return "Core ML not requested."
    if sys.platform == "darwin":
        return "Core ML prediction parity checked on this Mac (same code and thresholds as ONNX FP16)."
    return (f"{coreml_export.REQUIRES_MACOS}: on {sys.platform} the packages are converted and their spec checked "
            "(I/O, shapes, target, FP16 share, op counts) and the swapped PyTorch graph is checked against the "
            "original; Core ML prediction parity runs only on macOS.")


def _check_onnx(part: ExportPart, artifact, cfg: ExportConfig, batch: int, seed: int, limits: Thresholds,
                variant: str, timed: bool) -> tuple[dict, list[ParityFailure]]:
    sess = runtime.session(artifact.path, cfg.threads)
    inputs = part.inputs(batch, seed)  # fresh seeded inputs, not the ones the graph was traced with
    record, failures = parity_record(part.name, variant, compare_all(runtime.run(sess, inputs),
                                                                     part.reference(inputs)), limits)
    entry = artifact.to_dict() | {"parity": record | {"batch": batch}}
    if timed:
        entry["latency"] = runtime.latency(sess, part.module, inputs, warmup=cfg.latency_warmup,
                                           runs=cfg.latency_runs, threads=cfg.threads)
    return entry, failures


def _export_onnx_part(part: ExportPart, tmp: Path, cfg: ExportConfig) -> tuple[dict, list[ParityFailure]]:
    """Static (+ dynamic-batch, + FP16) ONNX files of one part, each checked against PyTorch."""
    fp32 = thresholds(cfg, "fp32")
    static = onnx_export.export_onnx(part, tmp, cfg, dynamic=False)
    entries, failures = {}, []
    entries["static"], found = _check_onnx(part, static, cfg, cfg.batch, cfg.seed + 1, fp32, "onnx static", True)
    failures += found
    if cfg.dynamic_batch:
        dynamic = onnx_export.export_onnx(part, tmp, cfg, dynamic=True)
        entries["dynamic_batch"], found = _check_onnx(part, dynamic, cfg, cfg.dynamic_batch_check, cfg.seed + 2,
                                                      fp32, f"onnx dynamic batch={cfg.dynamic_batch_check}", False)
        failures += found
    if cfg.onnx_fp16:
        half = onnx_export.convert_fp16(static.path, tmp, part.name, cfg)
        entries["fp16"], found = _check_onnx(part, half, cfg, cfg.batch, cfg.seed + 1, thresholds(cfg, "fp16"),
                                             "onnx fp16", True)
        failures += found
    return entries, failures


def generation_check(inputs: ExportInputs, tmp: Path, cfg: ExportConfig) -> tuple[dict, list[ParityFailure]]:
    """A whole few-step generation (sampler maths in torch, UNet and decoder in ORT) vs PyTorch."""
    p, seeds = inputs.preset, list(cfg.generation_seeds)
    unet_file = onnx_export.onnx_path(tmp, "unet", "dynamic_batch" if cfg.dynamic_batch else "static")
    unet_sess = runtime.session(unet_file, cfg.threads)
    dec_sess = runtime.session(onnx_export.onnx_path(tmp, "decoder", "static"), cfg.threads)
    part = unet_part(inputs.unet, p, cfg.text_length)
    cond_names = part.input_names[2:]
    cond = dict(zip(cond_names, part.inputs(len(seeds), cfg.seed + 3)[2:]))
    sampler = runtime.few_step_sampler(p, cfg.generation_steps)
    uncond = unconditional(inputs, len(seeds), cfg.text_length) if sampler.guidance != 1.0 else None
    start = time.perf_counter()
    lat_t, img_t = runtime.generate_latents_and_images(inputs.unet, inputs.decoder, p, seeds, sampler,
                                                        cond=cond, uncond=uncond)
    torch_s = time.perf_counter() - start
    start = time.perf_counter()
    lat_o, img_o = runtime.generate_latents_and_images(runtime.OrtUNet(unet_sess, cond_names),
                                                        runtime.ort_decoder(dec_sess), p, seeds, sampler,
                                                        cond=cond, uncond=uncond)
    ort_s = time.perf_counter() - start
    image_psnr = psnr(img_o.astype("float64"), img_t.astype("float64"), peak=255.0)
    failures = []
    if not image_psnr >= cfg.generation_min_psnr:
        failures.append(ParityFailure("generation", f"onnx few-step x{cfg.generation_steps}", "image_psnr",
                                      image_psnr, cfg.generation_min_psnr))
    null = "conditioner" if inputs.conditioner is not None else "zeros (no conditioner)"
    result = {"steps": cfg.generation_steps, "sampler": sampler.kind, "guidance": sampler.guidance, "seeds": seeds,
              "null_condition": null if uncond is not None else None,
              "unet_graph": unet_file.name, "image_psnr": image_psnr, "min_psnr": cfg.generation_min_psnr,
              "image_max_abs_uint8": int(abs(img_o.astype(int) - img_t.astype(int)).max()),
              "latent": compare(lat_o, lat_t).to_dict(), "passed": not failures,
              "ort_s": round(ort_s, 4), "torch_s": round(torch_s, 4)}
    return result, failures


def _write_manifest(tmp: Path, key: str, report: dict) -> None:
    """manifest.json, written last: the key, and every file's size and sha256."""
    files = sorted(f for f in tmp.rglob("*") if f.is_file())
    sizes = {f.relative_to(tmp).as_posix(): f.stat().st_size for f in files}
    digests = {f.relative_to(tmp).as_posix(): file_sha256(f) for f in files}
    manifest = {"export_key": key, "code_version": EXPORT_CODE_VERSION, "preset": report["preset"],
                "formats": report["formats"], "parts": sorted(report["parts"]), "sizes": sizes, "sha256": digests}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def _move_into_place(tmp: Path, out_dir: Path) -> None:
    """Replace `out_dir` by `tmp` (renames in the same folder; the old export is removed after)."""
    if out_dir.exists():
        old = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out_dir)
