"""Toy-world evidence for the paper's two claims, through the product's own pipeline, with 95% CIs.

    python bench/toy_evidence.py                        # the evidence run (CPU: `toy`, from the shipped teacher)
    python bench/toy_evidence.py --preset toy-smoke     # minutes: checks the script itself
    python bench/toy_evidence.py --status               # what is finished, what is left (computes nothing)
    python bench/toy_evidence.py --finished-only        # the report so far, from the ledger (computes nothing)

Claims (SNAPGEN_SPEC.md sections 5-6; issue 15):
1. Multi-level KD with timestep-aware scaling beats task-only training. Three students per seed at equal
   steps, on the same data and teacher cache: task-only (`kd.combine=task_only`), output + feature KD with
   fixed weights (`weighted`) and the same KD with the timestep-aware scaling (`scaled`). Only
   `pretrain.train.kd.combine` and `pretrain.train.seed` differ between runs; every stage before
   pretraining is shared (same stage keys). Each student is scored at its preset's sampler and swept over the
   guidance scales at full steps, and the variants are compared (paired) at each guidance.
2. Adversarial step distillation keeps quality at 4 steps. Each scaled-KD student is distilled to 4 steps;
   beside it the undistilled student is sampled at 4 steps with the same sampler (`few_step`) and the same
   guidance, and at its full step count (Euler). Each is swept over guidance 1, 2, 4.

Scoring: every toy prompt x --images images, the exact scene parser, GenEval's official rules and the
exact-object-count diagnostic, seen and held-out prompts apart. The models of one training seed share an
evaluation base seed (`snapgen eval --seed`: --eval-seed + 1000 x (seed's position + 1)), so image j of a
prompt starts from the same noise for every variant of that seed, and each training seed has its own
noise. Intervals are two-level bootstrap intervals over prompts and images (`evaluation.stats`); a
model's rows from its training seeds are pooled as more images per prompt, so the intervals cover
prompt and image variation, not training-seed variation beyond the seeds run (per-seed scores are
reported beside them). Comparisons are paired (same prompts and noise).

Resumable: every pipeline run and every evaluation is recorded in the ledger (`--ledger`, default
`<home>/evidence/ledger-<preset>.json`) when it finishes, with the git commit it was computed at (the report
lists them). A pipeline piece is keyed by every stage's config as the pipeline resolves it (so a preset
edit trains anew), an evaluation by the model, sampler and seeds; a rerun reuses every recorded result, and an interrupted pipeline resumes from its stage records
and pretraining checkpoints. Each student's evaluations run right after its pipeline, and an evaluation keeps
the images the grid shows beside the ledger (`<ledger folder>/pictures/`), so a ledger alone carries a
finished piece: with `--ledger bench/evidence/ledger-toy-v2.json` committed after each piece, the evidence is
built over sessions on fresh machines; a piece cut off mid-pretraining continues there from the state a SIGTERM stop
(or --save-carry) copied beside the ledger (`--carry`, default `<ledger folder>/carry/<ledger name>`). Keep `--home`
(default `<repo>/.evidence`) between sessions on one machine. Writes the section below into bench/RESULTS.md,
the figures into --json (default bench/toy_evidence.json) and a sample grid into bench/evidence/.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import checkout_relative, command_line, device_name, now_utc, replace_section, resolve_device  # noqa: E402

# one section per ledger, so a longer run (another ledger) reports beside the finished one instead of over it
HEADING = "## Toy evidence of {ledger}: teacher, KD ablation, few-step distillation (bench/toy_evidence.py)"
VARIANTS = ("task_only", "weighted", "scaled")
RUN_ORDER = ("scaled", "task_only", "weighted")  # the paper's student first: the first piece says whether KD learns
LEDGER_VERSION = 2  # 2: pipeline pieces keyed by every stage's resolved config (1: by the preset's name and overrides)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="auto", help="auto (toy-gpu on CUDA, else toy), toy-smoke, toy, toy-gpu")
    p.add_argument("--set", dest="overrides", action="append", default=[], help="pipeline override path=value")
    p.add_argument("--seeds", default="0,1", help="training seeds of every student (comma-separated)")
    p.add_argument("--guidances", default="1,2,4", help="guidance sweep of the students (comma-separated)")
    p.add_argument("--pretrain-steps", type=int, default=0,
                   help="pretraining steps of every student (0 = the preset's; equal for every variant)")
    p.add_argument("--distill-steps", type=int, default=0, help="step-distillation steps (0 = the preset's)")
    p.add_argument("--few-steps", type=int, default=4, help="sampler steps of the distilled student")
    p.add_argument("--images", type=int, default=4, help="images per prompt of every evaluation")
    p.add_argument("--eval-seed", type=int, default=0, help="base seed of every evaluation (snapgen eval --seed)")
    p.add_argument("--max-prompts-per-task", type=int, default=0, help="prompts per GenEval task (0 = all)")
    p.add_argument("--replicates", type=int, default=4000, help="bootstrap replicates per interval")
    p.add_argument("--home", default=str(ROOT / ".evidence"), help="SNAPGEN_HOME of the run (keep it to resume)")
    p.add_argument("--ledger", default="", help="the finished pieces' record (default <home>/evidence/ledger-"
                   "<preset>.json); commit it, e.g. bench/evidence/ledger-toy.json, to resume on another machine")
    p.add_argument("--out", default=str(ROOT / "bench" / "RESULTS.md"), help="results file (section replaced)")
    p.add_argument("--json", dest="json_out", default=str(ROOT / "bench" / "toy_evidence.json"),
                   help="the figures as JSON ('' = none)")
    p.add_argument("--grid", default=str(ROOT / "bench" / "evidence" / "toy_evidence_grid.png"),
                   help="the sample grid PNG ('' = none)")
    p.add_argument("--carry", default=None,
                   help="folder of the pretraining states carried to another machine (default <ledger folder>/carry/"
                        "<ledger name>; '' = none): read at the start, written when a run is stopped by SIGTERM "
                        "and by --save-carry; commit it with the ledger")
    p.add_argument("--save-carry", action="store_true",
                   help="copy the newest saved state of every unfinished pretraining under --home into --carry, "
                        "compute nothing (before a session on this machine ends)")
    p.add_argument("--status", action="store_true", help="list finished and missing work, compute nothing")
    p.add_argument("--finished-only", action="store_true",
                   help="report what the ledger holds so far and compute nothing (a run that spans sessions): "
                        "every finished model, each comparison on the seeds finished on both sides")
    args = p.parse_args(argv)
    try:
        args.seed_list = [int(s) for s in args.seeds.split(",") if s.strip()]
        args.guidance_list = [float(g) for g in args.guidances.split(",") if g.strip()]
    except ValueError:
        p.error(f"--seeds {args.seeds!r} / --guidances {args.guidances!r}: expected comma-separated numbers")
    if not args.seed_list or not args.guidance_list or min(args.guidance_list) < 1:
        p.error("--seeds needs at least one seed; --guidances at least one scale, each >= 1")
    return args


def code_version() -> str:
    """The git commit the piece was computed with (+dirty when the tree had changes): recorded with each
    ledger entry and reported, because a rerun reuses finished pieces across code changes."""
    import subprocess

    try:
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short=10", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _key(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Ledger:
    """Finished work of an evidence run, by key; written after each piece finishes (atomic replace)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.entries: dict[str, Any] = {}
        if path.is_file():
            data = json.loads(path.read_text())
            if data.get("version") != LEDGER_VERSION:
                raise SystemExit(f"{path}: an evidence ledger of version {data.get('version')}, and this script keys its "
                                 f"pieces as version {LEDGER_VERSION} does (every stage's resolved config, not the "
                                 "preset's name): pass another --ledger path; the old ledger stays as it is")
            self.entries = data["entries"]
        self.computed: list[str] = []  # what this invocation computed (a finished rerun: empty)
        self.reused: list[str] = []

    def get(self, key: str, label: str) -> Any:
        if key in self.entries:
            self.reused.append(label)
            return self.entries[key]
        return None

    def put(self, key: str, label: str, value: Any) -> Any:
        self.entries[key] = value
        self.computed.append(label)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"version": LEDGER_VERSION, "entries": self.entries}, default=str))
        tmp.replace(self.path)
        return value


