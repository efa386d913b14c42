"""Text encoders (SNAPGEN_SPEC.md section 3): CLIP ViT-L, OpenCLIP ViT-bigG, Gemma-2-2B, each optional.

`TextEncoderAdapter` wraps one frozen transformers encoder and its tokenizer (loaded by hub id or
local path: the same code for the full models and the toy world's tiny CLIP). Its outputs are what
the caching stage stores per encoder. `TextConditioner` is the trainable part the student owns:
a projection per encoder to a common width, token-wise concatenation, the pooled vector, and
independent per-encoder dropout to a zero or learned null embedding (which is also the
classifier-free-guidance null condition).
"""
from __future__ import annotations

import dataclasses
from typing import Literal, Sequence

import torch
from torch import nn

from snapgen_model.config_base import ConfigBase, check, check_choice
from snapgen_model.distill.teacher import DTYPES, LoadError, load_pretrained


@dataclasses.dataclass(frozen=True, kw_only=True)
class TextEncoderSpec(ConfigBase):
    """One text encoder."""

    name: str  # short name used in caches and metrics, e.g. clip_l, clip_g, gemma
    kind: Literal["clip", "gemma", "t5"]  # clip: CLIPTextModelWithProjection (pooled = text_embeds); gemma: AutoModel; t5: T5EncoderModel (SD3 teachers)
    path: str  # hub id or local folder
    subfolder: str = ""  # model subfolder inside `path`
    tokenizer_subfolder: str = ""  # tokenizer subfolder inside `path` ("" = same as the model)
    max_length: int = 77  # tokens (CLIP: 77) [U for Gemma]
    hidden_layer: int = -1  # hidden state used as token features (-2 = penultimate, SD3-style for CLIP)
    dropout: float = 0.1  # training-time probability of dropping this encoder's condition (SPEC 3) [U]
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # GPU dtype

    def __post_init__(self) -> None:
        check(bool(self.name), "text_encoder.name", "must not be empty")
        check_choice(self.kind, "text_encoder.kind", ("clip", "gemma", "t5"))
        check(bool(self.path), "text_encoder.path", "needs a hub id or a local path")
        check(self.max_length >= 1, "text_encoder.max_length", "must be >= 1")
        check(0.0 <= self.dropout <= 1.0, "text_encoder.dropout", "must be in [0, 1]")


@dataclasses.dataclass
class Encoded:
    """One encoder's output for a batch of prompts."""

    tokens: torch.Tensor  # (B, L, D)
    pooled: torch.Tensor | None  # (B, P) for CLIP, None for Gemma
    mask: torch.Tensor  # (B, L) 1 for real tokens


class TextEncoderAdapter(nn.Module):
    """Frozen tokenizer + encoder."""

    def __init__(self, spec: TextEncoderSpec, tokenizer, model: nn.Module) -> None:
        super().__init__()
        self.spec, self.tokenizer = spec, tokenizer
        self.model = model.eval().requires_grad_(False)
        cfg = model.config
        self.hidden_size = int(cfg.hidden_size)
        self.pooled_size = int(getattr(cfg, "projection_dim", 0)) if spec.kind == "clip" else 0

    @classmethod
    def from_pretrained(cls, spec: TextEncoderSpec, device: str | torch.device = "cpu") -> "TextEncoderAdapter":
        from transformers import AutoModel, AutoTokenizer, CLIPTextModelWithProjection, T5EncoderModel

        dtype = DTYPES[spec.dtype] if torch.device(device).type == "cuda" else torch.float32
        model_cls = {"clip": CLIPTextModelWithProjection, "gemma": AutoModel, "t5": T5EncoderModel}[spec.kind]
        model = load_pretrained(model_cls, spec.path, subfolder=spec.subfolder, dtype=dtype)
        try:
            sub = spec.tokenizer_subfolder or spec.subfolder
            tokenizer = AutoTokenizer.from_pretrained(spec.path, **({"subfolder": sub} if sub else {}))
        except (OSError, ValueError) as exc:
            raise LoadError(f"cannot load the tokenizer of text encoder {spec.name!r} from {spec.path!r}: "
                            f"{str(exc)[:200]}") from exc
        return cls(spec, tokenizer, model.to(device))

    def train(self, mode: bool = True) -> "TextEncoderAdapter":
        return super().train(False)

    @torch.no_grad()
    def forward(self, prompts: Sequence[str]) -> Encoded:
        device = next(self.model.parameters()).device
        batch = self.tokenizer(list(prompts), padding="max_length", truncation=True,
                               max_length=self.spec.max_length, return_tensors="pt").to(device)
        out = self.model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                         output_hidden_states=True)
        tokens = out.hidden_states[self.spec.hidden_layer].float()  # (B, L, D)
        pooled = out.text_embeds.float() if self.spec.kind == "clip" else None  # (B, P)
        mask = batch.get("attention_mask", torch.ones(tokens.shape[:2], device=device))
        return Encoded(tokens=tokens, pooled=pooled, mask=mask)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TextConditionerConfig(ConfigBase):
    """How per-encoder outputs become the student's condition."""

    width: int = 1024  # common token width (= unet.context_dim)
    pooled_dim: int = 2048  # pooled vector width (= unet.pooled_dim)
    null: Literal["zero", "learned"] = "zero"  # null embedding of a dropped encoder

    def __post_init__(self) -> None:
        check(self.width >= 1, "text.width", "must be >= 1")
        check(self.pooled_dim >= 1, "text.pooled_dim", "must be >= 1")
        check_choice(self.null, "text.null", ("zero", "learned"))


