"""Grids of trainings that vary the loss from one base config (paper Table 1a/1b and beyond),
resumable setting by setting and splittable across processes or machines.

Each setting of a grid is a list of config overrides applied on top of the base config and the
user's overrides. It trains with `train(..., resume=True)` into <output_dir>/<setting name>/, so
an interrupted setting continues from its last checkpoint, and a setting is finished once its
final evaluation (eval/metrics.json) exists: finished settings are never rerun. A setting whose
loss turns non-finite (with train.on_nonfinite=stop) is recorded as failed in failed.json,
and the grid goes on; failed settings are retried only on request. Settings share nothing but
the output folder, so several processes may each run some of them (`only`), provided no two run
the same one at once.

After any run, the table <output_dir>/ablation.csv / .md is rebuilt from every finished or
failed setting; for Table 1a/1b it shows the paper's numbers (ResNet-50-FPN, 600 px, COCO
minival, 90k iterations) beside ours, which come from however many iterations were run.
"""

from __future__ import annotations

import csv
import json
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from retinanet.config import (
    Config,
    ConfigError,
    config_differences,
    config_value,
    load_config,
    parse_override,
)
from retinanet.data.build import resolve_data_paths
from retinanet.engine.distributed import is_main_process
from retinanet.engine.evaluation import METRICS_FILENAME
from retinanet.engine.files import atomic_open, atomic_write_json, atomic_write_text
from retinanet.engine.trainer import NonFiniteLossError, train

# Where `train` writes its final evaluation, relative to its output folder.
FINAL_EVAL_DIR = "eval"
FAILED_FILENAME = "failed.json"
CONFIG_FILENAME = "config.yaml"


@dataclass(frozen=True)
class PaperResult:
    """AP, AP50 and AP75 of a paper table row, in percent."""

    AP: float
    AP50: float
    AP75: float


@dataclass(frozen=True)
class AblationSetting:
    """One training of a grid: its folder name, its config overrides and, for the paper's
    tables, the paper's result."""

    name: str
    overrides: tuple[str, ...]
    paper: PaperResult | None = None

    @property
    def keys(self) -> set[str]:
        """The dotted config keys this setting sets."""
        return {".".join(parse_override(o)[0]) for o in self.overrides}


@dataclass(frozen=True)
class AblationGrid:
    """Settings of one experiment, and the table columns that describe them: (header, dotted
    config key) pairs read from each setting's stored config."""

    description: str
    settings: tuple[AblationSetting, ...]
    columns: tuple[tuple[str, str], ...]

    def setting(self, name: str) -> AblationSetting:
        for setting in self.settings:
            if setting.name == name:
                return setting
        raise KeyError(name)

    @property
    def varied_keys(self) -> set[str]:
        return set().union(*(s.keys for s in self.settings))


def _table1a() -> AblationGrid:
    # Paper Table 1a: gamma = 0 (alpha-balanced cross entropy), varying alpha.
    paper = {
        "0.10": PaperResult(0.0, 0.0, 0.0),
        "0.25": PaperResult(10.8, 16.0, 11.7),
        "0.50": PaperResult(30.2, 46.7, 32.8),
        "0.75": PaperResult(31.1, 49.4, 33.0),
        "0.90": PaperResult(30.8, 49.7, 32.3),
        "0.99": PaperResult(28.7, 47.4, 29.9),
        "0.999": PaperResult(25.1, 41.7, 26.1),
    }
    settings = tuple(
        AblationSetting(f"alpha{alpha}", ("loss.gamma=0", f"loss.alpha={alpha}"), result)
        for alpha, result in paper.items()
    )
    return AblationGrid(
        "paper Table 1a: alpha-balanced CE (gamma = 0), varying alpha",
        settings,
        (("alpha", "loss.alpha"), ("gamma", "loss.gamma")),
    )


def _table1b() -> AblationGrid:
    # Paper Table 1b: varying gamma, each with its best alpha.
    paper = {
        ("0", "0.75"): PaperResult(31.1, 49.4, 33.0),
        ("0.1", "0.75"): PaperResult(31.4, 49.9, 33.1),
        ("0.2", "0.75"): PaperResult(31.9, 50.7, 33.4),
        ("0.5", "0.50"): PaperResult(32.9, 51.7, 35.2),
        ("1.0", "0.25"): PaperResult(33.7, 52.0, 36.2),
        ("2.0", "0.25"): PaperResult(34.0, 52.5, 36.5),
        ("5.0", "0.25"): PaperResult(32.2, 49.6, 34.8),
    }
    settings = tuple(
        AblationSetting(
            f"gamma{gamma}_alpha{alpha}", (f"loss.gamma={gamma}", f"loss.alpha={alpha}"), result
        )
        for (gamma, alpha), result in paper.items()
    )
    return AblationGrid(
        "paper Table 1b: focal loss, varying gamma with its best alpha",
        settings,
        (("gamma", "loss.gamma"), ("alpha", "loss.alpha")),
    )


