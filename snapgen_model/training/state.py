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


def save_state(folder: str | os.PathLike, *, modules: dict[str, Any], optimizer, scheduler, step: int,
               extra: dict[str, Any]) -> Path:
    """Write the state folder atomically (temp folder + rename; state.json last). `modules` maps a name to a
    module or to its (full) state dict; `optimizer` is an optimiser or its state dict (a sharded run passes
    the states it gathered, `training.fsdp`)."""
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    states = {m: mod if isinstance(mod, dict) else mod.state_dict() for m, mod in modules.items()}
    weights = {f"{m}/{k}": v.detach().cpu().contiguous() for m, state in states.items() for k, v in state.items()}
    save_file(weights, tmp / "modules.safetensors")
    opt_tensors, opt_meta = _flatten_optimizer(optimizer if isinstance(optimizer, dict) else optimizer.state_dict())
    save_file(opt_tensors, tmp / "optimizer.safetensors")
    save_file({"cpu": torch.get_rng_state()}, tmp / "rng.safetensors")
    meta = {"step": step, "optimizer": opt_meta, "scheduler": scheduler.state_dict() if scheduler else None} | extra
    (tmp / STATE_FILE).write_text(json.dumps(meta, default=str))
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return folder


def read_state_meta(folder: str | os.PathLike) -> dict[str, Any]:
    """state.json of a state folder; `CheckpointError` naming the file when it is missing or unreadable."""
    from snapgen_model.storage.checkpoint import CheckpointError

    path = Path(folder) / STATE_FILE
    if not path.is_file():
        raise CheckpointError(f"{Path(folder)}: not a complete training state (no {STATE_FILE})")
    try:
        meta = json.loads(path.read_text())
        int(meta["step"])
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path}: unreadable training state ({type(exc).__name__}: {exc}); remove the folder "
                              "to resume from an earlier checkpoint") from None
    return meta


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file of a state folder, checked first (no pickles, no truncated files)."""
    from snapgen_model.storage.checkpoint import CheckpointError, check_safetensors

    check_safetensors(path)
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors' own error types for corrupt contents
        raise CheckpointError(f"{path}: unreadable safetensors file ({exc})") from None


COMPILE_PREFIX = "_orig_mod."  # how torch.compile's wrapper names the wrapped module's parameters


def _without_compile_prefix(state: dict[str, torch.Tensor], module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A state written from a torch.compile'd module (before 2026-12-07 checkpoints held the wrapper's keys,
    "_orig_mod.<name>") loaded into the plain module: the prefix dropped. Other states as they are."""
    if not state or not all(k.startswith(COMPILE_PREFIX) for k in state):
        return state
    if any(k.startswith(COMPILE_PREFIX) for k in module.state_dict()):
        return state  # loading into a compiled module: its own keys carry the prefix too
    return {k[len(COMPILE_PREFIX):]: v for k, v in state.items()}


