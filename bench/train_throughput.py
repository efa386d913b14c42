"""Training throughput: images/s and step time of pretraining and step distillation, with the teacher
cache in memory (`data=memory`) or streamed from its shards (`data=stream`), per preset.

    python bench/train_throughput.py [--presets toy,toy-gpu] [--stages pretrain,distill]
                                     [--data memory,stream] [--batch 16] [--steps 8] [--warmup 2]
                                     [--repeats 2] [--samples 256] [--shard-size 64] [--buffer 256]
                                     [--device auto] [--precision 32-true] [--out bench/RESULTS.md]

1. Cache. A synthetic teacher cache in the caching stage's on-disk format (`shards/*.tar` of fp16
   `.npy` members, like `cache.feature_dtype=float16`): per sample the latent (16 x L x L, L the
   preset's latent side), the text states of one CLIP-like encoder shaped as the preset's toy
   teacher bundle makes them (`bootstrap_config`: text_max_length tokens x text_hidden, pooled
   pooled_dim, int8 mask) and K=2 teacher targets (t, v); no teacher features (the caching
   stage's default `store_features=false`, so feature KD is off). --samples samples in shards of
   --shard-size. Random values: throughput does not depend on them.
2. Runs. The product's entry points, `fit` (pretraining, `kd.combine=scaled`: task + output KD)
   and `fit_distill` (adversarial step distillation, 4-step sampler, hinge loss, one D update per
   G update, the discriminator on a teacher of the preset's toy bootstrap shape
   (`bootstrap.build_teacher`, random weights) with feature layers [0, -1]), on the preset's
   student (random init), global batch --batch, --warmup + --steps steps, no checkpoints
   until the end, 1 device. `data=memory` loads the cache with `load_cache_folder`;
   `data=stream` streams it (`StreamData`, shuffle buffer --buffer, reader in process).
   Each (preset, stage) alternates the data modes --repeats times.
3. Timing. A callback stamps the end of every step (the GPU synchronised first); step time = the
   median of the step-to-step intervals after the --warmup steps, over all repeats; images/s =
   batch / step time; spread = (max - min) / median of the intervals. start-up = the data set-up
   before training (memory: read and decode the whole cache; stream: the layout probe).
   `reader alone` rows: the data path without a model, samples/s over 50 batches (memory: select
   the rows of each step's batch; stream: `StreamBatches` from a fresh stream).

The section `## Training throughput (bench/train_throughput.py)` of --out is written (or replaced).
"""
from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.common import (  # noqa: E402
    command_line,
    environment_line,
    fmt_num,
    load_warning,
    markdown_table,
    now_utc,
    print_table,
    replace_section,
    resolve_device,
)

HEADING = "## Training throughput (bench/train_throughput.py)"


def npy(a: Any, dtype=np.float16) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.asarray(a).astype(dtype))
    return buf.getvalue()


def write_cache(folder: Path, preset_name: str, samples: int, shard_size: int) -> dict[str, int]:
    """The synthetic cache (module docstring, 1.); returns its text shapes."""
    from snapgen_model.data.wds_io import write_shard
    from snapgen_model.presets import get_preset
    from snapgen_model.artifacts.teacher_recipe import get_bootstrap_config

    side, boot = get_preset(preset_name).latent_size, get_bootstrap_config(preset_name)
    tokens, width, pooled = boot.text_max_length, boot.text_hidden, boot.pooled_dim
    rng = np.random.default_rng(0)
    (folder / "shards").mkdir(parents=True)
    for s in range(0, samples, shard_size):
        rows = []
        for i in range(s, min(samples, s + shard_size)):
            row = {"__key__": f"k{i:06d}", "latent.npy": npy(rng.normal(size=(16, side, side))),
                   "clip.tokens.npy": npy(rng.normal(size=(tokens, width))),
                   "clip.pooled.npy": npy(rng.normal(size=pooled)), "clip.mask.npy": npy(np.ones(tokens), np.int8)}
            for k in range(2):
                row[f"t{k}.npy"] = npy([rng.uniform(0.05, 0.95)], np.float32)
                row[f"v{k}.npy"] = npy(rng.normal(size=(16, side, side)))
            rows.append(row)
        write_shard(iter(rows), folder / "shards" / f"shard-{s // shard_size:06d}.tar")
    return {"tokens": tokens, "width": width, "pooled": pooled}


def load_data(mode: str, folder: Path):
    from snapgen_model.training.data import load_cache_folder
    from snapgen_model.training.stream import StreamData

    t0 = time.perf_counter()
    data = load_cache_folder(folder, ["clip"]) if mode == "memory" else StreamData.from_folder(folder, ["clip"])
    return data, time.perf_counter() - t0


def clock(device: torch.device):
    import lightning.pytorch as pl

    class Clock(pl.Callback):
        def __init__(self) -> None:
            self.stamps: list[float] = []

        def on_train_batch_end(self, *args) -> None:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            self.stamps.append(time.perf_counter())

    return Clock()


