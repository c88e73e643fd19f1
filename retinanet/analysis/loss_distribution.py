"""Cumulative distribution of the focal loss over foreground and background samples
(paper Sec. 5.1, "Analysis of the Focal Loss", Figure 4).

A converged model is run on many images and, for each gamma in a list (0, 0.5, 1, 2), the focal
loss of every sample is re-evaluated from the same logits: only the loss changes, not the model.
Foreground and background samples are kept apart. Each set of losses is sorted from lowest to
highest and normalised to sum to one; the curve is the cumulative normalised loss against the
fraction of samples. The class weight alpha multiplies every loss of one kind by the same
constant, so it cancels in the normalisation and is left out.

Samples. `anchor_labels` gives, per anchor, the ground-truth class in [0, K) for a foreground
anchor, -1 for a background anchor and -2 for an ignored anchor (IoU in the ignore band, or
matched to a crowd box). Ignored anchors are never samples. With p_k = sigmoid(x_k):

- view "anchor" (default): one sample per anchor. A foreground anchor with class c has loss
  -(1 - p_c)^gamma log(p_c), the focal loss of its ground-truth class only. A background anchor
  has loss sum_k -(p_k)^gamma log(1 - p_k), the sum of its K negative terms.
- view "binary": one sample per (anchor, class) pair, as the sigmoid loss sees them. Positives
  are the (foreground anchor, its class) pairs; negatives are every (background anchor, class)
  pair and every (foreground anchor, other class) pair, with loss -(p_k)^gamma log(1 - p_k).

All terms are computed from logits without forming p: log p = logsigmoid(x) = -softplus(-x) and
log(1 - p) = logsigmoid(-x) = -softplus(x), in at least float32, so logits of +-100 give finite
losses.

Streaming. COCO gives ~1e7 background and ~1e5 foreground samples, so losses are not kept:
each (gamma, kind) feeds a `LossHistogram` over log-spaced loss bins that stores, per bin, the
sample count and the loss sum, plus the count and sum of losses below the lowest edge (exact
zeros included) and the exact values above the top edge (rare). Memory is O(bins) whatever the
number of samples, and histograms from several processes merge by addition.

Accuracy. Counts and loss sums are exact at every bin boundary, so the curve is exact there;
inside a bin it is interpolated linearly. Over a bin [lo, hi) holding n samples of mean m, the
true curve (cumulative loss against sample count) is convex with slopes in [lo, hi], so the
chord is off by at most n (m - lo)(hi - m) / ((hi - lo) S), S the total loss, which is at most
(hi / lo - 1) / 4 times the bin's share of S. `curve_error_bound` returns the largest of these
over all bins. With the default 16384 bins over [1e-16, 1e4], hi / lo - 1 = 0.28%, so no bin
adds more than 7e-4, and bins of real curves, whose loss is spread over many bins, far less.
The underflow bin [0, min_loss) is off by at most its share of the loss, at most
count * min_loss / S: negligible unless nearly all of the loss lies below min_loss.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from retinanet.analysis.plots import plot_cumulative_loss
from retinanet.analysis.tables import write_csv
from retinanet.files import atomic_write_json
from retinanet.model.matcher import BACKGROUND, IGNORE

VIEWS = ("anchor", "binary")
KINDS = ("foreground", "background")

# Number of losses bucketed at once in `LossHistogram.update`: bounds its float64 and index
# temporaries to ~100 MB whatever the size of the input.
_UPDATE_CHUNK = 1 << 22


def _check_gammas(gammas: Sequence[float]) -> tuple[float, ...]:
    values = tuple(float(g) for g in gammas)
    if not values:
        raise ValueError("gammas is empty; give at least one focal-loss gamma")
    for g in values:
        if not math.isfinite(g) or g < 0:
            raise ValueError(f"gamma must be finite and >= 0, got {g}")
    if len(set(values)) != len(values):
        raise ValueError(f"gammas contains duplicates: {values}")
    return values


def _flatten_inputs(
    cls_logits: torch.Tensor, anchor_labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Check shapes and values; return logits (N, K) in >= float32 and labels (N,) int64."""
    if not cls_logits.is_floating_point():
        raise ValueError(f"cls_logits must be a floating tensor, got {cls_logits.dtype}")
    if cls_logits.dim() not in (2, 3):
        raise ValueError(
            f"cls_logits must be (A, K) or (B, A, K), got shape {tuple(cls_logits.shape)}"
        )
    if tuple(anchor_labels.shape) != tuple(cls_logits.shape[:-1]):
        raise ValueError(
            f"anchor_labels shape {tuple(anchor_labels.shape)} does not match cls_logits "
            f"shape {tuple(cls_logits.shape)}; expected {tuple(cls_logits.shape[:-1])}"
        )
    if anchor_labels.is_floating_point() or anchor_labels.dtype == torch.bool:
        raise ValueError(f"anchor_labels must be an integer tensor, got {anchor_labels.dtype}")
    num_classes = cls_logits.shape[-1]
    if num_classes == 0:
        raise ValueError("cls_logits has zero classes")

    dtype = torch.promote_types(cls_logits.dtype, torch.float32)
    logits = cls_logits.detach().reshape(-1, num_classes).to(dtype)
    labels = anchor_labels.detach().reshape(-1).to(device=logits.device, dtype=torch.int64)

    bad = (labels < IGNORE) | (labels >= num_classes)
    if bool(bad.any()):
        index = int(bad.nonzero()[0, 0])
        position = np.unravel_index(index, tuple(anchor_labels.shape))
        raise ValueError(
            f"anchor_labels{list(map(int, position))} = {int(labels[index])} is out of range: "
            f"expected a class in [0, {num_classes}), {BACKGROUND} (background) or "
            f"{IGNORE} (ignored)"
        )
    finite = torch.isfinite(logits)
    if not bool(finite.all()):
        index = int((~finite).nonzero()[0, 0])
        raise ValueError(
            f"cls_logits has a non-finite value at flattened anchor {index} "
            f"({int((~finite).sum())} non-finite values in total)"
        )
    return logits, labels


