"""The ablation grid driver and tools/ablate.py."""

import csv
import json
import math
from pathlib import Path

import pytest

from retinanet.analysis import ablation
from retinanet.analysis.ablation import (
    GRIDS,
    run_ablation,
    scaled_schedule_overrides,
    select_settings,
    setting_config,
    setting_status,
)
from retinanet.cli import main as cli
from retinanet.config import ConfigError, config_to_yaml, load_config
from retinanet.data.build import resolve_data_paths
from retinanet.engine.trainer import NonFiniteLossError
from retinanet.files import atomic_write_json, atomic_write_text

REPO = Path(__file__).resolve().parents[2]
SHAPES = REPO / "configs" / "shapes.yaml"


class FakeTrain:
    """Stands in for `train`: writes what a finished run leaves behind (config.yaml and
    eval/metrics.json with AP = alpha / 10 + train.seed / 1000, AP50 = alpha / 5,
    AP75 = gamma / 100), or raises NonFiniteLossError for the settings named in `fail`."""

    def __init__(self, fail=()):
        self.calls = []
        self.fail = set(fail)

    def __call__(self, cfg, output_dir, resume=False, device="auto", progress=True):
        output_dir = Path(output_dir)
        self.calls.append((output_dir.name, resume))
        atomic_write_text(output_dir / "config.yaml", config_to_yaml(resolve_data_paths(cfg)))
        if output_dir.name in self.fail:
            raise NonFiniteLossError("non-finite loss_cls at iteration 3")
        alpha, gamma, seed = cfg.loss.alpha, cfg.loss.gamma, cfg.train.seed
        metrics = {"AP": alpha / 10 + seed / 1000, "AP50": alpha / 5, "AP75": gamma / 100}
        atomic_write_json(output_dir / "eval" / "metrics.json", metrics)


@pytest.fixture
def fake_train(monkeypatch):
    def install(fail=()):
        fake = FakeTrain(fail)
        monkeypatch.setattr(ablation, "train", fake)
        return fake

    return install


def _read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_grids_hold_the_papers_settings():
    table1a = {s.name: s for s in GRIDS["table1a"].settings}
    assert list(table1a) == [
        "alpha0.10",
        "alpha0.25",
        "alpha0.50",
        "alpha0.75",
        "alpha0.90",
        "alpha0.99",
        "alpha0.999",
    ]
    assert table1a["alpha0.75"].paper.AP == 31.1
    table1b = {s.name: s for s in GRIDS["table1b"].settings}
    assert table1b["gamma2.0_alpha0.25"].paper.AP50 == 52.5
    assert table1b["gamma0.5_alpha0.50"].paper.AP75 == 35.2
    cfg = setting_config(SHAPES, "table1b", table1b["gamma0.5_alpha0.50"])
    assert (cfg.loss.gamma, cfg.loss.alpha) == (0.5, 0.5)
    cfg = setting_config(SHAPES, "gamma_schedule", GRIDS["gamma_schedule"].setting("cosine"))
    assert (cfg.loss.gamma_schedule, cfg.loss.gamma_start, cfg.loss.gamma) == ("cosine", 0.0, 2.0)
    setting = GRIDS["gamma_schedule"].setting("linear_alpha_ramp")
    cfg = setting_config(SHAPES, "gamma_schedule", setting)
    assert (cfg.loss.alpha_start, cfg.loss.alpha, cfg.loss.gamma_start) == (0.75, 0.25, 0.0)
    cfg = setting_config(SHAPES, "modulation", GRIDS["modulation"].setting("exponential_f0.01"))
    assert cfg.loss.modulation == "exponential"
    assert cfg.loss.exponential_beta == pytest.approx(math.log(100) / 0.9, rel=1e-5)
    assert [s.name for s in GRIDS["calibration"].settings] == [
        "ce", "ce_smoothing0.1", "focal_gamma1", "focal_gamma2", "focal_gamma3", "flsd53",
    ]  # fmt: skip
    cfg = setting_config(SHAPES, "calibration", GRIDS["calibration"].setting("ce_smoothing0.1"))
    assert (cfg.loss.gamma, cfg.loss.alpha, cfg.loss.label_smoothing) == (0.0, 0.75, 0.1)
    assert all(s.paper is None for s in GRIDS["modulation"].settings)


