"""Normalisation layers: frozen BatchNorm keeps the activation dtype; GroupNorm keeps the
channels-last layout; both equal the reference layers numerically."""

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


def test_group_norm_restores_channels_last_where_the_kernel_drops_it(monkeypatch):
    """As on CUDA: a GroupNorm kernel that returns NCHW for a channels-last input."""
    reference = nn.GroupNorm(4, 16)
    ours = GroupNorm(4, 16)
    ours.load_state_dict(reference.state_dict())
    x = torch.randn(2, 16, 6, 9).contiguous(memory_format=torch.channels_last).requires_grad_()
    native_forward = nn.GroupNorm.forward
    monkeypatch.setattr(
        nn.GroupNorm, "forward", lambda self, t: native_forward(self, t).contiguous()
    )
    y = ours(x)
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, reference(x.contiguous()))
    y.sum().backward()
    assert x.grad is not None


def test_group_norm_dispatch_keeps_layouts():
    layer = make_norm("gn", 8, gn_groups=4)
    assert isinstance(layer, GroupNorm)
    x = torch.randn(1, 8, 4, 4)
    assert layer(x).is_contiguous()
    assert layer(x.contiguous(memory_format=torch.channels_last)).is_contiguous(
        memory_format=torch.channels_last
    )


def _backbone_with_random_statistics(norm: str):
    from retinanet.model.backbone import ResNetBackbone

    torch.manual_seed(0)
    backbone = ResNetBackbone(depth=18, norm=norm, freeze_at=0).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in backbone.modules():
            if isinstance(m, FrozenBatchNorm2d | nn.BatchNorm2d):
                c = m.running_mean.numel()
                m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.copy_(torch.randn(c, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
    return backbone


def test_folding_norms_into_convs_keeps_the_outputs():
    from retinanet.model.norm import fold_norms_into_convs

    x = torch.randn(2, 3, 64, 96)
    for norm, kind in (("frozen_bn", FrozenBatchNorm2d), ("bn", nn.BatchNorm2d)):
        backbone = _backbone_with_random_statistics(norm)
        with torch.no_grad():
            expected = backbone(x)
            # ResNet-18: stem, 2 per block x 8 blocks, 3 downsample branches
            assert fold_norms_into_convs(backbone) == 1 + 16 + 3
            got = backbone(x)
        assert not any(isinstance(m, kind) for m in backbone.modules())
        assert len(got) == len(expected) == 3  # C3, C4, C5
        for level, reference in zip(got, expected, strict=True):
            scale = float(reference.abs().max())
            torch.testing.assert_close(level, reference, rtol=0, atol=1e-5 * scale)


def test_a_batchnorm_still_training_is_not_folded():
    from retinanet.model.norm import fold_norms_into_convs

    block = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).train()
    assert fold_norms_into_convs(block) == 0 and isinstance(block[1], nn.BatchNorm2d)
    frozen = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), FrozenBatchNorm2d(4), nn.ReLU())
    assert fold_norms_into_convs(frozen) == 1
    assert isinstance(frozen[1], nn.Identity) and frozen[0].bias is not None


def test_only_a_norm_that_consumes_the_conv_is_folded():
    from retinanet.model.norm import fold_norms_into_convs

    class PreActivation(nn.Module):  # bn1 normalises the input; conv1 comes after it
        def __init__(self):
            super().__init__()
            self.bn1, self.conv1 = FrozenBatchNorm2d(3), nn.Conv2d(3, 3, 1)

        def forward(self, x):
            return self.conv1(torch.relu(self.bn1(x)))

    assert fold_norms_into_convs(PreActivation()) == 0
    relu_between = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), FrozenBatchNorm2d(4))
    assert fold_norms_into_convs(relu_between) == 0
