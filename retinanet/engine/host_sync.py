"""Counting the points where a GPU program would wait for the device (host syncs).

A CUDA program runs fast when the host only queues kernels; every operation whose result the
host must read (a Python bool or number from a tensor, an output whose size depends on the
data) makes it wait until the queue drains. `HostSyncCounter` finds such operations on any
device, CPU included, by watching the ATen operators that a GPU would have to synchronise for,
so tests can hold the training step to a budget without a GPU. On a real GPU,
`torch.cuda.set_sync_debug_mode("warn")` reports the same syncs (and copies to the host) from
the driver's side.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

# Operators that read a device value on the host, or whose output size depends on the data.
_SYNCING_PACKETS = (
    aten._local_scalar_dense,  # .item(), bool(t), float(t), int(t), `if t:`
    aten.is_nonzero,
    aten.equal,
    aten.nonzero,
    aten.masked_select,
    aten.unique_dim,
    aten._unique,
    aten._unique2,
    aten.unique_consecutive,
    aten.bincount,
)
# Indexing operators, which sync only when an index is a boolean mask (turned into indices with
# nonzero); with integer indices they do not.
_INDEXING_PACKETS = (aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_)


def _has_bool_index(args: tuple) -> bool:
    indices = args[1] if len(args) > 1 else ()
    if isinstance(indices, torch.Tensor):
        indices = [indices]
    return any(
        isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices or ()
    )


class HostSyncCounter(TorchDispatchMode):
    """Context manager that counts syncing operators by name while active.

        with HostSyncCounter() as syncs:
            train_step(...)
        assert syncs.total <= 1, syncs.counts

    Also counts `aten.repeat_interleave` with tensor repeats and no output size. Not seen:
    copies to the host (`.cpu()`, `.tolist()` and non-blocking copies are invisible at this
    level on a CPU), which `torch.cuda.set_sync_debug_mode` catches on a GPU."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = func.overloadpacket
        if packet in _SYNCING_PACKETS:
            self.counts[str(packet.__name__)] += 1
        elif packet in _INDEXING_PACKETS and _has_bool_index(args):
            self.counts[f"{packet.__name__} (boolean mask)"] += 1
        elif (
            packet is aten.repeat_interleave
            and isinstance(args[0] if args else None, torch.Tensor)
            and kwargs.get("output_size") is None
            and (len(args) < 2 or isinstance(args[1], torch.Tensor))
        ):
            self.counts["repeat_interleave (tensor repeats)"] += 1
        return func(*args, **kwargs)
