"""Issue 14: evaluation and export guide against the null condition training used (the student's
conditioner with every encoder dropped, not all zeros), and few-step images depend only on their own
(condition, seed), not on the batch they are generated in, through torch and the export runtime alike."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

from snapgen_model.configs import SamplerConfig
from snapgen_model.diffusion.generate import conditioner_null, generate, null_condition, seeded_noise
from snapgen_model.distill.text import Encoded, TextConditioner, TextConditionerConfig
from snapgen_model.evaluation import runner
from snapgen_model.evaluation.runner import CheckpointGenerator
from snapgen_model.export import ExportConfig, export_key, load_inputs, pipeline, runtime
from snapgen_model.nn.decoder import TinyDecoder
from snapgen_model.nn.unet import SnapGenUNet
from snapgen_model.presets import get_preset
from snapgen_model.storage.checkpoint import save_model
from snapgen_model.artifacts.student import save_conditioner
from tests.fixtures.checkpoints import randomize_zero_init

PRESET = get_preset("toy-smoke")  # context_dim 32, pooled_dim 32, 8x8x16 latents, 32 px


def few_step(preset=PRESET, steps: int = 3, guidance: float = 1.0):
    return dataclasses.replace(preset, sampler=SamplerConfig(kind="few_step", steps=steps, guidance=guidance))


def tiny_unet():
    torch.manual_seed(0)
    return randomize_zero_init(SnapGenUNet(PRESET.unet)).eval()


def tiny_conditioner() -> TextConditioner:
    """A learned-null conditioner with a non-zero null, as a trained one has."""
    torch.manual_seed(1)
    cond = TextConditioner(TextConditionerConfig(width=32, pooled_dim=32, null="learned"), {"clip": (24, 32)})
    with torch.no_grad():
        cond.null_tokens["clip"].normal_()
        cond.null_pooled["clip"].normal_()
    return cond.eval()


def encode(prompts) -> dict[str, Encoded]:
    """A stand-in text encoder: per-prompt features from a hash of the prompt."""
    rows = [torch.Generator().manual_seed(sum(map(ord, p))) for p in prompts]
    tokens = torch.stack([torch.randn(6, 24, generator=g) for g in rows])
    pooled = torch.stack([torch.randn(32, generator=g) for g in rows])
    return {"clip": Encoded(tokens, pooled, torch.ones(len(prompts), 6))}


def training_null(cond: TextConditioner, encoded: dict[str, Encoded]) -> dict[str, torch.Tensor]:
    """The dropped condition exactly as pretraining builds it: conditioner(encoded, drop) with every encoder dropped."""
    b = encoded["clip"].tokens.shape[0]
    return cond(encoded, torch.ones(b, 1, dtype=torch.bool))


# ------------------------------------------------------------------------------------ the null condition

def test_eval_guides_against_the_training_null(tmp_path, monkeypatch):
    unet_path = save_model(tiny_unet(), tmp_path / "unet.safetensors", preset=few_step(guidance=3.0))
    cond = tiny_conditioner()
    save_conditioner(cond, tmp_path / "conditioner.safetensors")  # the sibling a student folder has
    seen = {}
    monkeypatch.setattr(runner, "generate", lambda *a, **kw: seen.update(kw) or np.zeros((2, 32, 32, 3), np.uint8))
    gen = CheckpointGenerator(unet_path, encode_text=encode, text_identity="stand-in")
    gen(["a red circle", "two blue squares"], [1, 2])
    with torch.no_grad():
        enc = encode(["a red circle", "two blue squares"])
        want_u, want_c = training_null(cond, enc), cond(enc)
    for k in ("context", "pooled"):
        assert torch.allclose(seen["uncond"][k], want_u[k], atol=1e-6), k
        assert torch.allclose(seen["cond"][k], want_c[k], atol=1e-6), k
    zeros = null_condition(PRESET, 2, tokens=6)
    assert not torch.allclose(seen["uncond"]["context"], zeros["context"], atol=1e-3)  # not the all-zero null
    blind = CheckpointGenerator(unet_path, conditioner=cond)  # prompt-blind: cond is the training null itself
    assert torch.allclose(blind.conditions(["x"])[0]["context"], training_null(cond, encode(["x"]))["context"][:, :1]
                          .expand(1, 8, 32), atol=1e-6)
    with pytest.raises(ValueError, match="conditioner"):
        CheckpointGenerator(save_model(tiny_unet(), tmp_path / "alone" / "unet.safetensors", preset=few_step(guidance=3.0)),
                            encode_text=lambda p: {})


def test_export_generation_check_guides_against_the_training_null(tmp_path, monkeypatch):
    unet_path = save_model(tiny_unet(), tmp_path / "unet.safetensors", preset=few_step(guidance=2.0))
    cond = tiny_conditioner()
    save_conditioner(cond, tmp_path / "conditioner.safetensors")
    inputs = load_inputs(unet_path)
    assert inputs.conditioner is not None and inputs.sources["conditioner"]["kind"] == "checkpoint"
    cfg = ExportConfig(text_length=8, generation_steps=2)
    other = tiny_conditioner()
    with torch.no_grad():
        other.null_tokens["clip"].add_(1.0)
    assert export_key(load_inputs(unet_path, conditioner=other), cfg, ("onnx",), ("unet",)) != export_key(
        inputs, cfg, ("onnx",), ("unet",))  # the conditioner decides the check's null: part of the key
    seen = []
    monkeypatch.setattr(runtime, "session", lambda *a, **kw: None)
    monkeypatch.setattr(runtime, "OrtUNet", lambda sess, names: inputs.unet)
    monkeypatch.setattr(runtime, "ort_decoder", lambda sess: inputs.decoder)
    real = runtime.generate_latents_and_images
    monkeypatch.setattr(runtime, "generate_latents_and_images",
                        lambda *a, **kw: seen.append(kw["uncond"]) or real(*a, **kw))
    result, failures = pipeline.generation_check(inputs, tmp_path, cfg)
    n = len(cfg.generation_seeds)
    enc = {"clip": Encoded(torch.zeros(n, 8, 24), torch.zeros(n, 32), torch.ones(n, 8))}
    with torch.no_grad():
        want = training_null(cond, enc)
    assert len(seen) == 2 and not failures and result["null_condition"] == "conditioner"
    for uncond in seen:
        assert all(torch.allclose(uncond[k], want[k], atol=1e-6) for k in ("context", "pooled"))


# ------------------------------------------------------------------------------ batch-independent samples

class RowWise(nn.Module):
    """A velocity model that treats every row alone (exactly): v = x * w + mean(context) + pooled mean."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor(0.7))

    def forward(self, x, t, context, pooled):
        return x * self.w + context.mean((1, 2)).view(-1, 1, 1, 1) + pooled.mean(1).view(-1, 1, 1, 1) * t.view(-1, 1, 1, 1)


