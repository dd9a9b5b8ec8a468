"""FSDP for the built-in GPT (`spec.trainer.strategy: fsdp`): sharding, and one checkpoint format.

The model is sharded with PyTorch's FSDP2 (`fully_shard`): each transformer block is one unit (its
parameters are all-gathered just before it runs and freed after), then the root (embeddings, final norm,
tied head). Parameters, gradients and AdamW's state live as `DTensor` shards, 1/world of each per rank.
With `precision: bf16` the blocks compute in bf16 (`MixedPrecisionPolicy`: bf16 parameters for the
forward and backward, gradients reduced in fp32), over fp32 master weights as with DDP.

Checkpoints do not change: `full_model_state` and `full_optimizer_state` gather the unsharded state on
rank 0 (`torch.distributed.checkpoint.state_dict`, CPU-offloaded, so no GPU holds the whole model), and
the optimizer's state is written in `torch.optim.Optimizer.state_dict()`'s own layout (parameters by
index) rather than DCP's (by name). So the model server, a fine-tune's base, and a resume under the
other strategy all read an FSDP checkpoint like a DDP one; loading broadcasts rank 0's copy.

Torch is imported here at module level: only the training loop imports this module.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, cast

import torch
import torch.distributed as tdist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler
from torch.distributed.tensor import DTensor

FIELD = "spec.trainer.strategy"

#: Gather on rank 0 only, in host memory: a checkpoint never needs the whole model on one GPU.
_GATHER = StateDictOptions(full_state_dict=True, cpu_offload=True)
#: Load rank 0's full copy and send every rank its shards (the other ranks read no file).
_SCATTER = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)


def mixed_precision(precision: str) -> MixedPrecisionPolicy:
    """bf16 parameters in compute, fp32 gradient reduction for `bf16`; fp32 throughout otherwise (fp16
    runs keep fp32 parameters under autocast and a gradient scaler, as with DDP)."""
    if precision == "bf16":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def shard_gpt(
    model: nn.Module, device: torch.device, world_size: int, *, precision: str, compile_blocks: bool
) -> None:
    """Shard `model` (a GPT, still on the CPU or already on `device`) in place over all ranks.

    Each block is compiled first when `compile_blocks` (in place, so parameter names keep no
    `_orig_mod.` prefix): per-block compilation is what torch.compile supports under FSDP2's hooks.
    FSDP moves each unit to `device` as it shards it, so a model built on the CPU never sits whole on
    the GPU.
    """
    if not tdist.is_initialized():
        raise ValueError(
            f"{FIELD}: fsdp needs torch.distributed initialised (Ray Train does it for every job; a plain "
            "run calls torch.distributed.init_process_group first)"
        )
    mesh = init_device_mesh(device.type, (world_size,))
    policy = mixed_precision(precision)
    blocks = cast(nn.ModuleList, model.h)
    for block in blocks:
        if compile_blocks:
            block.compile()
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)


def set_gradient_sync(model: nn.Module, sync: bool) -> None:
    """Reduce-scatter the gradients in this backward (the last micro-batch) or keep accumulating them
    unsharded without communication (the others), as DDP's `no_sync` does."""
    cast(FSDPModule, model).set_requires_gradient_sync(sync)


def grad_scaler(device: torch.device, enabled: bool) -> torch.amp.GradScaler:
    """fp16's loss scaler over sharded gradients: one rank's inf skips the step on every rank."""
    return ShardedGradScaler(device.type, enabled=enabled)


def grad_norm(parameters: Iterable[nn.Parameter]) -> torch.Tensor | None:
    """The global L2 norm of the gradients as a plain tensor (sharded norms are summed over ranks)."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return None
    norm = nn.utils.get_total_norm(grads)
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


def clip_grad_norm(parameters: Iterable[nn.Parameter], max_norm: float) -> torch.Tensor | None:
    """`nn.utils.clip_grad_norm_` for sharded gradients: the norm over every rank's shards scales all."""
    params = list(parameters)
    norm = grad_norm(params)
    if norm is not None:
        nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm


# ------------------------------------------------------------------------------------------------
# Checkpoints: full state dicts in the layout DDP runs write
# ------------------------------------------------------------------------------------------------


def full_model_state(model: nn.Module) -> dict[str, Any]:
    """The unsharded `state_dict()` on rank 0 (CPU tensors), {} on the others; a collective."""
    return get_model_state_dict(model, options=_GATHER)


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The unsharded `optimizer.state_dict()` on rank 0, parameters by index as a plain optimizer
    writes it; {} on the others. A collective."""
    named = get_optimizer_state_dict(model, optimizer, options=_GATHER)
    if not named:
        return {}
    index = {name: i for i, name in enumerate(parameter_names(model, optimizer))}
    return _rekey(named, index)


def load_model_state(model: nn.Module, state: dict[str, Any]) -> None:
    """Load a full `state_dict()` that rank 0 passes (the others pass {}) into the sharded model."""
    set_model_state_dict(model, state, options=_SCATTER)


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load a full `optimizer.state_dict()` (parameters by index, DDP's or FSDP's checkpoint) that rank 0
    passes (the others pass {}) into the sharded optimizer."""
    if state:
        names = parameter_names(model, optimizer)
        state = _rekey(state, dict(enumerate(names)))
    set_optimizer_state_dict(model, optimizer, state, options=_SCATTER)
    # The broadcast carries tuples as lists (AdamW's `betas`): give each setting its default's type back,
    # so the next checkpoint is the one an uninterrupted run writes.
    for group in optimizer.param_groups:
        for key, default in optimizer.defaults.items():
            if isinstance(default, tuple) and isinstance(group.get(key), list):
                group[key] = tuple(group[key])


def parameter_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The optimizer's parameters by name, in the order `Optimizer.state_dict()` numbers them (a tied
    parameter under its first name, as `named_parameters` and DCP name it)."""
    names = {param: name for name, param in model.named_parameters()}
    return [names[p] for group in optimizer.param_groups for p in group["params"]]


def _rekey(state: dict[str, Any], key: dict[Any, Any]) -> dict[str, Any]:
    """An optimizer state dict with every parameter reference mapped through `key`."""
    return {
        "state": {key[k]: v for k, v in state["state"].items()},
        "param_groups": [{**g, "params": [key[p] for p in g["params"]]} for g in state["param_groups"]],
    }