# ----------------------------------------------------------------------------- carried states

def carry_folder(args: argparse.Namespace, ledger: Ledger) -> Path | None:
    """Where the pretraining states travel with the ledger (None: --carry '')."""
    if args.carry == "":
        return None
    return Path(args.carry).resolve() if args.carry else ledger.path.parent / "carry" / ledger.path.stem


def finished_pretrain_keys(ledger: Ledger) -> set[str]:
    """The pretraining runs (`tasks.pretrain.run_key`) of the pipeline pieces the ledger holds."""
    return {e["pretrain_key"] for e in ledger.entries.values() if isinstance(e, dict) and e.get("pretrain_key")}


def _copy_state(state: Path, into: Path) -> Path:
    """Copy one `step-*` state folder into `into` through a .tmp name (a half-copied state is never a state);
    a folder of that name without a complete state (a cut copy) is replaced."""
    import shutil

    into.mkdir(parents=True, exist_ok=True)
    tmp, dest = into / f"{state.name}.tmp", into / state.name
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(state, tmp)
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return dest


def save_carry(home: Path, carry: Path, finished: set[str], since: float | None = None) -> list[str]:
    """Copy the newest saved state of the evidence's pretraining in flight under `home` into `carry` (one state
    per run, replacing an older one), and drop the carried states of runs the ledger has finished. In flight:
    the runs whose state was written since `since` (the stopped invocation's start: its own student, whether
    its pretraining had finished or not), or without it the run trained last (--save-carry). Other runs under
    the same home (another ledger's, a toy-smoke check, a key that changed) stay where they are. A piece cut
    off on this machine then continues from that state on another one (`load_carry`) instead of training
    again from step 0: about 80 minutes per student on 2 cores. Returns one line per change."""
    import shutil

    from snapgen_model.training.state import STATE_FILE, latest_state

    def written(state: Path) -> float:
        return (state / STATE_FILE).stat().st_mtime

    candidates = [(run, latest_state(run / "state")) for run in sorted((home / "runs").glob("pretrain-*"))]
    states = [(run, st) for run, st in candidates
              if st is not None and run.name.removeprefix("pretrain-") not in finished]
    if since is not None:
        chosen = [(run, st) for run, st in states if written(st) >= since]
    else:
        chosen = [max(states, key=lambda rs: written(rs[1]))] if states else []
    said = []
    for run, state in chosen:
        have = latest_state(carry / run.name)
        if have is not None and have.name >= state.name:
            continue
        _copy_state(state, carry / run.name)
        for old in (carry / run.name).glob("step-*"):
            if old.name != state.name:
                shutil.rmtree(old)
        said.append(f"carried {run.name}/{state.name} into {carry}")
    for run in sorted(carry.glob("pretrain-*")) if carry.is_dir() else []:
        if run.name.removeprefix("pretrain-") in finished:
            shutil.rmtree(run)
            said.append(f"dropped the carried state of {run.name} (finished)")
    return said