def _gamma_schedule() -> AblationGrid:
    common = ("loss.alpha=0.25", "loss.gamma=2", "loss.gamma_start=0")
    settings = tuple(
        AblationSetting(name, (*common, f"loss.gamma_schedule={schedule}"))
        for name, schedule in (("constant", ""), ("linear", "linear"), ("cosine", "cosine"))
    )
    return AblationGrid(
        "gamma constant at 2 vs ramped from 0 to 2 over training",
        settings,
        (
            ("schedule", "loss.gamma_schedule"),
            ("gamma start", "loss.gamma_start"),
            ("gamma", "loss.gamma"),
            ("alpha", "loss.alpha"),
        ),
    )


def _modulation() -> AblationGrid:
    settings = (
        AblationSetting(
            "power_gamma2", ("loss.alpha=0.25", "loss.modulation=power", "loss.gamma=2")
        ),
        *(
            AblationSetting(
                f"exponential_beta{beta}",
                (
                    "loss.alpha=0.25",
                    "loss.modulation=exponential",
                    f"loss.exponential_beta={beta}",
                ),
            )
            for beta in (1, 2, 5)
        ),
    )
    return AblationGrid(
        "modulating factor (1 - p_t)^gamma vs exp(-beta p_t)",
        settings,
        (
            ("modulation", "loss.modulation"),
            ("gamma", "loss.gamma"),
            ("beta", "loss.exponential_beta"),
            ("alpha", "loss.alpha"),
        ),
    )


def _calibration() -> AblationGrid:
    settings = tuple(
        AblationSetting(f"gamma{gamma}", (f"loss.gamma={gamma}", "loss.alpha=0.25"))
        for gamma in (0, 1, 2, 3)
    )
    return AblationGrid(
        "gamma in {0, 1, 2, 3} at alpha 0.25: the models of tools/calibrate.py",
        settings,
        (("gamma", "loss.gamma"), ("alpha", "loss.alpha")),
    )


GRIDS: dict[str, AblationGrid] = {
    "table1a": _table1a(),
    "table1b": _table1b(),
    "gamma_schedule": _gamma_schedule(),
    "modulation": _modulation(),
    "calibration": _calibration(),
}


def get_grid(name: str) -> AblationGrid:
    if name not in GRIDS:
        raise ValueError(f"unknown grid {name!r}; choose one of {', '.join(GRIDS)}")
    return GRIDS[name]


def select_settings(grid: str, only: Sequence[str] | None = None) -> list[AblationSetting]:
    """The settings of `grid`, all or those named in `only` (in grid order)."""
    settings = get_grid(grid).settings
    if not only:
        return list(settings)
    known = [s.name for s in settings]
    unknown = [name for name in only if name not in known]
    if unknown:
        hint = " (key=value overrides go before --only)" if any("=" in n for n in unknown) else ""
        raise ValueError(
            f"grid {grid!r} has no setting {', '.join(map(repr, unknown))}{hint}; "
            f"its settings are {', '.join(known)}"
        )
    return [s for s in settings if s.name in only]


def scaled_schedule_overrides(cfg: Config, max_iter: int) -> list[str]:
    """Overrides that shorten (or lengthen) the schedule of `cfg` to `max_iter` iterations,
    scaling the lr steps, warmup and checkpoint/eval periods by the same factor, so that the
    schedule keeps its shape."""
    if max_iter < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter}")
    train_cfg = cfg.train
    factor = max_iter / train_cfg.max_iter

    def scaled(value: int) -> int:
        return max(1, round(value * factor))

    overrides = [
        f"train.max_iter={max_iter}",
        f"train.lr_steps=[{','.join(str(scaled(s)) for s in train_cfg.lr_steps)}]",
        f"train.warmup_iters={round(train_cfg.warmup_iters * factor)}",
        f"train.checkpoint_period={scaled(train_cfg.checkpoint_period)}",
    ]
    if train_cfg.eval_period > 0:
        overrides.append(f"train.eval_period={scaled(train_cfg.eval_period)}")
    return overrides


