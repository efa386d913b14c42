"""Does sampling alone lift the shipped toy teacher? Euler steps x guidance x timestep shift, scored.

    python bench/teacher_sampling.py                                  # releases/toy-teacher/v2, the default grid
    python bench/teacher_sampling.py --grid 24:5:1,48:5:1 --images 4  # steps:guidance:shift points

Each point samples every evaluation prompt of the bundle's world (seen and held-out) x --images images with
the release's own seeds (`evaluate_bundle`: seed = eval_seed + 1000 * prompt + image, so one point's images
differ from another's only by the sampling settings) and scores them with the exact scene parser and
GenEval's rules. The reference rows are left out: they do not depend on sampling. The shift is SD3's
timestep shift of the Euler grid (1 = the release's uniform grid; > 1 spends more steps at high noise).

Weights are not touched: this asks whether the teacher's shortfall against issue 14's targets (0.6
overall) is a sampling choice or the weights.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import checkout_relative, command_line, device_name, now_utc, replace_section  # noqa: E402

SECTION = "## Toy teacher sampling sweep: steps, guidance and timestep shift (bench/teacher_sampling.py)"
DEFAULT_GRID = "24:5:1,48:5:1,24:7:1,48:7:1,24:5:3,24:5:0.5"
TASKS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")


def parse_grid(text: str) -> list[tuple[int, float, float]]:
    """'steps:guidance:shift,...' -> [(steps, guidance, shift)], each checked."""
    points = []
    for item in (s.strip() for s in text.split(",")):
        if not item:
            continue
        parts = item.split(":")
        try:
            if len(parts) != 3:
                raise ValueError(item)
            steps, guidance, shift = int(parts[0]), float(parts[1]), float(parts[2])
        except ValueError:
            raise SystemExit(f"--grid: {item!r} is not steps:guidance:shift (e.g. 24:5:1)") from None
        if not (math.isfinite(guidance) and math.isfinite(shift)) or steps < 1 or guidance < 1 or shift <= 0:
            raise SystemExit(f"--grid: {item!r}: steps >= 1, guidance >= 1 and shift > 0 are required")
        points.append((steps, guidance, shift))
    if not points:
        raise SystemExit("--grid: no points")
    return points


@contextlib.contextmanager
def euler_shift(shift: float) -> Iterator[None]:
    """The teacher sampler's Euler grid with SD3's timestep shift (the library samples the release at shift 1)."""
    import snapgen_model.artifacts.teacher_bundle as tb
    from snapgen_model.diffusion.samplers import make_timesteps

    previous = tb.make_timesteps
    tb.make_timesteps = lambda steps, _shift=1.0, device="cpu": make_timesteps(steps, shift, device)  # type: ignore[assignment]
    try:
        yield
    finally:
        tb.make_timesteps = previous  # type: ignore[assignment]


def score_point(bundle: Any, steps: int, guidance: float, shift: float, images: int) -> dict[str, Any]:
    from snapgen_model.artifacts.teacher_bundle import evaluate_bundle
    from snapgen_model.training.release_card import headline, with_eval

    started = time.monotonic()
    with euler_shift(shift):
        evaluation = evaluate_bundle(with_eval(bundle, eval_steps=steps, eval_guidance=guidance,
                                               eval_images_per_prompt=images), reference=False)
    h = headline(evaluation)
    splits = {k: (v["overall"] if isinstance(v, dict) else v) for k, v in h["splits"].items()}
    return {"steps": steps, "guidance": guidance, "shift": shift, "overall": h["overall"],
            "exact_count": h["exact_count"], "splits": splits, "tasks": dict(h["tasks"]),
            "images": h["images"], "seconds": round(time.monotonic() - started, 1)}


def table(rows: list[dict[str, Any]]) -> str:
    head = "| Euler steps | guidance | shift | toy-GenEval | exact count | seen | held-out | " + " | ".join(TASKS) + " |"
    lines = [head, "|" + "---|" * (7 + len(TASKS))]
    for r in rows:
        cells = [str(r["steps"]), f"{r['guidance']:g}", f"{r['shift']:g}", f"{r['overall']:.3f}",
                 f"{r['exact_count']:.3f}", f"{r['splits'].get('seen', float('nan')):.3f}",
                 f"{r['splits'].get('heldout', float('nan')):.3f}"] + [f"{r['tasks'].get(t, 0.0):.3f}" for t in TASKS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", default=str(ROOT / "releases" / "toy-teacher" / "v2"), help="teacher bundle folder")
    p.add_argument("--grid", default=DEFAULT_GRID, help="comma-separated steps:guidance:shift points")
    p.add_argument("--images", type=int, default=2, help="images per prompt")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--json", dest="json_out", default=str(ROOT / "bench" / "evidence" / "teacher_sampling.json"),
                   help="figures as JSON ('' = none)")
    p.add_argument("--out", default=str(ROOT / "bench" / "RESULTS.md"), help="results file (section replaced; '' = none)")
    args = p.parse_args(argv)
    points = parse_grid(args.grid)
    if args.images < 1:
        raise SystemExit(f"--images {args.images}: must be >= 1")
    if not (Path(args.bundle) / "bundle.json").is_file():
        raise SystemExit(f"--bundle {args.bundle}: no bundle.json there (a toy teacher bundle folder is needed)")
    if args.threads:
        torch.set_num_threads(args.threads)
    from snapgen_model.artifacts.teacher_bundle import load_bundle

    started = time.monotonic()
    bundle = load_bundle(args.bundle)
    rows = []
    for k, (steps, guidance, shift) in enumerate(points, 1):
        row = score_point(bundle, steps, guidance, shift, args.images)
        rows.append(row)
        print(f"[{k}/{len(points)}] {steps} steps, guidance {guidance:g}, shift {shift:g}: toy-GenEval "
              f"{row['overall']:.3f}, exact count {row['exact_count']:.3f} ({row['seconds']:.0f} s)", flush=True)
    result = {"measured": now_utc(), "command": command_line(), "device": device_name(torch.device("cpu")),
              "bundle": checkout_relative(args.bundle), "images_per_prompt": args.images, "seconds": round(time.monotonic() - started, 1),
              "points": rows}
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(result, indent=1) + "\n")
    if args.out:
        best = max(rows, key=lambda r: r["overall"])
        body = (f"Measured {result['measured']} with `{result['command']}` on {result['device']}; bundle "
                f"`{result['bundle']}`, every evaluation prompt x {args.images} images per point, the release's seeds; "
                f"{result['seconds']:.0f} s in all.\n\n{table(rows)}\n\n"
                f"Best point: {best['steps']} steps, guidance {best['guidance']:g}, shift {best['shift']:g} "
                f"({best['overall']:.3f}).")
        replace_section(Path(args.out), SECTION, body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
