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

import dataclasses
import glob
import json
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from retinanet.analysis.plots import plot_modulating_factors
from retinanet.analysis.tables import (
    MISSING,
    format_value,
    markdown_table,
    mean_and_std,
    mean_std_cell,
    percent,
    write_table,
)
from retinanet.config import (
    Config,
    ConfigError,
    config_differences,
    config_value,
    load_config,
    parse_override,
)
from retinanet.data.build import resolve_data_paths
from retinanet.engine.coco_metrics import METRICS_FILENAME
from retinanet.engine.distributed import is_main_process
from retinanet.engine.trainer import NonFiniteLossError, train
from retinanet.files import atomic_write_json
from retinanet.model.build import build_modulation

# Where `train` writes its final evaluation, relative to its output folder.
FINAL_EVAL_DIR = "eval"
FAILED_FILENAME = "failed.json"
CONFIG_FILENAME = "config.yaml"
METRICS = ("AP", "AP50", "AP75")


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
    # The first three: constant gamma 2 vs ramps from 0 (all at alpha 0.25). The others follow
    # up on the ramps' collapse at alpha 0.25: an alpha between the best of gamma 0 (0.75)
    # and of gamma 2 (0.25), an alpha that follows gamma from the one to the other, a short
    # ramp (over the first quarter), and a ramp downwards.
    ramp = ("loss.gamma=2", "loss.gamma_start=0")
    specs = {
        "constant": ("loss.alpha=0.25", *ramp, "loss.gamma_schedule="),
        "linear": ("loss.alpha=0.25", *ramp, "loss.gamma_schedule=linear"),
        "cosine": ("loss.alpha=0.25", *ramp, "loss.gamma_schedule=cosine"),
        "linear_alpha0.5": ("loss.alpha=0.5", *ramp, "loss.gamma_schedule=linear"),
        "linear_alpha_ramp": (
            "loss.alpha=0.25", "loss.alpha_start=0.75", *ramp, "loss.gamma_schedule=linear"
        ),
        "linear_short": (
            "loss.alpha=0.25", *ramp, "loss.gamma_schedule=linear", "loss.gamma_ramp_fraction=0.25"
        ),
        "linear_down": (
            "loss.alpha=0.25", "loss.gamma=2", "loss.gamma_start=4", "loss.gamma_schedule=linear"
        ),
    }  # fmt: skip
    return AblationGrid(
        "gamma schedules: constant 2, ramps 0 -> 2 (at alpha 0.25, 0.5 and 0.75 -> 0.25, over "
        "all of training or its first quarter) and 4 -> 2",
        tuple(AblationSetting(name, overrides) for name, overrides in specs.items()),
        (
            ("schedule", "loss.gamma_schedule"),
            ("gamma start", "loss.gamma_start"),
            ("gamma", "loss.gamma"),
            ("ramp fraction", "loss.gamma_ramp_fraction"),
            ("alpha start", "loss.alpha_start"),
            ("alpha", "loss.alpha"),
        ),
    )


def matched_modulations(f_at_09: float) -> dict[str, tuple[str, ...]]:
    """Overrides of the modulating factors that all weigh a sample with p_t = 0.9 by
    `f_at_09` ("matched strength"): (1 - p_t)^gamma, exp(-beta p_t), exp(-p_t^2 / s) and, where
    it can reach it without turning negative (f(0.9) >= cos(0.45 pi) = 0.156), cos(scale p_t)."""
    log_f = math.log(f_at_09)
    settings = {
        "power": ("loss.modulation=power", f"loss.gamma={log_f / math.log(0.1):.6g}"),
        "exponential": ("loss.modulation=exponential", f"loss.exponential_beta={-log_f / 0.9:.6g}"),
        "gaussian": ("loss.modulation=gaussian", f"loss.gaussian_s={-0.81 / log_f:.6g}"),
    }  # fmt: skip
    scale = math.acos(f_at_09) / 0.9
    if scale <= math.pi / 2 + 1e-9:
        settings["cos"] = ("loss.modulation=cos", f"loss.cos_scale={min(scale, math.pi / 2)!r}")
    return settings


