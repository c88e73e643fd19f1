import csv
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from retinanet.analysis import loss_distribution
from retinanet.analysis.loss_distribution import (
    LossDistribution,
    LossHistogram,
    cumulative_curve,
    curve_error_bound,
    hardest_share,
    sample_losses,
    write_loss_cdf,
)
from retinanet.analysis.plots import plot_cumulative_loss, plot_loss_vs_pt

GAMMAS = (0.0, 0.5, 1.0, 2.0)


def _reference_losses(logits, labels, gamma, view):
    """Direct float64 evaluation of the sample definitions, one anchor at a time."""
    logits = logits.to(torch.float64).reshape(-1, logits.shape[-1]).tolist()
    labels = labels.reshape(-1).tolist()
    foreground, background = [], []
    for row, label in zip(logits, labels, strict=True):
        p = [1.0 / (1.0 + math.exp(-x)) for x in row]
        negative = [-(pk**gamma) * math.log(1.0 - pk) for pk in p]
        if label >= 0:
            foreground.append(-((1.0 - p[label]) ** gamma) * math.log(p[label]))
            if view == "binary":
                background.extend(t for k, t in enumerate(negative) if k != label)
        elif label == -1:
            if view == "anchor":
                background.append(sum(negative))
            else:
                background.extend(negative)
    return torch.tensor(foreground, dtype=torch.float64), torch.tensor(
        background, dtype=torch.float64
    )


def _small_batch(seed=0):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 7, 4, generator=generator) * 3.0
    labels = torch.tensor([[0, -1, -2, 3, -1, -1, 1], [-1, 2, -2, -2, 0, -1, -1]])
    return logits, labels


def _exact_curve(losses, fraction):
    ordered = np.sort(losses)
    cumulative = np.concatenate([[0.0], np.cumsum(ordered)])
    knots = np.arange(ordered.size + 1) / ordered.size
    return np.interp(fraction, knots, cumulative / cumulative[-1])


# --- sample_losses -------------------------------------------------------------------------


