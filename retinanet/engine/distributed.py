"""Multi-process training with torch.distributed, set up from the environment that `torchrun`
creates (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT). Multi-node runs use
torchrun's own flags (--nnodes, --node-rank, --rdzv-endpoint); nothing here is node-specific.

When one process fails, the others must not wait for it in a collective until the timeout
(30 minutes by default): code run under `failures_shared` records "rank R: <error>" in the
rendezvous store (the TCPStore that torchrun's agent, or rank 0, serves) before the error
leaves it. A process whose collective then breaks raises `PeerFailedError` naming that rank and
its error instead of a bare connection error, and a watcher thread ends a process still running
`FAILURE_GRACE_S` seconds after a failure was recorded (a collective waiting for a process that
will never join it does not return: NCCL, or a peer that hangs on its way out).
"""

from __future__ import annotations

import functools
import os
import sys
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from .device import launched_by_torchrun, resolve_device

T = TypeVar("T")

TIMEOUT_ENV = "RETINANET_DIST_TIMEOUT"  # seconds a collective may wait (default 30 minutes)
DEFAULT_TIMEOUT = timedelta(minutes=30)
FAILURE_POLL_S = 2.0  # how often the watcher reads the store (a few bytes per process)
FAILURE_GRACE_S = 10.0  # time a process gets to stop by itself once a failure is recorded
STORE_TIMEOUT_S = 5.0  # store requests of the failure record give up after this
_FAILURE_KEY = "retinanet/first_failure"


class PeerFailedError(RuntimeError):
    """Another process failed first; this one stopped because of it. `rank` is the failed
    process's rank (-1 when no process recorded an error)."""

    def __init__(self, message: str, rank: int) -> None:
        super().__init__(message)
        self.rank = rank


def init_distributed(device: str | torch.device = "auto") -> torch.device:
    """This process's device (see `resolve_device`), joining the process group when started by
    torchrun (NCCL on CUDA, gloo on CPU). A plain `python tools/train.py` stays single-process
    on `device` (e.g. cuda:1). Collectives time out after $RETINANET_DIST_TIMEOUT seconds
    (default 30 minutes); a failure recorded by another process ends this one sooner."""
    device = resolve_device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # kernels and allocations without a device go there
    if launched_by_torchrun() and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend=backend, timeout=collective_timeout(), **kwargs)
        if dist.get_world_size() > 1:
            _FailureRecord.start(dist.get_rank())
    return device


def collective_timeout() -> timedelta:
    """$RETINANET_DIST_TIMEOUT seconds, or 30 minutes."""
    text = os.environ.get(TIMEOUT_ENV, "").strip()
    if not text:
        return DEFAULT_TIMEOUT
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise ValueError(f"{TIMEOUT_ENV}={text!r}: expected a number of seconds > 0")
    return timedelta(seconds=seconds)


def shutdown_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _FailureRecord.stop()


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


def run_on_main(fn: Callable[[], T], default: Any = None) -> T | Any:
    """`fn()` on rank 0, `default` on the other processes, which wait for it. If `fn` raises,
    every process raises: rank 0 its error, the others a PeerFailedError naming it (instead of
    waiting in their next collective for a rank 0 that has left)."""
    result, failure = default, None
    if is_main_process():
        try:
            result = fn()
        except Exception as err:
            failure = err
    message = broadcast_from_main(None if failure is None else _describe(failure))
    if failure is not None:
        raise failure
    if message is not None:
        raise PeerFailedError(f"rank 0 failed: {message}; rank {get_rank()} stopped too", 0)
    return result


def main_process_first(fn: Callable[[], T]) -> T:
    """Run `fn` on rank 0, then on the other processes: the first call generates or downloads
    (a dataset, weights), the later ones find it done. An error on rank 0 reaches them all."""
    result = run_on_main(fn)
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


def failures_shared(
    fn: Callable[..., T] | None = None, *, clean_stops: tuple[type[BaseException], ...] = ()
) -> Any:
    """Decorator: an exception leaving `fn` in a multi-process run is recorded as this rank's
    failure (unless another rank recorded one first, or it is one of `clean_stops`, which every
    process raises together); an error of a broken collective becomes a PeerFailedError naming
    the rank that failed first and its error."""

    def decorate(function: Callable[..., T]) -> Callable[..., T]:
        @functools.wraps(function)
        def wrapper(*args: Any, **kwargs: Any) -> T:
            try:
                return function(*args, **kwargs)
            except clean_stops:
                raise
            except Exception as err:
                explained = explain_failure(err)
                if explained is not None:
                    raise explained from err
                raise

        return wrapper

    return decorate if fn is None else decorate(fn)