def iter_sample_losses(
    cls_logits: torch.Tensor,
    anchor_labels: torch.Tensor,
    gammas: Sequence[float],
    view: str = "anchor",
) -> Iterator[tuple[float, torch.Tensor, torch.Tensor]]:
    """Yield `(gamma, foreground_losses, background_losses)` one gamma at a time, so that only
    one gamma's losses are alive at once. Arguments and outputs as in `sample_losses`."""
    if view not in VIEWS:
        raise ValueError(f"view must be one of {VIEWS}, got {view!r}")
    gammas = _check_gammas(gammas)
    logits, labels = _flatten_inputs(cls_logits, anchor_labels)

    foreground = labels >= 0
    gt_class = labels[foreground]
    gt_logit = logits[foreground].gather(1, gt_class[:, None]).squeeze(1)  # (F,)
    gt_nll = F.softplus(-gt_logit)  # -log(p_t)
    gt_log_one_minus_p = F.logsigmoid(-gt_logit)  # log(1 - p_t)

    if view == "anchor":
        negative_logits = logits[labels == BACKGROUND]  # (Nbg, K)
        negative_mask = None
    else:
        kept = labels != IGNORE
        negative_logits = logits[kept]  # (Nkept, K)
        kept_labels = labels[kept]
        kept_foreground = (kept_labels >= 0).nonzero().squeeze(1)
        negative_mask = torch.ones_like(negative_logits, dtype=torch.bool)
        negative_mask[kept_foreground, kept_labels[kept_foreground]] = False
    # The two (N, K) tensors kept over the gamma loop; each gamma adds one more.
    negative_nll = F.softplus(negative_logits)  # -log(1 - p)
    negative_log_p = F.logsigmoid(negative_logits)  # log(p)
    del negative_logits

    for gamma in gammas:
        foreground_losses = torch.exp(gamma * gt_log_one_minus_p) * gt_nll
        terms = negative_log_p.mul(gamma).exp_().mul_(negative_nll)  # p^gamma * -log(1 - p)
        background_losses = terms.sum(dim=1) if negative_mask is None else terms[negative_mask]
        del terms
        yield gamma, foreground_losses, background_losses


