"""ResNet backbone: output channels and strides, freezing, normalisation, local weights."""

import pytest
import torch
import torchvision
from torch import nn

from retinanet.model.backbone import ResNetBackbone
from retinanet.model.norm import FrozenBatchNorm2d, GroupNorm

STAGES = ("stem", "res2", "res3", "res4", "res5")


@pytest.mark.parametrize(
    ("depth", "channels"), [(18, [128, 256, 512]), (34, [128, 256, 512]), (50, [512, 1024, 2048])]
)
def test_output_channels_and_strides(depth, channels):
    backbone = ResNetBackbone(depth=depth).eval()
    assert backbone.out_channels == channels and backbone.strides == [8, 16, 32]
    with torch.no_grad():
        c3, c4, c5 = backbone(torch.randn(1, 3, 64, 96))
    assert c3.shape == (1, channels[0], 8, 12)
    assert c4.shape == (1, channels[1], 4, 6)
    assert c5.shape == (1, channels[2], 2, 3)


@pytest.mark.parametrize("freeze_at", [0, 1, 2, 5])
def test_freeze_at_freezes_leading_stages_and_keeps_them_in_eval_mode(freeze_at):
    backbone = ResNetBackbone(depth=18, norm="bn", freeze_at=freeze_at)
    backbone.train()
    for index, name in enumerate(STAGES):
        stage = getattr(backbone, name)
        frozen = index < freeze_at
        assert all(p.requires_grad != frozen for p in stage.parameters()), name
        norms = [m for m in stage.modules() if isinstance(m, nn.BatchNorm2d)]
        assert norms and all(m.training != frozen for m in norms), name


def test_frozen_stage_statistics_do_not_move_in_training():
    backbone = ResNetBackbone(depth=18, norm="bn", freeze_at=2).train()
    stem_mean = backbone.stem[1].running_mean.clone()
    res3_mean = backbone.res3[0].bn1.running_mean.clone()
    backbone(torch.randn(2, 3, 64, 64))
    assert torch.equal(backbone.stem[1].running_mean, stem_mean)
    assert not torch.equal(backbone.res3[0].bn1.running_mean, res3_mean)


@pytest.mark.parametrize(
    ("norm", "layer"),
    [("frozen_bn", FrozenBatchNorm2d), ("bn", nn.BatchNorm2d), ("gn", GroupNorm)],
)
def test_norm_choice(norm, layer):
    backbone = ResNetBackbone(depth=18, norm=norm, freeze_at=0)
    norms = [
        m
        for m in backbone.modules()
        if isinstance(m, (FrozenBatchNorm2d, nn.BatchNorm2d, nn.GroupNorm))
    ]
    assert len(norms) == 1 + 8 * 2 + 3  # stem, two per basic block, three downsample shortcuts
    assert all(type(m) is layer for m in norms)
    # Frozen BatchNorm has buffers only, nothing to train.
    trainable_norm_params = sum(p.numel() for m in norms for p in m.parameters())
    assert (trainable_norm_params == 0) == (norm == "frozen_bn")


def test_unknown_norm_and_depth_are_rejected():
    with pytest.raises(ValueError, match="unknown norm 'layer'"):
        ResNetBackbone(depth=18, norm="layer")
    with pytest.raises(ValueError, match="depth must be one of"):
        ResNetBackbone(depth=20)
    with pytest.raises(ValueError, match="freeze_at"):
        ResNetBackbone(depth=18, freeze_at=6)


