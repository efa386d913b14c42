"""Teacher adapters: a frozen DiT returning velocity and named features (SNAPGEN_SPEC.md sections 4-5).

One adapter serves the whole diffusers SD3 family (`SD3Transformer2DModel`: SD3-Medium 2B,
SD3.5-Large 8.1B, and the toy teacher the bootstrap flow trains), loaded by hub id or local path.
Features are captured by forward hooks on transformer blocks (the final one by default: the
feature-KD target of SnapGen section 5). The flow-matching convention matches ours: t = sigma in
[0, 1], x_t = (1 - t) x0 + t eps, output v = eps - x0; diffusers takes timesteps as 1000 t.
"""
from __future__ import annotations

import threading

import dataclasses
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
from torch import nn

from snapgen_model.config_base import ConfigBase, check, check_choice

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class LoadError(ValueError):
    """A model could not be loaded; the message names the path and the expected class."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class TeacherConfig(ConfigBase):
    """Which teacher, how it is loaded and which features it exposes."""

    path: str = "stabilityai/stable-diffusion-3.5-large"  # hub id or local folder
    subfolder: str = "transformer"  # where the transformer lives in a pipeline folder ("" = top level)
    feature_layers: tuple[int, ...] = (-1,)  # transformer blocks whose image tokens are captured (-1 = last)
    dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"  # weights/compute dtype on GPU (CPU: float32)

    def __post_init__(self) -> None:
        check(bool(self.path), "teacher.path", "needs a hub id or a local path")
        check(len(self.feature_layers) >= 1, "teacher.feature_layers", "needs at least one layer")
        check_choice(self.dtype, "teacher.dtype", tuple(DTYPES))


@dataclasses.dataclass
class TeacherOutput:
    velocity: torch.Tensor  # (B, C, H, W)
    features: dict[str, torch.Tensor]  # name -> (B, N, D) image tokens, N = (H/p) * (W/p)


class Teacher(Protocol):
    """What distillation needs from any teacher."""

    feature_dim: int
    patch_size: int

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                 pooled: torch.Tensor) -> TeacherOutput: ...


def load_pretrained(cls: type[Any], path: str | Path, *, subfolder: str = "", **kwargs):
    """`cls.from_pretrained` with errors that name the path and the expected class. Refuses folders
    that hold another class, and weights that leave parameters uninitialised (diffusers would only warn)."""
    local = Path(str(path))
    folder = local / subfolder
    if str(path).startswith((".", "/")) or local.exists():
        if not folder.exists():
            raise LoadError(f"{cls.__name__}: no model folder at {folder}")
        _check_class_name(cls, folder)
    extra = {"subfolder": subfolder} if subfolder else {}
    try:
        model, info = cls.from_pretrained(str(path), output_loading_info=True, **extra, **kwargs)
    except (OSError, EnvironmentError, ValueError, KeyError) as exc:
        raise LoadError(f"cannot load a {cls.__name__} from {path!r}"
                        f"{f' (subfolder {subfolder!r})' if subfolder else ''}: {str(exc)[:300]}") from exc
    missing = list(info.get("missing_keys", []))
    if missing or not (isinstance(model, cls) or cls.__name__.startswith("Auto")):
        raise LoadError(f"{path!r}{f' (subfolder {subfolder!r})' if subfolder else ''} does not hold the weights of a "
                        f"{cls.__name__}: {len(missing)} parameters missing, e.g. {sorted(missing)[:3]}")
    return model


def _check_class_name(cls: type, folder: Path) -> None:
    """diffusers configs name their class: refuse a folder saved from another one."""
    import json

    config = folder / "config.json"
    if not config.is_file():
        return
    saved = json.loads(config.read_text()).get("_class_name")
    if saved and saved != cls.__name__:
        raise LoadError(f"{folder} holds a {saved}, expected a {cls.__name__}")


_CAPTURED = threading.local()  # .slots: {id(teacher): {feature name: tensor}} of the forward running in this thread


class SD3Teacher(nn.Module):
    """Frozen `SD3Transformer2DModel` with feature capture by forward hooks."""

    def __init__(self, transformer: nn.Module, feature_layers: tuple[int, ...] = (-1,)) -> None:
        super().__init__()
        self.transformer = transformer.eval().requires_grad_(False)
        blocks = transformer.transformer_blocks
        self.layer_index = sorted({i % len(blocks) for i in feature_layers})
        self.feature_dim = transformer.config.num_attention_heads * transformer.config.attention_head_dim
        self.patch_size = transformer.config.patch_size
        for i in self.layer_index:
            blocks[i].register_forward_hook(self._hook(f"block{i}"))

    def _hook(self, name: str):
        def capture(module, args, output):
            # JointTransformerBlock returns (encoder_hidden_states, hidden_states): keep the image tokens
            slot = getattr(_CAPTURED, "slots", {}).get(id(self))
            if slot is not None:  # a direct call of self.transformer captures nothing
                slot[name] = output[1]
        return capture

    @property
    def feature_names(self) -> list[str]:
        return [f"block{i}" for i in self.layer_index]

    @classmethod
    def from_pretrained(cls, cfg: TeacherConfig, device: str | torch.device = "cpu") -> "SD3Teacher":
        from diffusers import SD3Transformer2DModel

        dtype = DTYPES[cfg.dtype] if torch.device(device).type == "cuda" else torch.float32
        model = load_pretrained(SD3Transformer2DModel, cfg.path, subfolder=cfg.subfolder, torch_dtype=dtype)
        return cls(model.to(device), cfg.feature_layers)

    def train(self, mode: bool = True) -> "SD3Teacher":
        return super().train(False)  # always frozen, always eval

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                pooled: torch.Tensor) -> TeacherOutput:
        # features are captured per thread: the caching flow runs shards in threads that share one teacher,
        # and a shared dict let one thread read another's features (a batch of another size)
        slots = _CAPTURED.__dict__.setdefault("slots", {})
        captured: dict[str, torch.Tensor] = {}
        slots[id(self)] = captured
        try:
            dtype = next(self.transformer.parameters()).dtype
            out = self.transformer(hidden_states=x_t.to(dtype), encoder_hidden_states=context.to(dtype),
                                   pooled_projections=pooled.to(dtype), timestep=t * 1000.0, return_dict=False)[0]
        finally:
            slots.pop(id(self), None)
        return TeacherOutput(velocity=out.float(), features={k: v.float() for k, v in captured.items()})
