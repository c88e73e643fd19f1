"""Mixed precision: autocast contexts and the fp16 gradient scaler."""

from __future__ import annotations

import contextlib

import torch

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def check_amp(amp: str, device: torch.device) -> None:
    if amp and amp not in _DTYPES:
        raise ValueError(f"train.amp must be '', 'bf16' or 'fp16', got {amp!r}")
    if amp == "fp16" and device.type != "cuda":
        raise ValueError("train.amp=fp16 needs a CUDA device; use bf16 or '' on CPU")


def autocast(amp: str, device: torch.device):
    """Autocast to the chosen dtype (no-op for amp == ''). The focal loss computes in fp32
    regardless, so only the network runs in reduced precision."""
    if not amp:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=_DTYPES[amp])


def grad_scaler(amp: str, device: torch.device) -> torch.amp.GradScaler | None:
    """fp16 gradients underflow without loss scaling; bf16 has fp32's range and needs none."""
    if amp == "fp16":
        return torch.amp.GradScaler(device.type)
    return None
