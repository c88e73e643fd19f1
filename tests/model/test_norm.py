"""Normalisation layers: frozen BatchNorm keeps the activation dtype; GroupNorm keeps the
channels-last layout; both equal the reference layers numerically."""

import pytest
import torch
import torchvision
from torch import nn

from retinanet.model.norm import FrozenBatchNorm2d, GroupNorm, make_norm


def _frozen_pair(channels: int = 16):
    g = torch.Generator().manual_seed(0)
    ours, reference = FrozenBatchNorm2d(channels), torchvision.ops.FrozenBatchNorm2d(channels)
    for name in ("weight", "bias", "running_mean"):
        getattr(ours, name).copy_(torch.randn(channels, generator=g))
    ours.running_var.copy_(torch.rand(channels, generator=g) + 0.5)
    reference.load_state_dict(ours.state_dict())
    return ours, reference


def test_frozen_bn_equals_torchvision_in_fp32():
    ours, reference = _frozen_pair()
    x = torch.randn(2, 16, 5, 7)
    assert torch.equal(ours(x), reference(x))


def test_frozen_bn_keeps_the_activation_dtype_under_autocast():
    ours, reference = _frozen_pair()
    conv = nn.Conv2d(3, 16, 3, padding=1)
    x = torch.randn(2, 3, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = conv(x)
        assert h.dtype == torch.bfloat16
        assert reference(h).dtype == torch.float32  # what torchvision's layer does
        y = ours(h)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), reference(h.float()), rtol=2e-2, atol=2e-2)
    h = h.contiguous(memory_format=torch.channels_last)
    assert ours(h).is_contiguous(memory_format=torch.channels_last)


def test_frozen_bn_loads_checkpoints_with_batchnorm_keys():
    bn = nn.BatchNorm2d(4)
    bn.running_mean.fill_(0.5)
    frozen = FrozenBatchNorm2d(4)
    frozen.load_state_dict(bn.state_dict())  # num_batches_tracked is dropped
    assert torch.equal(frozen.running_mean, bn.running_mean)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_group_norm_channels_last_path_equals_nn_group_norm(dtype):
    g = torch.Generator().manual_seed(0)
    ours = GroupNorm(4, 16)
    with torch.no_grad():
        ours.weight.copy_(torch.randn(16, generator=g))
        ours.bias.copy_(torch.randn(16, generator=g))
    reference = nn.GroupNorm(4, 16)
    reference.load_state_dict(ours.state_dict())
    x = (3 + 2 * torch.randn(2, 16, 6, 9, generator=g)).to(dtype)
    x_last = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    x_ref = x.float().clone().requires_grad_()

    # The path CUDA takes for channels-last inputs, run here on CPU.
    y = ours.forward_channels_last(x_last)
    expected = reference(x_ref)
    assert y.dtype == dtype and y.is_contiguous(memory_format=torch.channels_last)
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 3e-2}
    torch.testing.assert_close(y.float(), expected, **tol)

    # Gradients through it (autograd of the plain formula) equal the native kernel's.
    weights = torch.randn(expected.shape, generator=g)
    (y.float() * weights).sum().backward()
    (expected * weights).sum().backward()
    torch.testing.assert_close(x_last.grad.float(), x_ref.grad, **tol)
    torch.testing.assert_close(ours.weight.grad, reference.weight.grad, rtol=1e-2, atol=5e-2)


def test_group_norm_dispatch_keeps_layouts():
    layer = make_norm("gn", 8, gn_groups=4)
    assert isinstance(layer, GroupNorm)
    x = torch.randn(1, 8, 4, 4)
    assert layer(x).is_contiguous()
    assert layer(x.contiguous(memory_format=torch.channels_last)).is_contiguous(
        memory_format=torch.channels_last
    )