def _mismatch(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> str:
    own = module.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    shapes = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    return "; ".join(filter(None, [f"missing {missing[:3]}" if missing else "",
                                   f"unexpected {unexpected[:3]}" if unexpected else "",
                                   f"shape mismatch {shapes[:3]}" if shapes else ""]))


def load_state(folder: str | os.PathLike, *, modules: dict[str, torch.nn.Module], optimizer=None,
               scheduler=None, load_module: Callable[[torch.nn.Module, dict], None] | None = None,
               load_optimizer: Callable[[Any, dict], None] | None = None) -> dict[str, Any]:
    """Restore modules (strict), optimiser, scheduler and RNG from a state folder; returns state.json.
    A truncated, pickled or foreign-architecture state raises `CheckpointError` naming the file.
    `load_module(module, state)` / `load_optimizer(optimizer, state)` replace `load_state_dict` (a sharded
    run loads the full state onto its shards, `training.fsdp`)."""
    from snapgen_model.storage.checkpoint import CheckpointError

    folder = Path(folder)
    meta = read_state_meta(folder)
    weights_path = folder / "modules.safetensors"
    weights = _load_tensors(weights_path)
    for name, mod in modules.items():
        prefix = f"{name}/"
        sub = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
        sub = _without_compile_prefix(sub, mod)
        detail = _mismatch(mod, sub)
        if detail:
            raise CheckpointError(f"{weights_path}: weights of {name!r} do not fit the model being trained ({detail}); "
                                  "the state comes from another architecture or configuration")
        if load_module is not None:
            load_module(mod, sub)
        else:
            mod.load_state_dict(sub, strict=True)
    if optimizer is not None:
        opt_path = folder / "optimizer.safetensors"
        try:
            opt_state = _unflatten_optimizer(_load_tensors(opt_path), meta["optimizer"])
            if load_optimizer is not None:
                load_optimizer(optimizer, opt_state)
            else:
                optimizer.load_state_dict(opt_state)
        except (ValueError, KeyError, RuntimeError) as exc:
            raise CheckpointError(f"{opt_path}: optimiser state does not fit this run ({exc})") from None
    if scheduler is not None and meta.get("scheduler"):
        scheduler.load_state_dict(meta["scheduler"])
    torch.set_rng_state(_load_tensors(folder / "rng.safetensors")["cpu"])
    return meta


def latest_state(root: str | os.PathLike) -> Path | None:
    """The newest complete `step-*` folder under root, if any."""
    root = Path(root)
    done = sorted(p for p in root.glob("step-*") if (p / STATE_FILE).is_file() and not p.name.endswith(".tmp"))
    return done[-1] if done else None


class TrainingInterrupted(SystemExit):
    """A run stopped by SIGTERM before its last step, its state saved: the process must stop, not carry on as
    if training had finished (a pipeline would otherwise save, evaluate and promote a half-trained model).

    A `SystemExit` with the shell's code for SIGTERM (143), so an orchestrator does not retry it in the
    process that is being stopped (Prefect records a crash) and the process exits as a stopped one does; the
    next run resumes from the saved state."""

    def __init__(self, stage: str, step: int, total: int, state: Path | None) -> None:
        super().__init__(143)
        self.stage, self.step, self.total, self.state = stage, step, total, state
        self.message = (f"{stage}: stopped by SIGTERM at step {step} of {total}; its state is saved at {state}: "
                        "run the same command again to resume from it")

    def __str__(self) -> str:
        return self.message


class StateCheckpoint(pl.Callback):
    """Every `every` steps, on SIGTERM and at the end: write the full state; keep the newest `keep`.
    A SIGTERM saves the state and stops the trainer; `raise_if_interrupted` then ends the run with
    `TrainingInterrupted` (the caller's `fit` calls it after `trainer.fit`)."""

    def __init__(self, root: str | os.PathLike, every: int, keep: int = 3,
                 upload: Callable[[Path], None] | None = None, handle_sigterm: bool = True) -> None:
        self.root, self.every, self.keep, self.upload = Path(root), every, keep, upload
        self.handle_sigterm, self.sigterm = handle_sigterm, False
        self.saved: list[Path] = []
        self.last_saved_step: int | None = None  # on every rank (only global rank 0 writes files)

    def on_train_start(self, trainer, pl_module) -> None:
        if self.handle_sigterm:  # every rank: a pod/process group stop signals all of them
            signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum, frame) -> None:
        self.sigterm = True

    def save(self, trainer, pl_module) -> Path | None:
        """Collective: every rank calls it (the barrier); global rank 0 writes."""
        step = pl_module.current_step()
        path = None
        gather = getattr(pl_module, "before_state_save", None)
        if gather is not None:  # collective: e.g. every rank's stream data position
            gather(trainer)
        if trainer.is_global_zero:
            path = pl_module.save_training_state(self.root / f"step-{step:08d}", trainer)
            self.saved.append(path)
            if self.upload is not None:
                self.upload(path)
            for old in sorted(p for p in self.root.glob("step-*") if not p.name.endswith(".tmp"))[:-self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        self.last_saved_step = step
        trainer.strategy.barrier()
        return path

    def _stop_requested(self, trainer) -> bool:
        """SIGTERM seen by any rank (all ranks must agree before the collective save)."""
        if trainer.world_size > 1:
            return bool(trainer.strategy.reduce_boolean_decision(self.sigterm, all=False))
        return self.sigterm

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = pl_module.current_step()
        if self._stop_requested(trainer):
            self.save(trainer, pl_module)
            trainer.should_stop = True
        elif self.every and step % self.every == 0:
            self.save(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.last_saved_step != pl_module.current_step():  # the same decision on every rank
            self.save(trainer, pl_module)

    def raise_if_interrupted(self, stage: str, step: int, total: int) -> None:
        """After `trainer.fit`: a SIGTERM that stopped the run before step `total` raises `TrainingInterrupted`
        (logged as a warning first, naming the saved state); a run that reached `total` returns."""
        if not self.sigterm or step >= total:
            return
        import logging

        error = TrainingInterrupted(stage, step, total, latest_state(self.root))
        logging.getLogger(__name__).warning("%s", error.message)
        raise error