def _modulation() -> AblationGrid:
    # Two strengths: the focal loss's (gamma 2: f(0.9) = 0.01) and cos(pi/2 p_t)'s, the
    # strongest cos that stays >= 0 (f(0.9) = 0.156); and the literal cos(p_t) (f(0.9) = 0.62).
    settings = []
    for label, f_at_09 in (("f0.01", 0.01), ("f0.16", math.cos(0.45 * math.pi))):
        for kind, overrides in matched_modulations(f_at_09).items():
            settings.append(AblationSetting(f"{kind}_{label}", ("loss.alpha=0.25", *overrides)))
    literal = ("loss.alpha=0.25", "loss.modulation=cos", "loss.cos_scale=1")
    settings.append(AblationSetting("cos_literal", literal))
    return AblationGrid(
        "modulating factors at matched strength f(0.9): (1 - p_t)^gamma, exp(-beta p_t), "
        "exp(-p_t^2 / s), cos(scale p_t)",
        tuple(settings),
        (
            ("modulation", "loss.modulation"),
            ("gamma", "loss.gamma"),
            ("beta", "loss.exponential_beta"),
            ("s", "loss.gaussian_s"),
            ("cos scale", "loss.cos_scale"),
            ("alpha", "loss.alpha"),
        ),
    )


def _calibration() -> AblationGrid:
    # Losses that are claimed to calibrate classifiers, each at the alpha that suits its gamma
    # in Table 1b (0.75 for cross-entropy, which at alpha 0.25 does not learn to fire).
    specs = {
        "ce": ("loss.gamma=0", "loss.alpha=0.75"),
        "ce_smoothing0.1": ("loss.gamma=0", "loss.alpha=0.75", "loss.label_smoothing=0.1"),
        "focal_gamma1": ("loss.gamma=1", "loss.alpha=0.25"),
        "focal_gamma2": ("loss.gamma=2", "loss.alpha=0.25"),
        "focal_gamma3": ("loss.gamma=3", "loss.alpha=0.25"),
        "flsd53": ("loss.modulation=flsd", "loss.alpha=0.25"),
    }
    return AblationGrid(
        "losses for calibration: cross-entropy, with label smoothing 0.1, focal loss gamma 1/2/3 "
        "and FLSD-53: the models of tools/calibrate.py",
        tuple(AblationSetting(name, overrides) for name, overrides in specs.items()),
        (
            ("modulation", "loss.modulation"),
            ("gamma", "loss.gamma"),
            ("alpha", "loss.alpha"),
            ("label smoothing", "loss.label_smoothing"),
        ),
    )


def _alpha() -> AblationGrid:
    # alpha at the focal loss's gamma 2, including values above 0.5, which weigh positives more.
    settings = tuple(
        AblationSetting(f"alpha{alpha}", ("loss.gamma=2", f"loss.alpha={alpha}"))
        for alpha in ("0.25", "0.5", "0.75", "0.8")
    )
    return AblationGrid(
        "alpha at gamma 2, from 0.25 (the paper's) to 0.8",
        settings,
        (("alpha", "loss.alpha"), ("gamma", "loss.gamma")),
    )


