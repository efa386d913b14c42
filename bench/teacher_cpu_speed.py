"""Toy teacher training step on CPU: each speed lever alone, and whether bf16 changes what is learnt.

    python bench/teacher_cpu_speed.py [--preset toy-release] [--batch 256] [--steps 6] [--warmup 3]
                                      [--tolerance-steps 400] [--tolerance-batch 64] [--skip-tolerance]
                                      [--out bench/RESULTS.md]

1. Step time. One optimiser step of the bootstrap's teacher loop (`bootstrap._TeacherStep`: text
   encoder + SD3 transformer forward, flow-matching loss, backward, gradient clip, AdamW) on the
   preset's models at --batch, random latents and captions (speed does not depend on values). Each
   variant runs in its own process, because the allocator setting is process-wide and cannot be
   undone: the median of --steps timed steps after --warmup untimed ones. Variants, cumulative
   from the fp32 baseline, then each lever alone on top of the product setting minus it:
     fp32 -> + allocator (training.cpu.tune_allocator) -> + bf16 autocast (PyTorch's fused
     attention) -> + explicit attention (nn.attention.use_fast_attention; CLIP eager): the product
     path of `mixed_precision="bf16"` on CPU -> + torch.compile of the transformer (not adopted).
2. Tolerance. `bootstrap.train_teacher` itself, --tolerance-steps steps at --tolerance-batch on a
   pool of 8,192 scenes and one AE, three runs: fp32 seed 0, fp32 seed 1 (the run-to-run spread of
   the loss) and bf16 seed 0. bf16 passes when its mean loss over the last quarter of the run differs
   from fp32 seed 0 by no more than the two fp32 seeds differ from each other, or by 2%, whichever is
   larger.

The section `## Teacher step on CPU (bench/teacher_cpu_speed.py)` of --out is written (or replaced).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SECTION = "## Teacher step on CPU (bench/teacher_cpu_speed.py)"
VARIANTS = {  # name -> (allocator, bf16, explicit attention, compile)
    "fp32 (before)": (False, False, False, False),
    "+ allocator": (True, False, False, False),
    "+ allocator + bf16 (fused attention)": (True, True, False, False),
    "+ allocator + bf16 + explicit attention (product)": (True, True, True, False),
    "bf16 + explicit attention, no allocator": (False, True, True, False),
    "allocator + explicit attention, fp32": (True, False, True, False),
    "product + torch.compile (not adopted)": (True, True, True, True),
}


def time_variant(preset: str, batch: int, steps: int, warmup: int, flags: tuple[bool, ...]) -> dict:
    """Run in a child process: the median step time of one variant."""
    allocator, bf16, explicit, compiled = flags
    import torch

    from snapgen_model.nn.attention import use_fast_attention
    from snapgen_model.training import bootstrap as bs
    from snapgen_model.training.cpu import tune_allocator

    if allocator:
        tune_allocator()
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    cfg = bs.get_bootstrap_config(preset, [f"teacher_batch={batch}", f"mixed_precision={'bf16' if bf16 else 'no'}"])
    tokenizer, text = bs.build_text_encoder(cfg, [f"word{i}" for i in range(40)])
    transformer = bs.build_teacher(cfg).train()
    with torch.no_grad():  # adaLN-Zero starts the blocks at the identity; time a trained-like network
        for p in transformer.parameters():
            if p.dim() == 2 and not p.any():
                p.normal_(0, 0.02)
    if explicit:
        use_fast_attention(transformer)
        text.set_attn_implementation("eager")
    text.train()
    params = list(transformer.parameters()) + list(text.parameters())
    opt = torch.optim.AdamW(params, lr=1e-4)
    step = bs._TeacherStep(cfg, transformer, text, "cpu")
    if compiled:
        step.transformer = torch.compile(transformer)
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(batch, cfg.ae_latent_channels, cfg.latent_size, cfg.latent_size)
    ids = torch.randint(0, len(tokenizer), (batch, cfg.text_max_length))
    mask = torch.ones_like(ids)

    def one() -> float:
        start = time.perf_counter()
        loss = step(x0, ids, mask, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        return time.perf_counter() - start

    first = time.perf_counter()
    for _ in range(warmup):
        one()
    warm_s = time.perf_counter() - first
    times = sorted(one() for _ in range(steps))
    median = times[len(times) // 2]
    return {"median_s": median, "images_per_s": batch / median, "warmup_s": warm_s,
            "spread": (times[-1] - times[0]) / median}


def tolerance(preset: str, steps: int, batch: int) -> dict:
    """fp32 (two seeds) against bf16 through `train_teacher`, same pool, same AE."""
    import torch

    from snapgen_model.training import bootstrap as bs

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    base = [f"teacher_steps={steps}", f"teacher_batch={batch}", "pool_size=8192", "teacher_time_budget_s=0",
            "ae_steps=300", "ae_time_budget_s=0", "log_every=25", "checkpoint_every=0", "teacher_warmup_steps=50"]
    cfg0 = bs.get_bootstrap_config(preset, base)
    vae, _ = bs.train_autoencoder(cfg0)
    pool = bs.render_pool(cfg0)
    runs = {}
    for name, extra in (("fp32 seed 0", ["mixed_precision=no", "seed=0"]), ("fp32 seed 1", ["mixed_precision=no", "seed=1"]),
                        ("bf16 seed 0", ["mixed_precision=bf16", "seed=0"])):
        cfg = bs.get_bootstrap_config(preset, base + extra)
        started = time.perf_counter()
        _, result = bs.train_teacher(cfg, None, vae, pool=pool)
        tail = [p["loss"] for p in result.curve if p["step"] > steps * 3 // 4]
        runs[name] = {"tail_loss": sum(tail) / len(tail), "seconds": time.perf_counter() - started,
                      "curve": [(p["step"], round(p["loss"], 5)) for p in result.curve]}
    ref = runs["fp32 seed 0"]["tail_loss"]
    seed_gap = abs(runs["fp32 seed 1"]["tail_loss"] - ref) / ref
    bf16_gap = abs(runs["bf16 seed 0"]["tail_loss"] - ref) / ref
    allowed = max(seed_gap, 0.02)
    return {"runs": runs, "seed_gap": seed_gap, "bf16_gap": bf16_gap, "allowed": allowed, "passed": bf16_gap <= allowed,
            "steps": steps, "batch": batch}


def child(args: argparse.Namespace) -> None:
    if args.child == "tolerance":
        out = tolerance(args.preset, args.tolerance_steps, args.tolerance_batch)
    else:
        out = time_variant(args.preset, args.batch, args.steps, args.warmup, VARIANTS[args.child])
    print("RESULT " + json.dumps(out))


def run_child(args: argparse.Namespace, name: str) -> dict:
    cmd = [sys.executable, __file__, "--child", name, "--preset", args.preset, "--batch", str(args.batch),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--tolerance-steps", str(args.tolerance_steps),
           "--tolerance-batch", str(args.tolerance_batch)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise SystemExit(f"variant {name!r} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="toy-release")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--tolerance-steps", type=int, default=400)
    parser.add_argument("--tolerance-batch", type=int, default=64)
    parser.add_argument("--skip-tolerance", action="store_true")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "RESULTS.md")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)

    from bench.common import command_line, environment_line, markdown_table, now_utc, replace_section
    import torch

    timings = {}
    for name in VARIANTS:
        timings[name] = run_child(args, name)
        t = timings[name]
        print(f"{name:55s} {t['median_s']:.3f} s/step  {t['images_per_s']:6.0f} img/s  (warm-up {t['warmup_s']:.0f} s)",
              flush=True)
    base = timings["fp32 (before)"]["median_s"]
    rows = [[name, f"{t['median_s']:.3f}", f"{t['images_per_s']:.0f}", f"{base / t['median_s']:.2f}x",
             f"{t['spread']:.2f}", f"{t['warmup_s']:.0f}"] for name, t in timings.items()]
    lines = [f"{now_utc()}; {environment_line(torch.device('cpu'))}; `{command_line()}`", "",
             f"Preset `{args.preset}`, batch {args.batch}: one teacher optimiser step (text encoder + SD3 transformer, "
             f"flow-matching loss, backward, clip, AdamW), median of {args.steps} steps after {args.warmup} untimed; "
             "each variant in its own process.", "",
             markdown_table(["variant", "s/step", "images/s", "speed-up", "spread", "warm-up s"], rows), ""]
    if not args.skip_tolerance:
        tol = run_child(args, "tolerance")
        print(f"tolerance: bf16 gap {tol['bf16_gap']:.2%}, seed gap {tol['seed_gap']:.2%}, allowed {tol['allowed']:.2%}: "
              f"{'pass' if tol['passed'] else 'FAIL'}")
        lines += [f"Tolerance (`train_teacher`, {tol['steps']} steps at batch {tol['batch']}, mean loss of the last quarter):", "",
                  markdown_table(["run", "tail loss", "seconds"],
                                 [[n, f"{r['tail_loss']:.4f}", f"{r['seconds']:.0f}"] for n, r in tol["runs"].items()]), "",
                  f"bf16 differs from fp32 by {tol['bf16_gap']:.2%}; two fp32 seeds differ by {tol['seed_gap']:.2%}; "
                  f"allowed {tol['allowed']:.2%}: **{'within tolerance' if tol['passed'] else 'OUTSIDE tolerance'}**.", ""]
    replace_section(args.out, SECTION, "\n".join(lines))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
