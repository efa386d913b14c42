"""Which KD objective trains the toy student fastest: short runs from one cache, held-out losses.

    python bench/kd_probe.py --home .snapgen [--steps 400] [--variants task_only,scaled_sample,scaled]
                             [--set pretrain.field=value] [--out bench/RESULTS.md]

Every variant trains the toy preset's student with the product's `training.pretrain.fit` (online KD from
the teacher the cache was made with, the toy preset's pretraining settings, `--steps` steps), from the
same seed, on the cache of a finished toy pipeline run in `--home` (`make demo` leaves one). Only the KD
settings differ. Each EMA student is then scored on a fixed held-out set: 512 cached samples the
students never train on (the last 512 of the cache; every variant trains on the rest), at 16 fixed
timesteps, each with its own fixed noise:

- `flow loss`: the flow-matching loss against the true velocity (noise - x0), what sampling needs;
- `to teacher`: the MSE to the teacher's velocity at the same x_t (0 = the teacher itself);
- `teacher`: the teacher's own flow loss on the same set, the bar a student can approach;
- `shuffled`: the student's flow loss when each sample gets another sample's caption: how much the
  student's prediction depends on the prompt (equal to `flow loss`: it ignores the prompt).

Losses are given overall and for t in [0, 1/3), [1/3, 2/3), [2/3, 1] (samplers start at t = 1).
The section `## KD objective probe (bench/kd_probe.py)` of --out is written (or replaced).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SECTION = "## KD objective probe (bench/kd_probe.py)"
HELD_OUT = 512
T_GRID = 16
# name -> (what it is, overrides of pretrain.train)
VARIANTS = {
    "task_only": ("task loss only", ["kd.combine=task_only"]),
    "scaled_sample": ("output + feature KD, timestep-aware scaling, ratio per sample", ["kd.combine=scaled",
                                                                                         "kd.ratio=sample"]),
    "scaled": ("output + feature KD, timestep-aware scaling, ratio per timestep", ["kd.combine=scaled",
                                                                                 "kd.ratio=timestep"]),
    "scaled_output": ("output KD only, timestep-aware scaling, ratio per timestep",
                      ["kd.combine=scaled", "kd.ratio=timestep", "kd.feature_kd=false"]),
    "scaled_sample_output": ("output KD only, timestep-aware scaling, ratio per sample",
                             ["kd.combine=scaled", "kd.ratio=sample", "kd.feature_kd=false"]),
    "weighted": ("output + feature KD, fixed weights 1, 1", ["kd.combine=weighted"]),
    "weighted_output": ("output KD only, fixed weight 1", ["kd.combine=weighted", "kd.feature_kd=false"]),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--home", default=str(ROOT / ".snapgen"), help="SNAPGEN_HOME of a finished toy pipeline run")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--variants", default="task_only,scaled_sample,scaled")
    p.add_argument("--set", dest="overrides", action="append", default=[], help="pretrain.train override (all runs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "bench" / "RESULTS.md"))
    p.add_argument("--json", dest="json_out", default="", help="also write the figures here")
    args = p.parse_args(argv)
    args.variant_list = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in args.variant_list if v not in VARIANTS]
    if unknown:
        p.error(f"--variants: unknown {unknown}; known: {sorted(VARIANTS)}")
    return args


def find_cache(home: Path) -> tuple[Path, dict]:
    """The newest complete cache (manifest.json written last) under the home's storage."""
    manifests = sorted((home / "storage").glob("**/cache/*/manifest.json"), key=lambda p: p.stat().st_mtime)
    if not manifests:
        raise SystemExit(f"no finished cache under {home / 'storage'}: run the toy pipeline first (make demo)")
    return manifests[-1].parent, json.loads(manifests[-1].read_text())


def split(data, held_out: int):
    """(train, held-out) CachedData: the last `held_out` samples are held out."""
    n = len(data)
    if n <= held_out * 2:
        raise SystemExit(f"the cache has {n} samples; the probe holds out {held_out}")
    import torch

    return data.select(torch.arange(n - held_out)), data.select(torch.arange(n - held_out, n))