def load_carry(home: Path, carry: Path | None, finished: set[str] | frozenset[str] = frozenset()) -> list[str]:
    """Put every carried state of an unfinished run under `home` where its pretraining resumes from
    (`<home>/runs/pretrain-<key>/state`), unless that run has a state there at the same or a later step.
    Returns one line per state."""
    if carry is None or not carry.is_dir():
        return []
    from snapgen_model.training.state import latest_state

    said = []
    for run in sorted(carry.glob("pretrain-*")):
        state = latest_state(run)
        if state is None or run.name.removeprefix("pretrain-") in finished:
            continue
        have = latest_state(home / "runs" / run.name / "state")
        if have is not None and have.name >= state.name:
            continue
        _copy_state(state, home / "runs" / run.name / "state")
        said.append(f"resuming {run.name} from its carried {state.name} ({carry})")
    return said


# ----------------------------------------------------------------------------- work items

def eval_seed(args: argparse.Namespace, seed: int | None) -> int:
    """Evaluation base seed of the models of training seed `seed` (None: the teacher): every variant of one
    training seed shares it (paired comparisons), each training seed has its own (independent images)."""
    return args.eval_seed + (0 if seed is None else 1000 * (1 + args.seed_list.index(seed)))


def pipeline_overrides(args: argparse.Namespace, variant: str, seed: int, preset: str = "toy") -> list[str]:
    """The pipeline run of one student: the shared overrides, what differs (KD combine, seed), then the
    user's `--set` (last: they win). On the `toy` preset the students train from random weights with the
    recipe the toy demo had when the ledgers were written (1,200 x 32 steps unless --pretrain-steps, 60
    distillation updates unless --distill-steps): the demo now continues the shipped student instead, and a
    piece's key must not move with it. Promotion is off and the registry is the evidence's own. The students
    keep their model preset's own sampling guidance, as the evidence recorded it (the `toy` pipeline samples
    its demo student at another guidance; the evidence sweeps guidance itself)."""
    from flows.pipeline_config import PRESETS, STUDENT_RECIPE

    student = list(PRESETS[preset]().pretrain.overrides)
    kept = [o for o in student if not o.replace(" ", "").startswith("sampler.guidance=")]
    options = {"images_per_prompt": args.images, "max_prompts_per_task": args.max_prompts_per_task,
               "base_seed": eval_seed(args, seed), "reference_rows": True}
    models = (["teacher"] if seed == args.seed_list[0] else []) + ["pretrained"] + \
        (["distilled"] if variant == "scaled" else [])
    out = ["evaluate.benchmarks=[\"geneval\"]", *[f"evaluate.options.{k}={json.dumps(v)}" for k, v in options.items()],
           f"evaluate.models={json.dumps(models)}", "export.enabled=false", "promotion.enabled=false",
           "promotion.pyfunc=false", "promotion.model_name=snapgen-evidence",
           *([f"pretrain.train={json.dumps(['steps=1200', *STUDENT_RECIPE])}", 'distill.train=["steps=60"]']
             if preset == "toy" else []),
           f"pretrain.train.kd.combine={variant}", f"pretrain.train.seed={seed}",
           *([f"pretrain.overrides={json.dumps(kept)}"] if kept != student else [])]
    if args.pretrain_steps:
        out.append(f"pretrain.train.steps={args.pretrain_steps}")
    if variant == "scaled":
        out += [f"distill.train.sampler_steps={args.few_steps}", f"distill.train.seed={seed}",
                *([f"distill.train.steps={args.distill_steps}"] if args.distill_steps else [])]
    else:
        out += ["distill.enabled=false"]
    return out + list(args.overrides)


def pipeline_key(preset: str, overrides: list[str]) -> str:
    """A pipeline run's ledger key: every stage's config as the pipeline resolves it from the preset and the
    overrides (`snapgen run --dry-run`), teacher included, so a preset that changes a stage's settings (or
    moves to another shipped teacher) does not reuse pieces trained under the old ones."""
    from flows.pipeline_config import build_config, resolved_stage_configs

    resolved = resolved_stage_configs(build_config(preset, overrides))
    for stage in STAGES_ADDED_SINCE_V2:  # resolved configs of stages the evidence does not run
        resolved.pop(stage, None)
    teacher = resolved.get("teacher") or {}
    if isinstance(teacher.get("path"), str):  # a shipped release: where this checkout lies is not part of the key
        teacher["path"] = checkout_relative(teacher["path"])
    for stage, neutral in ADDED_SINCE_V2.items():  # left out at their neutral value: older pieces stay valid
        for name, value in neutral.items():
            if resolved.get(stage, {}).get(name, value) == value:
                resolved.get(stage, {}).pop(name, None)
    return _key(["pipeline", preset, resolved])


# Fields added to a stage's library config after ledger v2 was written, with the value that trains what the
# config did before they existed: at that value they stay out of a piece's key, so pieces recorded earlier
# remain valid; any other value is part of the key. Distillation's device placement (one process), and
# the t of its KD term: "uniform" before 2026-12-07 (the default is now the preset's density), so the
# batch-32 run continues with `--set distill.train.kd_timesteps=uniform`.
# Stages whose resolved config joined `snapgen run --dry-run` after ledger v2 (the export config, 2026-12-07);
# the evidence turns export off, so it is not part of a piece's key.
STAGES_ADDED_SINCE_V2: tuple[str, ...] = ("export",)
ADDED_SINCE_V2: dict[str, dict[str, Any]] = {"distill": {"strategy": "auto", "devices": 1, "num_nodes": 1,
                                                         "kd_timesteps": "uniform"},
                                             "pretrain": {"init": ""}}  # random init (2026-12-07: pretrain.init)