@pytest.mark.parametrize("f_at_09", [0.01, math.cos(0.45 * math.pi), 0.5])
def test_modulation_grid_matches_the_factors_at_p_09(f_at_09):
    """Each factor the matched-strength helper configures weighs p_t = 0.9 by the same f."""
    import torch

    from retinanet.model.build import build_modulation

    base = load_config(SHAPES)
    settings = ablation.matched_modulations(f_at_09)
    assert set(settings) == {"power", "exponential", "gaussian", "cos"} - (
        set() if f_at_09 >= math.cos(0.45 * math.pi) - 1e-12 else {"cos"}
    )
    for overrides in settings.values():
        cfg = load_config(SHAPES, list(overrides))
        assert cfg.loss.modulation != base.loss.modulation or overrides[0].endswith("power")
        factor = build_modulation(cfg.loss)
        value = factor(torch.tensor([0.9], dtype=torch.float64)).item()
        assert value == pytest.approx(f_at_09, rel=1e-4), overrides


def test_max_iter_scales_the_whole_schedule():
    cfg = load_config(REPO / "configs" / "retinanet_R50_FPN_1x.yaml")
    assert scaled_schedule_overrides(cfg, 9000) == [
        "train.max_iter=9000",
        "train.lr_steps=[6000,8000]",
        "train.warmup_iters=100",
        "train.checkpoint_period=500",
    ]
    setting = GRIDS["table1a"].setting("alpha0.25")
    scaled = setting_config(
        REPO / "configs" / "retinanet_R50_FPN_1x.yaml", "table1a", setting, max_iter=900
    )
    assert (scaled.train.max_iter, scaled.train.lr_steps, scaled.train.warmup_iters) == (
        900,
        [600, 800],
        10,
    )


def test_overrides_of_varied_keys_and_unknown_names_are_errors():
    setting = GRIDS["table1a"].setting("alpha0.25")
    with pytest.raises(ConfigError, match="loss.alpha=0.5.*varies"):
        setting_config(SHAPES, "table1a", setting, ["loss.alpha=0.5"])
    with pytest.raises(ValueError, match="unknown grid 'table2'"):
        select_settings("table2")
    with pytest.raises(ValueError, match="no setting 'alpha0.3'.*alpha0.25"):
        select_settings("table1a", ["alpha0.3"])
    assert [s.name for s in select_settings("table1a", ["alpha0.99", "alpha0.10"])] == [
        "alpha0.10",
        "alpha0.99",
    ]


def test_grid_skips_finished_settings_and_tabulates_them(
    tmp_path, tiny_config_overrides, fake_train
):
    fake = fake_train()
    only = ["alpha0.25", "alpha0.75"]
    statuses = run_ablation(
        SHAPES, tmp_path, "table1a", tiny_config_overrides, only=only, progress=False
    )
    assert statuses == {"alpha0.25": "finished", "alpha0.75": "finished"}
    assert fake.calls == [("alpha0.25", True), ("alpha0.75", True)]

    # A second call trains nothing more; a third adds one setting, and the table has all three.
    run_ablation(SHAPES, tmp_path, "table1a", tiny_config_overrides, only=only, progress=False)
    assert len(fake.calls) == 2
    run_ablation(
        SHAPES, tmp_path, "table1a", tiny_config_overrides, only=["alpha0.99"], progress=False
    )
    assert [name for name, _ in fake.calls] == ["alpha0.25", "alpha0.75", "alpha0.99"]

    rows = _read_csv(tmp_path / "ablation.csv")
    assert list(rows[0]) == [
        "setting",
        "status",
        "alpha",
        "gamma",
        "AP",
        "AP50",
        "AP75",
        "paper_AP",
        "paper_AP50",
        "paper_AP75",
        "AP_std",
        "AP50_std",
        "AP75_std",
        "seeds",
        "AP_per_seed",
        "error",
    ]
    assert [r["setting"] for r in rows] == ["alpha0.25", "alpha0.75", "alpha0.99"]
    row = rows[1]
    assert (float(row["alpha"]), float(row["gamma"])) == (0.75, 0.0)
    assert (float(row["AP"]), float(row["AP50"]), float(row["AP75"])) == (0.075, 0.15, 0.0)
    assert float(row["paper_AP"]) == pytest.approx(0.311)

    markdown = (tmp_path / "ablation.md").read_text()
    # Ours (AP 7.5, AP50 15.0, AP75 0.0) beside the paper's 31.1 / 49.4 / 33.0.
    assert "| alpha0.75 | finished | 0.75 | 0 | 7.5 | 15.0 | 0.0 | 31.1 | 49.4 | 33.0 |" in markdown
    assert "| alpha0.99 | finished | 0.99 | 0 | 9.9 | 19.8 | 0.0 | 28.7 | 47.4 | 29.9 |" in markdown
    assert "alpha0.50" not in markdown


