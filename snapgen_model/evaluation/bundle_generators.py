"""Text-to-image generators built from a teacher bundle: the teacher itself, and a student trained
on the bundle's latents and text embeddings.

A student folder (`artifacts.student`, written by pretraining or step distillation) holds `unet_ema.safetensors` (its
preset, with the sampler settings, in the metadata), `conditioner.safetensors` (the trained
per-encoder projections) and `student.json` (which bundle and text encoders it was trained with).
The student then generates exactly as in training: prompts -> the bundle's frozen text encoders ->
the student's conditioner -> the UNet sampled with classifier-free guidance against the
conditioner's null condition -> the bundle VAE's decoder. Both generators satisfy the
`ImageGenerator` protocol of `runner.py` (`__call__`, `identity`, `describe`), so every benchmark
scores students, teachers and plain checkpoints with the same code.
"""
from __future__ import annotations

import dataclasses
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from snapgen_model.keys import content_key
from snapgen_model.diffusion.generate import generate
from snapgen_model.distill.text import TextEncoderAdapter, TextEncoderSpec
from snapgen_model.evaluation.fid import file_sha256
from snapgen_model.artifacts import student as student_files
from snapgen_model.artifacts.student import load_conditioner
from snapgen_model.artifacts.student import read_card as read_student_card
from snapgen_model.storage.checkpoint import load_model, read_preset

class _VAEDecode(nn.Module):
    """The bundle VAE's decoder as the `decoder` module `generate` expects (latents -> [-1, 1] images)."""

    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents)


class BundleStudentGenerator:
    """A student folder + the (local) teacher bundle it was trained against, as an ImageGenerator."""

    def __init__(self, student_folder: str | Path, bundle_folder: str | Path, *, steps: int | None = None,
                 guidance: float | None = None, kind: str | None = None, device: str = "cpu",
                 decoder_path: str | Path | None = None) -> None:
        """`decoder_path`: a trained TinyDecoder checkpoint (the phone's decoder) in place of the bundle VAE's
        decoder, which is what evaluation scores by default."""
        from snapgen_model.distill.vae import VAEAdapter, VAEConfig

        folder = Path(student_folder)
        card = read_student_card(folder)
        unet_path = folder / student_files.UNET
        preset = read_preset(unet_path)
        if preset is None:
            raise ValueError(f"{unet_path}: the student checkpoint carries no preset (sampler settings)")
        given: dict[str, Any] = {"steps": steps, "guidance": guidance, "kind": kind}
        sampler = dataclasses.replace(preset.sampler, **{k: v for k, v in given.items() if v is not None})
        self.preset = dataclasses.replace(preset, sampler=sampler)
        self.unet = load_model(unet_path, expected_kind="SnapGenUNet", device=device).eval()
        self.conditioner = load_conditioner(folder / student_files.CONDITIONER, device).eval()
        bundle = str(Path(bundle_folder).resolve())
        self.encoders: dict[str, TextEncoderAdapter] = {}
        for spec in card["encoders"]:
            spec = TextEncoderSpec.from_dict(dict(spec) | {"path": bundle})
            self.encoders[spec.name] = TextEncoderAdapter.from_pretrained(spec, device)
        missing = [n for n in self.conditioner.names if n not in self.encoders]
        if missing:
            raise ValueError(f"{folder}: the conditioner expects text encoders {missing} that {student_files.CARD} does not "
                             f"list (it lists {list(self.encoders)})")
        decoder_id: dict[str, str] = {}
        if decoder_path is None:
            self.decoder = _VAEDecode(VAEAdapter.from_pretrained(VAEConfig(path=bundle, subfolder="vae"),
                                                                 device)).eval()
            channels, what = self.decoder.vae.latent_channels, f"the bundle VAE at {bundle}"
        else:
            self.decoder = load_model(decoder_path, expected_kind="TinyDecoder", device=device).eval()
            channels, what = self.decoder.config.latent_channels, f"the tiny decoder {decoder_path}"
            decoder_id = {"decoder": file_sha256(str(decoder_path))}
            if self.decoder.config.upsample != self.preset.latent.downsample:
                raise ValueError(f"tiny decoder {decoder_path}: up-samples {self.decoder.config.upsample}x but the "
                                 f"student's latent space is {self.preset.latent.downsample}x down-sampled")
        if channels != self.preset.latent.channels:
            raise ValueError(f"{folder}: student latents have {self.preset.latent.channels} channels but {what} "
                             f"takes {channels}")
        self.decoder_name = "bundle VAE" if decoder_path is None else f"tiny decoder ({Path(decoder_path).name})"
        self.device, self.card, self._lock = device, card, threading.Lock()
        self.identity = content_key({"unet": file_sha256(str(unet_path)),
                              "conditioner": file_sha256(str(folder / student_files.CONDITIONER)),
                              "bundle": card.get("bundle_id") or bundle, "encoders": card["encoders"],
                              "sampler": sampler.to_dict(), "kind": "bundle-student"} | decoder_id)[:32]

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str], seeds: Sequence[int]) -> np.ndarray:
        with self._lock:  # HF fast tokenizers refuse concurrent use ("Already borrowed")
            encoded = {name: enc(list(prompts)) for name, enc in self.encoders.items()}
        cond = self.conditioner(encoded)
        uncond = self.conditioner.null_condition(encoded)
        return generate(self.unet, self.decoder, self.preset, seeds, cond=cond, uncond=uncond)

    def describe(self) -> dict[str, Any]:
        return {"kind": "student", "preset": self.preset.name, "image_size": self.preset.image_size,
                "identity": self.identity, "sampler": self.preset.sampler.to_dict(),
                "conditioning": f"text:{','.join(self.encoders)} (bundle {str(self.card.get('bundle_id'))[:12]})",
                "stage": self.card.get("stage"), "decoder": self.decoder_name}


class BundleTeacherGenerator:
    """The toy teacher bundle (SD3 transformer + VAE + text encoder) as an ImageGenerator."""

    def __init__(self, bundle_folder: str | Path, *, steps: int | None = None, guidance: float | None = None,
                 kind: str | None = None, device: str = "cpu") -> None:
        from snapgen_model.artifacts.teacher_bundle import load_bundle

        if kind not in (None, "euler"):
            raise ValueError(f"sampler {kind!r}: the toy teacher samples with Euler only (few_step is for distilled "
                             "students)")
        self.bundle = load_bundle(bundle_folder, device)
        cfg = self.bundle.config
        self.steps = steps or cfg.eval_steps
        self.guidance = cfg.eval_guidance if guidance is None else guidance
        record = self.bundle.record
        self.image_size, self._lock = int(cfg.resolution), threading.Lock()
        self.identity = content_key({"bundle": record.get("config_hash"), "files": record.get("files"),
                              "steps": self.steps, "guidance": self.guidance, "kind": "bundle-teacher"})[:32]

    def __call__(self, prompts: Sequence[str], seeds: Sequence[int]) -> np.ndarray:
        from snapgen_model.artifacts.teacher_bundle import sample_teacher

        with self._lock:  # one sampling at a time: the bundle's tokenizer refuses concurrent use
            return sample_teacher(self.bundle, list(prompts), list(seeds), steps=self.steps, guidance=self.guidance)

    def describe(self) -> dict[str, Any]:
        return {"kind": "teacher", "preset": f"bundle:{self.bundle.record.get('preset', 'toy')}",
                "image_size": self.image_size, "identity": self.identity,
                "sampler": {"kind": "euler", "steps": self.steps, "guidance": self.guidance},
                "conditioning": "text:clip (teacher bundle)"}
