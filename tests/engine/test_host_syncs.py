"""The host-sync budget of a training step: at most one wait for the device per non-logging
iteration (the check that the loss is finite), counted on CPU with HostSyncCounter."""

import pytest
import torch

from retinanet.config import load_config
from retinanet.data.collate import Batch
from retinanet.engine.host_sync import HostSyncCounter
from retinanet.engine.optim import build_optimizer
from retinanet.engine.step import StepParts, train_step
from retinanet.model.build import build_model

from .conftest import REPO

SYNC_BUDGET = 1


def make_batch(num_images: int = 3, size: int = 64, seed: int = 0) -> Batch:
    """Random images with boxes; the second image has none, the third a crowd region."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (num_images, 3, size, size), generator=g, dtype=torch.uint8)
    targets = []
    for i in range(num_images):
        n = 0 if i == 1 else 3
        xy = torch.rand(n, 2, generator=g) * size * 0.6
        wh = 6 + torch.rand(n, 2, generator=g) * size * 0.3
        crowd = torch.tensor([[0.0, 0.0, 30.0, 30.0]]) if i == 2 else torch.zeros(0, 4)
        targets.append(
            {
                "boxes": torch.cat([xy, xy + wh], 1),
                "labels": torch.randint(0, 3, (n,), generator=g),
                "crowd_boxes": crowd,
            }
        )
    sizes = torch.tensor([[size, size]] * num_images)
    return Batch(images, sizes, targets, list(range(num_images)), [(size, size)] * num_images)


def step_parts(overrides: list[str]) -> StepParts:
    cfg = load_config(
        REPO / "configs" / "shapes.yaml",
        [
            "model.fpn.channels=32",
            "model.anchors.sizes=[8,16,32,64,128]",
            "model.head.num_convs=1",
            "precision.amp=",
            "precision.channels_last=false",
            *overrides,
        ],
    )
    model = build_model(cfg, num_classes=3)
    if cfg.precision.channels_last:
        model.use_channels_last()
    t = cfg.train
    optimizer = build_optimizer(cfg, model)  # lr 1e-3: the recipe's, at its batch size
    model.train()
    return StepParts(
        model, model, optimizer, cfg.precision.amp, torch.device("cpu"), None, t.clip_grad_norm
    )


@pytest.mark.parametrize(
    "overrides",
    [
        [],  # the shapes recipe: AdamW (fused), GroupNorm, BN backbone
        ["precision.amp=bf16", "precision.channels_last=true"],
        ["train.optimizer=sgd", "loss.normalizer=ema", "train.clip_grad_norm=1.0"],
        ["loss.box_loss=giou", "loss.gamma_schedule=cosine"],
        ["loss.box_loss=giou", "precision.amp=bf16"],  # box deltas decoded from bf16 outputs
        ["loss.modulation=exponential", "loss.alpha=null", "model.fpn.norm="],
        ["train.optimizer_impl=foreach", "train.optimizer=sgd"],
    ],
    ids=[
        "recipe",
        "bf16-channels-last",
        "sgd-ema-clip",
        "giou-gamma-schedule",
        "giou-bf16",
        "exp",
        "foreach",
    ],
)
def test_training_step_waits_for_the_device_at_most_once(overrides):
    parts = step_parts(overrides)
    batch = make_batch()
    train_step(parts, batch, progress=0.0)  # first step: anchors cached, optimizer state made
    with HostSyncCounter() as syncs:
        losses, finite, _ = train_step(parts, batch, progress=0.5)
    assert finite and torch.isfinite(losses["loss"])
    assert syncs.total <= SYNC_BUDGET, dict(syncs.counts)
    # The one sync is the finiteness check of the loss.
    assert syncs.counts["_local_scalar_dense"] == syncs.total


def test_grad_scaler_adds_no_sync_with_a_fused_optimizer():
    """fp16 training scales the loss; with a fused optimizer the overflow check runs inside the
    kernel, so the step still syncs once. (With foreach or for_loop kernels GradScaler reads
    the check on the host, a second sync on a GPU; on a CPU their per-parameter step counters
    are read too, which hides it here. That is why train.optimizer_impl=auto picks fused.)"""
    parts = step_parts(["train.optimizer_impl=fused"])
    parts.scaler = torch.amp.GradScaler("cpu")
    batch = make_batch()
    train_step(parts, batch, progress=0.0)
    with HostSyncCounter() as syncs:
        result = train_step(parts, batch, progress=0.5)
    assert result.taken and syncs.total == 1, dict(syncs.counts)


def test_counter_sees_the_operators_that_sync():
    x = torch.tensor([0.5, -1.0, 2.0])
    with HostSyncCounter() as syncs:
        x.sum().item()
        torch.nonzero(x > 0)
        x[x > 0]
        x[torch.tensor([0, 2])]  # integer indices: no sync
        y = x.clone()
        y[y < 0] = 0.0
        torch.where(x > 0, x, 0.0)  # fixed shape: no sync
        bool(x.any())
        x.repeat_interleave(torch.tensor([1, 2, 1]))
    assert dict(syncs.counts) == {
        "_local_scalar_dense": 2,
        "nonzero": 1,
        "index (boolean mask)": 1,
        "index_put_ (boolean mask)": 1,
        "repeat_interleave (tensor repeats)": 1,
    }


def test_nonfinite_loss_skips_the_update():
    parts = step_parts([])
    batch = make_batch()
    train_step(parts, batch, progress=0.0)
    # Parameters only: BatchNorm statistics move in every forward, as in any skipped step.
    before = {k: v.detach().clone() for k, v in parts.model.named_parameters()}
    with torch.no_grad():
        parts.model.head.cls_score.bias.fill_(float("nan"))
    steps = [state["step"].clone() for state in parts.optimizer.state.values()]
    losses, finite, _ = train_step(parts, batch, progress=0.5)
    assert not finite and not torch.isfinite(losses["loss_cls"])
    after = dict(parts.model.named_parameters())
    for key, value in before.items():
        if key == "head.cls_score.bias":
            assert bool(torch.isnan(after[key]).all())
        else:
            assert torch.equal(after[key], value), key
    assert [state["step"] for state in parts.optimizer.state.values()] == steps


def test_a_stop_request_travels_in_the_same_sync():
    parts = step_parts([])
    batch = make_batch()
    train_step(parts, batch, progress=0.0)
    parts.stop_requested = lambda: True
    with HostSyncCounter() as syncs:
        result = train_step(parts, batch, progress=0.5)
    assert result.taken and result.stop  # the step is finished, then training stops
    assert syncs.total == 1