def held_out_set(data, seed: int = 1234):
    """Fixed (x0, noise, t) rows: every sample at T_GRID timesteps (stratified, jittered), fixed noise."""
    import torch

    g = torch.Generator().manual_seed(seed)
    n = len(data)
    t = ((torch.arange(T_GRID)[None, :] + torch.rand(n, T_GRID, generator=g)) / T_GRID).clamp(1e-3, 1 - 1e-3)
    noise = torch.randn((n, T_GRID, *data.latent.shape[1:]), generator=g)
    return t, noise


def score(student, conditioner, teacher, cond_teacher_fn, data, t_all, noise_all, encoded_fn, batch: int = 64):
    """{"flow": [...], "to_teacher": [...], "teacher": [...], "t": [...]} per (sample, t) row."""
    import torch

    from snapgen_model.diffusion.flow import interpolate
    from snapgen_model.distill.text import Encoded

    out = {"flow": [], "to_teacher": [], "teacher": [], "shuffled": [], "t": []}
    student.eval()
    with torch.no_grad():
        for lo in range(0, len(data), batch):
            idx = torch.arange(lo, min(lo + batch, len(data)))
            b = data.select(idx)
            enc = encoded_fn(b)
            drop = torch.zeros(len(b), len(enc), dtype=torch.bool)
            cond = conditioner({e: Encoded(x.tokens, x.pooled, x.mask) for e, x in enc.items()}, drop)
            roll = torch.roll(torch.arange(len(b)), 1)  # every sample with its neighbour's caption
            cond_sh = conditioner({e: Encoded(x.tokens[roll], None if x.pooled is None else x.pooled[roll],
                                              x.mask[roll]) for e, x in enc.items()}, drop)
            tcond = cond_teacher_fn(enc)
            for k in range(T_GRID):
                t, noise = t_all[idx, k], noise_all[idx, k]
                x_t = interpolate(b.latent, noise, t)
                v = student(x_t, t, **cond)
                vt = teacher(x_t, t, tcond["context"], tcond["pooled"]).velocity
                target = noise - b.latent
                out["flow"].append((v - target).pow(2).flatten(1).mean(1))
                out["to_teacher"].append((v - vt).pow(2).flatten(1).mean(1))
                out["teacher"].append((vt - target).pow(2).flatten(1).mean(1))
                out["shuffled"].append((student(x_t, t, **cond_sh) - target).pow(2).flatten(1).mean(1))
                out["t"].append(t)
    return {k: torch.cat(v) for k, v in out.items()}


