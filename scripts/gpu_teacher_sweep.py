"""One-call accelerator sweep of the toy-release teacher recipe (issue 14's levers, measured one at a time).

Why: a teacher recipe is judged by toy-GenEval after thousands of steps, which costs hours per variant
on 2 CPU cores. When a session is lent a GPU, this script trains several *CPU-affordable* variants of
the `toy-release` bootstrap preset side by side on it, with the project's own code path
(`snapgen_model.training.bootstrap.train_autoencoder` / `train_teacher`, `save_bundle`, `load_bundle`,
`release_card.release_report`), and records for each:

* toy-GenEval of the EMA and raw weights every `--probe-every` steps (every toy prompt x 1 image at
  guidance 1 and 3), i.e. quality against steps;
* for a finished run, the release scoring: guidance sweep, then every toy prompt x 4 images at the best
  guidance with the reference rows (clean / AE / prompt-blind floor / noise), raw beside EMA;
* the finished bundles, packed as fp16 release folders (`release.package_release`) for the best runs.

Every variant is `toy-release` plus overrides of training fields, so a variant's config hash is the hash
the `toy-release` preset gets once its defaults are set to the winner's values.

Run (one prepared call, everything under a deadline; partial results are always written):

    python scripts/gpu_teacher_sweep.py --out $OUT --deadline-s 430 --hard-stop-s 520
    python scripts/gpu_teacher_sweep.py --out /tmp/sweep --smoke     # the same path in seconds on a CPU
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# name -> overrides of toy-release (training fields only; every one CPU-affordable: <= ~770k images)
VARIANTS: dict[str, list[str]] = {
    "A-b64-8k-lr1e-3": ["teacher_steps=8000"],
    "B-b64-8k-lr2e-3": ["teacher_steps=8000", "teacher_lr=2e-3", "teacher_warmup_steps=400"],
    "C-b128-6k-lr2e-3": ["teacher_steps=6000", "teacher_batch=128", "teacher_lr=2e-3", "teacher_warmup_steps=300"],
    "E-b256-3k-lr3e-3": ["teacher_steps=3000", "teacher_batch=256", "teacher_lr=3e-3", "teacher_warmup_steps=200"],
    "G-b128-12k-lr2e-3": ["teacher_steps=12000", "teacher_batch=128", "teacher_lr=2e-3", "teacher_warmup_steps=300"],
    "F-4L-b64-10k-lr2e-3": ["teacher_steps=10000", "teacher_layers=4", "teacher_lr=2e-3", "teacher_warmup_steps=400"],
}
SMOKE_BASE = ["pool_size=512", "ae_steps=30", "eval_steps=4", "log_every=5", "teacher_time_budget_s=0",
              "ae_time_budget_s=0"]
SMOKE_VARIANTS = {"A-smoke": ["teacher_steps=20"], "B-smoke": ["teacher_steps=20", "teacher_lr=2e-3"]}
COMMON = ["checkpoint_every=0"]  # outside the config hash (NOT_TRAINING): one state file, at the end


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def base_overrides(smoke: bool) -> list[str]:
    return COMMON + (SMOKE_BASE if smoke else [])


class Deadline(Exception):
    """Raised from the progress callback when the sweep's training deadline has passed."""


# ----------------------------------------------------------------------------- worker

