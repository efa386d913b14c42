"""Fully sharded data parallelism (torch FSDP2, `fully_shard`) for the pretraining stage (plain PyTorch).

`pretrain.strategy=fsdp` runs Lightning's `ModelParallelStrategy` with a one-dimensional data-parallel
mesh (every rank holds 1/world of each parameter, gradient and AdamW moment; the full weights of a unit
exist only while it runs). It runs on GPUs with NCCL and on CPUs with gloo: the same code path, which is
what the CPU tests exercise.

What is sharded (`shard_pretraining`): every residual block and spatial transformer of the UNet, then the
UNet itself (the rest: stems, time MLP, up/down samplers, output head), the text conditioner, the KD
feature projector's convolution, and the EMA copies of the saved modules with the same units, so that the
EMA update is a local lerp of equally-sharded tensors (no communication). The frozen teacher is not
sharded (it has no gradients or optimiser state; at full scale it is a separate inference copy).

Checkpoints stay the single-file format of `training.state` (safetensors, full tensors, optimiser state
indexed by parameter position): `full_module_state` and `full_optimizer_state` gather them (collective:
every rank calls them, rank 0 receives the tensors), and `load_module_state` / `load_optimizer_state` shard
a full state back onto this rank. A state written by a DDP run resumes under FSDP and the other way round.
"""
from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn

def _unit_types() -> tuple[type[nn.Module], ...]:
    from snapgen_model.nn.attention import SpatialTransformer
    from snapgen_model.nn.blocks import ResBlock

    return (ResBlock, SpatialTransformer)


def is_sharded(module: nn.Module | None) -> bool:
    """Whether `module` holds DTensor (sharded) parameters."""
    if module is None:
        return False
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in module.parameters())


def shard(module: nn.Module, mesh, units: Iterable[type[nn.Module]] = ()) -> nn.Module:
    """`fully_shard` every submodule of the `units` types (innermost first), then `module` itself.
    A module without parameters is left as it is."""
    from torch.distributed.fsdp import fully_shard

    unit_types = tuple(units)
    if unit_types:
        for sub in reversed(list(module.modules())):
            if sub is not module and isinstance(sub, unit_types) and any(True for _ in sub.parameters()):
                fully_shard(sub, mesh=mesh)
    if any(True for _ in module.parameters()):
        fully_shard(module, mesh=mesh)
    return module


def shard_pretraining(student: nn.Module, conditioner: nn.Module | None, projector: nn.Module,
                      ema_copies: dict[str, nn.Module], mesh) -> None:
    """Shard the modules a pretraining step trains, and the EMA copies in the same units (module docstring)."""
    units = _unit_types()
    shard(student, mesh, units)
    if conditioner is not None:
        shard(conditioner, mesh)
    proj = getattr(projector, "proj", None)  # FeatureProjector: its conv is called directly for non-square grids
    if isinstance(proj, nn.Module):
        shard(proj, mesh)
    for name, copy in ema_copies.items():
        shard(copy, mesh, units if name == "student" else ())


def _options(full: bool = True):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=full, cpu_offload=True)


def full_module_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """The full (unsharded) state dict of `module`, on CPU. Collective for a sharded module: every rank
    calls it; rank 0 receives the tensors, the other ranks an empty dict."""
    if not is_sharded(module):
        return {k: v.detach().cpu() for k, v in module.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(module, options=_options())


def load_module_state(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a full state dict into `module` (strict); a sharded module keeps only this rank's shards."""
    if not is_sharded(module):
        module.load_state_dict(state, strict=True)
        return
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    set_model_state_dict(module, state, options=_options())


def _param_fqns(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The fully qualified names of the optimiser's parameters, in its own order (param_groups, then position)."""
    names = {id(p): n for n, p in model.named_parameters()}
    try:
        return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    except KeyError:
        raise ValueError("optimizer holds a parameter that is not part of the model it is saved with") from None


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimiser's full state in torch's own layout (state and param_groups indexed by parameter position),
    gathered from the shards. Collective: every rank calls it; rank 0 receives the tensors."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    fqns = _param_fqns(model, optimizer)
    by_name = get_optimizer_state_dict(model, optimizer, options=_options())
    index = {n: i for i, n in enumerate(fqns)}
    state = {index[n]: entry for n, entry in by_name.get("state", {}).items()}
    groups = [dict(g, params=[index[n] for n in g["params"]]) for g in by_name.get("param_groups", [])]
    return {"state": state, "param_groups": groups}


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load a full optimiser state in torch's layout (as `full_optimizer_state` returns it, or a plain
    `optimizer.state_dict()` of an unsharded run) into the sharded optimiser of this rank."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    fqns = _param_fqns(model, optimizer)
    groups = state["param_groups"]
    count = sum(len(g["params"]) for g in groups)
    if count != len(fqns):
        raise ValueError(f"optimizer state has {count} parameters, the model being trained {len(fqns)}")
    by_name = {"state": {fqns[int(i)]: entry for i, entry in state["state"].items()},
               "param_groups": [dict(g, params=[fqns[int(i)] for i in g["params"]]) for g in groups]}
    set_optimizer_state_dict(model, optimizer, by_name, options=_options())
