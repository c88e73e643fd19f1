"""Atomic file writes: every output of the project is written to a temporary file in the
destination folder and renamed over the final name, so a crash or a full disk never leaves a
half-written checkpoint, JSON or plot behind (a rename within one filesystem is atomic). A write
the filesystem refuses (full disk, quota, file size limit, read-only) is re-raised as an OSError
that names the file, since the writers themselves often do not: torch.save reports a full disk
as "enforce fail ... unexpected pos"."""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[Path]:
    """A temporary file name beside `path`, for writers that open files by name (OpenCV's
    VideoWriter picks its container from `suffix`); on a clean exit the file replaces `path`,
    on an error it is removed and `path` is left untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        # mkstemp creates the file readable by its owner only; give it the permissions a plain
        # open() would have (or the replaced file's), so outputs can be shared as usual.
        os.chmod(tmp, _permissions_for(path))
        os.replace(tmp, path)
    except BaseException as error:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        refused = _refused_write(error) if isinstance(error, Exception) else None
        if refused is None:
            raise
        raise OSError(refused.errno, _refused_message(path, refused)) from error


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", **kwargs: Any) -> Iterator[IO]:
    """Open a temporary file beside `path`; on a clean exit it replaces `path`, on an error it
    is removed and `path` is left untouched."""
    with atomic_path(path) as tmp, open(tmp, mode, **kwargs) as f:
        yield f
        f.flush()
        os.fsync(f.fileno())


# Errors only a write gets (not EIO, which reading an input inside the `with` block can raise).
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}


def _refused_write(error: BaseException) -> OSError | None:
    """The OSError with a write errno in `error`'s chain (torch.save wraps it in a
    RuntimeError as its context), or None. `raise ... from None` ends the chain."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, OSError) and current.errno in _WRITE_ERRNOS:
            return current
        seen.add(id(current))
        hidden = current.__suppress_context__
        current = current.__cause__ or (None if hidden else current.__context__)
    return None


def _refused_message(path: Path, error: OSError) -> str:
    message = f"could not write {path}: {error.strerror or error}"
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        with contextlib.suppress(OSError):
            free = shutil.disk_usage(path.parent).free
            message += f" ({free / 2**20:.1f} MiB free in {path.parent})"
    return message + "; any earlier version of the file is left intact"


def _permissions_for(path: Path) -> int:
    try:
        return path.stat().st_mode & 0o777
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def json_safe(obj: Any) -> Any:
    """`obj` with non-finite floats replaced by None: NaN (e.g. COCO's "no ground truth in this
    area range") and infinities are not valid JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_open(path, "w", encoding="utf-8") as f:
        f.write(text)


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> None:
    """Strict JSON (non-finite floats as null, see `json_safe`), written atomically."""
    with atomic_open(path, "w", encoding="utf-8") as f:
        json.dump(json_safe(obj), f, indent=indent, allow_nan=False)
        f.write("\n")


def atomic_torch_save(path: str | os.PathLike, obj: Any) -> None:
    import torch

    with atomic_open(path, "wb") as f:
        torch.save(obj, f)


def atomic_savefig(path: str | os.PathLike, figure: Any, **kwargs: Any) -> None:
    """Save a matplotlib figure atomically; the format is taken from the suffix of `path`."""
    fmt = Path(path).suffix.lstrip(".") or "png"
    with atomic_open(path, "wb") as f:
        figure.savefig(f, format=fmt, **kwargs)