def run_worker(name: str, overrides: list[str], work: Path, vae_dir: Path, stop_at: float, probe_every: int,
               smoke: bool) -> None:
    import torch
    from diffusers import AutoencoderKL

    from snapgen_model.training import bootstrap as bs
    from snapgen_model.training import release_card as rc
    from snapgen_model.training.release import package_release

    torch.set_num_threads(2)
    dev = _device()
    out = work / name
    out.mkdir(parents=True, exist_ok=True)
    cfg = bs.get_bootstrap_config("toy-release", base_overrides(smoke) + overrides)
    if smoke:
        cfg = cfg.with_overrides(["eval_prompts_per_task=2"])
    result: dict = {"variant": name, "overrides": overrides, "config_hash": cfg.content_hash(), "device": dev,
                    "status": "running", "probes": [], "started": time.time()}

    def save() -> None:
        tmp = out / ".result.json.tmp"
        tmp.write_text(json.dumps(result, indent=1, default=str))
        os.replace(tmp, out / "result.json")

    vae = AutoencoderKL.from_pretrained(str(vae_dir)).to(dev).eval()
    ae_record = json.loads((vae_dir.parent / "ae.json").read_text())

    def progress(phase: str, step: int, total: int, info: dict) -> None:
        result["last"] = {"step": step, "loss": info.get("loss"), "elapsed_s": info.get("elapsed_s")}
        if time.time() > stop_at:
            raise Deadline(f"deadline at step {step}")

    def probe(step: int, models: dict) -> None:
        row: dict = {"step": step, "elapsed_s": round(time.time() - result["started"], 1)}
        for kind, m in models.items():
            if kind == "raw" and step % (2 * probe_every):
                continue
            folder = out / f"probe-{kind}"
            bs.save_bundle(folder, cfg, vae, m.transformer, m.text_model, m.tokenizer, {}, {})
            bundle = bs.load_bundle(folder, dev)
            for g in ((1.0, 3.0) if kind == "ema" else (3.0,)):
                ev = rc.evaluate_bundle_without_reference(rc.with_eval(bundle, eval_guidance=g, eval_images_per_prompt=1))
                h = rc.headline(ev)
                row[f"{kind}_g{g:g}"] = {"overall": h["overall"], "exact_count": h["exact_count"],
                                         "splits": h["splits"], "tasks": h["tasks"]}
        result["probes"].append(row)
        save()
        log(f"{name} step {step}: " + ", ".join(f"{k} {v['overall']:.3f}/{v['exact_count']:.3f}"
                                                  for k, v in row.items() if isinstance(v, dict)))

    state_dir = out / "state"
    try:
        models, tr = bs.train_teacher(cfg, None, vae, dev, progress, checkpoint_dir=state_dir, probe=probe,
                                      probe_every=probe_every)
    except Deadline as exc:
        result["status"] = f"cut: {exc}"
        save()
        log(f"{name}: {result['status']}")
        return
    result["train"] = tr.metrics
    result["curve"] = tr.curve
    bundle_dir = out / "bundle"
    bs.save_bundle(bundle_dir, cfg, vae, models.transformer, models.text_model, models.tokenizer,
                   ae_record["metrics"] | tr.metrics, {"autoencoder": ae_record["curve"], "teacher": tr.curve})
    result["status"] = "trained"
    save()
    log(f"{name}: trained {tr.metrics['teacher_steps']} steps in {tr.metrics['teacher_seconds']:.0f} s; scoring")
    raw_dir = rc.bundle_from_checkpoint(cfg, bundle_dir / "vae", state_dir / bs.TEACHER_STATE, out / "raw", weights="raw")
    bundle, raw = bs.load_bundle(bundle_dir, dev), bs.load_bundle(raw_dir, dev)
    report = rc.release_report(bundle, guidances=(1.0, 2.0, 3.0, 4.0, 5.0), images_per_prompt=4 if not smoke else 1,
                               sweep_images=1, raw_bundle=raw, log=lambda line: log(f"{name}: {line}"))
    result["report"] = {k: v for k, v in report.items() if k != "evaluation"}
    result["status"] = "scored"
    save()
    package_release(bundle_dir, f"toy-teacher/{name}", card=f"sweep variant {name} (card written at release time)\n",
                    extra_record={"sweep_variant": name, "trained_on": dev}, releases_dir=out / "releases")
    result["status"] = "done"
    save()
    log(f"{name}: done, toy-GenEval {report['headline']['overall']:.3f} at guidance {report['guidance']:g}")


# ----------------------------------------------------------------------------- orchestrator

def train_shared_autoencoder(work: Path, smoke: bool) -> Path:
    import torch

    from snapgen_model.training import bootstrap as bs

    torch.set_num_threads(4)
    cfg = bs.get_bootstrap_config("toy-release", base_overrides(smoke))
    started = time.time()
    vae, result = bs.train_autoencoder(cfg, None, _device())
    vae_dir = work / "ae" / "vae"
    vae.save_pretrained(vae_dir)
    (work / "ae" / "ae.json").write_text(json.dumps({"metrics": result.metrics, "curve": result.curve,
                                                     "seconds": round(time.time() - started, 1)}, default=str))
    log(f"autoencoder: {result.metrics}")
    return vae_dir


