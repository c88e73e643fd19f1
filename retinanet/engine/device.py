"""Which device a process computes on: `--device auto | cpu | cuda | cuda:N`, and under torchrun
the GPU of the process's LOCAL_RANK.

A CUDA device is always returned with its index (`cuda:0`, never bare `cuda`): the functions
that take a device (torch.cuda.set_device, DistributedDataParallel's device_ids, memory
statistics) reject or misread an unindexed one.
"""

from __future__ import annotations

import os

import torch


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def local_rank() -> int | None:
    """LOCAL_RANK under torchrun (the process's index on its node), else None."""
    if not launched_by_torchrun():
        return None
    return int(os.environ.get("LOCAL_RANK", 0))


def resolve_device(spec: str | torch.device = "auto") -> torch.device:
    """'auto' -> CUDA when available, else CPU; 'cuda' -> the GPU this process should use;
    'cuda:N' -> GPU N, checked; 'cpu' -> CPU.

    Under torchrun each process takes the GPU of its LOCAL_RANK; asking for another index
    there would put several processes on one GPU, and is an error."""
    text = str(spec).strip().lower()
    if text == "auto":
        text = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(text)
    except RuntimeError as err:
        raise ValueError(
            f"--device {spec!r} is not a device (use auto, cpu, cuda or cuda:N)"
        ) from err
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type != "cuda":
        raise ValueError(f"--device {spec!r}: only cpu and cuda are supported")
    if not torch.cuda.is_available():
        raise RuntimeError(f"--device {spec} requested but CUDA is not available")
    count = torch.cuda.device_count()
    rank = local_rank()
    if device.index is None:
        if rank is None:
            index = torch.cuda.current_device()
        else:
            # Schedulers that give each task its own GPU (CUDA_VISIBLE_DEVICES per rank) leave
            # one visible device whatever the LOCAL_RANK.
            index = 0 if count == 1 else rank
    elif rank is not None and device.index != rank:
        raise ValueError(
            f"--device {spec} under torchrun: each process uses the GPU of its LOCAL_RANK "
            f"(this one: cuda:{rank}); pass --device cuda and select GPUs with "
            "CUDA_VISIBLE_DEVICES"
        )
    else:
        index = device.index
    if not 0 <= index < count:
        where = f"LOCAL_RANK={rank}" if device.index is None and rank is not None else f"{spec!r}"
        raise ValueError(f"--device {where}: no such GPU; this machine has {count} CUDA device(s)")
    return torch.device("cuda", index)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"{torch.cuda.get_device_name(device)} (compute capability {major}.{minor})"
    import platform

    return platform.processor() or platform.machine() or "cpu"
