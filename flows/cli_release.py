"""`snapgen release-teacher`: score a finished toy teacher bundle and package it as a shipped release.

Registered in flows/cli.py. It sweeps guidance, scores every toy prompt x N images at the best one
with the reference rows (and the raw weights beside the EMA when the training state is given), draws
the loss curves and a sample grid per task, writes MODEL_CARD.md, and writes the fp16 release under
releases/<name> with its index entry (snapgen_model.training.release). Plain PyTorch; no services.
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import typer
from rich.console import Console

err = Console(stderr=True) if sys.stderr.isatty() else Console(stderr=True, width=110)


def release_teacher(
    bundle: Path = typer.Option(..., "--bundle", help="finished bundle folder (bundle.json written)"),
    name: str = typer.Option(..., "--name", help="release name, e.g. toy-teacher/v1 (immutable)"),
    state: Path = typer.Option(None, "--state", help="the run's teacher_state.pt: also score its other weights"),
    ship: str = typer.Option("ema", "--ship", help="which weights of the run the release holds: ema (the bundle's) "
                             "or raw (the last step's, from --state); the other is scored beside it with --state"),
    guidances: str = typer.Option("1,2,3,4,5", "--guidances", help="comma-separated CFG scales to sweep"),
    images: int = typer.Option(4, "--images", min=1, help="images per prompt for the final scores"),
    rebuild: str = typer.Option("snapgen bootstrap-teacher --preset toy-release", "--rebuild",
                                help="the command that retrains it (written into the card)"),
    report_json: Path = typer.Option(None, "--report-json", help="also write the score report here"),
    note: Path = typer.Option(None, "--note", help="a markdown file appended to the card (limits, what changed)"),
    dry_run: bool = typer.Option(False, "--dry-run", help="score and write the card into a temp folder only"),
) -> None:
    """Score a toy teacher bundle and write it as a versioned release (fp16, checksums, model card)."""
    from snapgen_model.distill.teacher import LoadError
    from snapgen_model.training import bootstrap as bs
    from snapgen_model.training import release as rel
    from snapgen_model.training import release_card as rc

    try:
        scales = [float(g) for g in guidances.split(",") if g.strip()]
        loaded = bs.load_bundle(bundle)
    except (ValueError, LoadError) as exc:
        err.print(f"[bold red]error:[/] {exc}")
        raise typer.Exit(2)
    if (rel.RELEASES_DIR / name).exists() and not dry_run:
        err.print(f"[bold red]error:[/] release {name} already exists under {rel.RELEASES_DIR}; pick a new version")
        raise typer.Exit(2)
    if ship not in ("ema", "raw") or (ship == "raw" and state is None):
        err.print(f"[bold red]error:[/] --ship {ship!r}: choose ema, or raw together with --state (the raw weights "
                  "live in the run's checkpoint)")
        raise typer.Exit(2)
    work = Path(tempfile.mkdtemp(prefix="snapgen-release-"))
    other = None
    source = bundle
    if state is not None:
        try:
            if ship == "raw":  # the raw pair becomes the release, with the finished bundle's AE and figures
                source = rc.bundle_from_checkpoint(loaded.config, bundle / "vae", state, work / "raw", weights="raw",
                                                   base_metrics=loaded.record.get("metrics"),
                                                   base_curves=loaded.record.get("curves"))
                other, loaded = loaded, bs.load_bundle(source)
            else:
                other = bs.load_bundle(rc.bundle_from_checkpoint(loaded.config, bundle / "vae", state, work / "raw",
                                                                 weights="raw"))
        except (ValueError, OSError) as exc:
            err.print(f"[bold red]error:[/] --state {state}: {exc}")
            raise typer.Exit(2)
    report = rc.release_report(loaded, guidances=scales, images_per_prompt=images, other_bundle=other,
                               log=lambda line: err.print(line))
    report["sweep_images"] = 1
    best = rc.with_eval(loaded, eval_guidance=report["guidance"], eval_images_per_prompt=images)
    pictures = {"loss_curves.png": rc.curve_picture(loaded.record["curves"], work / "loss_curves.png")}
    grid, _ = rc.task_grid(best)
    grid.save(work / "samples_per_task.png")
    pictures["samples_per_task.png"] = work / "samples_per_task.png"
    record = dict(loaded.record) | {"config": best.config.to_dict(), "evaluation": report["evaluation"]}
    extra = ""
    if note is not None:
        if not note.is_file():
            err.print(f"[bold red]error:[/] --note {note}: no such file")
            raise typer.Exit(2)
        extra = "\n" + note.read_text()
    card = rc.card_markdown(name, record, report, rebuild, world_note=extra)
    if report_json is not None:
        rc.dump({k: v for k, v in report.items() if k != "evaluation"} | {"name": name}, report_json)
    if dry_run:
        (work / "MODEL_CARD.md").write_text(card)
        err.print(f"dry run: card and pictures in {work}")
        return
    out = rel.package_release(source, name, card=card, card_files=pictures,
                              extra_record={"config": record["config"], "evaluation": report["evaluation"],
                                            "guidance_sweep": report["sweep"], "other_weights": report.get("other")})
    err.print(f"release {name} written to {out} "
              f"({sum(p.stat().st_size for p in out.rglob('*') if p.is_file()) / 2**20:.1f} MB); "
              f"toy-GenEval {report['headline']['overall']:.3f} at guidance {report['guidance']:g}")
    sys.stdout.write(json.dumps({"release": name, "path": str(out), "headline": report["headline"]}, default=str) + "\n")


def release_card(
    name: str = typer.Argument(..., help="the release whose card is corrected, e.g. toy-student/v1"),
    card: Path = typer.Option(..., "--card", help="the corrected MODEL_CARD.md"),
    reason: str = typer.Option(..., "--reason", help="why (kept in the release record)"),
    releases_dir: Path = typer.Option(None, "--releases-dir", help="the releases folder (default: the project's releases/)"),
) -> None:
    """Correct a release's MODEL_CARD.md; its weights, configs and pictures stay byte for byte.

    The card's new sha256 goes into the release record with the reason, the record's into releases/index.json,
    and the release is verified again. A release that does not verify is refused."""
    from snapgen_model.distill.teacher import LoadError
    from snapgen_model.training import release as rel

    if not card.is_file():
        err.print(f"[bold red]error:[/] --card {card}: no such file", soft_wrap=True)
        raise typer.Exit(2)
    try:
        changed = rel.amend_card(name, card.read_bytes(), reason, releases_dir)
    except (LoadError, ValueError, OSError) as exc:
        err.print(f"[bold red]error:[/] {exc}", soft_wrap=True)
        raise typer.Exit(2) from None
    folder = rel.release_path(name, releases_dir)
    if changed:
        err.print(f"release {name}: card amended and verified ({folder / rel.CARD_FILE})", soft_wrap=True)
    else:
        err.print(f"release {name}: the card is unchanged; nothing recorded", soft_wrap=True)
    sys.stdout.write(json.dumps({"release": name, "card": str(folder / rel.CARD_FILE), "changed": changed,
                                 "reason": reason if changed else None}) + "\n")