class TextConditioner(nn.Module):
    """Trainable projections + concatenation + per-encoder dropout (SPEC 3)."""

    def __init__(self, cfg: TextConditionerConfig, encoders: dict[str, tuple[int, int]]) -> None:
        """`encoders`: name -> (token width, pooled width or 0), in concatenation order."""
        super().__init__()
        self.cfg, self.names = cfg, list(encoders)
        self.proj = nn.ModuleDict({n: nn.Linear(d, cfg.width) for n, (d, _) in encoders.items()})
        pooled_in = sum(p for _, p in encoders.values())
        if pooled_in == 0:
            raise ValueError("text encoders: at least one encoder must provide a pooled vector (a CLIP)")
        self.pooled_names = [n for n, (_, p) in encoders.items() if p]
        self.pooled_proj = nn.Identity() if pooled_in == cfg.pooled_dim else nn.Linear(pooled_in, cfg.pooled_dim)
        learned = cfg.null == "learned"
        self.null_tokens = nn.ParameterDict({n: nn.Parameter(torch.zeros(d), requires_grad=learned)
                                             for n, (d, _) in encoders.items()})
        self.null_pooled = nn.ParameterDict({n: nn.Parameter(torch.zeros(p), requires_grad=learned)
                                             for n, (_, p) in encoders.items() if p})

    @property
    def config(self) -> TextConditionerConfig:
        """Its config, under the name the checkpoint registry reads (`storage.checkpoint.save_model`)."""
        return self.cfg

    def encoder_dims(self) -> dict[str, tuple[int, int]]:
        """name -> (token width, pooled width or 0), in concatenation order: what `__init__` was given."""
        return {n: (int(self.proj[n].in_features), self.null_pooled[n].numel() if n in self.null_pooled else 0)
                for n in self.names}

    def checkpoint_metadata(self) -> dict[str, str]:
        """What a checkpoint needs beyond the config to rebuild it: the encoder widths."""
        import json

        return {"snapgen.encoders": json.dumps({n: list(d) for n, d in self.encoder_dims().items()})}

    @classmethod
    def from_checkpoint(cls, cfg: TextConditionerConfig, metadata: dict[str, str]) -> "TextConditioner":
        import json

        return cls(cfg, {n: (int(d[0]), int(d[1])) for n, d in json.loads(metadata["snapgen.encoders"]).items()})

    def sample_drop(self, batch: int, probs: dict[str, float], generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, n_encoders) bool: each encoder dropped independently with its own probability."""
        p = torch.tensor([probs.get(n, 0.0) for n in self.names])
        return torch.rand(batch, len(self.names), generator=generator) < p

    def forward(self, encoded: dict[str, Encoded], drop: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """{context (B, sum L_i, width), pooled (B, pooled_dim)}; `drop` (B, n) replaces encoders by null."""
        tokens, pooled = [], []
        for j, name in enumerate(self.names):
            enc = encoded[name]
            t, p = enc.tokens, enc.pooled
            if drop is not None:
                d = drop[:, j].to(t.device).view(-1, 1, 1)
                t = torch.where(d, self.null_tokens[name].to(t.dtype).expand_as(t), t)
                if p is not None:
                    p = torch.where(d[:, 0], self.null_pooled[name].to(p.dtype).expand_as(p), p)
            tokens.append(self.proj[name](t))  # (B, L_i, width)
            if name in self.pooled_names:
                pooled.append(p)
        return {"context": torch.cat(tokens, dim=1), "pooled": self.pooled_proj(torch.cat(pooled, dim=-1))}

    def null_condition(self, encoded: dict[str, Encoded]) -> dict[str, torch.Tensor]:
        """Every encoder dropped: the classifier-free-guidance null condition."""
        b = next(iter(encoded.values())).tokens.shape[0]
        return self(encoded, torch.ones(b, len(self.names), dtype=torch.bool))


def sd3_teacher_condition(encoded: dict[str, Encoded], clip_names: Sequence[str], joint_dim: int,
                          t5_name: str | None = None) -> dict[str, torch.Tensor]:
    """SD3's own conditioning layout: CLIP token states concatenated on channels and zero-padded to
    `joint_dim`, then T5 tokens appended on the sequence; pooled = concatenated CLIP pooled vectors."""
    clip_tokens = torch.cat([encoded[n].tokens for n in clip_names], dim=-1)  # (B, 77, sum D)
    pad = joint_dim - clip_tokens.shape[-1]
    if pad < 0:
        raise ValueError(f"teacher joint_attention_dim {joint_dim} < CLIP width {clip_tokens.shape[-1]}")
    context = nn.functional.pad(clip_tokens, (0, pad))
    if t5_name is not None:
        context = torch.cat([context, encoded[t5_name].tokens], dim=1)
    pooled = torch.cat([encoded[n].pooled for n in clip_names], dim=-1)
    return {"context": context, "pooled": pooled}