class FirstThree(nn.Module):
    def forward(self, z):
        return torch.tanh(z[:, :3])


def _cond(rows):
    g = torch.Generator().manual_seed(4)
    ctx, pooled = torch.randn(2, 8, 32, generator=g), torch.randn(2, 32, generator=g)
    return {"context": ctx[rows], "pooled": pooled[rows]}


def test_few_step_images_do_not_depend_on_the_batch():
    cfg, seeds = few_step(steps=4), [11, 12]
    both = generate(RowWise(), FirstThree(), cfg, seeds, cond=_cond([0, 1]))
    a = generate(RowWise(), FirstThree(), cfg, seeds[:1], cond=_cond([0]))
    b = generate(RowWise(), FirstThree(), cfg, seeds[1:], cond=_cond([1]))
    assert np.array_equal(both, np.concatenate([a, b]))
    c = generate(RowWise(), FirstThree(), cfg, [12, 11], cond=_cond([1, 0]))  # order within the batch neither
    assert np.array_equal(c, np.concatenate([b, a]))
    # the real UNet (batched convs may round differently by batch size; the noise is the same)
    unet, dec = tiny_unet(), TinyDecoder(PRESET.decoder).eval()
    both = generate(unet, dec, cfg, seeds, cond=_cond([0, 1])).astype(int)
    alone = np.concatenate([generate(unet, dec, cfg, [s], cond=_cond([i])) for i, s in enumerate(seeds)]).astype(int)
    assert np.abs(both - alone).max() <= 1


def test_export_runtime_samples_as_the_torch_path():
    cfg, seeds = few_step(steps=3), [5, 6]
    dec = FirstThree()
    lat, img = runtime.generate_latents_and_images(RowWise(), dec, cfg, seeds, cfg.sampler, cond=_cond([0, 1]),
                                                   uncond=None)
    assert np.array_equal(img, generate(RowWise(), dec, cfg, seeds, cond=_cond([0, 1])))
    _, alone = runtime.generate_latents_and_images(RowWise(), dec, cfg, seeds[1:], cfg.sampler, cond=_cond([1]),
                                                   uncond=None)
    assert np.array_equal(img[1:], alone)
    euler = dataclasses.replace(cfg, sampler=SamplerConfig(kind="euler", steps=3))  # initial noise unchanged
    lat_e, _ = runtime.generate_latents_and_images(lambda x, t, **c: torch.zeros_like(x), dec, euler, seeds,
                                                   euler.sampler, cond=_cond([0, 1]), uncond=None)
    assert torch.equal(lat_e, seeded_noise(seeds, (16, 8, 8)))


def test_conditioner_null_is_the_all_dropped_condition():
    cond = tiny_conditioner()
    got = conditioner_null(cond, 2, 5)
    enc = encode(["p", "q"])
    want = training_null(cond, {"clip": Encoded(enc["clip"].tokens[:, :5], enc["clip"].pooled, torch.ones(2, 5))})
    assert all(torch.allclose(got[k], want[k], atol=1e-6) for k in ("context", "pooled"))