@pytest.mark.parametrize("norm", ["frozen_bn", "bn"])
@pytest.mark.parametrize("wrapped", [False, True])
def test_loads_weights_from_a_local_file(tmp_path, norm, wrapped):
    torch.manual_seed(0)
    reference = torchvision.models.resnet18(weights=None)
    with torch.no_grad():  # make BatchNorm statistics non-trivial so that they are checked too
        for m in reference.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
    state = reference.state_dict()
    path = tmp_path / "resnet18.pth"
    torch.save({"state_dict": state} if wrapped else state, path)

    backbone = ResNetBackbone(depth=18, norm=norm, weights=str(path))
    assert torch.equal(backbone.stem[0].weight, state["conv1.weight"])
    assert torch.equal(backbone.stem[1].running_var, state["bn1.running_var"])
    assert torch.equal(backbone.res3[0].downsample[0].weight, state["layer2.0.downsample.0.weight"])
    assert torch.equal(backbone.res5[1].bn2.running_mean, state["layer4.1.bn2.running_mean"])
    assert torch.equal(backbone.res5[1].conv2.weight, state["layer4.1.conv2.weight"])
    # The same features as torchvision's network (up to its classifier).
    reference.eval()
    backbone.eval()
    image = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        x = reference.maxpool(reference.relu(reference.bn1(reference.conv1(image))))
        expected_c5 = reference.layer4(reference.layer3(reference.layer2(reference.layer1(x))))
        c5 = backbone(image)[2]
    torch.testing.assert_close(c5, expected_c5, rtol=1e-4, atol=1e-4)


def test_bad_weight_files_are_named(tmp_path):
    missing = tmp_path / "nowhere.pth"
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        ResNetBackbone(depth=18, weights=str(missing))
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="garbage.pth"):
        ResNetBackbone(depth=18, weights=str(garbage))
    not_a_dict = tmp_path / "list.pth"
    torch.save([1, 2, 3], not_a_dict)
    with pytest.raises(ValueError, match="list.pth"):
        ResNetBackbone(depth=18, weights=str(not_a_dict))
    wrong_depth = tmp_path / "resnet34.pth"
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), wrong_depth)
    with pytest.raises(ValueError, match="resnet34.pth.*ResNet-18"):
        ResNetBackbone(depth=18, weights=str(wrong_depth))
    with pytest.raises(ValueError, match="BatchNorm"):
        ResNetBackbone(depth=18, norm="gn", weights=str(wrong_depth))


def test_stride_in_1x1_moves_the_stride_without_changing_shapes():
    torch.manual_seed(0)
    v1_5 = ResNetBackbone(depth=50).eval()
    torch.manual_seed(0)
    msra = ResNetBackbone(depth=50, stride_in_1x1=True).eval()
    for name in ("res3", "res4", "res5"):
        block = getattr(msra, name)[0]
        assert block.conv1.stride == (2, 2) and block.conv2.stride == (1, 1)
        assert getattr(v1_5, name)[0].conv2.stride == (2, 2)
        assert block.downsample[0].stride == (2, 2)
    assert msra.res2[0].conv1.stride == (1, 1)
    image = torch.randn(1, 3, 96, 64)
    with torch.no_grad():
        out_v1_5, out_msra = v1_5(image), msra(image)
    assert [o.shape for o in out_msra] == [o.shape for o in out_v1_5]
    # Same weights, different sampling positions: different features.
    assert not torch.allclose(out_msra[0], out_v1_5[0])


def test_blocks_per_stage_make_a_resnet10():
    resnet10 = ResNetBackbone(depth=18, norm="bn", freeze_at=0, blocks=(1, 1, 1, 1))
    resnet18 = ResNetBackbone(depth=18, norm="bn", freeze_at=0)
    assert [len(s) for s in (resnet10.res2, resnet10.res3, resnet10.res4, resnet10.res5)] == [1] * 4
    assert resnet10.out_channels == resnet18.out_channels
    x = torch.randn(1, 3, 64, 64)
    assert [f.shape for f in resnet10(x)] == [f.shape for f in resnet18(x)]
    with pytest.raises(ValueError, match="4 counts"):
        ResNetBackbone(depth=18, norm="bn", freeze_at=0, blocks=(1, 1, 1))
    with pytest.raises(ValueError, match="ImageNet weights"):
        ResNetBackbone(depth=18, blocks=(1, 1, 1, 1), weights="imagenet")


def test_config_checks_blocks():
    from retinanet.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="model.backbone.blocks"):
        load_config(None, ["model.backbone.blocks=[1,1,0,1]"])