def sample_losses(
    cls_logits: torch.Tensor,
    anchor_labels: torch.Tensor,
    gammas: Sequence[float],
    view: str = "anchor",
) -> dict[float, tuple[torch.Tensor, torch.Tensor]]:
    """Focal loss of every foreground and background sample, for each gamma (see module doc).

    cls_logits: (A, K) or (B, A, K) float classification logits.
    anchor_labels: (A,) or (B, A) int, class in [0, K) for foreground, -1 background, -2 ignored.
    view: "anchor" (one sample per anchor) or "binary" (one per anchor and class).
    Returns {gamma: (foreground_losses, background_losses)}, 1-D tensors of float32 (float64 for
    float64 logits) on the logits' device. Anchor view: (F,) and (Nbg,) in flattened
    (image, anchor) order. Binary view: (F,) and (Nbg * K + F * (K - 1),) in flattened
    (image, anchor, class) order over non-ignored anchors.
    """
    return {
        gamma: (foreground, background)
        for gamma, foreground, background in iter_sample_losses(
            cls_logits, anchor_labels, gammas, view
        )
    }


class LossHistogram:
    """Streaming histogram of non-negative losses over log-spaced bins.

    Bin i covers [edges[i], edges[i + 1]) with edges = logspace(min_loss, max_loss,
    num_bins + 1); per bin it keeps the sample count and the loss sum (float64). Losses below
    min_loss (zeros included) go to one underflow bin with lower edge 0; losses >= max_loss are
    kept exactly.
    """

    def __init__(
        self, min_loss: float = 1e-16, max_loss: float = 1e4, num_bins: int = 16384
    ) -> None:
        if not (0 < min_loss < max_loss < math.inf):
            raise ValueError(
                f"need 0 < min_loss < max_loss < inf, got min_loss={min_loss}, max_loss={max_loss}"
            )
        if num_bins < 1:
            raise ValueError(f"num_bins must be >= 1, got {num_bins}")
        self.min_loss = float(min_loss)
        self.max_loss = float(max_loss)
        self.num_bins = int(num_bins)
        self.edges = torch.logspace(
            math.log10(min_loss), math.log10(max_loss), num_bins + 1, dtype=torch.float64
        )
        # Pin the ends so that the edges are exactly the values asked for.
        self.edges[0] = self.min_loss
        self.edges[-1] = self.max_loss
        self.counts = torch.zeros(num_bins, dtype=torch.int64)
        self.sums = torch.zeros(num_bins, dtype=torch.float64)
        self.underflow_count = 0
        self.underflow_sum = 0.0
        self._overflow: list[torch.Tensor] = []

    @property
    def overflow(self) -> torch.Tensor:
        """Exact losses >= max_loss seen so far: (M,) float64, unsorted."""
        # Chunks are concatenated once, when read: one cat per added chunk would copy all
        # earlier ones each time.
        if not self._overflow:
            return torch.zeros(0, dtype=torch.float64)
        if len(self._overflow) > 1:
            self._overflow = [torch.cat(self._overflow)]
        return self._overflow[0]

    @property
    def num_samples(self) -> int:
        return int(self.counts.sum()) + self.underflow_count + self.overflow.numel()

    @property
    def total_loss(self) -> float:
        return float(self.sums.sum()) + self.underflow_sum + float(self.overflow.sum())

    def update(self, losses: torch.Tensor) -> None:
        """Add losses: any shape, float, finite and >= 0, on any device. The bucketing runs on
        that device; only the per-bin totals move to the CPU."""
        if not losses.is_floating_point():
            raise ValueError(f"losses must be a floating tensor, got {losses.dtype}")
        losses = losses.detach().reshape(-1)
        if losses.numel() == 0:
            return
        invalid = ~torch.isfinite(losses) | (losses < 0)
        if bool(invalid.any()):
            index = int(invalid.nonzero()[0, 0])
            raise ValueError(
                f"losses must be finite and >= 0; flattened index {index} is "
                f"{float(losses[index])} ({int(invalid.sum())} invalid values in total)"
            )
        edges = self.edges.to(losses.device)
        for chunk in losses.split(_UPDATE_CHUNK):
            chunk = chunk.to(torch.float64)
            # 0: underflow, 1..num_bins: bin index + 1, num_bins + 1: overflow.
            slot = torch.bucketize(chunk, edges, right=True)
            counts = torch.bincount(slot, minlength=self.num_bins + 2).cpu()
            # index_add_ rather than bincount(weights=...): it has a deterministic CUDA kernel.
            sums = torch.zeros(self.num_bins + 2, dtype=torch.float64, device=chunk.device)
            sums = sums.index_add_(0, slot, chunk).cpu()
            self.counts += counts[1:-1]
            self.sums += sums[1:-1]
            self.underflow_count += int(counts[0])
            self.underflow_sum += float(sums[0])
            if int(counts[-1]) > 0:
                self._overflow.append(chunk[slot == self.num_bins + 1].cpu())

    def merge(self, other: LossHistogram) -> None:
        """Add the samples of `other` (e.g. from another process) into this histogram."""
        bins, other_bins = ((h.min_loss, h.max_loss, h.num_bins) for h in (self, other))
        if bins != other_bins:
            raise ValueError(
                "cannot merge histograms with different bins: "
                f"(min_loss, max_loss, num_bins) = {bins} vs {other_bins}"
            )
        self.counts += other.counts
        self.sums += other.sums
        self.underflow_count += other.underflow_count
        self.underflow_sum += other.underflow_sum
        if other.overflow.numel() > 0:
            self._overflow.append(other.overflow.clone())


