"""Prepare a multi-node pretraining run: fetch the teacher cache and write the launcher's spec.

    python infra/scripts/pretrain_spec.py --cache s3://bucket/.../cache/KEY --preset snapgen-1024 \
        --nodes 2 --gpus-per-node 8 --set steps=100000 --out /shared/pretrain/spec.json

Every node then runs ``torchrun --nnodes N --nproc-per-node G ... -m snapgen_model.training.launch
SPEC`` (docs/training.md, infra/k8s/pretrain-multinode-job.yaml). The spec holds local paths only,
so ``SNAPGEN_HOME`` must be on storage every node mounts (the cache is downloaded under
``$SNAPGEN_HOME/cache``, state goes to ``$SNAPGEN_HOME/runs/pretrain-<key>/state``).

The spec's ``devices``/``num_nodes`` are set from --gpus-per-node/--nodes (Lightning refuses a
world size that differs from torchrun's), ``strategy`` defaults to ``ddp`` and ``accelerator`` to
``gpu``; the global batch must divide by the world size. The spec is plain JSON (no secrets).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pretrain_spec.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--cache", required=True, help="teacher cache URI (snapgen cache output: s3://, file:// or a path)")
    p.add_argument("--preset", default="toy", help="model preset, e.g. snapgen-1024")
    p.add_argument("--preset-set", action="append", default=[], metavar="KEY=VALUE", help="preset override (repeatable)")
    p.add_argument("--set", dest="set_", action="append", default=[], metavar="KEY=VALUE",
                   help="PretrainConfig override (repeatable), e.g. --set steps=100000")
    p.add_argument("--nodes", type=int, required=True, help="nodes (torchrun --nnodes; the Indexed Job's completions)")
    p.add_argument("--gpus-per-node", type=int, required=True, help="processes per node (torchrun --nproc-per-node)")
    p.add_argument("--resume", default="latest", help="latest | none | a state folder")
    p.add_argument("--out", required=True, type=Path, help="where to write the spec (on the shared volume)")
    return p


def _has(overrides: list[str], key: str) -> bool:
    return any(o.split("=", 1)[0].strip() == key for o in overrides)


def build_spec(cache_dir: str | Path, manifest: dict[str, Any], *, preset: str, preset_overrides: list[str],
               pretrain_overrides: list[str], nodes: int, gpus_per_node: int, home: str | Path,
               resume: str = "latest") -> dict[str, Any]:
    """The spec `snapgen_model.training.launch` reads, for `nodes` x `gpus_per_node` processes."""
    from snapgen_model.config_base import ConfigError
    from snapgen_model.distill.cache import CacheConfig
    from snapgen_model.presets import get_preset
    from snapgen_model.training.pretrain import PretrainConfig
    from tasks.pretrain import run_key

    if nodes < 1 or gpus_per_node < 1:
        raise ConfigError("--nodes and --gpus-per-node must be >= 1")
    for key in ("devices", "num_nodes"):
        if _has(pretrain_overrides, key):
            raise ConfigError(f"pretrain.{key}: set it with --nodes/--gpus-per-node, not --set")
    defaults = [] if _has(pretrain_overrides, "strategy") else ["strategy=ddp"]
    defaults += [] if _has(pretrain_overrides, "accelerator") else ["accelerator=gpu"]
    cfg = PretrainConfig().with_overrides([*defaults, *pretrain_overrides, f"devices={gpus_per_node}",
                                           f"num_nodes={nodes}"])
    world = nodes * gpus_per_node
    if cfg.batch_size % world:
        raise ConfigError(f"pretrain.batch_size: {cfg.batch_size} does not divide by the world size {world} "
                          f"({nodes} nodes x {gpus_per_node} GPUs)")
    get_preset(preset, preset_overrides)  # fail fast on a bad preset or override
    cache_cfg = CacheConfig.from_dict(manifest["config"])
    key = run_key(manifest, preset, preset_overrides, cfg)
    run_dir = Path(home) / "runs" / f"pretrain-{key}"
    return {
        "preset": preset,
        "overrides": list(preset_overrides),
        "pretrain": cfg.to_dict(),
        "cache": cache_cfg.to_dict(),
        "cache_dir": str(cache_dir),
        "encoders": [e["name"] for e in manifest["encoders"]],
        "state_root": str(run_dir / "state"),
        "result_path": str(run_dir / "result.json"),
        "resume": resume,
    }


def write_json_atomic(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from snapgen_model.config_base import ConfigError
    from tasks.cache import local_folder
    from tasks.settings import get_settings

    settings = get_settings()
    cache_uri = args.cache if "://" in args.cache else "file://" + str(Path(args.cache).expanduser().resolve())
    try:
        folder = local_folder(cache_uri)  # s3:// caches are downloaded once under $SNAPGEN_HOME/cache
        manifest = json.loads((folder / "manifest.json").read_text())
        spec = build_spec(folder, manifest, preset=args.preset, preset_overrides=args.preset_set,
                          pretrain_overrides=args.set_, nodes=args.nodes, gpus_per_node=args.gpus_per_node,
                          home=settings.home, resume=args.resume)
    except (ConfigError, FileNotFoundError, KeyError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    write_json_atomic(args.out, spec)
    print(f"wrote {args.out}: {args.nodes} nodes x {args.gpus_per_node} GPUs, state {spec['state_root']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
