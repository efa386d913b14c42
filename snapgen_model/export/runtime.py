"""ONNX Runtime side of the export checks: sessions, CPU latency against PyTorch eager, and a whole
few-step generation through the exported UNet and decoder with the project's sampler maths.
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from snapgen_model.configs import SamplerConfig, SnapGenConfig
from snapgen_model.diffusion.generate import latents_to_images, seeded_start
from snapgen_model.diffusion.samplers import sample


def session(path: str | Path, threads: int = 0) -> ort.InferenceSession:
    """A CPU session (ORT's warnings silenced; `threads` 0 = torch's current thread count)."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _feed_value(tensor: torch.Tensor, dtype: str) -> np.ndarray:
    array = tensor.detach().cpu().numpy()
    want = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
            "tensor(int32)": np.int32}.get(dtype)
    return array.astype(want) if want is not None and array.dtype != want else array


def run(sess: ort.InferenceSession, inputs: Sequence[torch.Tensor]) -> list[np.ndarray]:
    """Run `sess` on positional inputs (matched to the graph's inputs in order)."""
    specs = sess.get_inputs()
    if len(specs) != len(inputs):
        raise ValueError(f"ONNX graph takes {[s.name for s in specs]}, got {len(inputs)} inputs")
    feed = {spec.name: _feed_value(x, spec.type) for spec, x in zip(specs, inputs)}
    return sess.run(None, feed)


def median_ms(fn: Callable[[], object], warmup: int, runs: int) -> float:
    """Median wall time of `fn()` in milliseconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(times)


def latency(sess: ort.InferenceSession, module: nn.Module, inputs: Sequence[torch.Tensor], *,
            warmup: int, runs: int, threads: int = 0) -> dict[str, float | None]:
    """ORT CPU vs PyTorch eager (no grad) median latency on the same inputs and thread count."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads or previous)
    try:
        with torch.inference_mode():
            torch_ms = median_ms(lambda: module(*inputs), warmup, runs)
        ort_ms = median_ms(lambda: run(sess, inputs), warmup, runs)
    finally:
        torch.set_num_threads(previous)
    return {"ort_ms": round(ort_ms, 3), "torch_ms": round(torch_ms, 3),
            "speedup": round(torch_ms / ort_ms, 3) if ort_ms > 0 else None,
            "threads": threads or previous, "runs": runs}


def static_batch(sess: ort.InferenceSession) -> int | None:
    """The graph's fixed batch size, or None when the batch dim is symbolic."""
    dim = sess.get_inputs()[0].shape[0]
    return dim if isinstance(dim, int) else None


class OrtUNet:
    """An ONNX Runtime UNet session behind the samplers' `model_fn(x, t, **cond) -> v` signature.

    A static-batch graph is called in chunks of its batch size, so a CFG-doubled batch works too.
    """

    def __init__(self, sess: ort.InferenceSession, cond_names: Sequence[str]) -> None:
        self.sess = sess
        self.cond_names = tuple(cond_names)
        self.batch = static_batch(sess)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **cond: torch.Tensor) -> torch.Tensor:
        args = (x, t, *(cond[name] for name in self.cond_names))
        step = self.batch or x.shape[0]
        outs = [run(self.sess, [a[i:i + step] for a in args])[0] for i in range(0, x.shape[0], step)]
        return torch.from_numpy(np.concatenate(outs)).to(x.dtype)


def few_step_sampler(cfg: SnapGenConfig, steps: int) -> SamplerConfig:
    """The preset's sampler settings as the few-step (x0-predict and re-noise) sampler with `steps`."""
    s = cfg.sampler
    return SamplerConfig(kind="few_step", steps=steps, guidance=s.guidance, shift=s.shift)


@torch.no_grad()
def generate_latents_and_images(model_fn: Callable, decode: Callable[[torch.Tensor], torch.Tensor],
                                cfg: SnapGenConfig, seeds: Sequence[int], sampler: SamplerConfig, *,
                                cond: dict, uncond: dict | None) -> tuple[torch.Tensor, np.ndarray]:
    """`generate()`'s maths with pluggable model and decoder: (latents, uint8 images); the same
    per-sample seeded noise and re-noising, so sample i depends only on (condition i, seed i)."""
    side = cfg.latent_size
    noise, generators = seeded_start(seeds, (cfg.latent.channels, side, side))
    latents = sample(model_fn, noise, sampler, cond=cond, uncond=uncond, generator=generators)
    return latents, latents_to_images(decode(latents))


def ort_decoder(sess: ort.InferenceSession) -> Callable[[torch.Tensor], torch.Tensor]:
    """An ONNX Runtime decoder session as latent -> image (chunked to a static batch)."""
    batch = static_batch(sess)

    def decode(z: torch.Tensor) -> torch.Tensor:
        step = batch or z.shape[0]
        outs = [run(sess, [z[i:i + step]])[0] for i in range(0, z.shape[0], step)]
        return torch.from_numpy(np.concatenate(outs))

    return decode
