"""Running under ``torchrun``: process group, DDP / FSDP wrapping, gathering for saving.

``torchrun --nproc_per_node N -m deltatune.cli train ...`` (or the ``deltatune`` script) sets
``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK``; :func:`init` then joins the process group (NCCL on
GPUs, gloo on CPU). Each process reads its share of every global batch; gradients are averaged
by PyTorch's DistributedDataParallel, or — with ``fsdp=True`` — the model is wrapped in
FullyShardedDataParallel so that parameters (including the adapter's), gradients and the
optimizer state are sharded across processes. Nothing here is a home-made process scheme.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device: torch.device | None = None) -> torch.device:
    """Join the process group torchrun prepared (no-op for one process); returns this rank's device."""
    if device is None:
        device = default_device()
    if launched_by_torchrun() and not dist.is_initialized():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if device.type == "cuda":
            torch.cuda.set_device(local)
            device = torch.device("cuda", local)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return device


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def wrap(model: nn.Module, device: torch.device, fsdp: bool = False) -> nn.Module:
    """DDP (default) or FSDP around ``model`` when more than one process runs; else ``model``."""
    if world_size() == 1:
        return model
    if fsdp:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp import ShardingStrategy

        # use_orig_params lets frozen base weights and trainable adapter weights share one
        # flat shard; the optimizer then sees (and shards) only the adapter's parameters.
        return FSDP(
            model,
            use_orig_params=True,
            sharding_strategy=ShardingStrategy.FULL_SHARD,
            device_id=device if device.type == "cuda" else None,
            sync_module_states=False,
        )
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)


def unwrap(model: nn.Module) -> nn.Module:
    inner = getattr(model, "module", None)
    return (
        inner
        if isinstance(inner, nn.Module)
        and type(model).__name__ in ("DistributedDataParallel", "FullyShardedDataParallel")
        else model
    )


def is_fsdp(model: nn.Module) -> bool:
    return type(model).__name__ == "FullyShardedDataParallel"


@contextlib.contextmanager
def full_params(model: nn.Module) -> Iterator[None]:
    """Inside this block an FSDP model holds its full (gathered) parameters on every rank."""
    if is_fsdp(model):
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        with FSDP.summon_full_params(model, writeback=False):
            yield
    else:
        yield


@contextlib.contextmanager
def no_sync(model: nn.Module, skip: bool) -> Iterator[None]:
    """Skip the gradient all-reduce on accumulation micro-batches (DDP / FSDP ``no_sync``)."""
    if skip and world_size() > 1 and hasattr(model, "no_sync"):
        with model.no_sync():  # type: ignore[operator]
            yield
    else:
        yield


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer state to checkpoint: FSDP's sharded state is gathered to full tensors."""
    if is_fsdp(model):
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        return FSDP.optim_state_dict(model, optimizer)
    return optimizer.state_dict()


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    if is_fsdp(model):
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        state = FSDP.optim_state_dict_to_load(model, optimizer, state)
    optimizer.load_state_dict(state)


def all_reduce_sum(values: list[float]) -> list[float]:
    """Sum floats across processes (evaluation counts)."""
    if world_size() == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()
