"""Checkpoints: safetensors weights with the config JSON in the file's metadata (STYLE.md 10).

A checkpoint rebuilds its model from the file alone: `load_model(path)` reads the component kind
and config from the metadata, builds the module and loads the weights strictly. A component whose
constructor needs more than its config (the text conditioner: its encoders' widths) writes that
into the metadata (`checkpoint_metadata()`) and rebuilds itself from it (`from_checkpoint`). Pickles are
refused: snapgen never unpickles model files.
"""
from __future__ import annotations

import json
import os
import struct
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from snapgen_model.config_base import ConfigBase
from snapgen_model.configs import SnapGenConfig, TinyDecoderConfig, UNetConfig
from snapgen_model.nn.decoder import TinyDecoder
from snapgen_model.nn.unet import SnapGenUNet

FORMAT_VERSION = "1"
# kind -> (config class, model class); later stages register their own components here
REGISTRY: dict[str, tuple[type[ConfigBase], type[nn.Module]]] = {
    "SnapGenUNet": (UNetConfig, SnapGenUNet),
    "TinyDecoder": (TinyDecoderConfig, TinyDecoder),
}


class CheckpointError(ValueError):
    """A checkpoint file is missing, not safetensors, truncated, or of another architecture."""


def register(kind: str, config_cls: type[ConfigBase], model_cls: type[nn.Module]) -> None:
    """Make `load_model` able to rebuild `model_cls` from its config."""
    REGISTRY[kind] = (config_cls, model_cls)


def save_model(model: nn.Module, path: str | os.PathLike, *, preset: SnapGenConfig | None = None,
               extra: dict[str, str] | None = None) -> Path:
    """Write `model` (its `.config` travels in the metadata) atomically to `path`."""
    kind = type(model).__name__
    if kind not in REGISTRY:
        raise CheckpointError(f"cannot save {kind}: not a registered component ({sorted(REGISTRY)})")
    metadata = {"snapgen.format": FORMAT_VERSION, "snapgen.kind": kind, "snapgen.config": model.config.to_json()}
    metadata.update(model.checkpoint_metadata() if hasattr(model, "checkpoint_metadata") else {})  # rebuild needs
    if preset is not None:
        metadata["snapgen.preset"] = preset.to_json()
    metadata.update(extra or {})
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    return _atomic_save(tensors, Path(path), metadata)


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The safetensors metadata, after checking the file really is an intact safetensors file."""
    path = Path(path)
    _check_safetensors(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise CheckpointError(f"{path}: unreadable safetensors file ({exc})") from exc


def check_safetensors(path: str | os.PathLike) -> None:
    """Raise `CheckpointError` naming `path` unless it is an intact safetensors file (missing,
    pickled, truncated and malformed files are refused before any byte is deserialised)."""
    _check_safetensors(Path(path))


def _check_safetensors(path: Path) -> None:
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file does not exist")
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(9)
    # a safetensors file is an 8-byte header length, then the JSON header; its length may well begin with the
    # bytes of a pickle (0x80 0x02 = 640 bytes) or a zip signature, so the structure is checked first
    if len(head) < 9 or head[8:9] != b"{":
        if head[:4] == b"PK\x03\x04" or (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")):
            raise CheckpointError(f"{path}: looks like a pickled torch checkpoint; snapgen loads safetensors only "
                                  "(pickles can run arbitrary code)")
        raise CheckpointError(f"{path}: not a safetensors file (bad header)")
    header_len = struct.unpack("<Q", head[:8])[0]
    if 8 + header_len > size:
        raise CheckpointError(f"{path}: truncated safetensors file (header says {header_len} bytes, file has {size})")
    with path.open("rb") as f:
        f.seek(8)
        try:
            header = json.loads(f.read(header_len))
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
            raise CheckpointError(f"{path}: not a safetensors file (malformed header: {exc})") from None
    if 8 + header_len + end > size:
        raise CheckpointError(f"{path}: truncated safetensors file (tensor data ends at {8 + header_len + end}, "
                              f"file has {size} bytes)")


def load_model(path: str | os.PathLike, *, expected_kind: str | None = None,
               device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the model stored at `path` from its metadata and load its weights strictly."""
    meta = read_metadata(path)
    kind = meta.get("snapgen.kind")
    if kind is None or "snapgen.config" not in meta:
        raise CheckpointError(f"{path}: safetensors file without snapgen metadata (kind/config)")
    if expected_kind is not None and kind != expected_kind:
        raise CheckpointError(f"{path}: holds a {kind}, expected a {expected_kind}")
    if kind not in REGISTRY:
        raise CheckpointError(f"{path}: unknown component kind {kind!r}; known: {sorted(REGISTRY)}")
    config_cls, model_cls = REGISTRY[kind]
    cfg = config_cls.from_dict(json.loads(meta["snapgen.config"]))
    # a component whose constructor needs more than its config rebuilds itself from the metadata
    model = model_cls.from_checkpoint(cfg, meta) if hasattr(model_cls, "from_checkpoint") else model_cls(cfg)
    load_weights(model, path, device=device)
    return model.to(device)


def load_weights(model: nn.Module, path: str | os.PathLike, device: str | torch.device = "cpu") -> None:
    """Load safetensors weights into `model`, naming missing, unexpected or mis-shaped tensors."""
    from safetensors.torch import load_file

    _check_safetensors(Path(path))
    state = load_file(str(path), device=str(device))
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [k for k in set(own) & set(state) if own[k].shape != state[k].shape]
    if missing or unexpected or shapes:
        detail = "; ".join(filter(None, [
            f"missing {missing[:3]}{'...' if len(missing) > 3 else ''}" if missing else "",
            f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}" if unexpected else "",
            f"shape mismatch {sorted(shapes)[:3]}" if shapes else ""]))
        raise CheckpointError(f"{path}: weights do not fit {type(model).__name__} ({detail})")
    model.load_state_dict(state, strict=True)


def read_preset(path: str | os.PathLike) -> SnapGenConfig | None:
    """The full preset (sampler settings included) stored with a checkpoint, if any."""
    raw = read_metadata(path).get("snapgen.preset")
    return SnapGenConfig.from_dict(json.loads(raw)) if raw else None


def state_dict_equal(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Bitwise equality of two state dicts."""
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
