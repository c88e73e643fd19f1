"""Atomic file writes: every output of the project is written to a temporary file in the
destination folder and renamed over the final name, so a crash or a full disk never leaves a
half-written checkpoint, JSON or plot behind (a rename within one filesystem is atomic)."""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", **kwargs: Any) -> Iterator[IO]:
    """Open a temporary file beside `path`; on a clean exit it replaces `path`, on an error it
    is removed and `path` is left untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        # mkstemp creates the file readable by its owner only; give it the permissions a plain
        # open() would have (or the replaced file's), so outputs can be shared as usual.
        os.chmod(tmp, _permissions_for(path))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


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
