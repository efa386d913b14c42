"""`snapgen release-student`: score a pretrained student and package it as a shipped release.

Registered in flows/cli.py. It evaluates the student with the product's evaluation flow (toy-GenEval,
every toy prompt x N images at each guidance of the sweep; finished evaluations are reused), scores the
reference rows at the best guidance, gathers the pretraining loss history of the student's run from
MLflow (every run of its config hash: a resumed run spans several), draws the per-task sample grid,
writes MODEL_CARD.md and writes the fp16 release under releases/<name> with its index entry
(snapgen_model.training.release.package_student_release).
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console

err = Console(stderr=True) if sys.stderr.isatty() else Console(stderr=True, width=110)


def teacher_release_of(bundle_id: str | None) -> str | None:
    """`release://<name>` of the shipped teacher whose config hash is `bundle_id`, if there is one."""
    from snapgen_model.training.release import read_index

    for name, entry in sorted(read_index()["releases"].items()):
        if entry.get("kind", "teacher") == "teacher" and bundle_id and entry.get("config_hash") == bundle_id:
            return f"release://{name}"
    return None


def training_summary(params: dict[str, Any], parameters: int) -> dict[str, Any]:
    """The pretraining config from the run's logged params (`pretrain.steps` ...), nested like PretrainConfig."""
    out: dict[str, Any] = {"parameters": parameters}
    for k, v in params.items():
        if not k.startswith("pretrain."):
            continue
        parts = k.split(".")[1:]
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = v
    return out


