"""Tiny-decoder training on the toy world (teacher VAE frozen), PSNR/SSIM, the optional loss terms."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from snapgen_model.distill.cache import images_to_tensor
from snapgen_model.distill.vae import VAEAdapter, VAEConfig
from snapgen_model.evaluation.image_metrics import psnr, ssim
from snapgen_model.nn.decoder import TinyDecoder
from snapgen_model.presets import get_preset
from snapgen_model.training.decoder import (
    DecoderTrainConfig,
    FeaturePerceptual,
    decoder_report,
    train_tiny_decoder,
)


def test_psnr_and_ssim_basics():
    a = torch.rand(2, 3, 16, 16) * 2 - 1
    assert torch.all(psnr(a, a) > 100) and torch.allclose(ssim(a, a), torch.ones(2))
    noisy = a + 0.1 * torch.randn_like(a)
    assert 15 < float(psnr(a, noisy).mean()) < 30 and float(ssim(a, noisy).mean()) < 0.99
    assert abs(float(psnr(torch.zeros(1, 3, 4, 4), torch.full((1, 3, 4, 4), 0.2)).mean()) - 10 * np.log10(4 / 0.04)) < 1e-4


@pytest.fixture(scope="module")
def toy_data(tiny_bundle):
    from snapgen_model.data.shapes import ShapesWorld, ShapesWorldConfig

    world = ShapesWorld(ShapesWorldConfig(resolution=32, object_size_px=(8, 11)))
    images, _ = world.batch(range(96))
    vae = VAEAdapter.from_pretrained(VAEConfig(path=str(tiny_bundle), subfolder="vae"))
    x = images_to_tensor(list(images))
    return vae, vae.encode(x), x


def test_training_beats_untrained_decoder_by_wide_margin(toy_data):
    vae, latents, images = toy_data
    torch.manual_seed(0)
    decoder = TinyDecoder(get_preset("toy-smoke").decoder)
    held_lat, held_img = latents[-16:], images[-16:]
    before = decoder_report(decoder, vae, held_lat, held_img)
    history = train_tiny_decoder(decoder, latents[:-16], images[:-16],
                                 DecoderTrainConfig(steps=150, batch_size=16, lr=3e-3, heldout=16))
    after = decoder_report(decoder, vae, held_lat, held_img)
    first, last = np.mean([h["loss"] for h in history[:10]]), np.mean([h["loss"] for h in history[-10:]])
    assert last < 0.5 * first
    assert after["psnr_vs_images"] > before["psnr_vs_images"] + 5, (before, after)  # >3x lower MSE
    assert after["params"] < after["vae_decoder_params"] and after["latency_ms"] > 0


def test_perceptual_and_adversarial_terms_are_used(toy_data):
    vae, latents, images = toy_data
    torch.manual_seed(0)
    feat = torch.nn.Conv2d(3, 8, 3, padding=1).requires_grad_(False)
    decoder = TinyDecoder(get_preset("toy-smoke").decoder)
    history = train_tiny_decoder(decoder, latents[:32], images[:32],
                                 DecoderTrainConfig(steps=3, batch_size=8, perceptual_weight=0.5, adversarial_weight=0.1),
                                 perceptual=FeaturePerceptual(feat))
    assert {"perceptual", "g_adv", "d_loss"} <= set(history[-1])
    assert all(np.isfinite(h["loss"]) for h in history)


def test_one_psnr_implementation_two_reductions():
    """Export parity's PSNR is image_metrics' formula over whole arrays with peak = max |reference|; per image
    with peak = the data range it is the decoder's figure. Hand-worked: error 0.1 everywhere, peak 2 ->
    10 log10(4 / 0.01) = 26.02 dB."""
    from snapgen_model.evaluation.image_metrics import psnr_total
    from snapgen_model.export.parity import psnr as parity_psnr

    ref = torch.full((1, 3, 4, 4), -1.0)
    ref[..., 0, 0] = 2.0  # max |reference| = 2
    out = ref + 0.1
    want = 10 * np.log10(4 / 0.01)
    assert abs(parity_psnr(out, ref) - want) < 1e-4 and abs(psnr_total(out.numpy(), ref.numpy()) - want) < 1e-4
    assert abs(float(psnr(out, ref, data_range=2.0)[0]) - want) < 1e-4
    assert abs(psnr_total(out, ref, peak=255.0) - 10 * np.log10(255.0 ** 2 / 0.01)) < 1e-4
    assert np.isfinite(parity_psnr(ref, ref)) and parity_psnr(ref, ref) > 150  # identical: large, finite
