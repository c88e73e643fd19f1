import json
import re

import pytest
import torch

from retinanet.config import config_to_yaml
from retinanet.engine import trainer as trainer_module
from retinanet.engine.checkpoint import FINAL_CHECKPOINT, find_last_checkpoint, load_checkpoint
from retinanet.engine.trainer import NonFiniteLossError, train


def _weights(path):
    return load_checkpoint(path)["model"]


def test_resume_reproduces_uninterrupted_run(tmp_path, tiny_config):
    full = train(tiny_config, tmp_path / "full", progress=False, evaluate=False)
    interrupted = train(
        tiny_config, tmp_path / "resumed", stop_at_iteration=4, progress=False, evaluate=False
    )
    assert interrupted.final_checkpoint is None
    # Stopped after iteration 4: the last checkpoint is the one written at iteration 3.
    assert find_last_checkpoint(tmp_path / "resumed").name == "model_0000003.pth"
    resumed = train(tiny_config, tmp_path / "resumed", resume=True, progress=False, evaluate=False)
    assert resumed.iterations == full.iterations == 6

    expected, got = _weights(full.final_checkpoint), _weights(resumed.final_checkpoint)
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key

    # The log of the resumed run has each iteration once, with the same losses.
    def log(path):
        return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]

    full_log, resumed_log = log(tmp_path / "full"), log(tmp_path / "resumed")
    assert (
        [r["iteration"] for r in resumed_log]
        == [r["iteration"] for r in full_log]
        == list(range(1, 7))
    )
    assert [r["loss"] for r in resumed_log] == [r["loss"] for r in full_log]


def test_checkpoint_contents(tmp_path, tiny_config):
    result = train(tiny_config, tmp_path, progress=False, evaluate=False)
    state = load_checkpoint(tmp_path / "model_0000006.pth")
    assert {
        "model",
        "config",
        "classes",
        "iteration",
        "optimizer",
        "scheduler",
        "rng",
    } <= state.keys()
    assert state["iteration"] == 6
    assert state["classes"]["names"] == [
        "circle",
        "square",
        "triangle",
        "star",
        "cross",
        "hexagon",
        "ring",
    ]
    assert state["config"]["train"]["max_iter"] == 6
    final = load_checkpoint(result.final_checkpoint)
    assert result.final_checkpoint.name == FINAL_CHECKPOINT and "optimizer" not in final
    assert (tmp_path / "config.yaml").is_file()
    assert list((tmp_path / "tensorboard").iterdir())


def _poison_at(monkeypatch, iteration_to_poison: int, term: str):
    """Make `term` NaN at one iteration (1-based) by wrapping the model's losses."""
    from retinanet.model.retinanet import RetinaNet

    original = RetinaNet.losses
    calls = {"n": 0}

    def losses(self, outputs, targets, progress=0.0):
        out = original(self, outputs, targets, progress)
        calls["n"] += 1
        if calls["n"] == iteration_to_poison:
            out[term] = out[term] * float("nan")
        return out

    monkeypatch.setattr(RetinaNet, "losses", losses)


def test_nonfinite_loss_stops_naming_iteration_and_term(tmp_path, tiny_config, monkeypatch):
    _poison_at(monkeypatch, 5, "loss_box")
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss_box at iteration 5") as err:
        train(tiny_config, tmp_path, progress=False, evaluate=False)
    assert "model_0000003.pth" in str(err.value)
    # Nothing was written after the failure; the earlier checkpoint is intact and loadable.
    assert sorted(p.name for p in tmp_path.glob("*.pth")) == ["model_0000003.pth"]
    assert load_checkpoint(tmp_path / "model_0000003.pth")["iteration"] == 3
    assert not list(tmp_path.glob(".*.tmp"))


def test_nonfinite_loss_can_skip_the_step(tmp_path, tiny_config, monkeypatch):
    import dataclasses

    _poison_at(monkeypatch, 2, "loss_cls")
    cfg = dataclasses.replace(
        tiny_config, train=dataclasses.replace(tiny_config.train, on_nonfinite="skip")
    )
    result = train(cfg, tmp_path, progress=False, evaluate=False)
    assert result.skipped_steps == 1 and result.iterations == 6
    for value in _weights(result.final_checkpoint).values():
        assert torch.isfinite(value.float()).all()


def test_batch_size_must_divide_world(tiny_config, tmp_path, monkeypatch):
    import dataclasses

    monkeypatch.setattr(trainer_module, "get_world_size", lambda: 3)
    cfg = dataclasses.replace(
        tiny_config, train=dataclasses.replace(tiny_config.train, batch_size=4)
    )
    with pytest.raises(ValueError, match="not divisible by the 3 processes"):
        train(cfg, tmp_path, progress=False, evaluate=False)