def run_pipeline(args: argparse.Namespace, ledger: Ledger, preset: str, variant: str, seed: int) -> dict[str, Any] | None:
    """The student's pipeline run, from the ledger or computed and recorded (--finished-only: None if not finished)."""
    overrides = pipeline_overrides(args, variant, seed, preset)
    key, label = pipeline_key(preset, overrides), f"pipeline {variant} seed {seed}"
    done = ledger.get(key, label)
    if done is not None or args.finished_only:
        return done
    from flows.pipeline import snapgen_pipeline

    started = time.perf_counter()
    summary = snapgen_pipeline(preset=preset, overrides=overrides)
    res = summary["results"]
    pre = res.get("pretrain") or {}
    record = {"variant": variant, "seed": seed, "wall_s": round(time.perf_counter() - started, 1),
              "teacher": (res.get("teacher") or {}).get("bundle_uri"), "pretrained": pre.get("student_uri"),
              "distilled": (res.get("distill_steps") or {}).get("student_uri"),
              "distilled_sampler": (res.get("distill_steps") or {}).get("sampler"),
              "kd_levels": pre.get("kd_levels") or _kd_levels_tag(pre.get("mlflow_run_id")),
              "pretrain_steps": pre.get("step"), "pretrain_key": pre.get("key"),
              "mlflow_run_id": summary.get("mlflow_run_id"), "code": code_version(),
              "stages": {r["name"]: r["status"] for r in summary["stages"]}}
    print(f"{label}: {record['wall_s']:.0f} s ({', '.join(f'{k} {v}' for k, v in record['stages'].items())})",
          flush=True)
    ledger.put(key, label, record)
    carry = carry_folder(args, ledger)
    if carry is not None and record["pretrain_key"] and (carry / f"pretrain-{record['pretrain_key']}").is_dir():
        import shutil  # finished: its carried state has served (the ledger carries the piece now)

        shutil.rmtree(carry / f"pretrain-{record['pretrain_key']}")
    return record


def _kd_levels_tag(run_id: str | None) -> str:
    """The KD levels a pretraining run trained (its MLflow tag `snapgen.kd_levels`)."""
    if not run_id:
        return "?"
    try:
        from mlflow import MlflowClient

        from tasks.settings import get_settings
        from tasks.tracking import configure_mlflow

        return MlflowClient(tracking_uri=configure_mlflow(get_settings())).get_run(run_id).data.tags.get(
            "snapgen.kd_levels", "?")
    except Exception as exc:  # noqa: BLE001 - a figure of the report, not a reason to lose the run
        return f"? ({type(exc).__name__})"


def evaluate(args: argparse.Namespace, ledger: Ledger, model: str, label: str, *, seed: int | None = None,
             steps: int | None = None, guidance: float | None = None, sampler: str | None = None) -> dict[str, Any] | None:
    """One evaluation (GenEval toy rows + summary) of a model of training seed `seed` (None: the teacher),
    recorded; the samples folder is the product's. --finished-only: the recorded one, or None."""
    base_seed = eval_seed(args, seed)
    key = _key(["eval", model, steps, guidance, sampler, args.images, base_seed, args.max_prompts_per_task])
    done = ledger.get(key, label)
    if done is not None or args.finished_only:
        return done
    from flows.evaluate import EvaluateParams, evaluate_flow
    from snapgen_model.evaluation.geneval import read_results

    started = time.perf_counter()
    result = evaluate_flow(EvaluateParams(
        model=model, benchmarks=["geneval"], steps=steps, guidance=guidance, sampler=sampler,
        images_per_prompt=args.images, base_seed=base_seed, max_prompts_per_task=args.max_prompts_per_task,
        reference_rows=False))
    folder = result["folders"]["shapes"]
    g = result["benchmarks"]["geneval"]
    pictures = keep_pictures(folder, ledger.path.parent / "pictures" / key)
    record = {"label": label, "model": model, "folder": folder, "sampler": result["generation"].get("sampler"),
              "pictures": {str(i): dict(v, file=os.path.relpath(v["file"], ledger.path.parent))
                           for i, v in pictures.items()},
              "overall": g.get("overall"), "splits": g.get("splits"), "exact": (g.get("exact_count") or {}).get("overall"),
              "tasks": g.get("tasks"), "rows": read_results(Path(folder) / "results.jsonl"),
              "base_seed": base_seed, "seconds": round(time.perf_counter() - started, 1), "code": code_version()}
    print(f"{label}: toy-GenEval {record['overall']:.3f} ({record['seconds']:.0f} s)", flush=True)
    return ledger.put(key, label, record)


def prompt_splits_of(ledger: Ledger, teacher_uri: str) -> dict[str, str]:
    """Seen / held-out label of every toy prompt (the teacher bundle's world), recorded like a piece so a
    finished ledger needs no bundle on this machine."""
    key = _key(["splits", teacher_uri])
    done = ledger.get(key, "prompt splits")
    if done is not None:
        return done
    from snapgen_model.evaluation.toy_reference import prompt_splits
    from tasks.evaluate import resolve_model, toy_world

    return ledger.put(key, "prompt splits", prompt_splits(toy_world(resolve_model(teacher_uri), {})))


# ----------------------------------------------------------------------------- statistics

def pooled(records: list[dict[str, Any]], images: int) -> list[dict[str, Any]]:
    """Rows of several training seeds as one set: seed s's image j becomes image s * images + j, so the
    bootstrap resamples over both, and paired comparisons pair image j of seed s with image j of seed s."""
    from snapgen_model.evaluation.stats import _image_index

    out = []
    for s, rec in enumerate(records):
        for i, row in enumerate(rec["rows"]):
            j = _image_index(row, i) + s * images
            out.append(dict(row) | {"filename": f"seed{s}/{j:04d}.png"})
    return out


