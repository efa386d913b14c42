"""How close each evidence student's velocity is to its teacher's, per timestep, and how it answers a caption.

    python bench/kd_function_gap.py                                   # the students of the committed ledger
    python bench/kd_function_gap.py --ledger bench/evidence/ledger-toy-long.json

toy-GenEval scores whole samples; this looks inside them. For fresh scenes of the teacher's world (rendered,
encoded by the bundle's AE; the students never saw these draws) and fixed noise, at each t of --timesteps:

- KD error: mean over latent elements of (v_student - v_teacher)^2 at the same x_t and caption, the quantity
  output KD trains down;
- flow error: mean (v - (noise - x0))^2, the task loss, for the teacher and each student (the teacher's is what
  a student could reach);
- caption response: v(x_t, caption) - v(x_t, another scene's caption), its size relative to |v| and its cosine
  with the teacher's own response (1 = the student changes its output for a caption as the teacher does).

Students are read from an evidence ledger (`bench/toy_evidence.py`): every finished pipeline's pretrained
student, grouped by KD variant, training seeds pooled. The scaled-KD minus task-only difference of KD error
is paired by scene (same x_t for both), averaged over the training seeds run, with a 95% bootstrap interval
over scenes; per-seed means are listed beside it, since the interval does not cover training-seed variation.
Forward passes only: a few minutes for six students on 2 CPU cores (6 min beside a training run).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable, Collection, Mapping, Sequence

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import command_line, device_name, now_utc, replace_section  # noqa: E402

SECTION = "## KD function gap of the {ledger} students: velocity against the teacher's, per timestep (bench/kd_function_gap.py)"
Velocity = Callable[[torch.Tensor, torch.Tensor, Sequence[str]], torch.Tensor]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ledger", default=str(ROOT / "bench" / "evidence" / "ledger-toy-v2.json"),
                   help="evidence ledger whose finished students are compared")
    p.add_argument("--scenes", type=int, default=192, help="fresh scenes of the teacher's world")
    p.add_argument("--timesteps", default="0.95,0.8,0.6,0.4,0.2", help="t values (comma-separated, in (0, 1])")
    p.add_argument("--seed", type=int, default=0, help="seed of the scenes and the noise")
    p.add_argument("--replicates", type=int, default=4000, help="bootstrap replicates")
    p.add_argument("--out", default=str(ROOT / "bench" / "RESULTS.md"), help="results file (section replaced; '' = none)")
    p.add_argument("--json", dest="json_out", default=None,
                   help="the figures as JSON, with every student's per-scene measures, reused by the next run "
                        "(default bench/evidence/kd_function_gap-<ledger name>[-seeds-<seeds>].json; '' = none)")
    p.add_argument("--seeds", default="", help="only the students of these training seeds (comma-separated; "
                   "default all): their own section and JSON")
    args = p.parse_args(argv)
    try:
        args.seed_list = sorted({int(x) for x in args.seeds.split(",") if x.strip()})
    except ValueError:
        raise SystemExit(f"--seeds {args.seeds!r}: not a comma-separated list of integers") from None
    args.name = Path(args.ledger).stem + (f"-seeds-{'-'.join(map(str, args.seed_list))}" if args.seed_list else "")
    try:
        args.t_list = [float(x) for x in args.timesteps.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"--timesteps {args.timesteps!r}: not a comma-separated list of numbers") from None
    if not args.t_list or not all(0.0 < t <= 1.0 for t in args.t_list):
        raise SystemExit(f"--timesteps {args.timesteps!r}: every t must lie in (0, 1]")
    if args.json_out is None:
        args.json_out = str(ROOT / "bench" / "evidence" / f"kd_function_gap-{args.name}.json")
    if args.scenes < 2:
        raise SystemExit(f"--scenes {args.scenes}: needs at least 2 (the caption swap pairs each scene with another)")
    return args


# ----------------------------------------------------------------------------- the measurement


def per_scene(v_student: torch.Tensor, v_student_swapped: torch.Tensor, v_teacher: torch.Tensor,
              v_teacher_swapped: torch.Tensor, target: torch.Tensor) -> dict[str, np.ndarray]:
    """Per-scene figures at one t, every tensor (N, C, H, W): KD error, flow error, caption-response size
    (|dv|^2 / |v|^2) and its cosine with the teacher's response."""
    def msq(x: torch.Tensor) -> np.ndarray:
        return x.float().pow(2).flatten(1).mean(1).numpy()

    d_s, d_t = (v_student - v_student_swapped).flatten(1), (v_teacher - v_teacher_swapped).flatten(1)
    return {"kd": msq(v_student - v_teacher), "flow": msq(v_student - target),
            "response": msq(d_s) / np.maximum(msq(v_student), 1e-12),
            "cosine": torch.nn.functional.cosine_similarity(d_s.float(), d_t.float(), dim=1, eps=1e-12).numpy()}