def run_once(stage: str, preset_name: str, mode: str, folder: Path, shapes: dict[str, int], args, device, root: Path):
    """(step-to-step intervals after warm-up, start-up seconds)."""
    from snapgen_model.distill.cache import CacheConfig
    from snapgen_model.presets import get_preset

    preset, steps = get_preset(preset_name), args.warmup + args.steps
    accelerator = "gpu" if device.type == "cuda" else "cpu"
    common = {"steps": steps, "batch_size": args.batch, "checkpoint_every": 0, "log_every": 10_000,
              "accelerator": accelerator, "precision": args.precision, "data": mode, "shuffle_buffer": args.buffer}
    data, startup = load_data(mode, folder)
    cache_cfg, timer = CacheConfig(targets_per_sample=2), clock(device)
    if stage == "pretrain":
        from snapgen_model.training.pretrain import PretrainConfig, fit

        cfg = PretrainConfig.from_dict(common | {"kd": {"feature_kd": False}})
        fit(preset, cfg, data, cache_cfg, root, callbacks=[timer])
    else:
        from snapgen_model.distill.teacher import SD3Teacher
        from snapgen_model.distill.text import TextConditioner, TextConditionerConfig
        from snapgen_model.nn.unet import SnapGenUNet
        from snapgen_model.training.bootstrap import build_teacher
        from snapgen_model.artifacts.teacher_recipe import get_bootstrap_config
        from snapgen_model.training.distill_steps import StepDistillConfig, fit_distill

        torch.manual_seed(0)
        teacher = SD3Teacher(build_teacher(get_bootstrap_config(preset_name)), (0, -1)).to(device)
        student = SnapGenUNet(preset.unet)
        conditioner = TextConditioner(TextConditionerConfig(width=preset.unet.context_dim,
                                                            pooled_dim=preset.unet.pooled_dim),
                                      {"clip": (shapes["width"], shapes["pooled"])})
        cfg = StepDistillConfig.from_dict(common | {"sampler_steps": 4, "discriminator": {"feature_layers": [0, -1]}})
        fit_distill(preset, cfg, data, cache_cfg, root, teacher=teacher, student=student, conditioner=conditioner,
                    callbacks=[timer])
    stamps = timer.stamps  # stamps[i]: end of step i; step i's time is stamps[i] - stamps[i - 1]
    first = max(1, args.warmup)
    return [b - a for a, b in zip(stamps[first - 1:], stamps[first:])], startup


def reader_alone(mode: str, folder: Path, batch: int, buffer: int, batches: int = 50) -> float:
    """samples/s of the data path without a model."""
    from snapgen_model.training.data import global_batch_indices
    from snapgen_model.training.stream import StreamBatches

    data, _ = load_data(mode, folder)
    t0 = time.perf_counter()
    if mode == "memory":
        for step in range(batches):
            data.select(global_batch_indices(len(data), batch, step, 0))
    else:
        for _ in StreamBatches(data, batch=batch, seed=0, start=0, steps=batches, buffer_size=buffer):
            pass
    return batch * batches / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--presets", default="toy,toy-gpu")
    ap.add_argument("--stages", default="pretrain,distill")
    ap.add_argument("--data", default="memory,stream")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=8, help="timed steps per run")
    ap.add_argument("--warmup", type=int, default=2, help="untimed first steps per run")
    ap.add_argument("--repeats", type=int, default=2, help="runs per (preset, stage, data), alternating data modes")
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--shard-size", type=int, default=64)
    ap.add_argument("--buffer", type=int, default=256, help="stream shuffle buffer")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed"])
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = leave as is)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "RESULTS.md"))
    args = ap.parse_args(argv)
    import logging
    import warnings

    import lightning.pytorch  # noqa: F401 - configures its loggers on import: quiet them after that

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)  # no per-run banners
    warnings.filterwarnings("ignore", module="lightning")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    warning = load_warning(device)
    modes, rows, notes = args.data.split(","), [], []
    with tempfile.TemporaryDirectory(prefix="snapgen-train-bench-") as tmp:
        for preset_name in args.presets.split(","):
            folder = Path(tmp) / preset_name / "cache"
            shapes = write_cache(folder, preset_name, args.samples, args.shard_size)
            for mode in modes:
                rate = reader_alone(mode, folder, args.batch, args.buffer)
                rows.append([preset_name, "reader alone", mode, str(args.batch), "-", f"{fmt_num(rate)} samples/s",
                             "-", "-", "50 batches"])
            for stage in args.stages.split(","):
                timings: dict[str, list[float]] = {m: [] for m in modes}
                startups: dict[str, list[float]] = {m: [] for m in modes}
                for r in range(args.repeats):
                    for mode in modes:
                        intervals, startup = run_once(stage, preset_name, mode, folder, shapes, args, device,
                                                      Path(tmp) / f"{preset_name}-{stage}-{mode}-{r}")
                        timings[mode] += intervals
                        startups[mode].append(startup)
                        print(f"{preset_name} {stage} {mode} run {r + 1}: median step "
                              f"{statistics.median(intervals) * 1e3:.1f} ms", flush=True)
                for mode in modes:
                    t = timings[mode]
                    med = statistics.median(t)
                    rows.append([preset_name, stage, mode, str(args.batch), f"{med * 1e3:,.1f}",
                                 fmt_num(args.batch / med), f"{(max(t) - min(t)) / med:.2f}",
                                 f"{statistics.median(startups[mode]):.2f}", str(len(t))])
    headers = ["preset", "stage", "data", "batch", "step time (ms)", "images/s", "spread", "start-up (s)",
               "steps timed"]
    print_table("training throughput", headers, rows)
    body = [f"Measured {now_utc()} with `{command_line()}`.", "", environment_line(device) + ".", ""]
    if warning:
        body += [f"**Warning:** {warning}.", ""]
    body += [markdown_table(headers, rows), "",
             f"Synthetic fp16 cache of {args.samples} samples in shards of {args.shard_size} (module docstring); "
             f"{args.warmup} untimed + {args.steps} timed steps per run, {args.repeats} runs per data mode "
             f"(alternating), precision {args.precision}. Pretraining: task + output KD (no cached features). "
             "Distillation: 4-step sampler, one D update per G update, discriminator on a random teacher of the "
             "preset's toy bootstrap shape. `reader alone`: the data path without a model."]
    body += notes
    replace_section(Path(args.out), HEADING, "\n".join(body))
    print(f"wrote {HEADING!r} to {args.out}")


if __name__ == "__main__":
    main()
