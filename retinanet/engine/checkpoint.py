"""Checkpoints: everything needed to continue training exactly, or to run the model alone.

A checkpoint is a dict saved with torch.save (atomically: temporary file + rename):
    model       state dict (the bare model, never the DDP wrapper)
    config      the full config as a plain dict
    classes     {"names": [...], "category_ids": [...]}: contiguous class index -> dataset category
    iteration   number of iterations completed
    optimizer, scheduler, scaler, rng   (training checkpoints only)
Training writes `model_{iteration:07d}.pth` and points `last_checkpoint` (a one-line text file)
at the newest; the finished run also writes `model_final.pth`.
"""

from __future__ import annotations

import pickle
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import Config, config_from_dict, config_to_dict
from ..data.classes import ClassInfo
from ..files import atomic_torch_save, atomic_write_text

LAST_CHECKPOINT_FILE = "last_checkpoint"
FINAL_CHECKPOINT = "model_final.pth"
BEST_CHECKPOINT = "model_best.pth"


def rng_state() -> dict[str, Any]:
    """Python, NumPy, torch CPU (and CUDA) generator states, for exact resume."""
    # Stored as tensors, lists and numbers only, so that checkpoints load with
    # torch.load(weights_only=True), which refuses to run code from the file.
    kind, keys, position, has_gauss, cached = np.random.get_state()  # noqa: NPY002
    state = {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        # This process's GPU only: a run resumed with fewer visible GPUs, or on another rank,
        # must not be handed the states of GPUs it does not have.
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` captured."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, position, has_gauss, cached = state["numpy"]
    keys = np.asarray(keys.numpy() if torch.is_tensor(keys) else keys, dtype=np.uint32)
    np.random.set_state((kind, keys, position, has_gauss, cached))  # noqa: NPY002
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if torch.is_tensor(cuda) and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda)


def save_checkpoint(
    path: str | Path,
    model: torch.nn.Module,
    config: Config,
    classes: ClassInfo,
    iteration: int,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    scaler: torch.amp.GradScaler | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint atomically: weights, config, classes and iteration, with the
    training state (optimizer, RNG, scheduler, scaler) when given, and `extra` entries (plain
    types and tensors only, so that it loads with weights_only=True)."""
    path = Path(path)
    state: dict[str, Any] = {
        "model": model.state_dict(),
        "config": config_to_dict(config),
        "classes": classes.to_dict(),
        "iteration": int(iteration),
    }
    if optimizer is not None:
        state["optimizer"] = optimizer.state_dict()
        state["rng"] = rng_state()
    if scheduler is not None:
        state["scheduler"] = scheduler.state_dict()
    if scaler is not None:
        state["scaler"] = scaler.state_dict()
    state.update(extra or {})
    atomic_torch_save(path, state)
    return path


def mark_last_checkpoint(output_dir: str | Path, checkpoint: str | Path) -> None:
    """Name `checkpoint` in `output_dir`/last_checkpoint (atomically), for --resume."""
    atomic_write_text(Path(output_dir) / LAST_CHECKPOINT_FILE, Path(checkpoint).name + "\n")


def find_last_checkpoint(output_dir: str | Path) -> Path | None:
    """The checkpoint named in `last_checkpoint`, or None for a fresh output directory."""
    marker = Path(output_dir) / LAST_CHECKPOINT_FILE
    if not marker.is_file():
        return None
    path = Path(output_dir) / marker.read_text().strip()
    if not path.is_file():
        raise FileNotFoundError(f"{marker} names {path.name}, which does not exist in {output_dir}")
    return path


def load_resume_checkpoint(output_dir: str | Path) -> tuple[Path | None, dict[str, Any] | None]:
    """The newest readable training checkpoint of `output_dir` and its state, for --resume:
    the one `last_checkpoint` names, else (when it is missing, cut short or unreadable) the
    periodic checkpoints from the newest down, each skipped with a message saying why.
    (None, None) for a folder without checkpoints."""
    output_dir = Path(output_dir)
    marker = output_dir / LAST_CHECKPOINT_FILE
    candidates = sorted(output_dir.glob("model_[0-9]*.pth"), reverse=True)
    if marker.is_file():
        named = output_dir / marker.read_text().strip()
        candidates = [named] + [c for c in candidates if c != named]
    problems = []
    for path in candidates:
        try:
            state = load_checkpoint(path)
            if "optimizer" not in state:
                raise ValueError(f"{path} holds weights only, no training state")
            if problems:
                print(f"resuming from {path.name}, the newest readable checkpoint; skipped: "
                     + "; ".join(problems))  # fmt: skip
            return path, state
        except (ValueError, FileNotFoundError) as err:
            problems.append(f"{path.name} ({err})")
    if problems:
        raise ValueError(
            f"no readable checkpoint to resume from in {output_dir}: " + "; ".join(problems)
        )
    return None, None


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by this project (or by tools/convert.py), with errors that name
    the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        # weights_only: tensors, containers and numbers, never code. A file that needs more
        # (a crafted pickle, or a foreign format) is refused without executing anything.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"refusing to load {path}: it holds objects other than tensors, containers and "
            "numbers, which could run code on loading (checkpoints of this project before "
            "version 0.2 stored NumPy arrays: re-save them with a trusted older version, or "
            f"convert foreign weights with tools/convert.py). Detail: {err}"
        ) from err
    except Exception as err:  # noqa: BLE001 - any other reading error means an unreadable file
        raise ValueError(f"cannot read checkpoint {path}: {err}") from err
    missing = (
        [k for k in ("model", "config", "classes") if k not in state]
        if isinstance(state, dict)
        else ["model"]
    )
    if missing:
        raise ValueError(
            f"{path} is not a retinanet checkpoint (missing {missing}); "
            "convert foreign weights with tools/convert.py"
        )
    return state


def checkpoint_config(state: dict[str, Any]) -> Config:
    """The config stored in a checkpoint."""
    return config_from_dict(state["config"])


def checkpoint_classes(state: dict[str, Any]) -> ClassInfo:
    """The class names and dataset category ids stored in a checkpoint."""
    return ClassInfo(list(state["classes"]["names"]), list(state["classes"]["category_ids"]))


def load_model_weights(
    model: torch.nn.Module,
    state: dict[str, Any],
    source: str | Path,
    skip: Sequence[str] = (),
) -> None:
    """Load `state['model']` into `model`, reporting mismatches by name. Tensors named in `skip`
    are neither loaded nor reported: the model keeps its own."""
    weights = {k: v for k, v in state["model"].items() if k not in skip}
    own = model.state_dict()
    wrong_shape = [
        f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}"
        for k, v in weights.items()
        if k in own and v.shape != own[k].shape
    ]
    if wrong_shape:
        raise ValueError(
            f"checkpoint {source} does not fit the model built from the config: "
            f"shapes differ (checkpoint vs model) for {wrong_shape[:6]}"
            f"{'...' if len(wrong_shape) > 6 else ''}"
        )
    result = model.load_state_dict(weights, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith("criterion.") and k not in skip]
    unexpected = result.unexpected_keys
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {source} does not fit the model built from the config: "
            f"missing {missing[:6]}{'...' if len(missing) > 6 else ''}, "
            f"unexpected {unexpected[:6]}{'...' if len(unexpected) > 6 else ''}"
        )


# The class subnet's output conv: the only tensors tied to the dataset's classes.
CLASS_OUTPUT_KEYS = ("head.cls_score.weight", "head.cls_score.bias")


def load_initial_weights(model: torch.nn.Module, path: str | Path, classes: ClassInfo) -> bool:
    """Start a new training from the weights of a checkpoint of ours (a finished run, or one
    written by tools/convert.py): every tensor is loaded, except the class output layer when the
    checkpoint's classes differ from `classes` (that layer keeps its prior-probability
    initialisation). Returns whether the class output layer was loaded."""
    state = load_checkpoint(path)
    same_classes = checkpoint_classes(state) == classes
    load_model_weights(model, state, path, skip=() if same_classes else CLASS_OUTPUT_KEYS)
    return same_classes


def load_trained_model(
    weights: str | Path,
    config_path: str | Path | None = None,
    overrides: list[str] | None = None,
    device: str | torch.device = "cpu",
) -> tuple[torch.nn.Module, Config, ClassInfo]:
    """A model ready for inference from a checkpoint: its architecture from `config_path` (plus
    overrides) when given, else from the config stored in the checkpoint; its classes always from
    the checkpoint. Returns (model in eval mode on `device`, config, classes)."""
    from ..config import load_config
    from ..model.build import build_model

    state = load_checkpoint(weights)
    if config_path is not None:
        cfg = load_config(config_path, overrides)
    else:
        cfg = config_from_dict(state["config"], f"the config stored in {weights}", overrides)
    classes = checkpoint_classes(state)
    model = build_model(cfg, classes.num_classes, load_backbone_weights=False)
    load_model_weights(model, state, weights)
    model.to(device).eval()
    if cfg.precision.channels_last:
        model.use_channels_last()
    return model, cfg, classes
