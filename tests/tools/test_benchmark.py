"""tools/benchmark.py: the recipe-step mode times both CPU classes in their own processes."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_recipe_mode_times_native_and_emulated_avx2(tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(
        f"_base_: {REPO / 'configs' / 'shapes.yaml'}\n"
        "model: {fpn: {channels: 16}, head: {num_convs: 1}}\n"
        "input: {min_size: [64], max_size: 64}\n"
        "train: {batch_size: 2}\n"
    )
    output = tmp_path / "bench.json"
    command = [sys.executable, str(REPO / "tools" / "benchmark.py"), "--no-parts", "--recipe",
               str(config), "--steps", "1", "--rounds", "1", "--output", str(output)]  # fmt: skip
    run = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    (result,) = json.loads(output.read_text())["results"]
    assert set(result["seconds"]) == {"native_auto", "avx2_fp32"}
    assert all(s > 0 for s in result["seconds"].values())
    assert result["details"]["avx2_fp32"] == "fp32 on AVX2"
    assert "avx2_fp32" in run.stdout


def test_bad_device_is_an_error_not_a_traceback():
    command = [sys.executable, str(REPO / "tools" / "benchmark.py"), "--device", "tpu"]
    run = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert run.returncode == 1 and run.stderr.startswith("error: --device 'tpu'")


def test_inference_benchmark_at_a_tiny_size(tmp_path, monkeypatch, capsys):
    """Every contender runs, or is skipped with its reason (here the compiler is made to fail,
    which also keeps the test fast), and the table and JSON give images/s per batch size."""
    import torch

    import retinanet.engine.benchmark as benchmark
    from retinanet.cli import main as cli
    from retinanet.engine.precision import resolve_amp

    def no_compiler(model, backend="inductor"):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(benchmark, "compile_network", no_compiler)
    output = tmp_path / "bench.json"
    args = ["benchmark", "--no-parts", "--inference", "--height", "64", "--width", "96",
            "--batch-sizes", "1", "2", "--repeats", "1", "--output", str(output)]  # fmt: skip
    assert cli(args) == 0
    (result,) = json.loads(output.read_text())["results"]
    measured = result["images_per_s"]
    native_bf16 = resolve_amp("auto", torch.device("cpu")) == "bf16"
    expected = {"torchvision", "ours_fp32_unfolded", "ours_fp32", "ours_fp32_channels_last"}
    expected.add("onnxruntime")
    assert set(measured) == expected | ({"ours_bf16"} if native_bf16 else set())
    assert all(set(per) == {"1", "2"} and min(per.values()) > 0 for per in measured.values())
    assert result["skipped"]["ours_compiled"] == "RuntimeError: no compiler here"
    if not native_bf16:
        assert "no native bf16" in result["skipped"]["ours_bf16"]
    speedup = result["speedup_vs_torchvision"]
    assert speedup["torchvision"] == {"1": 1.0, "2": 1.0}
    assert speedup["ours_fp32"]["2"] == measured["ours_fp32"]["2"] / measured["torchvision"]["2"]
    printed = capsys.readouterr().out
    assert "R50-FPN inference, 64x96, cpu" in printed and "| onnxruntime |" in printed
    assert "target >= 1.1x" in printed


def test_inference_benchmark_rejects_a_zero_batch(capsys):
    from retinanet.cli import main as cli

    assert cli(["benchmark", "--no-parts", "--inference", "--batch-sizes", "0"]) == 1
    assert "error: --batch-sizes must be positive" in capsys.readouterr().err
