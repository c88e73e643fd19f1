"""Plots of the focal loss: loss against p_t (paper Figure 1) and the cumulative distribution of
the normalised loss over foreground and background samples (paper Figure 4).

Figures are built with `matplotlib.figure.Figure`, not pyplot, so no global backend or figure
registry is touched; saving renders with Agg and writes atomically.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure

from retinanet.files import atomic_savefig

_KINDS = ("foreground", "background")


def _gamma_label(gamma: float) -> str:
    return f"γ = {gamma:g}"


def _gamma_colors(gammas: Sequence[float]) -> dict[float, tuple[float, ...]]:
    cmap = colormaps["viridis"]
    steps = max(len(gammas) - 1, 1)
    return {g: cmap(0.9 * i / steps) for i, g in enumerate(sorted(gammas))}


def plot_cumulative_loss(
    path: str | os.PathLike,
    curves: Mapping[tuple[float, str], tuple[np.ndarray, np.ndarray]],
) -> Figure:
    """Paper Figure 4: two panels, foreground and background, one curve per gamma.

    curves: {(gamma, kind): (fraction_of_samples, cumulative_loss)}, kind in ("foreground",
    "background"), both arrays (P,) in [0, 1]. Writes the image to `path` (format from the
    suffix) and returns the figure.
    """
    unknown = {kind for _, kind in curves} - set(_KINDS)
    if unknown:
        raise ValueError(f"unknown curve kinds {sorted(unknown)}; expected {list(_KINDS)}")
    colors = _gamma_colors(sorted({gamma for gamma, _ in curves}))
    figure = Figure(figsize=(10, 4.2), layout="constrained")
    axes = figure.subplots(1, 2, sharey=True)
    for ax, kind in zip(axes, _KINDS, strict=True):
        for (gamma, curve_kind), (fraction, loss) in sorted(curves.items()):
            if curve_kind == kind:
                ax.plot(fraction, loss, color=colors[gamma], label=_gamma_label(gamma))
        ax.set(title=f"{kind} samples", xlim=(0, 1), ylim=(0, 1))
        ax.set_xlabel(f"fraction of {kind} samples (sorted by loss)")
        ax.grid(True, alpha=0.3)
        ax.legend(loc="upper left")
    axes[0].set_ylabel("cumulative normalized loss")
    atomic_savefig(path, figure, dpi=150)
    return figure


def plot_loss_vs_pt(
    path: str | os.PathLike,
    gammas: Sequence[float] = (0, 0.5, 1, 2, 5),
    well_classified_from: float = 0.6,
) -> Figure:
    """Paper Figure 1: loss -(1 - p_t)^gamma log(p_t) against the probability p_t of the
    ground-truth class, for each gamma (gamma = 0 is the cross entropy), y limited to [0, 5];
    p_t > `well_classified_from` is shaded as "well-classified examples". Writes the image to
    `path` (format from the suffix) and returns the figure."""
    if not gammas:
        raise ValueError("gammas is empty; give at least one focal-loss gamma")
    for gamma in gammas:
        if not math.isfinite(gamma) or gamma < 0:
            raise ValueError(f"gamma must be finite and >= 0, got {gamma}")
    if not 0.0 < well_classified_from < 1.0:
        raise ValueError(f"well_classified_from must be in (0, 1), got {well_classified_from}")

    # p_t = 0 has infinite loss; start just above it, the curves leave the y range long before.
    p_t = np.linspace(1e-3, 1.0, 1000)
    colors = _gamma_colors(gammas)
    figure = Figure(figsize=(6.4, 4.8), layout="constrained")
    ax = figure.subplots()
    for gamma in gammas:
        loss = -((1.0 - p_t) ** gamma) * np.log(p_t)
        label = _gamma_label(gamma) + (" (CE)" if gamma == 0 else "")
        ax.plot(p_t, loss, color=colors[gamma], label=label)
    ax.axvspan(well_classified_from, 1.0, color="0.85", zorder=0)
    ax.text((well_classified_from + 1.0) / 2, 2.2, "well-classified\nexamples", ha="center")
    ax.set(xlim=(0, 1), ylim=(0, 5), xlabel="probability of ground truth class", ylabel="loss")
    ax.legend(loc="upper right")
    atomic_savefig(path, figure, dpi=150)
    return figure


def plot_modulating_factors(
    path: str | os.PathLike, factors: Mapping[str, object], marked_pt: float = 0.9
) -> Figure:
    """Figure 1 for any modulating factor: f(p_t) (left) and the loss f(p_t) (-log p_t)
    (right) against p_t for each labelled factor (a `ModulatingFactor`), with cross-entropy
    for reference and p_t = `marked_pt` marked (where the ablation matches the factors'
    strength). Writes the image to `path` and returns the figure."""
    import torch

    if not factors:
        raise ValueError("no modulating factors to plot")
    p_t = np.linspace(1e-3, 1.0, 1000)
    cross_entropy = -np.log(p_t)
    figure = Figure(figsize=(11, 4.4), layout="constrained")
    weight_ax, loss_ax = figure.subplots(1, 2)
    loss_ax.plot(p_t, cross_entropy, color="0.5", linestyle="--", label="CE")
    cmap = colormaps["tab10"]
    for i, (label, factor) in enumerate(factors.items()):
        f = factor(torch.from_numpy(p_t)).numpy()
        weight_ax.plot(p_t, f, color=cmap(i % 10), label=label)
        loss_ax.plot(p_t, f * cross_entropy, color=cmap(i % 10), label=label)
    for ax in (weight_ax, loss_ax):
        ax.axvline(marked_pt, color="0.7", linewidth=0.8, zorder=0)
        ax.set(xlim=(0, 1), xlabel="probability of ground truth class p_t")
    weight_ax.set(ylim=(0, 1.05), ylabel="modulating factor f(p_t)")
    loss_ax.set(ylim=(0, 5), ylabel="loss f(p_t) (-log p_t)")
    loss_ax.legend(loc="upper right", fontsize="small")
    atomic_savefig(path, figure, dpi=150)
    return figure
