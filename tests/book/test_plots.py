"""Tests for gilib.book.plots (headless: Agg backend)."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.container import BarContainer  # noqa: E402

from gilib.book import plots  # noqa: E402


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


@pytest.fixture
def table():
    return pd.DataFrame(
        {
            "layer": [1, 6, 12],
            "rouge1": [0.8, 0.6, 0.4],
            "rouge2": [0.5, 0.3, 0.1],
            "rougeL": [0.7, 0.5, 0.3],
            "rouge1_std": [0.05, 0.10, 0.08],
            "rouge2_std": [0.04, 0.06, 0.02],
        }
    )


def _bar_containers(ax):
    return [c for c in ax.containers if isinstance(c, BarContainer)]


def _assert_labelled(ax):
    assert isinstance(ax, Axes)
    assert ax.get_xlabel()
    assert ax.get_ylabel()


def test_palette_is_fixed_and_colour_blind_safe():
    assert len(plots.PALETTE) >= 8
    assert plots.PALETTE[:3] == ["#0173b2", "#de8f05", "#029e73"]


def test_set_style_is_idempotent():
    plots.set_style()
    first = dict(matplotlib.rcParams)
    plots.set_style()
    assert dict(matplotlib.rcParams) == first
    assert matplotlib.rcParams["figure.dpi"] == 110


def test_loss_curves_single_series():
    ax = plots.loss_curves({"layer 6": [3.0, 2.0, 1.5, 1.2]})
    _assert_labelled(ax)
    assert ax.get_xlabel() == "attack step"
    assert ax.get_ylabel() == "reconstruction loss"
    assert len(ax.get_lines()) == 1
    assert ax.get_legend() is None


def test_loss_curves_several_series_get_legend_and_logy():
    histories = {"layer 1": [1.0, 0.5, 0.1], "layer 12": [2.0, 1.0, 0.7]}
    ax = plots.loss_curves(histories, logy=True, ylabel="gradient distance", title="t")
    _assert_labelled(ax)
    assert ax.get_ylabel() == "gradient distance"
    assert ax.get_yscale() == "log"
    assert ax.get_title() == "t"
    assert len(ax.get_lines()) == 2
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == list(histories)


def test_loss_curves_draws_on_given_axes():
    _, given = plt.subplots()
    assert plots.loss_curves({"a": [1.0, 0.5]}, ax=given) is given


def test_loss_curves_empty_raises():
    with pytest.raises(ValueError, match="empty"):
        plots.loss_curves({})


def test_rouge_bars_draws_one_bar_per_group_and_metric(table):
    ax = plots.rouge_bars(table, group="layer")
    _assert_labelled(ax)
    assert ax.get_xlabel() == "layer"
    assert ax.get_ylabel() == "ROUGE F1"
    assert ax.get_ylim() == (0.0, 1.0)
    assert len(ax.patches) == len(table) * 2
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1", "6", "12"]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["ROUGE-1", "ROUGE-2"]
    assert all(c.errorbar is None for c in _bar_containers(ax))


def test_rouge_bars_three_metrics(table):
    metrics = ("rouge1", "rouge2", "rougeL")
    ax = plots.rouge_bars(table, group="layer", metrics=metrics, title="by layer")
    assert len(ax.patches) == len(table) * len(metrics)
    assert ax.get_title() == "by layer"


def test_rouge_bars_single_metric_has_no_legend(table):
    ax = plots.rouge_bars(table, group="layer", metrics=["rouge1"])
    assert len(ax.patches) == len(table)
    assert ax.get_legend() is None


def test_rouge_bars_error_bars(table):
    ax = plots.rouge_bars(table, group="layer", errors="_std")
    containers = _bar_containers(ax)
    assert len(containers) == 2
    assert all(c.errorbar is not None for c in containers)


def test_rouge_bars_draws_on_given_axes(table):
    _, given = plt.subplots()
    assert plots.rouge_bars(table, group="layer", ax=given) is given


def test_rouge_bars_missing_column_raises(table):
    with pytest.raises(ValueError, match="no column"):
        plots.rouge_bars(table, group="layer", metrics=["rouge3"])
    with pytest.raises(ValueError, match="no column"):
        plots.rouge_bars(table, group="layer", metrics=["rougeL"], errors="_std")


def test_rouge_bars_repeated_group_raises(table):
    with pytest.raises(ValueError, match="one row per group"):
        plots.rouge_bars(pd.concat([table, table]), group="layer")


def test_rouge_bars_empty_table_raises(table):
    with pytest.raises(ValueError, match="empty"):
        plots.rouge_bars(table.iloc[:0], group="layer")


def test_layer_bars_draw_spread_and_baseline(table):
    ax = plots.layer_bars(table, layer="layer", baseline={"rouge1": 0.9, "rouge2": 0.7})
    _assert_labelled(ax)
    assert ax.get_xlabel() == "encoder layer attacked"
    bars = _bar_containers(ax)
    assert [round(b.get_height(), 2) for b in bars[0]] == [0.8, 0.6, 0.4]
    dashed = [line for line in ax.get_lines() if line.get_linestyle() == "--"]
    assert sorted(round(line.get_ydata()[0], 2) for line in dashed) == [0.7, 0.9]
    assert any("full model" in t.get_text() for t in ax.get_legend().get_texts())


def test_heatmap_places_each_value_in_its_cell():
    table = pd.DataFrame({
        "component": ["attention.query", "attention.query", "ffn.output", "ffn.output"],
        "layers": [0, 1, 0, 1],
        "rouge1": [0.9, 0.5, 0.25, 0.1],
    })
    ax = plots.heatmap(table, rows="component", cols="layers", value="rouge1",
                       row_order=["ffn.output", "attention.query"])
    _assert_labelled(ax)
    assert [t.get_text() for t in ax.get_yticklabels()] == ["ffn.output", "attention.query"]
    assert [t.get_text() for t in ax.texts] == ["0.25", "0.10", "0.90", "0.50"]
    with pytest.raises(ValueError, match="appear once"):
        plots.heatmap(pd.concat([table, table]), rows="component", cols="layers")
    with pytest.raises(ValueError, match="no column"):
        plots.heatmap(table, rows="component", cols="depth")


def test_noise_curves_one_line_per_series_with_raw_baselines():
    table = pd.DataFrame({
        "selection": ["full"] * 3 + ["query0"] * 3,
        "noise_multiplier": [0.0, 0.1, 0.5] * 2,
        "rouge1": [0.9, 0.5, 0.1, 0.6, 0.2, 0.05],
    })
    ax = plots.noise_curves(table, series="selection", baselines={"full": 0.95})
    _assert_labelled(ax)
    solid = [line for line in ax.get_lines() if line.get_linestyle() == "-"]
    assert [list(line.get_ydata()) for line in solid] == [[0.9, 0.5, 0.1], [0.6, 0.2, 0.05]]
    assert [line.get_ydata()[0] for line in ax.get_lines() if line.get_linestyle() == "--"] == [0.95]
    assert ax.get_xscale() == "symlog"
    with pytest.raises(ValueError, match="no column"):
        plots.noise_curves(table, series="component")


def test_batch_curves_one_line_per_selection_on_a_log2_axis_of_the_sizes():
    table = pd.DataFrame({
        "selection": ["full"] * 3 + ["layer 0"] * 3,
        "batch_size": [4, 1, 2] * 2,
        "rouge1": [0.4, 0.8, 0.6, 0.3, 0.5, 0.4],
    })
    ax = plots.batch_curves(table, series="selection")
    _assert_labelled(ax)
    assert "batch size" in ax.get_xlabel() and ax.get_ylabel() == "ROUGE-1"
    assert [list(line.get_xdata()) for line in ax.get_lines()] == [[1, 2, 4]] * 2
    assert [list(line.get_ydata()) for line in ax.get_lines()] == [[0.8, 0.6, 0.4], [0.5, 0.4, 0.3]]
    assert ax.get_xscale() == "log" and [t.get_text() for t in ax.get_xticklabels()] == ["1", "2", "4"]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["full", "layer 0"]
    with pytest.raises(ValueError, match="no column"):
        plots.batch_curves(table, series="component")
    with pytest.raises(ValueError, match="must appear once"):
        plots.batch_curves(pd.concat([table, table]), series="selection")
    with pytest.raises(ValueError, match="empty"):
        plots.batch_curves(table.iloc[:0], series="selection")


def test_residual_map_colours_by_log_residual_and_labels_cells_with_tokens():
    residuals = np.array([[1e-7, 0.1, 0.2], [1e-6, 1e-3, 0.5]])
    ax = plots.residual_map(residuals, [["the", "a", "cat"], ["dog", "cat", "sat"]])
    _assert_labelled(ax)
    assert [t.get_text() for t in ax.texts] == ["the", "a", "cat", "dog", "cat", "sat"]
    np.testing.assert_allclose(ax.collections[0].get_array().reshape(2, 3), np.log10(residuals))
    assert [t.get_text() for t in ax.get_yticklabels()] == ["position 1", "position 2"]
    with pytest.raises(ValueError, match="one token list per row"):
        plots.residual_map(residuals, [["the", "a", "cat"]])


def _summary_table():
    return pd.DataFrame({
        "shared": ["every parameter", "layer 0's query", "layer 0's query"],
        "attack": ["cosine", "cosine", "span check"],
        "rouge1": [0.69, 0.39, 1.0], "low": [0.62, 0.34, 1.0], "high": [0.76, 0.46, 1.0],
        "exact": [1 / 30, 0.0, 1.0], "sentences": [30, 30, 12],
    })


def test_leakage_summary_draws_one_bar_per_row_with_whiskers_and_exact_rates():
    ax = plots.leakage_summary(_summary_table())
    _assert_labelled(ax)
    bars = [bar for container in _bar_containers(ax) for bar in container]
    assert sorted(round(bar.get_width(), 2) for bar in bars) == [0.39, 0.69, 1.0]
    # One colour (legend entry) per attack; rows top to bottom in the table's order.
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["cosine", "span check"]
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels == ["every parameter", "layer 0's query", "layer 0's query"]
    texts = [t.get_text() for t in ax.texts]
    assert "0.69, exact 3 % (n = 30)" in texts and "1.00, exact 100 % (n = 12)" in texts
    assert all(len(c.errorbar.lines[2]) for c in _bar_containers(ax))  # interval whiskers


def test_leakage_summary_draws_the_cached_table():
    from gilib.book import summary

    table = summary.leakage_table()
    ax = plots.leakage_summary(table)
    assert len([bar for c in _bar_containers(ax) for bar in c]) == len(table)
    assert "span check" in [t.get_text() for t in ax.get_legend().get_texts()]


def test_leakage_summary_rejects_an_empty_or_incomplete_table():
    with pytest.raises(ValueError, match="column"):
        plots.leakage_summary(_summary_table().drop(columns="exact"))
    with pytest.raises(ValueError, match="empty"):
        plots.leakage_summary(_summary_table().iloc[:0])


# --------------------------------------------------------------------------- #
# Intervals: asymmetric whiskers on bars, shaded bands on lines.
# --------------------------------------------------------------------------- #


@pytest.fixture
def spans():
    return pd.DataFrame({"layer": [0, 5], "rouge1": [0.54, 0.40], "rouge1_low": [0.48, 0.30],
                         "rouge1_high": [0.61, 0.44], "rouge2": [0.2, 0.1], "rouge2_low": [0.1, 0.05],
                         "rouge2_high": [0.25, 0.2]})


def _whisker_ends(ax):
    """The (bottom, top) y of every vertical error-bar segment drawn."""
    from matplotlib.collections import LineCollection

    ends = [tuple(sorted((seg[0][1], seg[1][1]))) for c in ax.collections if isinstance(c, LineCollection)
            for seg in c.get_segments()]
    return sorted((round(a, 6), round(b, 6)) for a, b in ends)


def test_rouge_bars_draw_asymmetric_interval_whiskers(spans):
    ax = plots.rouge_bars(spans, group="layer", low="{}_low", high="{}_high")
    assert _whisker_ends(ax) == [(0.05, 0.2), (0.1, 0.25), (0.3, 0.44), (0.48, 0.61)]
    assert ax.get_xlabel() == "layer" and ax.get_ylabel() == "ROUGE F1"


def test_rouge_bars_take_errors_or_an_interval_not_both(spans):
    with pytest.raises(ValueError, match="not both"):
        plots.rouge_bars(spans.assign(rouge1_std=0.1, rouge2_std=0.1), group="layer", errors="_std",
                         low="{}_low", high="{}_high")
    with pytest.raises(ValueError, match="interval column"):
        plots.rouge_bars(spans, group="layer", low="lower", high="upper")
    with pytest.raises(ValueError, match="low and high"):
        plots.rouge_bars(spans, group="layer", low="{}_low")


def test_layer_bars_draw_the_interval_instead_of_the_spread(spans):
    ax = plots.layer_bars(spans, layer="layer", low="{}_low", high="{}_high", baseline={"rouge1": 0.7},
                          xlabel="layer shared")
    assert _whisker_ends(ax) == [(0.05, 0.2), (0.1, 0.25), (0.3, 0.44), (0.48, 0.61)]
    assert ax.get_xlabel() == "layer shared"
    assert "full model, ROUGE-1" in [t.get_text() for t in ax.get_legend().get_texts()]


def _band_bounds(ax):
    """The (low, high) of every shaded band, at its x positions."""
    from matplotlib.collections import PolyCollection

    out = []
    for band in ax.collections:
        if isinstance(band, PolyCollection):
            ys = band.get_paths()[0].vertices[:, 1]
            out.append((round(float(ys.min()), 6), round(float(ys.max()), 6)))
    return out


def test_batch_curves_shade_each_lines_interval():
    table = pd.DataFrame({"selection": ["full", "full", "layer 0", "layer 0"], "batch_size": [1, 4, 1, 4],
                          "rouge1": [0.67, 0.46, 0.52, 0.34], "low": [0.6, 0.35, 0.45, 0.25],
                          "high": [0.74, 0.55, 0.6, 0.41]})
    ax = plots.batch_curves(table, series="selection", low="low", high="high")
    assert _band_bounds(ax) == [(0.35, 0.74), (0.25, 0.6)]
    assert ax.get_xlabel() and ax.get_ylabel() == "ROUGE-1"
    assert _band_bounds(plots.batch_curves(table, series="selection")) == []


def test_batch_panels_shade_only_the_values_asked():
    table = pd.DataFrame({"method": ["a", "a"], "batch_size": [2, 4], "exact": [1.0, 0.5],
                          "exact_low": [1.0, 0.25], "exact_high": [1.0, 0.75], "seconds": [2.0, 20.0]})
    fig = plots.batch_panels(table, series="method", intervals=("exact",))
    assert _band_bounds(fig.axes[0]) == [(0.25, 1.0)]
    assert _band_bounds(fig.axes[1]) == []


def test_noise_curves_shade_the_interval_not_the_spread():
    table = pd.DataFrame({"check": ["x"] * 3, "noise_multiplier": [0.0, 1e-6, 1e-5], "accuracy": [1.0, 0.85, 0.4],
                          "accuracy_std": [0.0, 0.5, 0.5], "low": [1.0, 0.8, 0.3], "high": [1.0, 0.9, 0.5]})
    ax = plots.noise_curves(table, series="check", value="accuracy", low="low", high="high")
    assert _band_bounds(ax) == [(0.3, 1.0)]
    assert ax.get_xlabel() == "noise multiplier $\\sigma$" and ax.get_ylabel() == "accuracy"


def test_heatmap_writes_the_annotation_column_in_each_cell():
    table = pd.DataFrame({"E": [1, 1, 5, 5], "lr": [1e-5, 1e-3, 1e-5, 1e-3], "exact": [0.0, 0.33, 0.0, 0.5],
                          "text": ["0.00\n[0.00, 0.00]", "0.33\n[0.00, 0.67]", "0.00\n[0.00, 0.00]",
                                   "0.50\n[0.17, 0.83]"]})
    ax = plots.heatmap(table, rows="E", cols="lr", value="exact", annot="text", colorbar=False)
    assert [t.get_text() for t in ax.texts] == list(table["text"])
    assert len(ax.figure.axes) == 1  # no colour bar
    assert ax.get_xlabel() == "lr" and ax.get_ylabel() == "E"


def test_rank_rule_puts_exact_and_failed_sentences_on_either_side_of_the_threshold():
    lines = pd.DataFrame({"capacity": [4, 16, 32, 8], "tokens": [10, 10, 20, 20],
                          "residual": [0.4, 1e-6, 2e-6, 0.3], "exact": [False, True, True, False]})
    ax = plots.rank_rule(lines)
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
    assert ax.get_xlabel() and ax.get_ylabel()
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["rebuilt exactly", "not exact"]
    with pytest.raises(ValueError, match="residual"):
        plots.rank_rule(lines.drop(columns="residual"))
    plt.close("all")