def test_training_from_scratch_refuses_to_freeze_random_weights(tmp_path, tiny_config):
    import dataclasses

    from retinanet.config import ConfigError

    backbone = dataclasses.replace(tiny_config.model.backbone, norm="frozen_bn", freeze_at=2)
    cfg = dataclasses.replace(
        tiny_config, model=dataclasses.replace(tiny_config.model, backbone=backbone)
    )
    with pytest.raises(
        ConfigError, match="model.backbone.norm=frozen_bn and model.backbone.freeze_at=2"
    ):
        train(cfg, tmp_path, progress=False, evaluate=False)


def test_keep_checkpoints_and_a_torn_log_line(tmp_path, tiny_config):
    import dataclasses

    cfg = dataclasses.replace(
        tiny_config,
        train=dataclasses.replace(tiny_config.train, checkpoint_period=1, keep_checkpoints=2),
    )
    train(cfg, tmp_path, stop_at_iteration=4, progress=False, evaluate=False)
    assert sorted(p.name for p in tmp_path.glob("model_*.pth")) == [
        "model_0000003.pth",
        "model_0000004.pth",
    ]
    # A crash while appending to metrics.jsonl leaves half a line; resuming drops it.
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"iteration": 5, "lo')
    with pytest.warns(UserWarning, match="metrics.jsonl:5: dropping an unreadable line"):
        result = train(cfg, tmp_path, resume=True, progress=False, evaluate=False)
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["iteration"] for x in lines] == [1, 2, 3, 4, 5, 6] and result.iterations == 6


def test_training_starts_from_init_weights(tmp_path, tiny_config):
    import dataclasses

    first = train(tiny_config, tmp_path / "first", progress=False, evaluate=False)
    start = _weights(first.final_checkpoint)
    # Frozen stages with no ImageNet weights are fine here: the weights come from the
    # checkpoint. A vanishing lr leaves the parameters where they were loaded.
    backbone = dataclasses.replace(tiny_config.model.backbone, weights="", freeze_at=2)
    cfg = dataclasses.replace(
        tiny_config,
        model=dataclasses.replace(tiny_config.model, backbone=backbone),
        train=dataclasses.replace(
            tiny_config.train,
            init_weights=str(first.final_checkpoint),
            base_lr=1e-12,
            max_iter=1,
            warmup_iters=0,
        ),
    )
    second = train(cfg, tmp_path / "second", progress=False, evaluate=False)
    after = _weights(second.final_checkpoint)
    params = [k for k in after if k.endswith((".weight", ".bias")) and "running" not in k]
    assert any(k.startswith("head.cls_score.") for k in params)
    for key in params:
        assert torch.allclose(after[key], start[key], atol=1e-9), key


def test_resume_skips_a_torn_newest_checkpoint(tmp_path, tiny_config, capsys):
    full = train(tiny_config, tmp_path / "full", progress=False, evaluate=False)
    tiny_config.train.checkpoint_period = 2
    run_dir = tmp_path / "torn"
    train(tiny_config, run_dir, stop_at_iteration=5, progress=False, evaluate=False)
    newest = run_dir / "model_0000004.pth"
    assert find_last_checkpoint(run_dir) == newest
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # cut short

    resumed = train(tiny_config, run_dir, resume=True, progress=False, evaluate=False)
    out = capsys.readouterr().out
    assert "resuming from model_0000002.pth, the newest readable checkpoint" in out
    assert "model_0000004.pth (cannot read checkpoint" in out
    expected, got = _weights(full.final_checkpoint), _weights(resumed.final_checkpoint)
    for key in expected:
        assert torch.equal(expected[key], got[key]), key