def _segments(hist: LossHistogram) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Non-empty segments of the sorted losses, lowest first: (count, sum, lo, hi) arrays. The
    underflow bin is [0, min_loss); each overflow value is a segment of its own."""
    overflow = np.sort(hist.overflow.numpy())
    count = np.concatenate(
        [[hist.underflow_count], hist.counts.numpy(), np.ones_like(overflow, dtype=np.int64)]
    )
    total = np.concatenate([[hist.underflow_sum], hist.sums.numpy(), overflow])
    edges = hist.edges.numpy()
    lo = np.concatenate([[0.0], edges[:-1], overflow])
    hi = np.concatenate([[hist.min_loss], edges[1:], overflow])
    keep = count > 0
    return count[keep], total[keep], lo[keep], hi[keep]


def _cdf_knots(hist: LossHistogram) -> tuple[np.ndarray, np.ndarray]:
    """Exact points of the curve at segment boundaries: fraction of samples (strictly
    increasing, 0 to 1) and cumulative normalised loss (non-decreasing, 0 to 1)."""
    count, total, _, _ = _segments(hist)
    if count.size == 0:
        raise ValueError("the loss histogram is empty: no samples were added")
    cumulative_count = np.concatenate([[0], np.cumsum(count)])
    cumulative_loss = np.concatenate([[0.0], np.cumsum(total)])
    if cumulative_loss[-1] <= 0:
        raise ValueError(
            f"the total loss of the {cumulative_count[-1]} samples is zero; the normalised "
            "cumulative loss is undefined"
        )
    return cumulative_count / cumulative_count[-1], cumulative_loss / cumulative_loss[-1]


def cumulative_curve(hist: LossHistogram, num_points: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    """Cumulative normalised loss of the samples sorted from lowest to highest loss.

    Returns (fraction_of_samples, cumulative_loss), each (num_points,) float64:
    fraction_of_samples = linspace(0, 1), and cumulative_loss non-decreasing from exactly 0 to
    exactly 1. Error bound: `curve_error_bound`.
    """
    if num_points < 2:
        raise ValueError(f"num_points must be >= 2, got {num_points}")
    knot_fraction, knot_loss = _cdf_knots(hist)
    fraction = np.linspace(0.0, 1.0, num_points)
    return fraction, np.interp(fraction, knot_fraction, knot_loss)


def hardest_share(hist: LossHistogram, fraction: float) -> float:
    """Share of the total loss carried by the `fraction` (in [0, 1]) highest-loss samples."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    knot_fraction, knot_loss = _cdf_knots(hist)
    return float(1.0 - np.interp(1.0 - fraction, knot_fraction, knot_loss))


def curve_error_bound(hist: LossHistogram) -> float:
    """Upper bound on |histogram curve - exact sorted-loss curve| over all fractions, in units
    of the normalised cumulative loss (see module doc)."""
    count, total, lo, hi = _segments(hist)
    if count.size == 0:
        raise ValueError("the loss histogram is empty: no samples were added")
    width = hi - lo
    mean = total / count
    spread = count * np.clip(mean - lo, 0.0, None) * np.clip(hi - mean, 0.0, None)
    # single overflow values (width 0) are exact
    gap = np.divide(spread, width, out=np.zeros_like(total), where=width > 0)
    return float(gap.max() / total.sum())