def summary(rows) -> dict:
    t = rows["t"]
    bins = {"all": t >= 0, "t<1/3": t < 1 / 3, "1/3..2/3": (t >= 1 / 3) & (t < 2 / 3), "t>=2/3": t >= 2 / 3}
    return {name: {k: float(rows[k][m].mean()) for k in ("flow", "to_teacher", "teacher", "shuffled")} for name, m in bins.items()}


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TQDM_DISABLE", "1")

    from flows.pipeline_config import build_config
    from snapgen_model.distill.cache import CacheConfig
    from snapgen_model.training.data import load_cache_folder
    from snapgen_model.training.pretrain import PretrainConfig, PretrainModule, fit, online_teacher
    from snapgen_model.presets import get_preset

    cache_dir, manifest = find_cache(Path(args.home))
    encoders = [e["name"] for e in manifest["encoders"]]
    from flows.pipeline_config import STUDENT_RECIPE

    pipe = build_config("toy", [])
    stage = pipe.pretrain
    data = load_cache_folder(str(cache_dir), encoders)
    train, held = split(data, HELD_OUT)
    cache_cfg = CacheConfig.from_dict(manifest["config"])
    from tasks.pretrain import teacher_folder

    results = {}
    for name in args.variant_list:
        what, extra = VARIANTS[name]
        # the student recipe from random weights (the toy demo now continues the shipped student instead)
        cfg = PretrainConfig().with_overrides([*STUDENT_RECIPE, f"steps={args.steps}", f"seed={args.seed}",
                                               "checkpoint_every=100000", *extra, *args.overrides])
        preset = get_preset(stage.preset)
        teacher = online_teacher(cfg, teacher_folder(cfg, manifest), manifest.get("feature_layers", [-1]))
        started = time.perf_counter()
        with tempfile.TemporaryDirectory() as state:
            result = fit(preset, cfg, train, cache_cfg, state, teacher=teacher)
        wall = time.perf_counter() - started
        module: PretrainModule = result["module"]
        scorer_teacher = teacher or online_teacher(cfg.with_overrides(["mode=online"]), teacher_folder(
            cfg.with_overrides(["mode=online"]), manifest), manifest.get("feature_layers", [-1]))
        t_all, noise_all = held_out_set(held)
        unet = getattr(module.ema_unet, "_orig_mod", module.ema_unet).float()
        rows = score(unet, module.ema_conditioner.float(), scorer_teacher, module.teacher_condition
                     if module.teacher is not None else _teacher_condition(scorer_teacher, cache_cfg),
                     held, t_all, noise_all, module._encoded)
        results[name] = {"what": what, "overrides": extra, "wall_s": round(wall, 1), "steps": result["step"],
                         "kd_levels": result.get("kd_levels"), "held_out": summary(rows)}
        s = results[name]["held_out"]["all"]
        print(f"{name}: {wall:.0f} s, flow {s['flow']:.4f}, to teacher {s['to_teacher']:.4f} "
              f"(teacher {s['teacher']:.4f})", flush=True)
    write(args, results, cache_dir, len(train))
    return 0


def _teacher_condition(teacher, cache_cfg):
    from snapgen_model.distill.cache import teacher_condition

    return lambda enc: teacher_condition(enc, cache_cfg, teacher.transformer.config.joint_attention_dim)


def write(args, results: dict, cache_dir: Path, n_train: int) -> None:
    import platform

    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    cpu = platform.processor() or platform.machine()
    lines = [SECTION, "",
             f"Measured {when} with `python bench/kd_probe.py --steps {args.steps} --variants {args.variants}"
             + "".join(f" --set {o}" for o in args.overrides) + f"` on {cpu} ({os.cpu_count()} logical CPUs); "
             f"the toy preset's student and pretraining settings, seed {args.seed}, online KD from the shipped "
             f"teacher, {n_train} training samples of the demo's cache; held out: {HELD_OUT} samples x {T_GRID} "
             "timesteps with fixed noise. EMA students. Lower is better.", "",
             "| variant | what | wall s | flow loss | t<1/3 | 1/3..2/3 | t>=2/3 | shuffled captions | to teacher "
             "| teacher's flow loss |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        h = r["held_out"]
        lines.append(f"| {name} | {r['what']} | {r['wall_s']:.0f} | {h['all']['flow']:.4f} | {h['t<1/3']['flow']:.4f} | "
                     f"{h['1/3..2/3']['flow']:.4f} | {h['t>=2/3']['flow']:.4f} | {h['all']['shuffled']:.4f} | "
                     f"{h['all']['to_teacher']:.4f} | "
                     f"{h['all']['teacher']:.4f} |")
    text = "\n".join(lines) + "\n"
    out = Path(args.out)
    old = out.read_text() if out.is_file() else ""
    if SECTION in old:
        head, _, rest = old.partition(SECTION)
        tail = rest[rest.find("\n## "):] if "\n## " in rest else ""
        old = head + text + tail.lstrip("\n") if not tail else head + text + "\n" + tail.lstrip("\n")
    else:
        old = old.rstrip("\n") + "\n\n" + text
    out.write_text(old)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(results, indent=1))



if __name__ == "__main__":
    raise SystemExit(main())