@pytest.mark.parametrize("num_workers", [0, 1])
def test_sigterm_writes_a_checkpoint_that_resume_continues(tmp_path, tiny_config, num_workers):
    """A cluster's preemption: SIGTERM mid-run ends the process within seconds with a
    checkpoint of the current iteration, equal to the state an uninterrupted run has there
    (so resuming from it continues exactly: see test_resume_reproduces_uninterrupted_run)."""
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    from .conftest import REPO, tiny_overrides

    run_dir = tmp_path / "preempted"
    # With loader workers too: they must not keep the process alive once it has stopped.
    long_run = ["train.max_iter=1000", "train.checkpoint_period=100000",
                f"data.num_workers={num_workers}"]  # fmt: skip
    command = [sys.executable, str(REPO / "tools" / "train.py"), "--config",
               str(REPO / "configs" / "shapes.yaml"), "--output-dir", str(run_dir), "--no-eval",
               "--device", "cpu", *tiny_overrides(Path(tiny_config.data.synthetic.root)),
               *long_run]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.1)
    process.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    _, stderr = process.communicate(timeout=60)
    assert time.monotonic() - sent < 60
    assert process.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    assert "stopped by SIGTERM after iteration" in stderr and "--resume" in stderr
    preempted = find_last_checkpoint(run_dir)
    stopped_at = int(preempted.stem.split("_")[1])
    assert 3 <= stopped_at < 1000

    tiny_config.train.max_iter = 1000
    tiny_config.train.checkpoint_period = stopped_at
    train(tiny_config, tmp_path / "reference", stop_at_iteration=stopped_at, progress=False,
          evaluate=False)  # fmt: skip
    expected = load_checkpoint(tmp_path / "reference" / preempted.name)
    got = load_checkpoint(preempted)
    assert got["iteration"] == expected["iteration"] == stopped_at
    for key, value in expected["model"].items():
        assert torch.equal(got["model"][key], value), key
    assert got["scheduler"] == expected["scheduler"]
    for a, b in zip(got["optimizer"]["state"].values(), expected["optimizer"]["state"].values(),
                    strict=True):  # fmt: skip
        assert all(torch.equal(a[k], b[k]) for k in b)

    resumed = train(tiny_config, run_dir, resume=True, stop_at_iteration=stopped_at + 2,
                    progress=False, evaluate=False)  # fmt: skip
    assert resumed.iterations == stopped_at + 2


def test_a_corrupt_training_image_stops_cleanly_or_is_skipped(tmp_path):
    from pathlib import Path

    from retinanet.config import load_config
    from retinanet.data import DatasetError
    from retinanet.data.build import resolve_data_paths

    from .conftest import REPO, tiny_overrides

    # A private tiny dataset with one training image cut short.
    cfg = load_config(REPO / "configs" / "shapes.yaml", tiny_overrides(tmp_path / "data"))
    cfg = resolve_data_paths(cfg)
    victim = sorted(Path(cfg.data.train.image_dir).iterdir())[5]
    victim.write_bytes(victim.read_bytes()[:100])

    with pytest.raises(DatasetError) as caught:
        train(cfg, tmp_path / "stop", progress=False, evaluate=False)
    message = str(caught.value)
    assert victim.name in message and "image id" in message and "Traceback" not in message
    assert "data.on_bad_image=skip" in message and "--resume" in message

    cfg.data.on_bad_image = "skip"
    result = train(cfg, tmp_path / "skip", progress=False, evaluate=False)
    assert result.iterations == cfg.train.max_iter
    logged = [json.loads(x) for x in (tmp_path / "skip" / "metrics.jsonl").read_text().splitlines()]
    assert max(x.get("skipped_images", 0) for x in logged) == 1


def test_a_full_disk_stops_the_run_and_keeps_the_previous_checkpoints(
    tmp_path, tiny_config, monkeypatch, capsys
):
    """ENOSPC while writing a checkpoint: a one-line error, no partial file, and the checkpoints
    written before are intact and still named for --resume."""
    import errno

    from retinanet.cli import main as cli

    real_save = torch.save
    saves = []

    def save_until_the_disk_is_full(obj, f, *args, **kwargs):
        saves.append(1)
        if len(saves) >= 2:
            f.write(b"half a checkpoint")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_until_the_disk_is_full)
    config = tmp_path / "tiny.yaml"
    config.write_text(config_to_yaml(tiny_config))
    run_dir = tmp_path / "run"
    code = cli(["train", "--config", str(config), "--output-dir", str(run_dir), "--device", "cpu",
                      "--no-eval"])  # fmt: skip
    assert code == 1
    # The error names the file that could not be written (torch.save's own message does not).
    err = capsys.readouterr().err
    assert re.search(
        rf"error: \[Errno 28\] could not write {re.escape(str(run_dir))}/model_\w+\.pth: "
        "No space left on device",
        err,
    ), err
    assert sorted(p.name for p in run_dir.glob("model_*")) == ["model_0000003.pth"]
    assert not list(run_dir.glob(".*.tmp"))  # no partial file left behind
    assert find_last_checkpoint(run_dir).name == "model_0000003.pth"
    assert load_checkpoint(run_dir / "model_0000003.pth")["iteration"] == 3