@pytest.mark.parametrize("view", ["anchor", "binary"])
def test_sample_losses_match_float64_formula(view):
    logits, labels = _small_batch()
    result = sample_losses(logits, labels, GAMMAS, view=view)
    assert list(result) == list(GAMMAS)
    for gamma, (foreground, background) in result.items():
        expected_fg, expected_bg = _reference_losses(logits, labels, gamma, view)
        assert foreground.dtype == torch.float32
        torch.testing.assert_close(foreground.double(), expected_fg, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(background.double(), expected_bg, rtol=1e-5, atol=1e-7)


def test_sample_counts_leave_out_ignored_anchors():
    logits, labels = _small_batch()
    num_fg, num_bg, num_classes = 5, 6, 4
    fg, bg = sample_losses(logits, labels, [2.0])[2.0]
    assert (fg.numel(), bg.numel()) == (num_fg, num_bg)
    fg, bg = sample_losses(logits, labels, [2.0], view="binary")[2.0]
    assert (fg.numel(), bg.numel()) == (num_fg, num_bg * num_classes + num_fg * (num_classes - 1))

    # Whatever an ignored anchor predicts, it changes nothing.
    changed = logits.clone()
    changed[labels == -2] = 50.0
    for view in ("anchor", "binary"):
        for before, after in zip(
            sample_losses(logits, labels, GAMMAS, view).values(),
            sample_losses(changed, labels, GAMMAS, view).values(),
            strict=True,
        ):
            torch.testing.assert_close(before, after, rtol=0, atol=0)


def test_gamma_zero_is_binary_cross_entropy():
    logits, labels = _small_batch(seed=1)
    flat_logits, flat_labels = logits.reshape(-1, 4), labels.reshape(-1)
    is_fg, is_bg = flat_labels >= 0, flat_labels == -1
    gt_logit = flat_logits[is_fg, flat_labels[is_fg]]
    bce = F.binary_cross_entropy_with_logits

    fg, bg = sample_losses(logits, labels, [0.0])[0.0]
    torch.testing.assert_close(fg, bce(gt_logit, torch.ones_like(gt_logit), reduction="none"))
    bg_logits = flat_logits[is_bg]
    expected_bg = bce(bg_logits, torch.zeros_like(bg_logits), reduction="none").sum(1)
    torch.testing.assert_close(bg, expected_bg)

    fg, bg = sample_losses(logits, labels, [0.0], view="binary")[0.0]
    kept_logits, kept_labels = flat_logits[is_fg | is_bg], flat_labels[is_fg | is_bg]
    targets = torch.zeros_like(kept_logits)
    kept_fg = kept_labels >= 0
    targets[kept_fg, kept_labels[kept_fg]] = 1.0
    terms = bce(kept_logits, targets, reduction="none")
    torch.testing.assert_close(fg, terms[targets == 1])
    torch.testing.assert_close(bg, terms[targets == 0])


def test_extreme_logits_give_finite_known_losses():
    big = 100.0
    logits = torch.tensor(
        [
            [big, -big, -big],  # foreground class 0, confidently right
            [big, -big, -big],  # foreground class 1, confidently wrong
            [-big, -big, -big],  # background, confidently right
            [big, big, big],  # background, confidently wrong on every class
        ]
    )
    labels = torch.tensor([0, 1, -1, -1])
    for fg, bg in sample_losses(logits, labels, (0.0, 2.0, 5.0)).values():
        # -log(sigmoid(-100)) = 100 and (1 - sigmoid(-100))^gamma = 1 to float32 precision.
        torch.testing.assert_close(fg, torch.tensor([0.0, big]), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(bg, torch.tensor([0.0, 3 * big]), rtol=1e-6, atol=1e-6)
    for fg, bg in sample_losses(logits, labels, (0.0, 2.0), view="binary").values():
        assert torch.isfinite(fg).all() and torch.isfinite(bg).all()
        # Negatives: 2 per foreground anchor, 3 per background anchor; 4 of them at logit +100.
        torch.testing.assert_close(bg.sort().values[-4:], torch.full((4,), big))
        assert float(bg.sort().values[:-4].max()) < 1e-30


def test_batched_input_equals_concatenated_images():
    logits, labels = _small_batch(seed=2)
    for view in ("anchor", "binary"):
        batched = sample_losses(logits, labels, GAMMAS, view)
        per_image = [sample_losses(logits[i], labels[i], GAMMAS, view) for i in range(2)]
        for gamma in GAMMAS:
            for kind in (0, 1):
                expected = torch.cat([result[gamma][kind] for result in per_image])
                torch.testing.assert_close(batched[gamma][kind], expected)


def test_float64_and_half_logits():
    logits, labels = _small_batch(seed=3)
    fg64, _ = sample_losses(logits.double(), labels, [2.0])[2.0]
    assert fg64.dtype == torch.float64
    fg16, bg16 = sample_losses(logits.half(), labels, [2.0])[2.0]
    assert fg16.dtype == torch.float32 and bg16.dtype == torch.float32


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda x, y: (x, y.masked_fill(y == 3, 4)), r"anchor_labels\[0, 3\] = 4"),
        (lambda x, y: (x, y.masked_fill(y == 2, -3)), r"anchor_labels\[1, 1\] = -3"),
        (lambda x, y: (x, y[:, :5]), "does not match"),
        (lambda x, y: (x.long(), y), "floating"),
        (lambda x, y: (x, y.float()), "integer"),
        (lambda x, y: (x[0, 0], y[0, 0]), r"\(A, K\) or \(B, A, K\)"),
        (lambda x, y: (x.index_fill(2, torch.tensor([1]), float("nan")), y), "non-finite"),
    ],
)
def test_sample_losses_rejects_bad_input(change, message):
    logits, labels = change(*_small_batch())
    with pytest.raises(ValueError, match=message):
        sample_losses(logits, labels, GAMMAS)


def test_sample_losses_rejects_bad_view_and_gammas():
    logits, labels = _small_batch()
    with pytest.raises(ValueError, match="view"):
        sample_losses(logits, labels, GAMMAS, view="pairs")
    with pytest.raises(ValueError, match="gamma must be finite and >= 0, got -1.0"):
        sample_losses(logits, labels, [1.0, -1.0])
    with pytest.raises(ValueError, match="duplicates"):
        sample_losses(logits, labels, [1.0, 1])


# --- LossHistogram and its curve -------------------------------------------------------------


def test_curve_is_monotone_from_zero_to_one():
    losses = torch.from_numpy(np.random.default_rng(0).lognormal(0.0, 3.0, 10_000))
    hist = LossHistogram()
    hist.update(losses)
    fraction, cumulative = cumulative_curve(hist, num_points=500)
    assert fraction.shape == cumulative.shape == (500,)
    assert (fraction[0], cumulative[0]) == (0.0, 0.0)
    assert (fraction[-1], cumulative[-1]) == (1.0, 1.0)
    assert np.all(np.diff(fraction) > 0) and np.all(np.diff(cumulative) >= 0)


