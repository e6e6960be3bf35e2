"""Small utilities with real contracts: gradient checks, timing, smoothing, plots, atomic writes, layers."""

from __future__ import annotations

import os
import pathlib

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from minillm import files, gradcheck, plots, timing
from minillm.layers import MLP


@given(seed=st.integers(0, 10_000), n=st.integers(1, 6))
def test_numerical_gradient_matches_autograd_in_float64(seed, n):
    """Central differences with h=1e-6 in float64: truncation ~h^2 |f'''| and rounding ~1e-16/h ~ 1e-10."""
    x = torch.randn(n, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))

    def f(v):
        return (torch.exp(torch.sin(v)) * v).sum()

    numeric = gradcheck.numerical_gradient(f, x)
    torch.testing.assert_close(numeric, gradcheck.autograd_gradient(f, x), rtol=1e-6, atol=1e-8)


def assert_drawn(path) -> None:
    """A PNG with something drawn on it: not a blank canvas (a plot that silently drew nothing fails)."""
    import matplotlib.image

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = matplotlib.image.imread(path)  # (H, W, channels), floats in [0, 1]
    assert pixels.shape[0] >= 100 and pixels.shape[1] >= 100
    colours = np.unique(pixels.reshape(-1, pixels.shape[-1]).round(2), axis=0)
    assert len(colours) > 20, f"{path.name} looks blank: {len(colours)} colours"
    assert (pixels[..., :3] < 0.5).mean() > 0.002, f"{path.name} has (almost) no dark ink: no text, axes or lines"


def test_gradient_check_catches_a_wrong_derivative():
    x = torch.linspace(-1, 1, 5, dtype=torch.float64)
    wrong = 2 * x  # derivative of x^3 is 3x^2, not 2x
    assert gradcheck.max_relative_error(wrong, gradcheck.numerical_gradient(lambda v: (v**3).sum(), x)) > 0.5


def test_time_callable_returns_the_median_after_warmup():
    calls = []
    assert timing.time_callable(lambda: calls.append(1), warmup=2, repeats=5) >= 0
    assert len(calls) == 7


@given(values=st.lists(st.floats(-1e3, 1e3), min_size=1, max_size=30), weight=st.floats(0.0, 0.99))
def test_smoothing_is_the_bias_corrected_moving_average(values, weight):
    smoothed = plots.smooth(values, weight)
    for t in range(1, len(values) + 1):
        numerator = sum((1 - weight) * weight ** (t - i) * values[i - 1] for i in range(1, t + 1))
        assert smoothed[t - 1] == pytest.approx(numerator / (1 - weight**t), rel=1e-9, abs=1e-9)


def test_plots_are_written_as_png_files(tmp_path):
    paths = [
        plots.plot_loss_curves({"a": [3, 2, 1], "b": ([0, 5, 10], [1.0, 0.5, 0.2])}, tmp_path / "loss.png", smoothing=0.5),
        plots.plot_lr_schedule([0.1, 0.2, 0.1], tmp_path / "sub" / "lr.png"),
        plots.plot_panels([{"curves": {"x": [1, 2]}, "scatter": {"pts": ([0, 1], [1, 0])}}], tmp_path / "panels.png"),
        plots.plot_trajectories_2d(lambda x, y: x**2 + y**2, {"gd": [(1, 1), (0.5, 0.5)]}, tmp_path / "paths.png", (-2, 2), (-2, 2)),
    ]
    for path in paths:
        assert_drawn(path)


def test_attention_heatmaps_are_written_for_one_map_or_a_stack(tmp_path):
    weights = torch.softmax(torch.randn(2, 3, 4), dim=-1)  # (n_heads, L, S)
    stack = plots.plot_attention(weights, tmp_path / "heads.png", x_labels=list("abcd"), y_labels=list("xyz"),
                                 titles=["head 0", "head 1"], title="two heads")
    single = plots.plot_attention(weights[0].numpy(), tmp_path / "one.png")
    grid = plots.plot_attention(torch.rand(3, 2, 2), tmp_path / "grid.png", columns=2)  # 2 x 2, one cell left empty
    for path in (stack, single, grid):
        assert_drawn(path)