def collect(work: Path, names: list[str]) -> dict:
    out = {}
    for n in names:
        p = work / n / "result.json"
        out[n] = json.loads(p.read_text()) if p.is_file() else {"variant": n, "status": "no result"}
        err = work / n / "error.txt"
        if err.is_file():
            out[n]["status"] = f"error (was {out[n].get('status')})"
            out[n]["error"] = err.read_text()[-4000:]
    return out


def score_of(r: dict) -> float:
    h = (r.get("report") or {}).get("headline")
    return (h["overall"] + h["exact_count"]) / 2 if h else -1.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--work", type=Path, default=Path("/tmp/snapgen-sweep"))
    ap.add_argument("--deadline-s", type=float, default=450.0, help="training stops (cut) this many s after start")
    ap.add_argument("--hard-stop-s", type=float, default=530.0, help="workers are killed this many s after start")
    ap.add_argument("--probe-every", type=int, default=1000)
    ap.add_argument("--variants", default="all")
    ap.add_argument("--keep", type=int, default=4, help="finished bundles packed into --out (best first)")
    ap.add_argument("--smoke", action="store_true", help="tiny steps: checks the whole path on a CPU")
    ap.add_argument("--worker")
    ap.add_argument("--stop-at", type=float)
    ap.add_argument("--vae-dir", type=Path)
    args = ap.parse_args()
    table = SMOKE_VARIANTS if args.smoke else VARIANTS
    if args.worker:
        try:
            run_worker(args.worker, table[args.worker], args.work, args.vae_dir, args.stop_at,
                       5 if args.smoke else args.probe_every, args.smoke)
        except Exception:
            (args.work / args.worker).mkdir(parents=True, exist_ok=True)
            (args.work / args.worker / "error.txt").write_text(traceback.format_exc())
            raise
        return 0
    t0 = time.time()
    args.out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    names = list(table) if args.variants == "all" else args.variants.split(",")
    summary: dict = {"started": t0, "variants": {n: table[n] for n in names}}
    try:
        import torch

        summary["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
        summary["torch"] = torch.__version__
        vae_dir = train_shared_autoencoder(args.work, args.smoke)
        summary["autoencoder_s"] = round(time.time() - t0, 1)
        procs = {}
        for n in names:
            logf = (args.work / f"{n}.log").open("w")
            procs[n] = subprocess.Popen(
                [sys.executable, __file__, "--worker", n, "--out", str(args.out), "--work", str(args.work), "--vae-dir", str(vae_dir),
                 "--stop-at", str(t0 + args.deadline_s), "--probe-every", str(args.probe_every)]
                + (["--smoke"] if args.smoke else []), stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
        while any(p.poll() is None for p in procs.values()) and time.time() < t0 + args.hard_stop_s:
            time.sleep(5)
        for n, p in procs.items():
            if p.poll() is None:
                log(f"{n}: killed at the hard stop")
                os.killpg(p.pid, signal.SIGKILL)
            summary.setdefault("exit", {})[n] = p.wait()
    except Exception:  # keep whatever finished
        summary["error"] = traceback.format_exc()
        log(summary["error"])
    results = collect(args.work, names)
    ae = args.work / "ae" / "ae.json"
    summary["autoencoder"] = json.loads(ae.read_text()) if ae.is_file() else None
    summary["results"] = results
    summary["seconds"] = round(time.time() - t0, 1)
    (args.out / "sweep_results.json").write_text(json.dumps(summary, indent=1, default=str))
    ranked = sorted((n for n in names if results[n].get("status") == "done"), key=lambda n: -score_of(results[n]))
    for n in ranked[:args.keep]:
        rel = args.work / n / "releases" / "toy-teacher" / n
        with tarfile.open(args.out / f"bundle-{n}.tar", "w") as tar:
            tar.add(rel, arcname=n)
    with (args.out / "worker_logs.txt").open("w") as fh:
        for n in names:
            p = args.work / f"{n}.log"
            fh.write(f"===== {n}\n" + (p.read_text()[-20000:] if p.is_file() else "(none)\n"))
    for n in names:
        r = results[n]
        last = r["probes"][-1] if r.get("probes") else {}
        log(f"{n}: {r.get('status')}; score {score_of(r):.3f}; last probe step {last.get('step')}: "
            + ", ".join(f"{k} {v['overall']:.3f}" for k, v in last.items() if isinstance(v, dict)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
