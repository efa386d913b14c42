"""Tasks of the train_decoder stage: load cached latents with their images, train, save, log."""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from prefect import task

from snapgen_model.data.sources import iter_tar_groups
from snapgen_model.data.wds_io import decode_sample
from snapgen_model.distill.cache import images_to_tensor, load_npy
from snapgen_model.distill.vae import VAEAdapter, VAEConfig
from snapgen_model.nn.decoder import TinyDecoder
from snapgen_model.presets import get_preset
from snapgen_model.storage.checkpoint import save_model
from snapgen_model.training.decoder import DecoderTrainConfig, decoder_report, train_tiny_decoder
from tasks.cache import local_folder
from tasks.defaults import compute_task_options, io_task_options
from tasks.settings import get_settings
from tasks.keys import content_key
from tasks.storage import storage


@task(name="load-latents", **io_task_options())
def load_latents(cache_uri: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(latents (N, C, h, w), images (N, 3, H, W) in [-1, 1]) joined by sample key across cache and dataset."""
    store = storage()
    manifest = store.read_json(store.join(cache_uri, "manifest.json"))
    latents, images = [], []
    for shard in manifest["shards"]:
        cached = {k: m for k, m in iter_tar_groups(store.open_read(store.join(cache_uri, shard["name"])))}
        source = store.join(manifest["dataset_uri"], shard["source"])
        for key, members in iter_tar_groups(store.open_read(source)):
            if key in cached:
                latents.append(torch.from_numpy(load_npy(cached[key]["latent.npy"]).astype(np.float32)))
                images.append(decode_sample(key, members)["image"])
    if not latents:
        raise ValueError(f"cache {cache_uri}: no latents matched their dataset samples")
    return torch.stack(latents), images_to_tensor(images)


@task(name="train-tiny-decoder", **compute_task_options())
def train_decoder_task(cache_uri: str, bundle_uri: str, preset: str, overrides: list[str],
                       cfg: DecoderTrainConfig) -> dict[str, Any]:
    """Train and report; the checkpoint goes next to the cache, keyed by its inputs. `cfg` comes parsed
    from the flow's parameters (`DecoderParams.config`)."""
    dec_cfg = get_preset(preset, overrides).decoder
    key = content_key([cache_uri, dec_cfg.to_dict(), cfg.to_dict()], 16)
    store = storage()
    ckpt_uri = store.join(cache_uri, "decoder", key, "tiny_decoder.safetensors")
    report_uri = store.join(cache_uri, "decoder", key, "report.json")
    if store.exists(report_uri):
        return store.read_json(report_uri) | {"cache_hit": True}
    latents, images = load_latents.fn(cache_uri)
    vae = VAEAdapter.from_pretrained(VAEConfig(path=str(local_folder(bundle_uri)), subfolder="vae"))
    torch.manual_seed(cfg.seed)
    decoder = TinyDecoder(dec_cfg)
    n = len(latents) - min(cfg.heldout, len(latents) // 4)
    history = train_tiny_decoder(decoder, latents[:n], images[:n], cfg)
    report = decoder_report(decoder, vae, latents[n:], images[n:])
    with tempfile.TemporaryDirectory() as tmp:
        local = save_model(decoder, Path(tmp) / "tiny_decoder.safetensors")
        store.upload_file(local, ckpt_uri)
    result = {"checkpoint": ckpt_uri, "report": report, "key": key, "final_loss": history[-1]["loss"],
              "loss_curve": [h["loss"] for h in history[:: max(1, len(history) // 50)]]}
    store.write_json(report_uri, result)
    return result | {"cache_hit": False}


@task(name="log-tiny-decoder", **io_task_options())
def log_decoder(result: dict[str, Any]) -> str:
    from tasks.lineage import lineage_tags
    from tasks.tracking import start_run

    with start_run(get_settings(), "train tiny decoder",
                   tags=lineage_tags(config_hash=result["key"]) | {"snapgen.stage": "train_decoder"}) as run:
        run.log_metrics({f"decoder.{k}": v for k, v in result["report"].items()})
        for i, loss in enumerate(result["loss_curve"]):
            run.log_metrics({"decoder.loss": loss}, step=i)
        run.log_dict(result, "tiny_decoder_report.json")
        return run.run_id
