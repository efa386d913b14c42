"""Full training state as safetensors + JSON (no pickles), and the Lightning callbacks that write it.

A state folder `step-NNNNNNNN/` holds `modules.safetensors` (every trainable module and the EMA),
`optimizer.safetensors` (optimiser tensors, flattened), `rng.safetensors` (torch RNG state) and
`state.json` (step, counters, optimiser param groups, scheduler state, configs), written last.
`upload` hands a finished folder to storage (injected by the task layer; this module does no I/O
beyond the local folder).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path
from typing import Any, Callable

import lightning.pytorch as pl
import torch
from safetensors.torch import load_file, save_file

STATE_FILE = "state.json"


def _flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors, scalars = {}, {}
    for pid, entry in state["state"].items():
        for name, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{pid}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{pid}.{name}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in list(tensors.items()) + list(meta["scalars"].items()):
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save_state(folder: str | os.PathLike, *, modules: dict[str, torch.nn.Module], optimizer, scheduler, step: int,
               extra: dict[str, Any]) -> Path:
    """Write the state folder atomically (temp folder + rename; state.json last)."""
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    weights = {f"{m}/{k}": v.detach().cpu().contiguous() for m, mod in modules.items() for k, v in mod.state_dict().items()}
    save_file(weights, tmp / "modules.safetensors")
    opt_tensors, opt_meta = _flatten_optimizer(optimizer.state_dict())
    save_file(opt_tensors, tmp / "optimizer.safetensors")
    save_file({"cpu": torch.get_rng_state()}, tmp / "rng.safetensors")
    meta = {"step": step, "optimizer": opt_meta, "scheduler": scheduler.state_dict() if scheduler else None} | extra
    (tmp / STATE_FILE).write_text(json.dumps(meta, default=str))
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return folder


def load_state(folder: str | os.PathLike, *, modules: dict[str, torch.nn.Module], optimizer=None,
               scheduler=None) -> dict[str, Any]:
    """Restore modules (strict), optimiser, scheduler and RNG from a state folder; returns state.json."""
    folder = Path(folder)
    if not (folder / STATE_FILE).is_file():
        raise FileNotFoundError(f"{folder}: not a complete training state (no {STATE_FILE})")
    meta = json.loads((folder / STATE_FILE).read_text())
    weights = load_file(str(folder / "modules.safetensors"))
    for name, mod in modules.items():
        prefix = f"{name}/"
        mod.load_state_dict({k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}, strict=True)
    if optimizer is not None:
        optimizer.load_state_dict(_unflatten_optimizer(load_file(str(folder / "optimizer.safetensors")),
                                                       meta["optimizer"]))
    if scheduler is not None and meta.get("scheduler"):
        scheduler.load_state_dict(meta["scheduler"])
    torch.set_rng_state(load_file(str(folder / "rng.safetensors"))["cpu"])
    return meta


def latest_state(root: str | os.PathLike) -> Path | None:
    """The newest complete `step-*` folder under root, if any."""
    root = Path(root)
    done = sorted(p for p in root.glob("step-*") if (p / STATE_FILE).is_file() and not p.name.endswith(".tmp"))
    return done[-1] if done else None


class StateCheckpoint(pl.Callback):
    """Every `every` steps, on SIGTERM and at the end: write the full state; keep the newest `keep`."""

    def __init__(self, root: str | os.PathLike, every: int, keep: int = 3,
                 upload: Callable[[Path], None] | None = None, handle_sigterm: bool = True) -> None:
        self.root, self.every, self.keep, self.upload = Path(root), every, keep, upload
        self.handle_sigterm, self.sigterm = handle_sigterm, False
        self.saved: list[Path] = []

    def on_train_start(self, trainer, pl_module) -> None:
        if self.handle_sigterm and trainer.is_global_zero:
            signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum, frame) -> None:
        self.sigterm = True

    def save(self, trainer, pl_module) -> Path | None:
        step = pl_module.current_step()
        path = None
        if trainer.is_global_zero:
            path = pl_module.save_training_state(self.root / f"step-{step:08d}", trainer)
            self.saved.append(path)
            if self.upload is not None:
                self.upload(path)
            for old in sorted(p for p in self.root.glob("step-*") if not p.name.endswith(".tmp"))[:-self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        trainer.strategy.barrier()
        return path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = pl_module.current_step()
        if self.sigterm:
            self.save(trainer, pl_module)
            trainer.should_stop = True
        elif self.every and step % self.every == 0:
            self.save(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if not self.saved or self.saved[-1].name != f"step-{pl_module.current_step():08d}":
            self.save(trainer, pl_module)