def test_failed_setting_is_recorded_and_the_grid_goes_on(
    tmp_path, tiny_config_overrides, fake_train
):
    fake = fake_train(fail={"ce"})
    statuses = run_ablation(
        SHAPES,
        tmp_path,
        "calibration",
        tiny_config_overrides,
        only=["ce", "focal_gamma1"],
        progress=False,
    )
    assert statuses == {"ce": "failed", "focal_gamma1": "finished"}
    assert setting_status(tmp_path / "ce") == "failed"
    assert "iteration 3" in json.loads((tmp_path / "ce" / "failed.json").read_text())["error"]
    rows = {r["setting"]: r for r in _read_csv(tmp_path / "ablation.csv")}
    assert rows["ce"]["status"] == "failed" and rows["ce"]["AP"] == ""
    assert "paper_AP" not in rows["focal_gamma1"]
    markdown = (tmp_path / "ablation.md").read_text()
    assert "- `ce`: non-finite loss_cls at iteration 3" in markdown

    # Failed settings are skipped, unless retried; a successful retry clears the failure.
    run_ablation(
        SHAPES, tmp_path, "calibration", tiny_config_overrides, only=["ce"], progress=False
    )
    assert len(fake.calls) == 2
    fake.fail.clear()
    statuses = run_ablation(
        SHAPES,
        tmp_path,
        "calibration",
        tiny_config_overrides,
        only=["ce"],
        retry_failed=True,
        progress=False,
    )
    assert statuses == {"ce": "finished"} and len(fake.calls) == 3
    assert not (tmp_path / "ce" / "failed.json").exists()


def test_tool_lists_and_reports_bad_input(tmp_path, capsys):
    assert cli(["ablate", "--grid", "modulation", "--list"]) == 0
    assert capsys.readouterr().out.split() == [
        "power_f0.01",
        "exponential_f0.01",
        "gaussian_f0.01",
        "power_f0.16",
        "exponential_f0.16",
        "gaussian_f0.16",
        "cos_f0.16",
        "cos_literal",
    ]
    assert cli(["ablate", "--list"]) == 0
    listing = capsys.readouterr().out
    for name, spec in GRIDS.items():
        assert f"{name}: {spec.description}\n" in listing
        assert all(f"\n  {setting.name}\n" in listing for setting in spec.settings)
    assert "  linear_alpha_ramp\n" in listing and "  flsd53\n" in listing
    assert cli(["ablate", "--grid", "table9", "--list"]) == 1
    assert "unknown grid 'table9'" in capsys.readouterr().err
    base = ["--config", str(SHAPES), "--output-dir", str(tmp_path), "--grid", "table1b"]
    assert cli(["ablate", *base, "--only", "gamma3.0_alpha0.25"]) == 1
    assert "no setting 'gamma3.0_alpha0.25'" in capsys.readouterr().err
    assert cli(["ablate", "--config", str(tmp_path / "missing.yaml"), "--output-dir", "x"]) == 1
    assert "missing.yaml" in capsys.readouterr().err
    assert cli(["ablate", "--grid", "table1b"]) == 1
    assert "--config and --output-dir are required" in capsys.readouterr().err


