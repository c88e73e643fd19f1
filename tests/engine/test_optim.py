import math

import pytest
import torch
from torch import nn

from retinanet.engine.optim import (
    create_lr_scheduler,
    create_optimizer,
    load_optimizer_state,
    lr_factor,
    optimizer_implementation,
    parameter_groups,
)


def test_step_schedule_with_linear_warmup():
    kw = dict(
        max_iter=90000,
        schedule="step",
        steps=[60000, 80000],
        decay=0.1,
        warmup_iters=1000,
        warmup_factor=0.001,
    )
    assert lr_factor(0, **kw) == pytest.approx(0.001)
    assert lr_factor(500, **kw) == pytest.approx(0.001 * 0.5 + 0.5)
    assert lr_factor(1000, **kw) == 1.0
    assert lr_factor(59999, **kw) == 1.0
    assert lr_factor(60000, **kw) == pytest.approx(0.1)
    assert lr_factor(80000, **kw) == pytest.approx(0.01)


def test_cosine_schedule():
    kw = dict(max_iter=100, schedule="cosine", warmup_iters=0)
    assert lr_factor(0, **kw) == 1.0
    assert lr_factor(50, **kw) == pytest.approx(0.5)
    assert lr_factor(100, **kw) == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(25, **kw) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))


def test_scheduler_drives_optimizer_lr():
    model = nn.Linear(2, 2)
    opt = create_optimizer(model, "sgd", 0.01, 1e-4)
    sched = create_lr_scheduler(opt, 10, "step", [5], 0.1, 2, 0.5)
    lrs = []
    for _ in range(8):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.005, 0.0075, 0.01, 0.01, 0.01, 0.001, 0.001, 0.001])


def test_no_weight_decay_on_norm_layers_and_frozen_params_excluded():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4), nn.Conv2d(4, 4, 1))
    model[2].weight.requires_grad_(False)
    groups = parameter_groups(model, weight_decay=1e-4, weight_decay_norm=0.0)
    decayed = {id(p) for p in groups[0]["params"]}
    not_decayed = {id(p) for p in groups[1]["params"]}
    assert groups[0]["weight_decay"] == 1e-4 and groups[1]["weight_decay"] == 0.0
    assert not_decayed == {id(model[1].weight), id(model[1].bias)}
    assert decayed == {id(model[0].weight), id(model[0].bias), id(model[2].bias)}


def test_unknown_optimizer_is_named():
    with pytest.raises(ValueError, match="'lamb'"):
        create_optimizer(nn.Linear(1, 1), "lamb", 0.1, 0.0)
    with pytest.raises(ValueError, match="'poly'"):
        lr_factor(0, 10, "poly")


def test_adamw_betas():
    opt = create_optimizer(nn.Linear(1, 1), "adamw", 1e-3, 0.05, adam_betas=(0.8, 0.9))
    assert isinstance(opt, torch.optim.AdamW) and opt.param_groups[0]["betas"] == (0.8, 0.9)


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_optimizer_implementations_give_the_same_updates(name):
    """fused, foreach and for_loop are kernels for one update rule: after a few steps on the
    same gradients the weights agree to float rounding."""
    results = {}
    for implementation in ("fused", "foreach", "for_loop"):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4), nn.Conv2d(4, 2, 1))
        opt = create_optimizer(model, name, 0.05, 1e-2, implementation=implementation)
        assert optimizer_implementation(opt) == implementation
        x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(1))
        for _ in range(3):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
        results[implementation] = torch.cat([p.detach().flatten() for p in model.parameters()])
    torch.testing.assert_close(results["fused"], results["for_loop"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(results["foreach"], results["for_loop"], rtol=1e-5, atol=1e-6)


def test_auto_implementation_prefers_fused_and_falls_back(monkeypatch):
    assert (
        optimizer_implementation(create_optimizer(nn.Linear(2, 2), "adamw", 1e-3, 0.0)) == "fused"
    )

    class NoFused(torch.optim.SGD):  # a PyTorch (or device) without a fused SGD
        def __init__(self, params, fused=None, **kwargs):
            if fused:
                raise RuntimeError("`fused=True` is not supported for this device")
            super().__init__(params, **kwargs)

    monkeypatch.setattr(torch.optim, "SGD", NoFused)
    opt = create_optimizer(nn.Linear(2, 2), "sgd", 0.1, 0.0)
    assert optimizer_implementation(opt) == "foreach"
    with pytest.raises(ValueError, match="optimizer_impl=fused.*not supported"):
        create_optimizer(nn.Linear(2, 2), "sgd", 0.1, 0.0, implementation="fused")


def test_resuming_keeps_this_runs_optimizer_kernels():
    model = nn.Linear(3, 2)
    saved = create_optimizer(model, "adamw", 1e-3, 0.0, implementation="foreach")
    model(torch.randn(4, 3)).sum().backward()
    saved.step()
    resumed = create_optimizer(model, "adamw", 1e-3, 0.0, implementation="fused")
    load_optimizer_state(resumed, saved.state_dict())
    assert optimizer_implementation(resumed) == "fused"
    assert resumed.state_dict()["state"][0]["step"] == saved.state_dict()["state"][0]["step"]
