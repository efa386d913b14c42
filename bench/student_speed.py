"""Toy student training step on CPU: each speed lever alone, and whether the adopted ones change what is learnt.

    python bench/student_speed.py [--preset toy] [--batch 32] [--steps 20] [--warmup 5]
                                  [--tolerance-steps 600] [--tolerance-mode both] [--only NAME] [--profile NAME]
                                  [--no-reference] [--skip-timing] [--skip-profile] [--skip-tolerance] [--out bench/RESULTS.md]

1. Step time. The product's pretraining entry point (`training.pretrain.fit`, Lightning, `kd.combine=scaled`:
   task + output KD + feature KD, the multi-level KD of the toy pipeline) on the preset's student, from an
   in-memory cache of the toy teacher's shapes (per sample: a 16 x 16 x 16 latent, 16 CLIP token states
   of width 128, pooled 128, mask; K=8 cached (t, v) pairs and the teacher's last-block image tokens,
   64 x 128, per pair; random values: speed does not depend on them). A callback stamps the end of
   every optimiser step; step time = the median of the step-to-step intervals after --warmup steps.
   Each variant runs in its own process (the allocator setting and thread count are process-wide).
   Variants: the setting of the 2026-11-26 measurement (fp32, 1 thread, batch 16), the fp32
   baseline at 2 threads, then the levers added one at a time (allocator, bf16 autocast, channels_last,
   fused AdamW, torch.compile), the adopted product setting with each lever taken out again, and
   the toy preset's online KD (the shipped teacher run each step, one student row per image) at
   batch 32 and 128, and with torch.compile (the student's and the teacher's forward). First of all, the code
   of the issue's reference figure (commit 3cba0e4, 2026-11-26) is timed by its own bench/train_throughput.py from
   an export of that commit (`git archive`; --no-reference skips it), so every speed-up has its reference from the same host at
   the same time.
2. Tolerance. `fit` itself for --tolerance-steps steps on a cache with learnable structure (targets
   are a fixed function of the latent, so the loss falls): fp32 seed 0, fp32 seed 1 (the run-to-run
   spread), then each adopted setting at seed 0: the product setting (allocator + bf16 autocast) and the
   product setting compiled. --tolerance-mode online does the same with the shipped teacher online (its
   outputs are the KD targets, the evidence run's setting), the compiled candidate compiling the teacher too. Each passes when its mean loss over the last quarter
   differs from fp32 seed 0 by no more than the two seeds differ, or by 2%, whichever is larger.

3. Profile. torch.profiler over 3 steps of the variants named by --profile: per-operator self CPU time.

Each part writes (or replaces) its own section of --out, so a run that skips a part leaves that part's figures:
`## Student step on CPU (bench/student_speed.py)` (timings), `...: profile (...)`, `...: tolerance (...)` and
`...: tolerance with the teacher online (...)`.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SECTION = "## Student step on CPU (bench/student_speed.py)"
PROFILE_SECTION = "## Student step on CPU: profile (bench/student_speed.py)"
TOLERANCE_SECTION = "## Student step on CPU: tolerance (bench/student_speed.py)"
TOLERANCE_ONLINE_SECTION = "## Student step on CPU: tolerance with the teacher online (bench/student_speed.py)"
# name -> settings: threads, batch, allocator, precision, channels_last, fused AdamW, compile
BEFORE = {"threads": 1, "batch": 16, "allocator": False, "precision": "32-true", "channels_last": False,
          "fused": False, "compile": False, "mode": "cached"}
BASE = BEFORE | {"threads": 2, "batch": 0}  # batch 0 = --batch
PRODUCT = BASE | {"allocator": True, "precision": "bf16-mixed"}
VARIANTS = {
    "fp32, 1 thread, batch 16 (the 2026-11-26 setting)": BEFORE,
    "fp32, 2 threads (baseline)": BASE,
    "+ allocator": BASE | {"allocator": True},
    "+ allocator + bf16 autocast (product)": PRODUCT,
    "product + channels_last": PRODUCT | {"channels_last": True},
    "allocator + fused AdamW, fp32": BASE | {"allocator": True, "fused": True},  # Lightning: no fused with bf16 + clip
    "product + torch.compile": PRODUCT | {"compile": True},
    "product without the allocator": PRODUCT | {"allocator": False},
    "allocator + channels_last, fp32": BASE | {"allocator": True, "channels_last": True},
    # online KD (the toy preset since 2026-12-06): the shipped teacher runs each step on the task term's own
    # (t, noise), so one student forward serves the task and both KD terms (cached: two rows per image)
    "product, online teacher": PRODUCT | {"mode": "online"},
    "product, online teacher, batch 128": PRODUCT | {"mode": "online", "batch": 128},
    "product, online teacher + torch.compile (the evidence run's)": PRODUCT | {"mode": "online", "compile": True},
    "product, online teacher, batch 128 + torch.compile": PRODUCT | {"mode": "online", "batch": 128, "compile": True},
    "product, online teacher, batch 256 + torch.compile": PRODUCT | {"mode": "online", "batch": 256, "compile": True},
}
# the code the reference figure was measured with (2026-11-26: 58 images/s, fp32, 1 thread, batch 16), run
# again here from an export of that commit (`git archive`) by its own bench (bench/train_throughput.py), so every speed-up is
# against the same code on the same host at the same time (this shared VM's speed moves by up to 1.7x between days)
REFERENCE_COMMIT = "3cba0e4dbe83fd0a21d469bda5252c21c4366711"
REFERENCE = f"the 2026-11-26 code ({REFERENCE_COMMIT[:7]}), fp32, 1 thread, batch 16"
TEACHER = ROOT / "releases" / "toy-teacher" / "v2"  # the online variants' teacher (its transformer)

LATENT, TOKENS, WIDTH, POOLED, K, FEAT_TOKENS, FEAT_DIM = 16, 16, 128, 128, 8, 64, 128


def make_cache(samples: int, learnable: bool = False, seed: int = 0):
    """An in-memory `CachedData` of the toy teacher's shapes. `learnable`: the velocity targets and
    features are fixed functions of the latent and caption, so a student can fit them."""
    import torch

    from snapgen_model.training.data import CachedData

    g = torch.Generator().manual_seed(seed)
    latent = torch.randn(samples, 16, LATENT, LATENT, generator=g)
    tokens = torch.randn(samples, TOKENS, WIDTH, generator=g)
    pooled = tokens.mean(1) if learnable else torch.randn(samples, POOLED, generator=g)
    t = torch.rand(samples, K, generator=g) * 0.9 + 0.05
    if learnable:  # the teacher's velocity: noise - x0 for a fixed per-(sample, pair) noise, as flow matching
        noise = torch.randn(samples, K, 16, LATENT, LATENT, generator=g)
        v = noise - latent[:, None]
        patches = latent.reshape(samples, 16, 8, 2, 8, 2).permute(0, 2, 4, 1, 3, 5).reshape(samples, FEAT_TOKENS, 64)
        weight = torch.randn(64, FEAT_DIM, generator=g) / 8
        feats = (patches @ weight)[:, None].expand(samples, K, FEAT_TOKENS, FEAT_DIM)
    else:
        v = torch.randn(samples, K, 16, LATENT, LATENT, generator=g)
        feats = torch.randn(samples, K, FEAT_TOKENS, FEAT_DIM, generator=g)
    return CachedData(keys=[f"k{i:06d}" for i in range(samples)], latent=latent, tokens={"clip": tokens},
                      pooled={"clip": pooled}, mask={"clip": torch.ones(samples, TOKENS)}, t=t, v=v,
                      features={"block5": feats.contiguous()})


def _clock():
    import lightning.pytorch as pl

    class Clock(pl.Callback):
        def __init__(self) -> None:
            self.stamps: list[float] = []
            self.losses: list[float] = []

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
            self.stamps.append(time.perf_counter())
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs
            self.losses.append(float(loss))

    return Clock()


def _quiet() -> None:
    import logging
    import warnings

    import lightning.pytorch  # noqa: F401 - configures its loggers on import: quiet them after that

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("lightning.fabric").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")


def run_fit(preset_name: str, settings: dict, steps: int, batch: int, data, seed: int = 0,
            extra_callbacks: list | None = None) -> list:
    """`fit` under one variant's settings; the Clock callback (stamps and losses per step)."""
    import torch

    from snapgen_model.distill.cache import CacheConfig
    from snapgen_model.presets import get_preset
    from snapgen_model.training import cpu
    from snapgen_model.training.pretrain import PretrainConfig, fit, online_teacher

    if not settings["allocator"]:
        cpu._tuned = False  # the bench's "off" switch: tune_allocator() then reports False and changes nothing
    torch.set_num_threads(settings["threads"])
    _quiet()
    cfg = PretrainConfig.from_dict({
        "steps": steps, "batch_size": batch, "checkpoint_every": 0, "log_every": 10_000, "accelerator": "cpu",
        "precision": settings["precision"], "channels_last": settings["channels_last"],
        "compile": settings["compile"], "fused_optimizer": settings["fused"], "seed": seed, "warmup_steps": min(50, steps // 10),
        "kd": {"combine": "scaled", "feature_kd": True}})
    cfg = cfg.with_overrides([f"mode={settings.get('mode', 'cached')}"])
    teacher = online_teacher(cfg, TEACHER) if cfg.mode == "online" else None
    clock = _clock()
    with tempfile.TemporaryDirectory(prefix="student-speed-") as root:
        fit(get_preset(preset_name), cfg, data, CacheConfig(targets_per_sample=K, store_features=True), root,
            teacher=teacher, callbacks=[clock, *(extra_callbacks or [])])
    return clock


def time_variant(args: argparse.Namespace, settings: dict) -> dict:
    batch = settings["batch"] or args.batch
    clock = run_fit(args.preset, settings, args.warmup + args.steps, batch, make_cache(512))
    stamps = clock.stamps
    intervals = sorted(b - a for a, b in zip(stamps[args.warmup - 1:], stamps[args.warmup:]))
    median = intervals[len(intervals) // 2]
    return {"median_s": median, "images_per_s": batch / median, "batch": batch, "threads": settings["threads"],
            "spread": (intervals[-1] - intervals[0]) / median, "timed": len(intervals)}


TOLERANCE_CANDIDATES = {"product seed 0": PRODUCT, "product + torch.compile seed 0": PRODUCT | {"compile": True}}
ONLINE = {"mode": "online"}
TOLERANCE_MODES = {  # mode -> (reference settings, candidates)
    "cached": (BASE, TOLERANCE_CANDIDATES),
    "online": (BASE | ONLINE, {"product seed 0": PRODUCT | ONLINE,
                               "product + torch.compile (student and teacher) seed 0": PRODUCT | ONLINE | {"compile": True}}),
}


def tolerance(args: argparse.Namespace, mode: str = "cached") -> dict:
    """fp32 seeds 0 and 1 (the run-to-run spread), then each adopted setting at seed 0: a candidate passes when
    its tail loss differs from fp32 seed 0 by no more than the two fp32 seeds differ, or 2%, whichever is larger.
    `mode`: cached KD targets, or the shipped teacher online (its outputs are the KD targets; the fp32 runs run it
    in fp32, the candidates in their own precision, compiled with the student where they compile)."""
    reference, candidates = TOLERANCE_MODES[mode]
    data = make_cache(2048, learnable=True)
    runs = {}
    plan = [("fp32 seed 0", reference, 0), ("fp32 seed 1", reference, 1)] + [(n, s, 0) for n, s in candidates.items()]
    for name, settings, seed in plan:
        started = time.perf_counter()
        clock = run_fit(args.preset, settings, args.tolerance_steps, args.batch, data, seed=seed)
        tail = clock.losses[len(clock.losses) * 3 // 4:]
        runs[name] = {"tail_loss": sum(tail) / len(tail), "first_loss": clock.losses[0],
                      "seconds": time.perf_counter() - started}
    ref = runs["fp32 seed 0"]["tail_loss"]
    seed_gap = abs(runs["fp32 seed 1"]["tail_loss"] - ref) / ref
    allowed = max(seed_gap, 0.02)
    gaps = {n: abs(runs[n]["tail_loss"] - ref) / ref for n in candidates}
    return {"runs": runs, "seed_gap": seed_gap, "gaps": gaps, "allowed": allowed,
            "passed": {n: g <= allowed for n, g in gaps.items()}, "steps": args.tolerance_steps, "batch": args.batch}


PROFILE_PREFIX = "profile::"
PROFILE_STEPS = 3
PROFILE_DEFAULT = ("fp32, 2 threads (baseline)", "product, online teacher, batch 128")


def profile_variant(args: argparse.Namespace, settings: dict) -> dict:
    """torch.profiler over PROFILE_STEPS optimiser steps after --warmup: per-operator self CPU time per step."""
    import lightning.pytorch as pl
    import torch
    from torch.profiler import ProfilerActivity, profile, schedule

    batch = settings["batch"] or args.batch
    prof = profile(activities=[ProfilerActivity.CPU], schedule=schedule(wait=max(0, args.warmup - 1), warmup=1,
                                                                        active=PROFILE_STEPS, repeat=1))

    class Step(pl.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
            prof.step()

    with prof:
        run_fit(args.preset, settings, args.warmup + PROFILE_STEPS + 1, batch, make_cache(512), extra_callbacks=[Step()])
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total_us = sum(e.self_cpu_time_total for e in events)
    ops = sorted(({"op": e.key, "calls_per_step": e.count / PROFILE_STEPS,
                   "self_ms_per_step": e.self_cpu_time_total / 1000 / PROFILE_STEPS,
                   "share": e.self_cpu_time_total / total_us} for e in events), key=lambda r: -r["self_ms_per_step"])
    # operators called by the model code (an aten op not inside another aten op), and the copies among all ops:
    # one dtype cast is aten::to -> aten::_to_copy -> aten::copy_, so only the innermost copy_ is counted
    raw = prof.events()
    calls = sum(1 for e in raw if e.name.startswith("aten::")
                and not (e.cpu_parent is not None and e.cpu_parent.name.startswith("aten::"))) / PROFILE_STEPS
    copies = sum(1 for e in raw if e.name == "aten::copy_") / PROFILE_STEPS
    return {"batch": batch, "threads": settings["threads"], "self_ms_per_step": total_us / 1000 / PROFILE_STEPS,
            "aten_calls_per_step": calls, "copy_calls_per_step": copies, "top": ops[:15], "torch": torch.__version__}


def time_reference(args: argparse.Namespace) -> dict:
    """The pretraining step of commit REFERENCE_COMMIT (the code of the 2026-11-26 figure) timed by that commit's own
    bench/train_throughput.py (toy preset, cache in memory, fp32, 1 thread, batch 16), from an export of the commit
    into a temporary folder (`git archive`: nothing is added to the repository's metadata, so an interrupted run
    leaves nothing behind but the temporary folder)."""
    with tempfile.TemporaryDirectory(prefix="student-speed-ref-") as tmp:
        tree, out = Path(tmp) / "tree", Path(tmp) / "out.md"
        tree.mkdir()
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", REFERENCE_COMMIT],
                                 capture_output=True, check=False)
        if archive.returncode:
            raise SystemExit(f"cannot export commit {REFERENCE_COMMIT[:7]} (the code of the 2026-11-26 figure): "
                             f"{archive.stderr.decode(errors='replace').strip()[-500:]}; a shallow clone lacks it: "
                             "pass --no-reference")
        subprocess.run(["tar", "-x", "-C", str(tree)], input=archive.stdout, check=True)
        cmd = [sys.executable, str(tree / "bench" / "train_throughput.py"), "--presets", args.preset, "--stages",
               "pretrain", "--data", "memory", "--batch", "16", "--steps", str(args.steps), "--warmup",
               str(args.warmup), "--repeats", "1", "--out", str(out)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=tree,
                              env=dict(os.environ, OMP_NUM_THREADS="1"))
        text = out.read_text() if out.is_file() else ""
        rows = [[c.strip() for c in ln.strip().strip("|").split("|")] for ln in text.splitlines()]
        row = next((r for r in rows if r[:3] == [args.preset, "pretrain", "memory"]), None)
        if proc.returncode or row is None:
            raise SystemExit(f"the {REFERENCE_COMMIT[:7]} bench failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        warning = next((ln.strip() for ln in text.splitlines() if ln.startswith("**Warning:**")), None)
    median = float(row[4].replace(",", "")) / 1000
    return {"median_s": median, "images_per_s": 16 / median, "batch": 16, "threads": 1, "spread": float(row[6]),
            "timed": args.steps, "warning": warning}


def child(args: argparse.Namespace) -> None:
    if args.child.startswith(PROFILE_PREFIX):
        out = profile_variant(args, VARIANTS[args.child[len(PROFILE_PREFIX):]])
    elif args.child.startswith("tolerance:"):
        out = tolerance(args, args.child.removeprefix("tolerance:"))
    else:
        out = time_variant(args, VARIANTS[args.child])
    print("RESULT " + json.dumps(out))


def run_child(args: argparse.Namespace, name: str) -> dict:
    cmd = [sys.executable, __file__, "--child", name, "--preset", args.preset, "--batch", str(args.batch),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--tolerance-steps", str(args.tolerance_steps)]
    env = dict(os.environ, OMP_NUM_THREADS=str(VARIANTS.get(name.removeprefix(PROFILE_PREFIX), BASE)["threads"]))
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise SystemExit(f"variant {name!r} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="toy")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--tolerance-steps", type=int, default=600)
    parser.add_argument("--skip-tolerance", action="store_true")
    parser.add_argument("--tolerance-mode", choices=["cached", "online", "both"], default="both",
                        help="which tolerance check(s): cached KD targets, the teacher online, or both (own sections)")
    parser.add_argument("--no-reference", action="store_true",
                        help=f"do not time {REFERENCE_COMMIT}, the code of the 2026-11-26 figure (needs git history)")
    parser.add_argument("--only", action="append", default=[], help="time only these variants (repeatable)")
    parser.add_argument("--profile", action="append", default=[],
                        help=f"profile these variants with torch.profiler (repeatable; default: {', '.join(PROFILE_DEFAULT)})")
    parser.add_argument("--skip-profile", action="store_true")
    parser.add_argument("--skip-timing", action="store_true", help="no step timing (profile and/or tolerance only)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "RESULTS.md")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    unknown = [n for n in args.only + args.profile if n not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant {unknown[0]!r}; variants: " + "; ".join(VARIANTS))

    import torch

    from bench.common import command_line, environment_line, markdown_table, now_utc, replace_section

    stamp = f"{now_utc()}; {environment_line(torch.device('cpu'))}; `{command_line()}`"
    if not args.skip_timing:
        lines = [stamp, ""]
        timings = {}
        if not args.no_reference:
            timings[REFERENCE] = t = time_reference(args)
            print(f"{REFERENCE:52s} {t['median_s'] * 1000:7.1f} ms/step  {t['images_per_s']:6.0f} img/s (batch {t['batch']})",
                  flush=True)
        for name in args.only or VARIANTS:
            timings[name] = t = run_child(args, name)
            print(f"{name:52s} {t['median_s'] * 1000:7.1f} ms/step  {t['images_per_s']:6.0f} img/s (batch {t['batch']})",
                  flush=True)
        base = timings["fp32, 2 threads (baseline)"]["images_per_s"] if "fp32, 2 threads (baseline)" in timings else None
        ref = timings[REFERENCE]["images_per_s"] if REFERENCE in timings else None
        rows = [[name, str(t["threads"]), str(t["batch"]), f"{t['median_s'] * 1000:.1f}", f"{t['images_per_s']:.0f}",
                 f"{t['images_per_s'] / base:.2f}x" if base else "-", *([f"{t['images_per_s'] / ref:.2f}x"] if ref else []),
                 f"{t['spread']:.2f}"] for name, t in timings.items()]
        lines += [f"Preset `{args.preset}`: one pretraining step through `training.pretrain.fit` (Lightning; task + output "
                  f"KD + feature KD, timestep-aware scaling; AdamW, gradient clip, EMA of UNet + conditioner), median of "
                  f"{args.steps} step intervals after {args.warmup} untimed steps; each variant in its own process; "
                  "speed-up against the fp32 2-thread baseline. Cached variants: each image is two UNet rows (the cached "
                  "KD pair and a fresh task pair in one batched forward, since issue 14), so rows/s is twice images/s. "
                  f"Online variants: the shipped teacher ({TEACHER.relative_to(ROOT)}) runs on each step's own (t, noise), "
                  "and one UNet row per image serves the task and both KD terms (the toy preset's setting); with "
                  "torch.compile the teacher's forward is compiled too (since 2026-12-08). "
                  + (f"The first row is the code of the issue's reference figure (commit {REFERENCE_COMMIT[:7]}, 2026-11-26: task + "
                     "output KD from one cached pair, one UNet row per image, no feature KD) timed by its own "
                     "`bench/train_throughput.py` from an export of that commit, here and now: the column \"vs 2026-11-26 "
                     "code\" is the speed-up against it (the issue's target: 3x)."
                     + (f" Its bench warned: {timings[REFERENCE]['warning']}" if timings[REFERENCE].get("warning") else "")
                     if ref else ""), "",
                  markdown_table(["variant", "threads", "batch", "ms/step", "images/s", "speed-up",
                                  *(["vs 2026-11-26 code"] if ref else []), "spread"], rows), ""]
        replace_section(args.out, SECTION, "\n".join(lines))
    if not args.skip_profile:
        lines = [stamp, "", "torch.profiler records every operator's CPU time, which adds its own cost per operator: "
                 "the self CPU time per step below is above the unprofiled step time, and the shares favour the many "
                 "small operators. Operator calls count what the model code dispatches (an aten op not inside "
                 "another); copies count `aten::copy_` (one per dtype cast or copy).", ""]
        for name in args.profile or PROFILE_DEFAULT:
            prof = run_child(args, PROFILE_PREFIX + name)
            print(f"profile {name}: {prof['self_ms_per_step']:.0f} ms self CPU per step, "
                  f"{prof['aten_calls_per_step']:.0f} aten calls per step", flush=True)
            lines += [f"Profile of `{name}` ({PROFILE_STEPS} steps after {args.warmup}, batch {prof['batch']}): "
                      f"{prof['self_ms_per_step']:.0f} ms of self CPU time per step, {prof['aten_calls_per_step']:.0f} "
                      f"operator calls from the model code and {prof['copy_calls_per_step']:.0f} copies per step. "
                      "The operators with the most self time:", "",
                      markdown_table(["operator", "calls per step", "self ms per step", "share"],
                                     [[f"`{r['op']}`", f"{r['calls_per_step']:.0f}", f"{r['self_ms_per_step']:.1f}",
                                       f"{r['share']:.1%}"] for r in prof["top"]]), ""]
        replace_section(args.out, PROFILE_SECTION, "\n".join(lines))
    for mode in [] if args.skip_tolerance else ["cached", "online"] if args.tolerance_mode == "both" else [args.tolerance_mode]:
        tol = run_child(args, f"tolerance:{mode}")
        for name, gap in tol["gaps"].items():
            print(f"tolerance ({mode}): {name} gap {gap:.2%}, seed gap {tol['seed_gap']:.2%}, allowed {tol['allowed']:.2%}: "
                  f"{'pass' if tol['passed'][name] else 'FAIL'}")
        what = ("on a learnable cache" if mode == "cached" else
                f"with the shipped teacher ({TEACHER.relative_to(ROOT)}) online on a learnable cache's latents and captions")
        lines = [stamp, "", f"Tolerance (`fit`, {tol['steps']} steps at batch {tol['batch']} {what}, mean loss of "
                  "the last quarter):", "",
                  markdown_table(["run", "first loss", "tail loss", "seconds"],
                                 [[n, f"{r['first_loss']:.4f}", f"{r['tail_loss']:.4f}", f"{r['seconds']:.0f}"]
                                  for n, r in tol["runs"].items()]), ""]
        lines += [f"{name} differs from fp32 seed 0 by {gap:.3%}; two fp32 seeds differ by {tol['seed_gap']:.3%}; "
                  f"allowed {tol['allowed']:.2%}: **{'within tolerance' if tol['passed'][name] else 'OUTSIDE tolerance'}**."
                  for name, gap in tol["gaps"].items()] + [""]
        replace_section(args.out, TOLERANCE_SECTION if mode == "cached" else TOLERANCE_ONLINE_SECTION, "\n".join(lines))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