def explain_failure(err: Exception) -> PeerFailedError | None:
    """Record `err` as this rank's failure, or, when it is the consequence of another rank's
    (a collective broke after that rank failed), the PeerFailedError to raise instead. None in a
    single process and for errors of this rank's own."""
    record = _FailureRecord.active
    if record is None or isinstance(err, PeerFailedError):
        return None
    rank = record.rank
    if not _is_communication_error(err):
        record.write(_describe(err))
        return None
    # A rank writes its record before its error takes it down, so the record is normally there
    # when the collective breaks; a short wait covers a record still on its way.
    first = record.read(wait_s=FAILURE_GRACE_S / 2)
    if first is None:
        # Recorded, so that processes still waiting for this one (in a collective that will
        # not fail for them) stop too.
        record.write(_describe(err))
        return PeerFailedError(
            f"rank {rank}: a collective failed and no process recorded an error (one may have "
            f"been killed, or lost its network): {_describe(err)}",
            -1,
        )
    failed_rank, message = first
    if failed_rank == rank:
        return None
    return PeerFailedError(
        f"rank {failed_rank} failed: {message}; rank {rank} stopped too", failed_rank
    )


def _describe(err: BaseException) -> str:
    text = str(err).strip() or "(no message)"
    return f"{type(err).__name__}: {text}"


def _is_communication_error(err: BaseException) -> bool:
    """An error raised by a collective or the store rather than by this rank's own work."""
    if isinstance(err, dist.DistError):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and any(
        marker in text for marker in ("Gloo", "gloo", "NCCL", "Connection closed", "Timed out")
    )


class _FailureRecord:
    """This process's view of the first failure of the job: one key in the rendezvous store,
    read and written through a client connection of its own (so that the watcher thread never
    queues behind the process group's own use of the store), plus the watcher thread."""

    active: _FailureRecord | None = None

    def __init__(self, store: Any, rank: int) -> None:
        self.store = store
        self.rank = rank
        # A torchrun restart reuses the store: each attempt has its own record.
        self.key = f"{_FAILURE_KEY}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._watch, name="failure-watcher", daemon=True)

    @classmethod
    def start(cls, rank: int) -> None:
        """Connect to the store torchrun describes (MASTER_ADDR/MASTER_PORT) and start watching;
        without one (a process group set up some other way) failures are not shared."""
        cls.stop()
        host, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
        if not host or not port:
            return
        try:
            store = dist.TCPStore(
                host,
                int(port),
                is_master=False,
                timeout=timedelta(seconds=STORE_TIMEOUT_S),
                wait_for_workers=False,
            )
        except (RuntimeError, ValueError, OSError):
            return
        cls.active = cls(store, rank)
        cls.active.thread.start()

    @classmethod
    def stop(cls) -> None:
        record, cls.active = cls.active, None
        if record is not None:
            record.stopped.set()

    def write(self, message: str) -> None:
        """Record this rank's failure, unless another was recorded first."""
        try:
            self.store.compare_set(self.key, "", f"{self.rank}\n{message}")
        except (RuntimeError, ValueError, OSError):
            pass  # the store is gone: there is nobody left to tell

    def read(self, wait_s: float = 0.0) -> tuple[int, str] | None:
        """(rank, message) of the first recorded failure, waiting up to `wait_s` for one."""
        deadline = time.monotonic() + wait_s
        while True:
            try:
                if self.store.check([self.key]):
                    rank, _, message = self.store.get(self.key).decode().partition("\n")
                    return int(rank), message
            except (RuntimeError, ValueError, OSError):
                return None
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.2)

    def _watch(self) -> None:
        seen_at = None
        while not self.stopped.wait(FAILURE_POLL_S):
            try:
                found = self.store.check([self.key])
            except (RuntimeError, ValueError, OSError):
                return  # the store is gone (the job is ending): the collectives will tell
            if not found:
                continue
            if seen_at is None:
                seen_at = time.monotonic()
            if time.monotonic() - seen_at < FAILURE_GRACE_S:
                continue
            first = self.read()
            if first is None or self.stopped.is_set():
                return
            failed_rank, message = first
            cause = (
                f"rank {failed_rank} failed: {message}"
                if failed_rank != self.rank
                else f"rank {self.rank} failed ({message})"
            )
            sys.stdout.flush()
            print(  # on a line of its own, also after a progress bar
                f"\nerror: {cause}; rank {self.rank} was still running {FAILURE_GRACE_S:.0f} s "
                "later (waiting for a collective that cannot finish) and exits now",
                file=sys.stderr,
                flush=True,
            )
            os._exit(1)