def measure(student: Velocity, teacher: Velocity, x0: torch.Tensor, noise: torch.Tensor, captions: Sequence[str],
            timesteps: Sequence[float]) -> dict[str, Any]:
    """{"t": {"student": per-scene figures, "teacher": {"flow", "response"}}} over x_t = (1 - t) x0 + t noise;
    the swapped caption of scene i is scene i-1's."""
    from snapgen_model.diffusion.flow import interpolate

    swapped = [captions[i - 1] for i in range(len(captions))]
    out: dict[str, Any] = {}
    for t0 in timesteps:
        t = torch.full((len(x0),), float(t0))
        xt, target = interpolate(x0, noise, t), noise - x0
        with torch.no_grad():
            v_t, v_t2 = teacher(xt, t, captions), teacher(xt, t, swapped)
            v_s, v_s2 = student(xt, t, captions), student(xt, t, swapped)
        teach = per_scene(v_t, v_t2, v_t, v_t2, target)
        out[f"{t0:g}"] = {"student": per_scene(v_s, v_s2, v_t, v_t2, target),
                          "teacher": {"flow": teach["flow"], "response": teach["response"]}}
    return out


def paired_mean_difference(a: np.ndarray, b: np.ndarray, replicates: int, seed: int = 0,
                           level: float = 0.95) -> dict[str, float]:
    """mean(a - b) over paired units with a percentile bootstrap interval (units resampled with replacement)."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    if a.shape != b.shape or a.ndim != 1 or len(a) < 2:
        raise ValueError(f"paired difference: needs two equal 1-D samples of >= 2 units, got {a.shape} and {b.shape}")
    d = a - b
    rng = np.random.default_rng(seed)
    draws = d[rng.integers(0, len(d), size=(replicates, len(d)))].mean(1)
    bounds = np.quantile(draws, np.array([(1 - level) / 2, (1 + level) / 2]))
    return {"value": float(d.mean()), "lo": float(bounds[0]), "hi": float(bounds[1])}


# ----------------------------------------------------------------------------- the ledger's models


def ledger_students(ledger: Path, recorded: Collection[str] = (), seeds: Collection[int] = ()
                    ) -> tuple[dict[str, dict[int, tuple[str, Path | None]]], Path | None]:
    """{variant: {seed: (student URI, its folder)}} of the ledger's finished pipelines (of `seeds` if given),
    and their teacher bundle's folder. A student measured before (its URI in `recorded`) needs no folder on
    this machine (None); nor then does the teacher, when every student is recorded. Anything else that is not
    here is an error naming it (the students live in the home of the machine that trained them)."""
    if not ledger.is_file():
        raise SystemExit(f"--ledger {ledger}: no such file (run bench/toy_evidence.py --ledger {ledger} first)")
    students: dict[str, dict[int, tuple[str, Path | None]]] = {}
    teachers = set()
    for entry in json.loads(ledger.read_text())["entries"].values():
        if not isinstance(entry, dict) or "variant" not in entry or not entry.get("pretrained"):
            continue
        if seeds and int(entry["seed"]) not in seeds:
            continue
        uri = entry["pretrained"]
        students.setdefault(entry["variant"], {})[int(entry["seed"])] = (
            uri, None if uri in recorded else _local(uri, ledger))
        teachers.add(entry["teacher"])
    if not students:
        raise SystemExit(f"--ledger {ledger}: no finished pipeline yet{f' of seeds {sorted(seeds)}' if seeds else ''} "
                         "(bench/toy_evidence.py --status lists them)")
    if len(teachers) != 1:
        raise SystemExit(f"--ledger {ledger}: students of {len(teachers)} teachers ({sorted(teachers)}); compare one")
    everything_recorded = all(folder is None for runs in students.values() for _, folder in runs.values())
    return students, None if everything_recorded else _local(teachers.pop(), ledger)


def _local(uri: str, ledger: Path) -> Path:
    path = Path(uri.removeprefix("file://"))
    if not path.exists():
        raise SystemExit(f"{uri} (recorded in {ledger}) is not on this machine and was not measured before: the "
                         "students live in the evidence run's home (bench/toy_evidence.py --home, default .evidence) "
                         "of the machine that trained them (--seeds measures the students of some seeds only)")
    return path


def recorded_measures(path: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The per-scene measures of the students measured before ({student URI: measure(...)}), from the JSON a
    previous run wrote, if it measured the same scenes, noise and timesteps; else nothing."""
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    if (data.get("scenes"), data.get("seed"), data.get("timesteps")) != (args.scenes, args.seed, [f"{t:g}" for t in args.t_list]):
        return {}
    return {uri: {t: {who: {k: np.asarray(v) for k, v in figs.items()} for who, figs in row.items()}
                  for t, row in m.items()} for uri, m in data.get("measures", {}).items()}


