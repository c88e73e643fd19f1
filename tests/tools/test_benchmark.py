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
