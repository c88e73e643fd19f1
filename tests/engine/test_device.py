"""Device and precision choice on CUDA machines, proved on CPU with a faked torch.cuda (see
the `fake_cuda` fixture): the set-up a GPU user's run goes through, up to the first kernel."""

import pytest
import torch

from retinanet.engine import step as step_module
from retinanet.engine.device import resolve_device
from retinanet.engine.distributed import init_distributed
from retinanet.engine.precision import grad_scaler, resolve_amp
from retinanet.engine.step import setup_device, wrap_distributed


def torchrun_env(monkeypatch, local_rank: int, world_size: int = 2) -> None:
    monkeypatch.setenv("RANK", str(local_rank))
    monkeypatch.setenv("WORLD_SIZE", str(world_size))
    monkeypatch.setenv("LOCAL_RANK", str(local_rank))


def test_the_fake_rejects_an_unindexed_device_like_torch_does(fake_cuda):
    # The bug this module guards against: torch.cuda.set_device(torch.device("cuda")).
    with pytest.raises(ValueError, match="specified index"):
        torch.cuda.set_device(torch.device("cuda"))
    torch.cuda.set_device(torch.device("cuda", 1))
    assert fake_cuda.set_device_calls == [1]


@pytest.mark.parametrize(
    ("spec", "current", "expected"),
    [("auto", 0, "cuda:0"), ("cuda", 0, "cuda:0"), ("cuda", 1, "cuda:1"), ("CUDA:1", 0, "cuda:1"),
     ("cpu", 0, "cpu"), (torch.device("cuda"), 1, "cuda:1")],
)  # fmt: skip
def test_cuda_devices_always_carry_an_index(fake_cuda, spec, current, expected):
    fake_cuda.current = current
    device = resolve_device(spec)
    assert device == torch.device(expected)
    assert device.type == "cpu" or device.index is not None


def test_single_gpu_run_starts_with_every_device_spelling(fake_cuda):
    for spec in ("auto", "cuda", "cuda:1"):
        device = init_distributed(spec)
        assert device.type == "cuda" and fake_cuda.set_device_calls[-1] == device.index
    assert fake_cuda.set_device_calls == [0, 0, 1]


def test_torchrun_processes_take_the_gpu_of_their_local_rank(fake_cuda, monkeypatch):
    torchrun_env(monkeypatch, local_rank=1)
    assert resolve_device("auto") == resolve_device("cuda") == resolve_device("cuda:1")
    assert resolve_device("cuda") == torch.device("cuda", 1)
    with pytest.raises(ValueError, match="LOCAL_RANK"):
        resolve_device("cuda:0")  # would put two processes on GPU 0
    torchrun_env(monkeypatch, local_rank=3, world_size=4)
    with pytest.raises(ValueError, match="LOCAL_RANK=3: no such GPU; .* 2 CUDA device"):
        resolve_device("cuda")


def test_one_visible_gpu_per_task_under_torchrun(fake_cuda, monkeypatch):
    fake_cuda.count = 1  # CUDA_VISIBLE_DEVICES set per rank by the scheduler
    torchrun_env(monkeypatch, local_rank=3, world_size=4)
    assert resolve_device("cuda") == torch.device("cuda", 0)


def test_bad_device_names_are_named(fake_cuda):
    with pytest.raises(ValueError, match="'cuda:2': no such GPU"):
        resolve_device("cuda:2")
    with pytest.raises(ValueError, match="'gpu0'"):
        resolve_device("gpu0")
    with pytest.raises(ValueError, match="only cpu and cuda"):
        resolve_device("meta")


def test_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        resolve_device("cuda")


@pytest.mark.parametrize(
    ("capability", "auto", "scaler"),
    [((7, 0), "fp16", True), ((7, 5), "fp16", True), ((8, 0), "bf16", False),
     ((9, 0), "bf16", False)],
)  # fmt: skip
def test_amp_auto_uses_bf16_only_where_the_gpu_computes_it(fake_cuda, capability, auto, scaler):
    fake_cuda.capability = capability
    device = resolve_device("cuda")
    assert resolve_amp("auto", device) == auto
    assert (grad_scaler("auto", device) is not None) == scaler
    assert grad_scaler("", device) is None


def test_explicit_bf16_on_an_older_gpu_is_refused(fake_cuda):
    fake_cuda.capability = (7, 0)
    with pytest.raises(ValueError, match=r"compute capability 7\.0.*emulated"):
        resolve_amp("bf16", resolve_device("cuda"))
    assert resolve_amp("fp16", resolve_device("cuda")) == "fp16"


def test_fp16_is_refused_on_cpu():
    with pytest.raises(ValueError, match="needs a CUDA device"):
        resolve_amp("fp16", torch.device("cpu"))


def test_training_setup_on_a_gpu(fake_cuda):
    fake_cuda.capability = (7, 0)
    previous = torch.backends.cudnn.benchmark
    try:
        device, amp = setup_device("cuda", "auto", cudnn_benchmark=True)
        assert device == torch.device("cuda", 0) and amp == "fp16"
        assert torch.backends.cudnn.benchmark is True
        device, amp = setup_device("auto", "", cudnn_benchmark=False)
        assert amp is None and torch.backends.cudnn.benchmark is False
    finally:
        torch.backends.cudnn.benchmark = previous


def test_ddp_wrapper_arguments(fake_cuda, monkeypatch):
    recorded = {}

    class RecordingDDP:
        def __init__(self, module, **kwargs):
            recorded.update(kwargs)

    monkeypatch.setattr(step_module, "DistributedDataParallel", RecordingDDP)
    monkeypatch.setattr(step_module, "get_world_size", lambda: 2)
    model = torch.nn.Linear(2, 2)
    wrap_distributed(model, torch.device("cuda", 1))
    assert recorded == {
        "device_ids": [1],
        "broadcast_buffers": False,
        "gradient_as_bucket_view": True,
    }
    wrap_distributed(model, torch.device("cpu"), broadcast_buffers=True)
    assert recorded["device_ids"] is None and recorded["broadcast_buffers"] is True
    monkeypatch.setattr(step_module, "get_world_size", lambda: 1)
    assert wrap_distributed(model, torch.device("cpu")) is model


class _ReachedTheGpu(Exception):
    pass


def test_train_with_device_cuda_gets_to_the_gpu(fake_cuda, monkeypatch, tiny_config, tmp_path):
    """`tools/train.py --device cuda` on a one-GPU machine: set-up, dataset, model and the
    messages run up to the first real GPU work (moving the model), which gets an indexed device."""
    from retinanet.engine.trainer import train

    moved_to = []
    real_to = torch.nn.Module.to

    def to(module, *args, **kwargs):
        device = args[0] if args else kwargs.get("device")
        if isinstance(device, (str, torch.device)) and torch.device(device).type == "cuda":
            moved_to.append(torch.device(device))
            raise _ReachedTheGpu
        return real_to(module, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "to", to)
    fake_cuda.capability = (7, 5)  # a T4: fp16 with loss scaling
    tiny_config.precision.amp = "auto"
    previous = torch.backends.cudnn.benchmark
    try:
        with pytest.raises(_ReachedTheGpu):
            train(tiny_config, tmp_path, device="cuda", progress=True)
    finally:
        torch.backends.cudnn.benchmark = previous
    assert moved_to == [torch.device("cuda", 0)]
    assert fake_cuda.set_device_calls == [0]