def _as_lists(measures: Mapping[str, Any]) -> dict[str, Any]:
    return {uri: {t: {who: {k: np.asarray(v).tolist() for k, v in figs.items()} for who, figs in row.items()}
                  for t, row in m.items()} for uri, m in measures.items()}


def scenes_for(bundle: Any, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """`n` fresh train-split scenes of the bundle's world: AE latents, fixed noise, captions."""
    from snapgen_model.data.shapes import render_array, sample_scene

    world = bundle.config.world()
    rng = np.random.default_rng(seed)
    scenes = [sample_scene(rng, world) for _ in range(n)]
    images = torch.from_numpy(np.stack([render_array(s, world) for s in scenes])).permute(0, 3, 1, 2).float()
    x0 = bundle.vae.encode(images / 127.5 - 1.0)  # (N, C, h, w)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed + 1))
    return x0, noise, [s.caption for s in scenes]


def velocity_of_teacher(bundle: Any) -> Velocity:
    def v(x: torch.Tensor, t: torch.Tensor, captions: Sequence[str]) -> torch.Tensor:
        c = bundle.condition(list(captions))
        return bundle.teacher(x, t, c["context"], c["pooled"]).velocity
    return v


def velocity_of_student(folder: Path, bundle_folder: Path) -> Velocity:
    from snapgen_model.evaluation.bundle_generators import BundleStudentGenerator

    gen = BundleStudentGenerator(folder, bundle_folder)

    def v(x: torch.Tensor, t: torch.Tensor, captions: Sequence[str]) -> torch.Tensor:
        cond = gen.conditioner({name: enc(list(captions)) for name, enc in gen.encoders.items()})
        return gen.unet(x, t, **cond)
    return v


# ----------------------------------------------------------------------------- report


def summarise(results: Mapping[str, Mapping[int, Mapping[str, Any]]], timesteps: Sequence[float],
              replicates: int) -> dict[str, Any]:
    """results[variant][seed] = measure(...) -> per t: the teacher's figures, each variant's means (seeds
    pooled, and per seed), and scaled - task-only KD error paired by scene (seed-averaged per scene)."""
    any_run = next(iter(next(iter(results.values())).values()))
    out: dict[str, Any] = {}
    for t0 in timesteps:
        key = f"{t0:g}"
        row: dict[str, Any] = {"teacher": {k: float(np.mean(v)) for k, v in any_run[key]["teacher"].items()}}
        for variant, seeds in results.items():
            figs = [seeds[s][key]["student"] for s in sorted(seeds)]
            row[variant] = {k: float(np.mean([f[k].mean() for f in figs])) for k in figs[0]} | {
                "kd_per_seed": [float(f["kd"].mean()) for f in figs]}
        if "scaled" in results and "task_only" in results:
            def seed_mean(variant: str) -> np.ndarray:
                return np.mean([results[variant][s][key]["student"]["kd"] for s in sorted(results[variant])], axis=0)
            row["scaled_minus_task_only_kd"] = paired_mean_difference(seed_mean("scaled"), seed_mean("task_only"),
                                                                      replicates)
        out[key] = row
    return out


def report(summary: Mapping[str, Any], variants: Sequence[str], seeds: Mapping[str, Sequence[int]],
           args: argparse.Namespace, device: str) -> str:
    def f(x: float) -> str:
        return f"{x:.3f}"

    head = ["t", "teacher: flow error, caption response"] + [f"{v}: KD error, flow error, response, cosine" for v in variants]
    lines = [f"Measured {now_utc()} with `{command_line()}` on {device}; students of `{Path(args.ledger).name}` "
             f"({', '.join(f'{v} seeds {list(seeds[v])}' for v in variants)}); {args.scenes} fresh scenes of the "
             f"teacher's world, noise seed {args.seed + 1}; seeds pooled.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for t, row in summary.items():
        cells = [t, f"{f(row['teacher']['flow'])}, {f(row['teacher']['response'])}"]
        cells += [f"{f(row[v]['kd'])}, {f(row[v]['flow'])}, {f(row[v]['response'])}, {row[v]['cosine']:.2f}"
                  for v in variants]
        lines.append("| " + " | ".join(cells) + " |")
    if any("scaled_minus_task_only_kd" in r for r in summary.values()):
        lines += ["", "Scaled KD minus task-only, KD error (paired by scene, 95% bootstrap over scenes; per-seed means "
                  "scaled / task-only):", ""]
        for t, row in summary.items():
            d = row["scaled_minus_task_only_kd"]
            lines.append(f"- t = {t}: {d['value']:+.4f} [{d['lo']:+.4f}, {d['hi']:+.4f}] "
                         f"({' / '.join(f(x) for x in row['scaled']['kd_per_seed'])} against "
                         f"{' / '.join(f(x) for x in row['task_only']['kd_per_seed'])})")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    from snapgen_model.artifacts.teacher_bundle import load_bundle

    measures = recorded_measures(Path(args.json_out), args) if args.json_out else {}
    students, teacher_folder = ledger_students(Path(args.ledger), measures, args.seed_list)
    variants = [v for v in ("task_only", "weighted", "scaled") if v in students]
    results: dict[str, dict[int, Any]] = {}
    scenes: tuple[torch.Tensor, torch.Tensor, list[str]] | None = None
    for v in variants:
        for s, (uri, folder) in sorted(students[v].items()):
            if folder is None:
                print(f"{v} seed {s}: measured before ({args.json_out})", flush=True)
            else:
                assert teacher_folder is not None  # ledger_students: a student to measure needs its teacher here
                if scenes is None:
                    bundle = load_bundle(teacher_folder)
                    scenes, teacher = scenes_for(bundle, args.scenes, args.seed), velocity_of_teacher(bundle)
                print(f"{v} seed {s}: {folder}", flush=True)
                measures[uri] = measure(velocity_of_student(folder, teacher_folder), teacher, *scenes, args.t_list)
            results.setdefault(v, {})[s] = measures[uri]
    summary = summarise(results, args.t_list, args.replicates)
    text = report(summary, variants, {v: sorted(students[v]) for v in variants}, args, device_name(torch.device("cpu")))
    print(text)
    if args.out:
        replace_section(Path(args.out), SECTION.format(ledger=args.name), text)
    if args.json_out:  # the summary readable, the per-scene measures (reused by the next run) one line per student
        head = json.dumps({"ledger": Path(args.ledger).name, "scenes": args.scenes, "seed": args.seed,
                           "timesteps": [f"{t:g}" for t in args.t_list], "summary": summary}, indent=1)
        kept = _as_lists({uri: m for uri, m in measures.items()
                          if any(uri == u for runs in students.values() for u, _ in runs.values())})
        body = ",\n".join(f"  {json.dumps(uri)}: {json.dumps(m)}" for uri, m in sorted(kept.items()))
        Path(args.json_out).write_text(head[:-2] + ',\n "measures": {\n' + body + "\n }\n}\n")
    return summary


if __name__ == "__main__":
    main()
