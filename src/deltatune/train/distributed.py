"""Running under ``torchrun``: process group, DDP / FSDP wrapping, gathering for saving.

``torchrun --nproc_per_node N -m deltatune.cli train ...`` (or the ``deltatune`` script) sets
``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK``; :func:`init` then joins the process group (NCCL on
GPUs, gloo on CPU). Each process reads its share of every global batch; gradients are averaged
by PyTorch's DistributedDataParallel, or — with ``fsdp=True`` — the model is sharded with
FSDP2 (``torch.distributed.fsdp.fully_shard``) so that parameters (including the adapter's),
gradients and the optimizer state are split across processes; the saved adapter is gathered
on rank 0. Nothing here is a home-made process scheme.
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
        # FSDP2 (``fully_shard``): each repeated block (every element of an nn.ModuleList, i.e.
        # the transformer layers) becomes one shard unit, then the root. Parameters turn into
        # DTensors sharded on dim 0 across processes: the frozen base and the adapter alike, so
        # AdamW's state for the adapter is sharded too. Unlike FSDP1 it also runs on CPU (gloo).
        from torch.distributed.fsdp import FSDPModule, fully_shard

        if isinstance(model, FSDPModule):  # sharded already (the evaluation before training did it)
            return model
        for module in list(model.modules()):
            if isinstance(module, nn.ModuleList):
                for block in module:
                    if any(True for _ in block.parameters()):
                        fully_shard(block)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DDP wrapper (an FSDP2 model is its own module)."""
    inner = getattr(model, "module", None)
    return (
        inner if isinstance(inner, nn.Module) and type(model).__name__ == "DistributedDataParallel" else model
    )


def is_fsdp(model: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch < 2.6
        return False
    return isinstance(model, FSDPModule)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A sharded DTensor gathered to a plain tensor (a collective: call on every rank)."""
    gather = getattr(t, "full_tensor", None)
    return gather() if callable(gather) else t


def shard_like(value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """``value`` (full) laid out like ``param`` (a DTensor shard, or a plain tensor)."""
    mesh = getattr(param, "device_mesh", None)
    if mesh is None:
        return value
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(value.to(param.dtype), mesh, param.placements).to_local()  # type: ignore[attr-defined]


@contextlib.contextmanager
def no_sync(model: nn.Module, skip: bool) -> Iterator[None]:
    """Skip the gradient reduction on accumulation micro-batches (DDP ``no_sync`` / FSDP2 flag)."""
    if not skip or world_size() == 1:
        yield
    elif hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(False)  # type: ignore[operator]
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)  # type: ignore[operator]
    elif hasattr(model, "no_sync"):
        with model.no_sync():  # type: ignore[operator]
            yield
    else:
        yield


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer state to checkpoint; FSDP's sharded state is gathered (full on rank 0)."""
    if is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(
            model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
    return optimizer.state_dict()


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    if is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
        return
    optimizer.load_state_dict(state)


def all_reduce_sum(values: list[float]) -> list[float]:
    """Sum floats across processes (evaluation counts, logged losses)."""
    if world_size() == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()