def test_equal_losses_give_the_diagonal():
    hist = LossHistogram()
    hist.update(torch.full((1000,), 0.37))
    fraction, cumulative = cumulative_curve(hist, num_points=101)
    np.testing.assert_allclose(cumulative, fraction, rtol=0, atol=1e-12)


def test_two_valued_losses_give_known_shares():
    # 90 samples of loss 1 and 10 of loss 91: total 1000, the hardest 10% carry 910.
    hist = LossHistogram()
    hist.update(torch.cat([torch.ones(90), torch.full((10,), 91.0)]))
    assert hist.num_samples == 100 and hist.total_loss == pytest.approx(1000.0)
    assert hardest_share(hist, 0.10) == pytest.approx(0.91, abs=1e-12)
    assert hardest_share(hist, 0.05) == pytest.approx(0.455, abs=1e-12)
    assert hardest_share(hist, 0.50) == pytest.approx(1.0 - 50.0 / 1000.0, abs=1e-12)
    assert hardest_share(hist, 0.0) == 0.0
    assert hardest_share(hist, 1.0) == 1.0
    with pytest.raises(ValueError, match="fraction"):
        hardest_share(hist, 1.5)


def test_histogram_curve_matches_exact_sorted_curve():
    rng = np.random.default_rng(1)
    losses = np.concatenate(
        [
            10.0 ** rng.uniform(-14.0, 3.5, 1_000_000),  # many decades inside the bins
            10.0 ** rng.uniform(-30.0, -16.0, 20_000),  # underflow
            np.zeros(1_000),
            10.0 ** rng.uniform(4.0, 5.0, 100),  # overflow, kept exactly
        ]
    )
    hist = LossHistogram()
    hist.update(torch.from_numpy(rng.permutation(losses)))
    assert hist.num_samples == losses.size
    assert hist.total_loss == pytest.approx(losses.sum(), rel=1e-12)
    assert hist.underflow_count == 21_000 and hist.overflow.numel() == 100

    fraction, cumulative = cumulative_curve(hist, num_points=20_001)
    error = np.abs(cumulative - _exact_curve(losses, fraction)).max()
    bound = curve_error_bound(hist)
    assert error < 1e-3
    assert error <= bound + 1e-12
    for share in (0.01, 0.1, 0.2):
        exact = 1.0 - _exact_curve(losses, 1.0 - share)
        assert hardest_share(hist, share) == pytest.approx(exact, abs=bound + 1e-12)


def test_error_bound_is_reached_by_the_worst_bin():
    # Half the samples at a bin's lower edge, half just below its upper edge: the linear
    # interpolation is furthest from the truth, (hi - lo) / (2 (hi + lo)), at fraction 0.5.
    hist = LossHistogram()
    lo = float(hist.edges[5000])
    hi = float(np.nextafter(hist.edges[5001].item(), 0.0))
    hist.update(torch.tensor([lo] * 50 + [hi] * 50, dtype=torch.float64))
    fraction, cumulative = cumulative_curve(hist, num_points=101)
    error = np.abs(cumulative - _exact_curve(np.array([lo] * 50 + [hi] * 50), fraction)).max()
    assert error == pytest.approx((hi - lo) / (2 * (hi + lo)), rel=1e-6)
    assert curve_error_bound(hist) == pytest.approx(error, rel=1e-6)


def test_edge_values_go_to_the_right_bins():
    # Bins are [edge_i, edge_{i+1}): a value on an edge belongs to the bin above it.
    hist = LossHistogram(min_loss=1e-3, max_loss=1e3, num_bins=6)
    edges = hist.edges.tolist()
    below = [float(np.nextafter(e, 0.0)) for e in edges]
    hist.update(
        torch.tensor(
            [0.0, edges[0], below[1], edges[1], edges[3], below[6], edges[6], 5e3],
            dtype=torch.float64,
        )
    )
    assert hist.underflow_count == 1 and hist.underflow_sum == 0.0
    assert hist.counts.tolist() == [2, 1, 0, 1, 0, 1]
    assert sorted(hist.overflow.tolist()) == [1e3, 5e3]


def test_merge_and_chunked_updates_equal_one_accumulator(monkeypatch):
    rng = np.random.default_rng(2)
    first = torch.from_numpy(10.0 ** rng.uniform(-20.0, 5.0, (300, 7)))
    second = torch.from_numpy(10.0 ** rng.uniform(-20.0, 5.0, 999)).float()

    single = LossHistogram()
    single.update(torch.cat([first.reshape(-1), second.double()]))

    monkeypatch.setattr(loss_distribution, "_UPDATE_CHUNK", 64)
    merged, other = LossHistogram(), LossHistogram()
    merged.update(first)
    other.update(second)
    merged.merge(other)

    assert torch.equal(merged.counts, single.counts)
    assert merged.underflow_count == single.underflow_count
    torch.testing.assert_close(merged.sums, single.sums, rtol=1e-12, atol=0)
    assert merged.underflow_sum == pytest.approx(single.underflow_sum, rel=1e-12)
    assert torch.equal(merged.overflow.sort().values, single.overflow.sort().values)
    np.testing.assert_allclose(
        cumulative_curve(merged)[1], cumulative_curve(single)[1], rtol=0, atol=1e-12
    )