def interval(rows: list[dict[str, Any]], args: argparse.Namespace, verdict=None) -> dict[str, float] | None:
    from snapgen_model.evaluation.stats import geneval_ci

    if not rows:
        return None
    kwargs = {"verdict": verdict} if verdict else {}
    return geneval_ci(rows, replicates=args.replicates, **kwargs).to_dict()


def difference(a: list[dict[str, Any]], b: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, float] | None:
    from snapgen_model.evaluation.stats import paired_difference_ci

    if not a or not b:
        return None
    return paired_difference_ci(a, b, replicates=args.replicates).to_dict()


def split(rows: list[dict[str, Any]], splits: dict[str, str]) -> dict[str, list[dict[str, Any]]]:
    from snapgen_model.evaluation.stats import split_rows

    return split_rows(rows, splits)


def summarise(rows: list[dict[str, Any]], splits: dict[str, str], args: argparse.Namespace) -> dict[str, Any]:
    """overall / seen / held-out / exact-count intervals of one (pooled) row set."""
    from snapgen_model.evaluation.geneval import exact_count

    parts = split(rows, splits)
    return {"overall": interval(rows, args), "seen": interval(parts.get("seen", []), args),
            "heldout": interval(parts.get("heldout", []), args),
            "exact": interval(rows, args, verdict=exact_count), "images": len(rows)}


# ----------------------------------------------------------------------------- pictures

GRID_PER_TASK = 2


def first_per_task(items, per_task: int = GRID_PER_TASK) -> list:
    """The grid's prompts: of (index, metadata, ...) items in index order, the first `per_task` of each
    GenEval task (metadata `tag`)."""
    chosen, per_tag = [], {}
    for item in sorted(items, key=lambda it: it[0]):
        tag = str(item[1].get("tag"))
        if per_tag.get(tag, 0) < per_task:
            per_tag[tag] = per_tag.get(tag, 0) + 1
            chosen.append(item)
    return chosen


def keep_pictures(folder: str | Path, dest: Path, per_task: int = GRID_PER_TASK) -> dict[int, dict[str, Any]]:
    """Copy image 0 of the first `per_task` prompts of every GenEval task of an evaluation folder into `dest`
    (what the grid shows), so a ledger carries its pictures to another machine. index -> prompt, tag, file."""
    import shutil

    from snapgen_model.evaluation.geneval import iter_prompt_folders

    kept = {}
    for index, meta, paths in first_per_task([it for it in iter_prompt_folders(folder) if it[2]], per_task):
        dest.mkdir(parents=True, exist_ok=True)
        target = dest / f"{index:05d}.png"
        shutil.copyfile(paths[0], target)
        kept[index] = {"prompt": meta.get("prompt", ""), "tag": str(meta.get("tag")), "file": str(target)}
    return kept


def _pictures(rec: dict[str, Any], base: Path) -> dict[int, tuple[dict[str, Any], Path | None]]:
    """index -> (metadata, image 0) of a record: its kept pictures (resolved against the ledger folder `base`),
    else its evaluation folder when this machine still has it."""
    if rec.get("pictures"):
        return {int(i): ({"prompt": v["prompt"], "tag": v["tag"]}, base / v["file"])
                for i, v in rec["pictures"].items()}
    from snapgen_model.evaluation.geneval import iter_prompt_folders

    folder = Path(rec.get("folder") or "")
    if not folder.is_dir():
        return {}
    return {i: (m, paths[0] if paths else None) for i, m, paths in iter_prompt_folders(folder)}