GRIDS: dict[str, AblationGrid] = {
    "table1a": _table1a(),
    "table1b": _table1b(),
    "gamma_schedule": _gamma_schedule(),
    "modulation": _modulation(),
    "calibration": _calibration(),
    "alpha": _alpha(),
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
    combined = [*overrides, *setting.overrides]
    cfg = load_config(config_path, combined)
    if max_iter is not None:
        cfg = load_config(config_path, combined + scaled_schedule_overrides(cfg, max_iter))
    return cfg


def setting_status(setting_dir: str | os.PathLike) -> str:
    """'finished' (final metrics exist), 'failed' (failed.json exists) or 'pending'."""
    setting_dir = Path(setting_dir)
    if (setting_dir / FINAL_EVAL_DIR / METRICS_FILENAME).is_file():
        return "finished"
    if (setting_dir / FAILED_FILENAME).is_file():
        return "failed"
    return "pending"


def run_name(setting: AblationSetting, seed_index: int) -> str:
    """The folder of a setting's run with its `seed_index`-th seed: the setting's name for the
    first (so single-seed grids keep their layout), NAME_seed<k> for the others."""
    return setting.name if seed_index == 0 else f"{setting.name}_seed{seed_index}"


def setting_of_run(run: str) -> str:
    """The setting a run folder belongs to: `run_name`'s inverse (NAME_seed<k> -> NAME)."""
    stem, _, index = run.rpartition("_seed")
    return stem if stem and index.isdigit() else run


def seeded_config(cfg: Config, seed_index: int) -> Config:
    """`cfg` with train.seed (model initialisation, data order and augmentation) moved on by
    `seed_index`."""
    return dataclasses.replace(
        cfg, train=dataclasses.replace(cfg.train, seed=cfg.train.seed + seed_index)
    )


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
    seeds: int = 1,
) -> dict[str, str]:
    """Train the selected settings of `grid`, each with `seeds` seeds, that are not finished
    (nor failed, unless `retry_failed`), then rebuild the table. Returns {run name: status}
    of the selected runs after the run (see `run_name`)."""
    if seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}")
    settings = select_settings(grid, only)
    # Build every config first, so that a bad override fails before hours of training.
    configs = {s.name: setting_config(config_path, grid, s, overrides, max_iter) for s in settings}
    output_dir = Path(output_dir)
    statuses = {}
    # Seed by seed, so that a grid cut short has every setting at the same number of seeds.
    for seed_index in range(seeds):
        for setting in settings:
            name = run_name(setting, seed_index)
            cfg = seeded_config(configs[setting.name], seed_index)
            statuses[name] = _run_setting(
                cfg, output_dir / name, name, retry_failed, device, progress
            )
    if is_main_process():
        write_ablation_table(output_dir, grid)
        if grid == "modulation":
            factors = {name: build_modulation(cfg.loss) for name, cfg in configs.items()}
            plot_modulating_factors(output_dir / "modulating_factors.png", factors)
    return statuses


def _run_setting(
    cfg: Config, run_dir: Path, name: str, retry_failed: bool, device: str, progress: bool
) -> str:
    """Train one run unless it is finished (or failed, unless `retry_failed`); its status."""
    status = setting_status(run_dir)
    if status == "finished" or (status == "failed" and not retry_failed):
        _warn_if_config_changed(run_dir, resolve_data_paths(cfg), name, status)
        print(f"{name}: {status}, skipped")
        return status
    print(f"{name}: training into {run_dir}")
    try:
        train(cfg, run_dir, resume=True, device=device, progress=progress)
    except NonFiniteLossError as error:
        # Under torchrun every process gets here; one record is enough.
        if is_main_process():
            atomic_write_json(run_dir / FAILED_FILENAME, {"error": str(error)})
            print(f"{name}: failed: {error}", file=sys.stderr)
        return "failed"
    if is_main_process():
        (run_dir / FAILED_FILENAME).unlink(missing_ok=True)
    return setting_status(run_dir)


def seed_runs(output_dir: Path, setting: AblationSetting) -> list[Path]:
    """The finished or failed runs of `setting` under `output_dir`, first seed first."""
    runs = {0: output_dir / setting.name}
    prefix = f"{setting.name}_seed"
    for path in output_dir.glob(f"{glob.escape(prefix)}*"):
        if path.name[len(prefix) :].isdigit():
            runs[int(path.name[len(prefix) :])] = path
    return [runs[k] for k in sorted(runs) if setting_status(runs[k]) != "pending"]