def test_histogram_rejects_bad_input():
    hist = LossHistogram()
    for bad, message in [
        (torch.tensor([1.0, float("nan")]), "flattened index 1 is nan"),
        (torch.tensor([1.0, 2.0, -0.5]), "flattened index 2 is -0.5"),
        (torch.tensor([float("inf")]), "finite"),
        (torch.tensor([1, 2]), "floating"),
    ]:
        with pytest.raises(ValueError, match=message):
            hist.update(bad)
    assert hist.num_samples == 0
    with pytest.raises(ValueError, match="empty"):
        cumulative_curve(hist)
    hist.update(torch.zeros(5))
    with pytest.raises(ValueError, match="total loss of the 5 samples is zero"):
        cumulative_curve(hist)
    with pytest.raises(ValueError, match="different bins"):
        hist.merge(LossHistogram(num_bins=100))
    with pytest.raises(ValueError, match="min_loss"):
        LossHistogram(min_loss=1.0, max_loss=0.1)


# --- LossDistribution and outputs ------------------------------------------------------------


def test_distribution_counts_samples_of_each_view():
    # The batch has 5 foreground and 6 background anchors, its first image 3 and 3; K = 4.
    logits, labels = _small_batch()
    num_fg, num_bg = 5 + 3, 6 + 3
    for view, num_negatives in (("anchor", num_bg), ("binary", num_bg * 4 + num_fg * 3)):
        distribution = LossDistribution(GAMMAS, view=view)
        distribution.update(logits, labels)
        distribution.update(logits[0], labels[0])  # the first image again, unbatched
        for gamma in GAMMAS:
            assert distribution.histogram(gamma, "foreground").num_samples == num_fg
            assert distribution.histogram(gamma, "background").num_samples == num_negatives
    with pytest.raises(KeyError, match="gamma=3"):
        distribution.histogram(3, "foreground")


def test_distribution_merge_equals_one_distribution():
    logits, labels = _small_batch(seed=4)
    single, merged, other = (LossDistribution(GAMMAS) for _ in range(3))
    single.update(logits, labels)
    merged.update(logits[0], labels[0])
    other.update(logits[1], labels[1])
    merged.merge(other)
    for key, hist in single.histograms.items():
        assert torch.equal(merged.histograms[key].counts, hist.counts)
        assert merged.histograms[key].total_loss == pytest.approx(hist.total_loss, rel=1e-12)
    with pytest.raises(ValueError, match="cannot merge"):
        merged.merge(LossDistribution((0.0, 2.0)))


def test_larger_gamma_moves_background_loss_to_the_hardest_samples():
    # With one probability per negative sample, its loss p^gamma * -log(1 - p) is increasing in
    # p for every gamma, so raising gamma reweights by p^gamma, which grows along the sorted
    # order: the share of the hardest samples must grow strictly with gamma.
    generator = torch.Generator().manual_seed(5)
    logits = torch.randn(4000, 3, generator=generator) * 2.0 - 5.0
    labels = torch.full((4000,), -1)
    labels[:100] = torch.randint(0, 3, (100,), generator=generator)
    distribution = LossDistribution(GAMMAS, view="binary")
    distribution.update(logits, labels)
    for fraction in (0.01, 0.1, 0.2):
        shares = [hardest_share(distribution.histogram(g, "background"), fraction) for g in GAMMAS]
        assert all(a < b for a, b in zip(shares, shares[1:], strict=False)), shares