def release_student(
    student: str = typer.Option(..., "--student", help="a finished student folder or URI (file://, s3://)"),
    name: str = typer.Option(..., "--name", help="release name, e.g. toy-student/v1 (immutable)"),
    teacher: Optional[str] = typer.Option(None, "--teacher", help="the teacher it was trained from, as a release URI "
                                "(default: the shipped teacher whose config hash is the student's bundle_id)"),
    guidances: str = typer.Option("1,2,4", "--guidances", help="comma-separated CFG scales to sweep"),
    images: int = typer.Option(4, "--images", min=1, help="images per prompt"),
    seed: int = typer.Option(1000, "--seed", min=0, help="evaluation base seed"),
    max_prompts_per_task: int = typer.Option(0, "--max-prompts-per-task", min=0,
                                             help="prompts per GenEval task (0 = every toy prompt, as a release is scored)"),
    rebuild: str = typer.Option(..., "--rebuild", help="the command that retrains it (written into the card)"),
    note: Path = typer.Option(None, "--note", help="a markdown file appended to the card"),
    dry_run: bool = typer.Option(False, "--dry-run", help="score and write the card into a temp folder only"),
) -> None:
    """Score a pretrained student and write it as a versioned release (fp16, checksums, model card)."""
    from flows.cli_checks import BadInput, check_model, fail, settings_or_fail
    from flows.evaluate import EvaluateParams, evaluate_flow
    from flows.progress import bar
    from snapgen_model.artifacts import student as st
    from snapgen_model.training import release as rel
    from snapgen_model.training import student_card as sc
    from tasks.cache import local_folder
    from tasks.defaults import prefect_env_defaults

    settings = settings_or_fail()
    try:
        scales = sorted({float(g) for g in guidances.split(",") if g.strip()})
        if not scales or min(scales) < 1:
            raise ValueError(f"--guidances {guidances!r}: give CFG scales >= 1, e.g. 1,2,4")
        check_model("--student", student, settings)
        if (rel.RELEASES_DIR / name).exists() and not dry_run:
            raise ValueError(f"release {name} already exists under {rel.RELEASES_DIR}; pick a new version")
        if note is not None and not note.is_file():
            raise ValueError(f"--note {note}: no such file")
    except (ValueError, BadInput) as exc:
        fail(str(exc))
    prefect_env_defaults(settings)
    folder = local_folder(student)
    if not st.is_student_folder(folder):
        fail(f"--student {student}: not a finished student folder ({st.CARD}, {st.UNET}, {st.CONDITIONER})")
    card = st.read_card(folder)
    teacher = teacher or teacher_release_of(card.get("bundle_id"))
    if not teacher or not rel.is_release_uri(teacher):
        fail(f"--student {student}: its teacher (bundle {card.get('bundle_id')}) is not a shipped release; ship the "
             "teacher first, or name it with --teacher release://<name>")
        return
    try:
        if rel.release_kind(rel.release_name(teacher)) != "teacher":
            raise ValueError(f"{teacher} is not a teacher release")
        rel.release_folder(teacher)
    except ValueError as exc:  # LoadError included: not in the index, or a file that does not match
        fail(f"--teacher {teacher}: {exc}")
    sweep: dict[float, dict[str, Any]] = {}
    folders: dict[float, str] = {}
    refs: dict[str, Any] = {}
    with bar():
        for g in scales:  # the reference rows (renders, AE, floor) do not depend on the guidance: scored once
            res = evaluate_flow(EvaluateParams(model=student, benchmarks=["geneval"], guidance=g, images_per_prompt=images,
                                               base_seed=seed, max_prompts_per_task=max_prompts_per_task,
                                               reference_rows=not refs))
            refs = refs or res.get("reference_rows", {})
            sweep[g], folders[g] = res["benchmarks"]["geneval"], res["folders"]["shapes"]
            err.print(f"guidance {g:g}: toy-GenEval {sweep[g]['overall']:.3f}")
        best = sc.best_guidance(sweep)
    work = Path(tempfile.mkdtemp(prefix="snapgen-release-student-"))
    from tasks.tracking import stage_metric_history

    points, params = stage_metric_history(settings, str(card.get("key")), "pretrain", "loss/total")
    _, unet, conditioner = st.load_student(folder)
    parameters = sum(p.numel() for m in (unet, conditioner) for p in m.parameters())
    pictures: dict[str, Path] = {}
    if sc.loss_curve(points, work / "loss_curve.png"):
        pictures["loss_curve.png"] = work / "loss_curve.png"
    else:
        err.print("no pretraining loss history in MLflow for this student's run: the card has no curve")
    sc.folder_task_grid(folders[best]).save(work / "samples_per_task.png")
    pictures["samples_per_task.png"] = work / "samples_per_task.png"
    markdown = sc.card_markdown(
        name, student=card, training=training_summary(params, parameters), teacher=teacher, sweep=sweep,
        references=refs, images=images, base_seed=seed, prompts=int(sweep[best].get("prompts") or 0), rebuild=rebuild,
        pictures={"grid": "card/samples_per_task.png"} | ({"curve": "card/loss_curve.png"} if "loss_curve.png" in pictures else {}),
        note=note.read_text() if note else "")
    if dry_run:
        (work / "MODEL_CARD.md").write_text(markdown)
        err.print(f"dry run: card and pictures in {work}")
        return
    summary = {str(g): {k: s.get(k) for k in ("overall", "exact_count", "splits", "tasks")} for g, s in sweep.items()}
    out = rel.package_student_release(folder, name, card=markdown, teacher=teacher, card_files=pictures,
                                      extra_record={"guidance_sweep": summary, "guidance": best, "images_per_prompt": images,
                                                    "base_seed": seed,
                                                    "final_loss": points[-1]["loss"] if points else None},
                                      preset_overrides=[f"sampler.guidance={best}"])
    err.print(f"release {name} written to {out} "
              f"({sum(p.stat().st_size for p in out.rglob('*') if p.is_file()) / 2**20:.1f} MB); "
              f"toy-GenEval {sweep[best]['overall']:.3f} at guidance {best:g}")
    sys.stdout.write(json.dumps({"release": name, "path": str(out), "guidance": best,
                                 "overall": sweep[best]["overall"]}) + "\n")