def ablation_rows(output_dir: str | os.PathLike, grid: str) -> list[dict[str, Any]]:
    """One row per setting of `grid` with a finished or failed run under `output_dir`, in grid
    order: setting, status ('finished' if any seed finished, else 'failed'), the grid's columns
    that the setting sets (from its stored config); AP, AP50, AP75: the mean over the finished
    seeds (fractions; None when none finished); AP_std, AP50_std, AP75_std: their standard
    deviation over seeds (n - 1 in the denominator; None below two seeds); seeds: how many
    finished; AP_per_seed: their APs; paper_AP, paper_AP50, paper_AP75 (fractions; None outside
    the paper's tables) and error (the failure messages, else None)."""
    spec = get_grid(grid)
    output_dir = Path(output_dir)
    rows = []
    for setting in spec.settings:
        runs = seed_runs(output_dir, setting)
        if not runs:
            continue
        try:
            cfg = load_config(runs[0] / CONFIG_FILENAME)
        except ConfigError as error:
            raise ValueError(f"setting {setting.name}: {error}") from error
        finished = [_read_final_metrics(r) for r in runs if setting_status(r) == "finished"]
        failures = [
            ("" if r.name == setting.name else f"{r.name}: ") + _read_failure(r)
            for r in runs
            if setting_status(r) == "failed"
        ]
        row: dict[str, Any] = {
            "setting": setting.name,
            "status": "finished" if finished else "failed",
        }
        # A column the setting does not set (beta of the power modulation, gamma of the
        # exponential one) does not apply to it and is left out of its row.
        for header, key in spec.columns:
            if key in setting.keys:
                row[header] = config_value(cfg, key)
        for name in METRICS:
            row[name], row[f"{name}_std"] = mean_and_std([m[name] for m in finished])
            paper = None if setting.paper is None else getattr(setting.paper, name) / 100
            row[f"paper_{name}"] = paper
        row["seeds"] = len(finished)
        row["AP_per_seed"] = [m["AP"] for m in finished]
        row["error"] = "; ".join(failures) or None
        rows.append(row)
    return rows


def write_ablation_table(output_dir: str | os.PathLike, grid: str) -> dict[str, Path]:
    """Write ablation.csv (fractions) and ablation.md (percent, one decimal; with several seeds
    mean ± standard deviation and each seed's AP) under `output_dir` from `ablation_rows`;
    paper columns only for grids with paper numbers."""
    spec = get_grid(grid)
    rows = ablation_rows(output_dir, grid)
    with_paper = any(s.paper is not None for s in spec.settings)
    several_seeds = any(row["seeds"] > 1 for row in rows)
    paper_columns = [f"paper_{name}" for name in METRICS] if with_paper else []
    columns = ["setting", "status", *(h for h, _ in spec.columns), *METRICS, *paper_columns]

    headers = [*columns[: 2 + len(spec.columns)], *METRICS]
    if several_seeds:
        headers += ["seeds", "AP per seed"]
    headers += [c.replace("paper_", "paper ") for c in paper_columns]
    cells = []
    for row in rows:
        line = [row["setting"], row["status"]]
        line += [format_value(row[h]) if h in row else MISSING for h, _ in spec.columns]
        line += [
            mean_std_cell(row[name], row[f"{name}_std"] if several_seeds else None, percent)
            for name in METRICS
        ]
        if several_seeds:
            line += [str(row["seeds"]), ", ".join(percent(ap) for ap in row["AP_per_seed"])]
        line += [percent(row[c]) for c in paper_columns]
        cells.append(line)
    lines = [
        f"# Ablation `{grid}`: {spec.description}",
        "",
        "AP in percent on data.val"
        + (", mean ± standard deviation over seeds" if several_seeds else "")
        + (" (paper: ResNet-50-FPN, 600 px, COCO minival, 90k iterations)" if with_paper else "")
        + ".",
        "",
        *markdown_table(headers, cells),
    ]
    failures = [row for row in rows if row["error"]]
    if failures:
        lines += ["", "Failed runs:", ""]
        lines += [f"- `{row['setting']}`: {row['error']}" for row in failures]
    if not rows:
        lines += ["", "No setting has finished yet."]
    extra = ["AP_std", "AP50_std", "AP75_std", "seeds", "AP_per_seed", "error"]
    csv_rows = [
        [row.get(c) for c in columns]
        + [row[c] for c in extra[:4]]
        + [" ".join(f"{ap:.6f}" for ap in row["AP_per_seed"]), row["error"]]
        for row in rows
    ]
    return write_table(output_dir, "ablation", [*columns, *extra], csv_rows, lines)


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
    missing = [k for k in METRICS if k not in metrics]
    if missing:
        raise ValueError(f"{path} lacks the key(s) {missing}")
    return {k: metrics[k] for k in METRICS}


def _read_failure(setting_dir: Path) -> str:
    path = setting_dir / FAILED_FILENAME
    try:
        return str(json.loads(path.read_text(encoding="utf-8"))["error"])
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise ValueError(f"{path} is not a failure record ({error})") from error