def test_write_loss_cdf_outputs(tmp_path):
    # K = 1 and gamma = 0: a foreground anchor with logit x costs softplus(-x), a background
    # anchor softplus(x). 90 samples of loss 1 and 10 of loss 91 for either kind.
    def logit_for_loss(loss):
        return math.log(math.expm1(loss))

    fg_logits = [-logit_for_loss(1.0)] * 90 + [-logit_for_loss(91.0)] * 10
    bg_logits = [logit_for_loss(1.0)] * 90 + [logit_for_loss(91.0)] * 10
    logits = torch.tensor(fg_logits + bg_logits)[:, None]
    labels = torch.tensor([0] * 100 + [-1] * 100)
    distribution = LossDistribution((0.0, 2.0))
    distribution.update(logits, labels)
    paths = write_loss_cdf(distribution, tmp_path / "out", num_points=201)

    assert {p.name for p in (tmp_path / "out").iterdir()} == {
        "loss_cdf.csv",
        "loss_cdf_summary.json",
        "loss_cdf.png",
    }
    with open(paths["csv"], newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["gamma", "kind", "fraction_of_samples", "cumulative_loss"]
    assert len(rows) == 2 * 2 * 201
    for gamma in ("0.0", "2.0"):
        for kind in ("foreground", "background"):
            curve = [r for r in rows if (r["gamma"], r["kind"]) == (gamma, kind)]
            assert len(curve) == 201
            first, last = curve[0], curve[-1]
            assert float(first["fraction_of_samples"]) == float(first["cumulative_loss"]) == 0
            assert float(last["fraction_of_samples"]) == float(last["cumulative_loss"]) == 1
            at_90pct = next(r for r in curve if float(r["fraction_of_samples"]) == 0.9)
            if gamma == "0.0":
                assert float(at_90pct["cumulative_loss"]) == pytest.approx(0.09, rel=1e-5)

    summary = json.loads(paths["summary"].read_text())
    assert summary["view"] == "anchor"
    records = {(r["gamma"], r["kind"]): r for r in summary["curves"]}
    assert set(records) == {(g, k) for g in (0.0, 2.0) for k in ("foreground", "background")}
    for record in records.values():
        assert set(record) == {
            "gamma",
            "kind",
            "num_samples",
            "total_loss",
            "loss_share_hardest_1pct",
            "loss_share_hardest_10pct",
            "loss_share_hardest_20pct",
            "curve_error_bound",
        }
        assert record["num_samples"] == 100
    for kind in ("foreground", "background"):
        record = records[(0.0, kind)]
        assert record["total_loss"] == pytest.approx(1000.0, rel=1e-5)
        assert record["loss_share_hardest_10pct"] == pytest.approx(0.91, rel=1e-5)
        assert record["loss_share_hardest_20pct"] == pytest.approx(0.92, rel=1e-5)
        assert record["loss_share_hardest_1pct"] == pytest.approx(0.091, rel=1e-5)

    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_write_loss_cdf_names_the_empty_kind(tmp_path):
    distribution = LossDistribution((2.0,))
    distribution.update(torch.randn(10, 3), torch.full((10,), -1))
    with pytest.raises(ValueError, match="gamma=2.0, kind=foreground: .* empty"):
        write_loss_cdf(distribution, tmp_path)
    assert not (tmp_path / "loss_cdf.csv").exists()


# --- plots -----------------------------------------------------------------------------------


def test_plot_loss_vs_pt_draws_the_focal_loss(tmp_path):
    figure = plot_loss_vs_pt(tmp_path / "fl.png", gammas=(0, 2, 5))
    assert (tmp_path / "fl.png").read_bytes()[:4] == b"\x89PNG"
    (ax,) = figure.axes
    assert ax.get_ylim() == (0.0, 5.0) and ax.get_xlim() == (0.0, 1.0)
    lines = {line.get_label(): line for line in ax.lines}
    assert set(lines) == {"γ = 0 (CE)", "γ = 2", "γ = 5"}
    for label, expected in [
        ("γ = 0 (CE)", math.log(2)),
        ("γ = 2", 0.25 * math.log(2)),
        ("γ = 5", 0.5**5 * math.log(2)),
    ]:
        x, y = lines[label].get_data()
        assert np.interp(0.5, x, y) == pytest.approx(expected, rel=1e-4)
        assert y[-1] == 0.0  # p_t = 1 costs nothing
    with pytest.raises(ValueError, match="gamma"):
        plot_loss_vs_pt(tmp_path / "bad.png", gammas=(-1,))


def test_plot_cumulative_loss_has_one_curve_per_gamma_and_panel(tmp_path):
    x = np.linspace(0, 1, 11)
    curves = {(g, k): (x, x**2) for g in GAMMAS for k in ("foreground", "background")}
    figure = plot_cumulative_loss(tmp_path / "cdf.png", curves)
    assert [ax.get_title() for ax in figure.axes] == ["foreground samples", "background samples"]
    assert [len(ax.lines) for ax in figure.axes] == [4, 4]
    with pytest.raises(ValueError, match="unknown curve kinds"):
        plot_cumulative_loss(tmp_path / "bad.png", {(0.0, "positive"): (x, x)})