@pytest.mark.parametrize("bad", [torch.rand(5), torch.rand(1, 2, 3, 4), torch.rand(0, 3)])
def test_attention_heatmap_refuses_a_wrong_shape(tmp_path, bad):
    with pytest.raises(ValueError, match="shape"):
        plots.plot_attention(bad, tmp_path / "bad.png")


def test_attention_heatmap_refuses_labels_that_do_not_fit(tmp_path):
    with pytest.raises(ValueError, match="x_labels"):
        plots.plot_attention(torch.rand(3, 4), tmp_path / "bad.png", x_labels=list("abc"))
    assert not (tmp_path / "bad.png").exists()


def test_grouped_bars_are_written_and_need_one_value_per_label(tmp_path):
    path = plots.plot_bars({"T=0.5": [0.7, 0.2, 0.1], "T=2": [0.4, 0.3, 0.3]}, ["a", "b", "c"], tmp_path / "bars.png")
    assert_drawn(path)
    with pytest.raises(ValueError, match="one value per label"):
        plots.plot_bars({"x": [1.0]}, ["a", "b"], tmp_path / "bad.png")


def test_heatmap_is_written_for_signed_and_unsigned_matrices_and_refuses_other_shapes(tmp_path):
    for name, matrix in (("signed", torch.randn(5, 4)), ("unsigned", torch.rand(5, 4).numpy())):
        assert_drawn(plots.plot_heatmap(matrix, tmp_path / f"{name}.png"))
    with pytest.raises(ValueError, match="2-D"):
        plots.plot_heatmap(torch.rand(2, 3, 4), tmp_path / "bad.png")


def test_confusion_matrix_plot_is_written_for_counts_and_refuses_mismatched_labels(tmp_path):
    for name, matrix in (("list", [[50, 3], [7, 40]]), ("tensor", torch.tensor([[5, 0, 1], [0, 0, 0], [2, 1, 9]]))):
        labels = ["negative", "positive"] if name == "list" else ["a", "b", "c"]  # the tensor has an empty row
        path = plots.plot_confusion_matrix(matrix, labels, tmp_path / "sub" / f"{name}.png", title=name)
        assert path == tmp_path / "sub" / f"{name}.png"
        assert_drawn(path)
    with pytest.raises(ValueError, match="3 labels for a 2-class"):
        plots.plot_confusion_matrix([[1, 2], [3, 4]], ["a", "b", "c"], tmp_path / "bad.png")
    with pytest.raises(ValueError, match="square"):
        plots.plot_confusion_matrix([[1, 2, 3], [3, 4, 5]], ["a", "b"], tmp_path / "bad.png")


def test_atomic_write_keeps_the_old_file_when_the_write_fails(tmp_path, monkeypatch):
    target = tmp_path / "results.json"
    files.write_json(target, {"step": 1})

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError):
        files.write_json(target, {"step": 2})
    assert files.read_json(target) == {"step": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]  # no temp file left behind


def test_shown_path_is_relative_below_the_working_directory_and_unchanged_elsewhere(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert files.shown_path(tmp_path / "runs" / "a" / "eval.json") == str(pathlib.Path("runs/a/eval.json"))
    assert files.shown_path("runs/a") == str(pathlib.Path("runs/a"))
    outside = tmp_path.parent / "elsewhere.json"
    assert files.shown_path(outside) == str(outside)


def test_mlp_has_the_requested_widths_and_no_final_activation():
    model = MLP([3, 5, 2])
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(3, 5), (5, 2)]
    assert isinstance(list(model.net)[-1], torch.nn.Linear)
    assert model(torch.randn(4, 3)).shape == (4, 2)
    with pytest.raises(ValueError):
        MLP([3])


def test_scatter_is_written_with_labels_on_a_log_axis_and_refuses_ragged_series(tmp_path):
    series = {"grid": ([1e-4, 1e-3, 1e-2], [0.6, 0.7, 0.5]), "random": ([3e-4], [0.65])}
    path = plots.plot_scatter(series, tmp_path / "scatter.png", logx=True, labels={"random": ["r 8"]})
    assert_drawn(path)
    with pytest.raises(ValueError, match="as many ys"):
        plots.plot_scatter({"x": ([1.0, 2.0], [1.0])}, tmp_path / "bad.png")
    with pytest.raises(ValueError, match="labels"):
        plots.plot_scatter({"x": ([1.0, 2.0], [1.0, 2.0])}, tmp_path / "bad.png", labels={"x": ["one"]})
