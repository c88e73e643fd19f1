"""Tests that need a CUDA GPU (marked `cuda`, skipped elsewhere; tools/gpu_selftest.py runs
them): the training step, losses and inference on the GPU against the CPU, the layouts and
dtypes the speed features promise, and the host-sync budget measured by the CUDA driver."""

import warnings

import pytest
import torch

from retinanet.engine.device import resolve_device
from retinanet.engine.optim import create_optimizer, optimizer_implementation
from retinanet.engine.precision import grad_scaler
from retinanet.engine.step import train_step
from retinanet.model.losses import dense_focal_loss, sigmoid_focal_loss
from retinanet.model.norm import FrozenBatchNorm2d, GroupNorm

from .test_host_syncs import make_batch, step_parts

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def cuda_parts(overrides):
    parts = step_parts(overrides)
    device = resolve_device("cuda")
    parts.model.to(device)
    if "precision.channels_last=true" in overrides:
        parts.model.use_channels_last()
    parts.optimizer = create_optimizer(parts.model, "adamw", 1e-3, 0.05)  # auto: fused
    parts.device = device
    parts.scaler = grad_scaler(parts.amp, device)
    return parts, make_batch().to(device)


@pytest.mark.parametrize(
    "overrides",
    [[], ["precision.amp=auto", "precision.channels_last=true"], ["loss.box_loss=giou"]],
)
def test_training_step_syncs_at_most_once_by_the_driver(overrides):
    parts, batch = cuda_parts(overrides)
    train_step(parts, batch, progress=0.0)
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            losses, finite, _ = train_step(parts, batch, progress=0.5)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message).lower()]
    assert finite and len(syncs) <= 1, syncs


def test_fp16_with_grad_scaler_and_fused_optimizer():
    parts, batch = cuda_parts(["precision.amp=fp16"])
    assert parts.scaler is not None and optimizer_implementation(parts.optimizer) == "fused"
    for i in range(3):
        torch.cuda.set_sync_debug_mode("warn")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                losses, finite, _ = train_step(parts, batch, progress=i / 3)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        assert finite and torch.isfinite(losses["loss"])
        if i > 0:  # the scaler checks for overflow inside the fused kernel, not on the host
            syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message).lower()]
            assert len(syncs) <= 1, syncs


def test_focal_loss_on_gpu_equals_cpu():
    g = torch.Generator().manual_seed(0)
    logits = 4 * torch.randn(2, 500, 7, generator=g)
    classes = torch.randint(-2, 7, (2, 500), generator=g)
    expected = dense_focal_loss(logits, classes)
    got = dense_focal_loss(logits.cuda(), classes.cuda())
    torch.testing.assert_close(got.cpu(), expected, rtol=1e-5, atol=1e-4)
    targets = torch.nn.functional.one_hot(classes.clamp(min=0), 7) * (classes >= 0)[..., None]
    reference = sigmoid_focal_loss(logits, targets, reduction="none")
    reference = (reference * (classes != -2)[..., None]).sum()
    torch.testing.assert_close(got.cpu(), reference, rtol=1e-5, atol=1e-3)


def test_inference_on_gpu_equals_cpu():
    parts, batch = cuda_parts([])
    model = parts.model.eval()
    with torch.no_grad():
        model.head.cls_score.bias.zero_()  # p = 0.5 at init: detections above the threshold
    gpu = model.predict(batch.images, batch.image_sizes)
    model.cpu()
    cpu = model.predict(batch.images.cpu(), batch.image_sizes.cpu())
    assert all(len(d["labels"]) > 10 for d in cpu)
    for a, b in zip(gpu, cpu, strict=True):
        assert torch.equal(a["labels"].cpu(), b["labels"])
        torch.testing.assert_close(a["boxes"].cpu(), b["boxes"], rtol=1e-4, atol=1e-2)
        torch.testing.assert_close(a["scores"].cpu(), b["scores"], rtol=1e-4, atol=1e-4)


def test_norm_layers_keep_layout_and_dtype_on_gpu():
    x = torch.randn(2, 32, 10, 12, device="cuda").contiguous(memory_format=torch.channels_last)
    gn = GroupNorm(8, 32).cuda()
    reference = torch.nn.GroupNorm(8, 32).cuda()
    y = gn(x)
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, reference(x), rtol=1e-5, atol=1e-5)
    frozen = FrozenBatchNorm2d(32).cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        h = torch.nn.functional.conv2d(x, torch.randn(32, 32, 1, 1, device="cuda"))
        assert frozen(h).dtype == torch.bfloat16
        assert gn(h).is_contiguous(memory_format=torch.channels_last)