def test_tool_trains_one_setting_end_to_end(tmp_path, tiny_config_overrides, capsys):
    args = ["--config", str(SHAPES), "--output-dir", str(tmp_path), "--grid", "calibration"]
    args += ["--only", "focal_gamma3", "--max-iter", "1", "--device", "cpu", *tiny_config_overrides]
    assert cli(["ablate", *args]) == 0
    assert "| focal_gamma3 | finished | – | 3 | 0.25 | – |" in capsys.readouterr().out
    assert (tmp_path / "focal_gamma3" / "model_final.pth").is_file()
    [row] = _read_csv(tmp_path / "ablation.csv")
    metrics = json.loads((tmp_path / "focal_gamma3" / "eval" / "metrics.json").read_text())
    assert float(row["AP"]) == metrics["AP"] and float(row["AP50"]) == metrics["AP50"]
    assert load_config(tmp_path / "focal_gamma3" / "config.yaml").train.max_iter == 1


def test_columns_a_setting_does_not_set_are_left_blank(tmp_path, tiny_config_overrides, fake_train):
    fake_train()
    only = ["power_f0.01", "exponential_f0.01"]
    run_ablation(SHAPES, tmp_path, "modulation", tiny_config_overrides, only=only, progress=False)
    rows = {r["setting"]: r for r in _read_csv(tmp_path / "ablation.csv")}
    # gamma belongs to the power modulation only, beta to the exponential one.
    assert (rows["power_f0.01"]["gamma"], rows["power_f0.01"]["beta"]) == ("2.0", "")
    assert (rows["exponential_f0.01"]["gamma"], rows["exponential_f0.01"]["beta"]) == (
        "",
        "5.11686",
    )
    markdown = (tmp_path / "ablation.md").read_text()
    assert "| power_f0.01 | finished | power | 2 | – | – | – | 0.25 |" in markdown
    assert (tmp_path / "modulating_factors.png").stat().st_size > 0  # Figure 1 of the factors
    assert "| exponential_f0.01 | finished | exponential | – | 5.11686 | – | – | 0.25 |" in markdown


def test_seeds_train_each_setting_again_and_report_their_spread(
    tmp_path, tiny_config_overrides, fake_train
):
    fake = fake_train()
    statuses = run_ablation(
        SHAPES, tmp_path, "table1a", tiny_config_overrides, only=["alpha0.25"], seeds=3,
        progress=False,
    )  # fmt: skip
    assert statuses == dict.fromkeys(
        ["alpha0.25", "alpha0.25_seed1", "alpha0.25_seed2"], "finished"
    )
    seeds = [load_config(tmp_path / name / "config.yaml").train.seed for name in statuses]
    assert seeds == [0, 1, 2]
    # AP 2.5, 2.6 and 2.7 percent: mean 2.6, standard deviation 0.1.
    row = _read_csv(tmp_path / "ablation.csv")[0]
    assert float(row["AP"]) == pytest.approx(0.026) and float(row["AP_std"]) == pytest.approx(0.001)
    assert row["seeds"] == "3" and row["AP_per_seed"] == "0.025000 0.026000 0.027000"
    assert row["AP50_std"] == "0.0"  # AP50 does not depend on the seed here
    markdown = (tmp_path / "ablation.md").read_text()
    assert (
        "| alpha0.25 | finished | 0.25 | 0 | 2.6 ± 0.1 | 5.0 ± 0.0 | 0.0 ± 0.0 | 3 "
        "| 2.5, 2.6, 2.7 |" in markdown
    )

    # Fewer seeds than are done trains nothing; more trains only the new seed.
    run_ablation(SHAPES, tmp_path, "table1a", tiny_config_overrides, only=["alpha0.25"], seeds=2,
                 progress=False)  # fmt: skip
    assert len(fake.calls) == 3
    run_ablation(SHAPES, tmp_path, "table1a", tiny_config_overrides, only=["alpha0.25"], seeds=4,
                 progress=False)  # fmt: skip
    assert [name for name, _ in fake.calls][3:] == ["alpha0.25_seed3"]
    with pytest.raises(ValueError, match="seeds must be >= 1"):
        run_ablation(SHAPES, tmp_path, "table1a", tiny_config_overrides, seeds=0, progress=False)
