"""Mixed precision: autocast contexts and the fp16 gradient scaler."""

from __future__ import annotations

import contextlib
import functools
from typing import Literal

import torch

from .device import device_name

# None: fp32; auto: the fastest precision the device computes natively (see resolve_amp)
AmpMode = Literal["auto", "bf16", "fp16"]

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@functools.cache
def _cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX-BF16: without them bf16 convolutions are emulated and slower than fp32."""
    cpu = torch.cpu
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(cpu, name, lambda: False)() for name in checks)


def cuda_has_native_bf16(device: torch.device) -> bool:
    """Ampere (compute capability 8.0) and newer compute bf16 in hardware. Older GPUs emulate
    it slowly, though torch.cuda.is_bf16_supported() counts the emulation as support."""
    return torch.cuda.get_device_capability(device)[0] >= 8


def resolve_amp(amp: AmpMode | None, device: torch.device) -> AmpMode | None:
    """'auto' -> bf16 on GPUs and CPUs that compute bf16 natively, fp16 (with loss scaling) on
    older GPUs, fp32 (None) on other CPUs; other values are returned checked ('' is None)."""
    if amp == "auto":
        if device.type == "cuda":
            return "bf16" if cuda_has_native_bf16(device) else "fp16"
        return "bf16" if device.type == "cpu" and _cpu_has_native_bf16() else None
    if not amp:
        return None
    if amp not in _DTYPES:
        raise ValueError(f"precision.amp must be null, 'auto', 'bf16' or 'fp16', got {amp!r}")
    if amp == "fp16" and device.type != "cuda":
        raise ValueError("precision.amp=fp16 needs a CUDA device; use bf16, auto or null on CPU")
    if amp == "bf16" and device.type == "cuda" and not cuda_has_native_bf16(device):
        raise ValueError(
            f"precision.amp=bf16 on {device_name(device)} would be emulated, slower than fp32; "
            "use precision.amp=fp16 or auto"
        )
    return amp


def autocast(amp: AmpMode | None, device: torch.device):
    """Autocast to the chosen dtype (no-op for fp32: None or ''). The focal loss computes in fp32
    regardless, so only the network runs in reduced precision."""
    amp = resolve_amp(amp, device)
    if not amp:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=_DTYPES[amp])


def grad_scaler(amp: AmpMode | None, device: torch.device) -> torch.amp.GradScaler | None:
    """fp16 gradients underflow without loss scaling; bf16 has fp32's range and needs none."""
    if resolve_amp(amp, device) == "fp16":
        return torch.amp.GradScaler(device.type)
    return None
