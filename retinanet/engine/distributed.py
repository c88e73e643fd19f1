"""Multi-process training with torch.distributed, set up from the environment that `torchrun`
creates (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT). Multi-node runs use
torchrun's own flags (--nnodes, --node-rank, --rdzv-endpoint); nothing here is node-specific."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from .device import launched_by_torchrun, resolve_device, use_device

T = TypeVar("T")


def init_distributed(device: str | torch.device = "auto") -> torch.device:
    """This process's device (see `resolve_device`), joining the process group when started by
    torchrun (NCCL on CUDA, gloo on CPU). A plain `python tools/train.py` stays single-process
    on `device` (e.g. cuda:1)."""
    device = resolve_device(device)
    use_device(device)
    if launched_by_torchrun() and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend=backend, timeout=timedelta(minutes=30), **kwargs)
    return device


def shutdown_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def barrier() -> None:
    """Wait for every process (no-op in a single process)."""
    if get_world_size() > 1:
        dist.barrier()


def main_process_first(fn: Callable[[], T]) -> T:
    """Run `fn` on rank 0, then on the other processes: the first call generates or downloads
    (a dataset, weights), the later ones find it done."""
    if is_main_process():
        result = fn()
    barrier()
    if not is_main_process():
        result = fn()
    return result


def reduce_mean(values: dict[str, torch.Tensor]) -> dict[str, float]:
    """Mean of scalar tensors over all processes (one all_reduce for the whole dict)."""
    if not values:
        return {}
    keys = sorted(values)
    stacked = torch.stack([values[k].detach().float().reshape(()) for k in keys])
    if get_world_size() > 1:
        dist.all_reduce(stacked)
        stacked /= get_world_size()
    return dict(zip(keys, stacked.tolist(), strict=True))


def gather_to_main(obj: Any) -> list[Any] | None:
    """Every process's `obj` as a list on rank 0 (None elsewhere)."""
    if get_world_size() == 1:
        return [obj]
    gathered = [None] * get_world_size() if is_main_process() else None
    dist.gather_object(obj, gathered, dst=0)
    return gathered


def broadcast_from_main(obj: Any) -> Any:
    """Rank 0's `obj` on every process (any picklable object)."""
    if get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