def setting_config(
    config_path: str | os.PathLike,
    grid: str,
    setting: AblationSetting,
    overrides: Sequence[str] = (),
    max_iter: int | None = None,
) -> Config:
    """The config of one setting: the base file, the user's `overrides`, the setting's own
    overrides and, with `max_iter`, the schedule scaled to it. A user override of a key that
    the grid varies is an error, as it would silently be overwritten."""
    varied = get_grid(grid).varied_keys
    clashing = [o for o in overrides if ".".join(parse_override(o)[0]) in varied]
    if clashing:
        raise ConfigError(
            f"override {clashing[0]!r} sets a key that grid {grid!r} varies per setting "
            f"({', '.join(sorted(varied))})"
        )
    cfg = load_config(config_path, [*overrides, *setting.overrides])
    if max_iter is not None:
        cfg = load_config(
            config_path,
            [*overrides, *setting.overrides, *scaled_schedule_overrides(cfg, max_iter)],
        )
    return cfg


def setting_status(setting_dir: str | os.PathLike) -> str:
    """'finished' (final metrics exist), 'failed' (failed.json exists) or 'pending'."""
    setting_dir = Path(setting_dir)
    if (setting_dir / FINAL_EVAL_DIR / METRICS_FILENAME).is_file():
        return "finished"
    if (setting_dir / FAILED_FILENAME).is_file():
        return "failed"
    return "pending"


def run_ablation(
    config_path: str | os.PathLike,
    output_dir: str | os.PathLike,
    grid: str,
    overrides: Sequence[str] = (),
    max_iter: int | None = None,
    only: Sequence[str] | None = None,
    retry_failed: bool = False,
    device: str = "auto",
    progress: bool = True,
) -> dict[str, str]:
    """Train the selected settings of `grid` that are not finished (nor failed, unless
    `retry_failed`), then rebuild the table. Returns {setting name: status} of the selected
    settings after the run."""
    settings = select_settings(grid, only)
    # Build every config first, so that a bad override fails before hours of training.
    configs = {s.name: setting_config(config_path, grid, s, overrides, max_iter) for s in settings}
    output_dir = Path(output_dir)
    statuses = {}
    for setting in settings:
        setting_dir = output_dir / setting.name
        status = setting_status(setting_dir)
        cfg = configs[setting.name]
        if status == "finished" or (status == "failed" and not retry_failed):
            _warn_if_config_changed(setting_dir, resolve_data_paths(cfg), setting.name, status)
            print(f"{setting.name}: {status}, skipped")
            statuses[setting.name] = status
            continue
        print(f"{setting.name}: training into {setting_dir}")
        try:
            train(cfg, setting_dir, resume=True, device=device, progress=progress)
        except NonFiniteLossError as error:
            # Under torchrun every process gets here; one record is enough.
            if is_main_process():
                atomic_write_json(setting_dir / FAILED_FILENAME, {"error": str(error)})
                print(f"{setting.name}: failed: {error}", file=sys.stderr)
            statuses[setting.name] = "failed"
            continue
        if is_main_process():
            (setting_dir / FAILED_FILENAME).unlink(missing_ok=True)
        statuses[setting.name] = setting_status(setting_dir)
    if is_main_process():
        write_ablation_table(output_dir, grid)
    return statuses


def ablation_rows(output_dir: str | os.PathLike, grid: str) -> list[dict[str, Any]]:
    """One row per finished or failed setting of `grid` under `output_dir`, in grid order:
    setting, status, the grid's columns that the setting sets (from its stored config), AP, AP50,
    AP75 (fractions; None when failed or undefined), paper_AP, paper_AP50, paper_AP75 (fractions;
    None outside the paper's tables) and error (the failure message, else None)."""
    spec = get_grid(grid)
    output_dir = Path(output_dir)
    rows = []
    for setting in spec.settings:
        setting_dir = output_dir / setting.name
        status = setting_status(setting_dir)
        if status == "pending":
            continue
        config_file = setting_dir / CONFIG_FILENAME
        try:
            cfg = load_config(config_file)
        except ConfigError as error:
            raise ValueError(f"setting {setting.name}: {error}") from error
        row: dict[str, Any] = {"setting": setting.name, "status": status}
        # A column the setting does not set (beta of the power modulation, gamma of the
        # exponential one) does not apply to it and is left out of its row.
        for header, key in spec.columns:
            if key in setting.keys:
                row[header] = config_value(cfg, key)
        metrics = _read_final_metrics(setting_dir) if status == "finished" else {}
        for name in ("AP", "AP50", "AP75"):
            row[name] = metrics.get(name)
        for name in ("AP", "AP50", "AP75"):
            row[f"paper_{name}"] = (
                None if setting.paper is None else getattr(setting.paper, name) / 100
            )
        row["error"] = _read_failure(setting_dir) if status == "failed" else None
        rows.append(row)
    return rows