def _scripted_evaluation(monkeypatch, ap_at: dict[int, float]):
    """Replace COCO evaluation by scores scripted per iteration (the final evaluation, in
    folder eval/, scores like the last periodic one), recording which iterations were scored."""
    from retinanet.engine.coco_metrics import CocoMetrics

    scored = []

    def evaluate_model(model, dataset, classes, device, cfg, output_dir, **kwargs):
        name = output_dir.name
        iteration = int(name.split("_")[1]) if "_" in name else max(ap_at)
        scored.append(iteration)
        numbers = dict.fromkeys(("AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100"), 0.0)
        numbers.update({"ARs": 0.0, "ARm": 0.0, "ARl": 0.0})
        return CocoMetrics(
            AP=ap_at[iteration], AP50=1 - ap_at[iteration], **numbers, per_category=(),
            summary="", backend="scripted", num_images=1, num_detections=1,
        )  # fmt: skip

    monkeypatch.setattr(trainer_module, "evaluate_model", evaluate_model)
    return scored


def test_best_checkpoint_and_early_stop_survive_resume(tmp_path, tiny_config, monkeypatch):
    """AP 0.1, 0.3, 0.2, 0.25 at iterations 2, 4, 6, 8: model_best.pth is iteration 4's, and
    with patience 2 training ends after iteration 8 (of 12) with a final checkpoint; a run
    interrupted at 5 and resumed ends the same, bit for bit."""
    from retinanet.config import load_config
    from retinanet.engine.checkpoint import BEST_CHECKPOINT

    from .conftest import REPO, tiny_overrides

    scored = _scripted_evaluation(monkeypatch, {2: 0.1, 4: 0.3, 6: 0.2, 8: 0.25})
    overrides = ["train.max_iter=12", "train.eval_period=2", "train.early_stop_patience=2"]
    root = tmp_path / "data"
    cfg = load_config(REPO / "configs" / "shapes.yaml", [*tiny_overrides(root), *overrides])

    full = train(cfg, tmp_path / "full", progress=False)
    assert full.iterations == 8 and full.final_checkpoint.name == FINAL_CHECKPOINT
    assert scored == [2, 4, 6, 8, 8]  # the periodic evaluations, then the final one
    assert (full.best.iteration, full.best.value) == (4, 0.3)
    best = json.loads((tmp_path / "full" / "best_metrics.json").read_text())
    assert best["iteration"] == 4 and best["metrics"]["AP"] == 0.3
    assert load_checkpoint(tmp_path / "full" / BEST_CHECKPOINT)["iteration"] == 4

    train(cfg, tmp_path / "resumed", stop_at_iteration=5, progress=False)
    resumed = train(cfg, tmp_path / "resumed", resume=True, progress=False)
    assert resumed.iterations == 8 and resumed.best == full.best
    for name in (FINAL_CHECKPOINT, BEST_CHECKPOINT):
        expected, got = _weights(tmp_path / "full" / name), _weights(tmp_path / "resumed" / name)
        assert all(torch.equal(expected[k], got[k]) for k in expected), name

    # Resuming a run that stopped early redoes only its end.
    again = train(cfg, tmp_path / "full", resume=True, progress=False)
    assert again.iterations == 8


def test_best_metric_is_checked(tmp_path):
    from retinanet.config import ConfigError, load_config

    from .conftest import REPO

    with pytest.raises(ConfigError, match="train.best_metric.*'AP50'.*got 'mAP'"):
        load_config(REPO / "configs" / "shapes.yaml", ["train.best_metric=mAP"])


def test_the_fp16_loss_scale_is_checkpointed_and_resumed(tmp_path, tiny_config, monkeypatch):
    """On a GPU with fp16 the GradScaler's scale is training state: a resumed run continues
    with it rather than restarting at 2**16. A CPU scaler stands in for the CUDA one."""
    import dataclasses

    scalers = []

    def cpu_scaler(amp, device):
        scalers.append(torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=1))
        return scalers[-1]

    monkeypatch.setattr(trainer_module, "grad_scaler", cpu_scaler)
    cfg = dataclasses.replace(
        tiny_config, train=dataclasses.replace(tiny_config.train, checkpoint_period=2)
    )
    train(cfg, tmp_path, stop_at_iteration=2, progress=False, evaluate=False)
    saved = load_checkpoint(tmp_path / "model_0000002.pth")["scaler"]
    assert saved["scale"] == scalers[0].get_scale() > 1024.0  # it grew with finite steps
    train(cfg, tmp_path, resume=True, stop_at_iteration=2, progress=False, evaluate=False)
    assert scalers[1].get_scale() == saved["scale"]