def grid_picture(columns: list[tuple[str, dict[str, Any]]], path: Path, base: Path,
                 per_task: int = GRID_PER_TASK) -> Path:
    """Rows = models (teacher first), columns = prompts (`per_task` per GenEval task); image 0 of each
    prompt, the caption under each column and the model's name left of each row. `base`: the ledger's folder."""
    from PIL import Image, ImageDraw, ImageFont

    chosen = [(i, meta) for i, meta, _ in first_per_task(
        [(i, meta, pic) for i, (meta, pic) in _pictures(columns[0][1], base).items()], per_task)]
    size, label_w, caption_h = 96, 150, 54
    font = ImageFont.load_default()
    img = Image.new("RGB", (label_w + size * len(chosen), (size + 4) * len(columns) + caption_h), "white")
    draw = ImageDraw.Draw(img)
    for r, (name, rec) in enumerate(columns):
        pics = _pictures(rec, base)
        y = r * (size + 4)
        draw.text((4, y + size // 2 - 14), _wrap(name, 22), fill="black", font=font)
        for c, (index, _) in enumerate(chosen):
            picture = (pics.get(index) or ({}, None))[1]
            if picture is not None and picture.is_file():
                with Image.open(picture) as im:
                    img.paste(im.convert("RGB").resize((size, size), Image.NEAREST), (label_w + c * size, y))
    y = len(columns) * (size + 4)
    for c, (_, meta) in enumerate(chosen):
        draw.text((label_w + c * size + 2, y + 2), _wrap(str(meta.get("prompt", "")), 15), fill="black", font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def _wrap(text: str, width: int) -> str:
    words, lines, line = text.split(), [], ""
    for w in words:
        if line and len(line) + 1 + len(w) > width:
            lines.append(line)
            line = w
        else:
            line = f"{line} {w}".strip()
    return "\n".join(lines + [line])


# ----------------------------------------------------------------------------- report

def fmt(ci: dict[str, float] | None) -> str:
    return "-" if not ci else f"{ci['value']:.3f} [{ci['lo']:.3f}, {ci['hi']:.3f}]"


def table(rows: list[tuple[str, str, dict[str, Any]]]) -> list[str]:
    out = ["| model | sampling | toy-GenEval [95% CI] | per training seed | seen | held-out | exact count | images |",
           "|---|---|---|---|---|---|---|---|"]
    out += [f"| {name} | {how} | {fmt(s['overall'])} | {' / '.join(f'{v:.3f}' for v in s.get('per_seed', [])) or '-'} | "
            f"{fmt(s['seen'])} | {fmt(s['heldout'])} | {fmt(s['exact'])} | {s['images']} |" for name, how, s in rows]
    return out


def compute(args: argparse.Namespace, ledger: Ledger, preset: str, plan: list[tuple[str, int]]
            ) -> tuple[dict[tuple[str, int], dict[str, Any]], dict[str, Any], dict[str, str]]:
    """Each student's pipeline, then at once its evaluations (a finished piece needs no model afterwards): the
    teacher after the first run; every student at its own sampler; the scaled students swept. Returns the
    pipeline records, the evaluations by name and the prompts' seen / held-out labels (--finished-only: what
    the ledger holds)."""
    runs: dict[tuple[str, int], dict[str, Any]] = {}
    evals: dict[str, Any] = {}
    few = args.few_steps
    splits: dict[str, str] = {}

    def keep(name: str, record: dict[str, Any] | None) -> None:
        if record is not None:  # None: --finished-only, and this evaluation is not finished
            evals[name] = record

    for v, s in plan:
        run = run_pipeline(args, ledger, preset, v, s)
        if run is None:  # --finished-only: this student is not finished
            continue
        runs[(v, s)] = run
        if "teacher" not in evals:
            keep("teacher", evaluate(args, ledger, run["teacher"], "teacher", seed=args.seed_list[0]))
            if "teacher" in evals:
                splits = prompt_splits_of(ledger, run["teacher"])
        keep(f"{v}/{s}/full", evaluate(args, ledger, run["pretrained"], f"{v} seed {s}, full steps", seed=s))
        for g in args.guidance_list:  # every variant swept: the ablation at each guidance, not only the preset's
            keep(f"{v}/{s}/full/g{g:g}", evaluate(args, ledger, run["pretrained"],
                                                  f"{v} seed {s}, full steps, guidance {g:g}", seed=s, guidance=g))
        if v != "scaled":
            continue
        for g in args.guidance_list:
            keep(f"scaled/{s}/undistilled{few}/g{g:g}", evaluate(
                args, ledger, run["pretrained"], f"scaled seed {s}, undistilled {few}-step few_step, guidance {g:g}",
                seed=s, steps=few, guidance=g, sampler="few_step"))
            if run.get("distilled"):
                keep(f"scaled/{s}/distilled/g{g:g}", evaluate(
                    args, ledger, run["distilled"], f"scaled seed {s}, distilled {few}-step, guidance {g:g}",
                    seed=s, steps=few, guidance=g, sampler="few_step"))
    return runs, evals, splits


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = resolve_device("auto")
    preset = args.preset if args.preset != "auto" else ("toy-gpu" if device.type == "cuda" else "toy")
    home = Path(args.home).resolve()
    os.environ["SNAPGEN_HOME"] = str(home)
    ledger = Ledger(Path(args.ledger).resolve() if args.ledger else home / "evidence" / f"ledger-{preset}.json")
    plan = [(v, s) for s in args.seed_list for v in RUN_ORDER]
    if args.status:
        for v, s in plan:
            key = pipeline_key(preset, pipeline_overrides(args, v, s, preset))
            print(f"pipeline {v} seed {s}: {'finished' if key in ledger.entries else 'to do'}")
        print(f"{len(ledger.entries)} finished pieces recorded in {ledger.path}")
        return {}
    carry = carry_folder(args, ledger)
    if args.save_carry:
        if carry is None:
            raise SystemExit("--save-carry needs a carry folder: --carry '' turns it off")
        said = save_carry(home, carry, finished_pretrain_keys(ledger))
        print("\n".join(said) if said else f"nothing to carry: no unfinished pretraining state under {home / 'runs'} "
              f"newer than what {carry} holds")
        return {}
    if not args.finished_only:
        for line in load_carry(home, carry, finished_pretrain_keys(ledger)):
            print(line, flush=True)
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from flows.console import configure_console, exit_on_sigterm

    configure_console("normal")  # as `snapgen` does: third-party notices to <home>/logs/console.log, progress stays
    from tasks.defaults import prefect_env_defaults
    from tasks.settings import get_settings

    prefect_env_defaults(get_settings())
    started, invoked = time.perf_counter(), time.time()
    restore_signals = exit_on_sigterm()  # SIGTERM in an evaluation too: exit 143, the state carried, server stopped
    try:
        runs, evals, splits = compute(args, ledger, preset, plan)
    except SystemExit as stop:  # SIGTERM (143): the training state is saved; carry it with the ledger
        if stop.code == 143 and carry is not None and not args.finished_only:
            try:
                for line in save_carry(home, carry, finished_pretrain_keys(ledger), since=invoked):
                    print(line, flush=True)
            except Exception as exc:  # noqa: BLE001 - the stop stays a stop (143); the state is still under --home
                print(f"WARNING: could not carry the training state into {carry} ({type(exc).__name__}: {exc}); "
                      f"it is saved under {home / 'runs'}: rerun with --save-carry", file=sys.stderr, flush=True)
        raise
    finally:
        restore_signals()
    few = args.few_steps
    if "teacher" not in evals:
        raise SystemExit(f"{ledger.path}: no finished student to report yet; run without --finished-only to compute")

    seeds = args.seed_list

    def finished_seeds(*fmt_keys: str) -> list[int]:
        """The seeds with every one of these evaluations: all of them in a full run; with --finished-only,
        those finished so far (a comparison pairs the seeds finished on both sides)."""
        return [s for s in seeds if all(k.format(s=s) in evals for k in fmt_keys)]

    def pool(fmt_key: str, among: list[int] | None = None) -> list[dict[str, Any]]:
        among = finished_seeds(fmt_key) if among is None else among
        return pooled([evals[fmt_key.format(s=s)] for s in among], args.images) if among else []

    def per_seed(fmt_key: str) -> list[float]:
        return [evals[fmt_key.format(s=s)]["overall"] for s in seeds if fmt_key.format(s=s) in evals]

    def paired(key_a: str, key_b: str, part: str | None = None) -> dict[str, float] | None:
        """key_a's rows minus key_b's, paired, on the seeds both have (one split of the prompts if `part`)."""
        among = finished_seeds(key_a, key_b)
        a, b = pool(key_a, among), pool(key_b, among)
        if part:
            a, b = split(a, splits).get(part, []), split(b, splits).get(part, [])
        return difference(a, b, args)

    ablation = {v: pool(f"{v}/{{s}}/full") for v in VARIANTS}
    stats: dict[str, Any] = {"teacher": summarise(evals["teacher"]["rows"], splits, args),
                             "ablation": {v: summarise(r, splits, args) | {"per_seed": per_seed(f"{v}/{{s}}/full")}
                                          for v, r in ablation.items()}}
    stats["scaled_minus_task_only"] = {part or "overall": paired("scaled/{s}/full", "task_only/{s}/full", part)
                                       for part in (None, "seen", "heldout")}
    stats["weighted_minus_task_only"] = {"overall": paired("weighted/{s}/full", "task_only/{s}/full")}
    # the same ablation at every guidance of the sweep (Euler, full steps): paired at equal guidance
    stats["ablation_sweep"] = {f"{g:g}": {v: summarise(pool(f"{v}/{{s}}/full/g{g:g}"), splits, args)
                                          | {"per_seed": per_seed(f"{v}/{{s}}/full/g{g:g}")} for v in VARIANTS}
                               for g in args.guidance_list}
    stats["scaled_minus_task_only_sweep"] = {
        f"{g:g}": {part or "overall": paired(f"scaled/{{s}}/full/g{g:g}", f"task_only/{{s}}/full/g{g:g}", part)
                   for part in (None, "seen", "heldout")} for g in args.guidance_list}
    if args.finished_only:
        stats["finished_seeds"] = {v: finished_seeds(f"{v}/{{s}}/full") for v in VARIANTS}
    sweep: dict[str, dict[str, Any]] = {}
    for g in args.guidance_list:
        for kind in ("full", f"undistilled{few}", "distilled"):
            rows = pool(f"scaled/{{s}}/{kind}/g{g:g}")
            if rows:
                sweep.setdefault(kind, {})[f"{g:g}"] = {
                    "rows": rows, "stats": summarise(rows, splits, args) | {"per_seed": per_seed(f"scaled/{{s}}/{kind}/g{g:g}")}}
    stats["sweep"] = {k: {g: d["stats"] for g, d in v.items()} for k, v in sweep.items()}

    def best(kind: str) -> tuple[str, dict[str, Any]] | None:
        if kind not in sweep:
            return None
        g = max(sweep[kind], key=lambda k: sweep[kind][k]["stats"]["overall"]["value"])
        return g, sweep[kind][g]

    b_full, b_und, b_dis = best("full"), best(f"undistilled{few}"), best("distilled")
    verdicts = []
    d = stats["scaled_minus_task_only"]
    wins = {k: bool(d[k] and d[k]["lo"] > 0) for k in ("seen", "heldout")}
    verdicts.append(f"scaled KD - task-only: seen {fmt(d['seen'])}, held-out {fmt(d['heldout'])}: "
                    f"{'beats it beyond the CI on both' if all(wins.values()) else 'not shown on ' + ', '.join(k for k, w in wins.items() if not w)}")
    sweep_d = stats["scaled_minus_task_only_sweep"]
    verdicts.append("scaled KD - task-only at equal guidance (Euler, full steps): " + "; ".join(
        f"guidance {g}: overall {fmt(d2['overall'])}, seen {fmt(d2['seen'])}, held-out {fmt(d2['heldout'])}"
        for g, d2 in sweep_d.items()))
    kd_score = stats["ablation"]["scaled"]["overall"]["value"] if stats["ablation"]["scaled"]["overall"] else 0.0
    scaled_by_g = {g: row["scaled"]["overall"]["value"] for g, row in stats["ablation_sweep"].items()
                   if row["scaled"]["overall"]}
    kd_g, kd_best = max(scaled_by_g.items(), key=lambda kv: kv[1]) if scaled_by_g else ("-", kd_score)
    kd_best = max(kd_best, kd_score)
    verdicts.append(f"scaled-KD student toy-GenEval {kd_score:.3f} at its sampler's guidance, {kd_best:.3f} at the best "
                    f"guidance of the sweep ({kd_g}) (target >= 0.5): {'met' if kd_best >= 0.5 else 'not met'}")
    if b_full and b_dis:
        ratio = b_dis[1]["stats"]["overall"]["value"] / max(1e-9, b_full[1]["stats"]["overall"]["value"])
        stats["distilled_over_full"] = ratio
        verdicts.append(f"distilled {few}-step (guidance {b_dis[0]}) / full-step (guidance {b_full[0]}): {ratio:.2f} "
                        f"(target >= 0.90): {'met' if ratio >= 0.9 else 'not met'}")
    if b_dis and b_und:
        g = b_dis[0]
        und_same = sweep[f"undistilled{few}"].get(g)
        diff = paired(f"scaled/{{s}}/distilled/g{g}", f"scaled/{{s}}/undistilled{few}/g{g}") if und_same else None
        stats["distilled_minus_undistilled"] = {"guidance": g, "difference": diff}
        verdicts.append(f"distilled - undistilled {few}-step, both few_step at guidance {g}: {fmt(diff)}: "
                        f"{'beats it beyond the CI' if diff and diff['lo'] > 0 else 'not shown'}")
    wall = time.perf_counter() - started

    lines = [f"Measured {now_utc()} with `{command_line()}` on {device_name(device)}; preset `{preset}`; "
             f"seeds {seeds}; every toy prompt{'' if not args.max_prompts_per_task else f' (<= {args.max_prompts_per_task} per task)'} "
             f"x {args.images} images, evaluation base seed {args.eval_seed}; this invocation {wall:.0f} s, "
             f"computed {len(ledger.computed)} pieces, reused {len(ledger.reused)}; pieces computed at commits "
             f"{', '.join(sorted({str(e.get('code')) for e in [*runs.values(), *evals.values()]}))}.", "",
             *([f"**Partial report** (`--finished-only`: the ledger so far, nothing computed): finished students "
                f"{', '.join(f'{v} seed {s}' for v, s in runs) or 'none'}; still to do "
                f"{', '.join(f'{v} seed {s}' for v, s in plan if (v, s) not in runs) or 'nothing'}. Each row pools "
                "the seeds it has; each difference pairs the seeds finished on both sides.", ""]
               if args.finished_only else []),
             "Brackets: 95% two-level bootstrap intervals (prompts, then images; training seeds pooled as images), "
             f"{args.replicates} replicates. KD levels trained (the runs' `snapgen.kd_levels`): " +
             ", ".join(f"{v.replace('_', '-')} {runs[(v, seeds[0])]['kd_levels']}" for v in VARIANTS
                       if (v, seeds[0]) in runs) + ".", "",
             "KD ablation at equal steps (same student, data, cache and prompts; only `kd.combine` and the seed differ):",
             "", *table([("teacher", "Euler, its release guidance", stats["teacher"])] +
                        [(f"student, {v.replace('_', '-')}", "Euler, full steps", stats["ablation"][v]) for v in VARIANTS]),
             "", f"Scaled KD minus task-only (paired): overall {fmt(d['overall'])}, seen {fmt(d['seen'])}, held-out "
             f"{fmt(d['heldout'])}. Weighted minus task-only: {fmt(stats['weighted_minus_task_only']['overall'])}.", "",
             "The same ablation at each guidance of the sweep (Euler, full steps; every student's score depends on "
             "guidance, so the comparison is made at each one):", "",
             *table([(f"student, {v.replace('_', '-')}", f"Euler, full steps, guidance {g}", row[v])
                     for g, row in stats["ablation_sweep"].items() for v in VARIANTS]),
             "", "Scaled KD minus task-only at equal guidance (paired): " + "; ".join(
                 f"guidance {g}: overall {fmt(d2['overall'])}, seen {fmt(d2['seen'])}, held-out {fmt(d2['heldout'])}"
                 for g, d2 in sweep_d.items()) + ".", "",
             f"Few-step distillation of the scaled-KD students, guidance sweep ({few} steps: the `few_step` sampler for "
             "both the distilled and the undistilled student):", ""]
    sweep_rows = []
    names = {"full": "scaled-KD student", f"undistilled{few}": "scaled-KD student, undistilled", "distilled": "distilled"}
    for kind, per_g in sweep.items():
        how = "Euler, full steps" if kind == "full" else f"few_step, {few} steps"
        sweep_rows += [(names[kind], f"{how}, guidance {g}", d2["stats"]) for g, d2 in per_g.items()]
    lines += table(sweep_rows) if sweep_rows else ["(no few-step rows)"]
    lines += ["", "Verdicts:", "", *[f"- {v}" for v in verdicts], ""]
    if args.grid:
        cols = [("teacher", evals["teacher"])] + [(f"{v.replace('_', '-')} (seed {seeds[0]})", evals[f"{v}/{seeds[0]}/full"])
                                                  for v in VARIANTS if f"{v}/{seeds[0]}/full" in evals]
        if b_und and f"scaled/{seeds[0]}/undistilled{few}/g{b_und[0]}" in evals:
            cols.append((f"undistilled {few}-step g{b_und[0]}", evals[f"scaled/{seeds[0]}/undistilled{few}/g{b_und[0]}"]))
        if b_dis and f"scaled/{seeds[0]}/distilled/g{b_dis[0]}" in evals:
            cols.append((f"distilled {few}-step g{b_dis[0]}", evals[f"scaled/{seeds[0]}/distilled/g{b_dis[0]}"]))
        grid = grid_picture(cols, Path(args.grid), ledger.path.parent)
        rel = os.path.relpath(grid, Path(args.out).parent)
        lines += [f"![teacher above the students, caption under each column]({rel})", "",
                  "Rows: teacher, the three students (first seed), the undistilled and distilled few-step samples at "
                  "their best guidance; columns: two prompts per GenEval task, image 0 of each.", ""]
    replace_section(Path(args.out), HEADING.format(ledger=ledger.path.stem), "\n".join(lines))
    figures = {"preset": preset, "device": device_name(device), "seeds": seeds, "images": args.images,
               "eval_seed": args.eval_seed, "wall_s": wall, "computed": ledger.computed, "reused": ledger.reused,
               "runs": {f"{v}/{s}": r for (v, s), r in runs.items()},
               "scores": {k: {kk: vv for kk, vv in e.items() if kk != "rows"} for k, e in evals.items()},
               "stats": stats, "verdicts": verdicts}
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(figures, indent=2, default=str))
    print("\n".join(lines))
    return figures


if __name__ == "__main__":
    main()