def write_ablation_table(output_dir: str | os.PathLike, grid: str) -> dict[str, Path]:
    """Write ablation.csv (fractions) and ablation.md (percent, one decimal) under
    `output_dir` from `ablation_rows`; paper columns only for grids with paper numbers."""
    spec = get_grid(grid)
    rows = ablation_rows(output_dir, grid)
    with_paper = any(s.paper is not None for s in spec.settings)
    metric_columns = ["AP", "AP50", "AP75"]
    if with_paper:
        metric_columns += ["paper_AP", "paper_AP50", "paper_AP75"]
    columns = ["setting", "status", *(h for h, _ in spec.columns), *metric_columns]

    output_dir = Path(output_dir)
    paths = {"csv": output_dir / "ablation.csv", "markdown": output_dir / "ablation.md"}
    with atomic_open(paths["csv"], "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([*columns, "error"])
        for row in rows:
            writer.writerow(
                ["" if row.get(c) is None else row[c] for c in columns] + [row["error"] or ""]
            )

    headers = [
        *columns[: 2 + len(spec.columns)],
        *(c.replace("paper_", "paper ") for c in metric_columns),
    ]
    lines = [
        f"# Ablation `{grid}`: {spec.description}",
        "",
        "AP in percent on data.val"
        + (" (paper: ResNet-50-FPN, 600 px, COCO minival, 90k iterations)" if with_paper else "")
        + ".",
        "",
        "| " + " | ".join(headers) + " |",
        "|" + "|".join("---" for _ in headers) + "|",
    ]
    for row in rows:
        cells = [row["setting"], row["status"]]
        cells += [_format_value(row[h]) if h in row else "–" for h, _ in spec.columns]
        cells += [_percent(row[c]) for c in metric_columns]
        lines.append("| " + " | ".join(cells) + " |")
    failures = [row for row in rows if row["error"]]
    if failures:
        lines += ["", "Failed settings:", ""]
        lines += [f"- `{row['setting']}`: {row['error']}" for row in failures]
    if not rows:
        lines += ["", "No setting has finished yet."]
    atomic_write_text(paths["markdown"], "\n".join(lines) + "\n")
    return paths


def _warn_if_config_changed(setting_dir: Path, cfg: Config, name: str, status: str) -> None:
    """A finished setting is kept as it is; say so when its config differs from the one this
    run would use (e.g. another --max-iter), which would make the table mix two setups."""
    config_file = setting_dir / CONFIG_FILENAME
    if not config_file.is_file():
        return
    changed = config_differences(load_config(config_file), cfg)
    if changed:
        print(
            f"warning: {name} is {status} with a config that differs from this run's in "
            f"{', '.join(changed)}; its result is kept (delete {setting_dir} to rerun it)",
            file=sys.stderr,
        )


def _read_final_metrics(setting_dir: Path) -> dict[str, float | None]:
    path = setting_dir / FINAL_EVAL_DIR / METRICS_FILENAME
    try:
        metrics = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from error
    missing = [k for k in ("AP", "AP50", "AP75") if k not in metrics]
    if missing:
        raise ValueError(f"{path} lacks the key(s) {missing}")
    return {k: metrics[k] for k in ("AP", "AP50", "AP75")}


def _read_failure(setting_dir: Path) -> str:
    path = setting_dir / FAILED_FILENAME
    try:
        return str(json.loads(path.read_text(encoding="utf-8"))["error"])
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise ValueError(f"{path} is not a failure record ({error})") from error


def _format_value(value: Any) -> str:
    if value is None or value == "":  # alpha null, gamma_schedule "" (constant)
        return "none"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _percent(value: float | None) -> str:
    return "–" if value is None or math.isnan(value) else f"{100 * value:.1f}"