class LossDistribution:
    """One `LossHistogram` per (gamma, kind), kind in ("foreground", "background"), fed with
    the logits and anchor labels of batches of images."""

    def __init__(
        self,
        gammas: Sequence[float] = (0.0, 0.5, 1.0, 2.0),
        view: str = "anchor",
        min_loss: float = 1e-16,
        max_loss: float = 1e4,
        num_bins: int = 16384,
    ) -> None:
        if view not in VIEWS:
            raise ValueError(f"view must be one of {VIEWS}, got {view!r}")
        self.gammas = _check_gammas(gammas)
        self.view = view
        self.histograms = {
            (gamma, kind): LossHistogram(min_loss, max_loss, num_bins)
            for gamma in self.gammas
            for kind in KINDS
        }

    def histogram(self, gamma: float, kind: str) -> LossHistogram:
        key = (float(gamma), kind)
        if key not in self.histograms:
            raise KeyError(
                f"no histogram for gamma={gamma}, kind={kind!r}; gammas are {self.gammas}, "
                f"kinds are {KINDS}"
            )
        return self.histograms[key]

    def update(self, cls_logits: torch.Tensor, anchor_labels: torch.Tensor) -> None:
        """Add one batch. cls_logits: (A, K) or (B, A, K) float logits; anchor_labels: (A,) or
        (B, A) int, class in [0, K) for foreground, -1 background, -2 ignored."""
        for gamma, foreground, background in iter_sample_losses(
            cls_logits, anchor_labels, self.gammas, self.view
        ):
            self.histograms[(gamma, "foreground")].update(foreground)
            self.histograms[(gamma, "background")].update(background)

    def merge(self, other: LossDistribution) -> None:
        """Add the histograms of `other` (same gammas and view), e.g. from another process."""
        if other.gammas != self.gammas or other.view != self.view:
            raise ValueError(
                f"cannot merge loss distributions with gammas {other.gammas}, view "
                f"{other.view!r} into gammas {self.gammas}, view {self.view!r}"
            )
        for key, hist in self.histograms.items():
            hist.merge(other.histograms[key])


def write_loss_cdf(
    distribution: LossDistribution, output_dir: str | os.PathLike, num_points: int = 1000
) -> dict[str, Path]:
    """Write the curves and their summary into `output_dir`:

    - loss_cdf.csv: gamma,kind,fraction_of_samples,cumulative_loss; num_points rows per
      (gamma, kind), from (0, 0) to (1, 1).
    - loss_cdf_summary.json: per (gamma, kind), the sample count, total loss, share of the total
      loss carried by the hardest 1%, 10% and 20% of samples, and the curve error bound.
    - loss_cdf.png: foreground and background panels, one curve per gamma (paper Figure 4).

    Raises ValueError naming the (gamma, kind) whose histogram is empty or has zero loss.
    Returns the paths written, keyed "csv", "summary", "plot".
    """
    output_dir = Path(output_dir)
    curves: dict[tuple[float, str], tuple[np.ndarray, np.ndarray]] = {}
    records = []
    for (gamma, kind), hist in distribution.histograms.items():
        try:
            curves[(gamma, kind)] = cumulative_curve(hist, num_points)
        except ValueError as error:
            raise ValueError(f"gamma={gamma}, kind={kind}: {error}") from error
        records.append(
            {
                "gamma": gamma,
                "kind": kind,
                "num_samples": hist.num_samples,
                "total_loss": hist.total_loss,
                "loss_share_hardest_1pct": hardest_share(hist, 0.01),
                "loss_share_hardest_10pct": hardest_share(hist, 0.10),
                "loss_share_hardest_20pct": hardest_share(hist, 0.20),
                "curve_error_bound": curve_error_bound(hist),
            }
        )

    paths = {
        "csv": output_dir / "loss_cdf.csv",
        "summary": output_dir / "loss_cdf_summary.json",
        "plot": output_dir / "loss_cdf.png",
    }
    rows = (
        (gamma, kind, x, y)
        for (gamma, kind), (fraction, loss) in curves.items()
        for x, y in zip(fraction.tolist(), loss.tolist(), strict=True)
    )
    write_csv(paths["csv"], ["gamma", "kind", "fraction_of_samples", "cumulative_loss"], rows)
    atomic_write_json(paths["summary"], {"view": distribution.view, "curves": records})
    plot_cumulative_loss(paths["plot"], curves)
    return paths
