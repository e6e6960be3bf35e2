"""The figures chapters save, as PNG files.

Figures are built with matplotlib's object-oriented API (``matplotlib.figure.Figure``), never
``pyplot``: no global state, no GUI backend, safe in scripts, tests and notebooks alike. Each
function saves to ``path`` and returns it; a notebook shows the file with
``IPython.display.Image(path)``.
"""

from __future__ import annotations

import os
import pathlib
from typing import Mapping, Sequence

from matplotlib.figure import Figure

Curve = Sequence[float] | tuple[Sequence[float], Sequence[float]]


def save_figure(fig: Figure, path: str | os.PathLike) -> pathlib.Path:
    """Save ``fig`` as a PNG at ``path`` (folders created as needed) and return the path."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path


def smooth(values: Sequence[float], weight: float) -> list[float]:
    """Exponential moving average with bias correction, as TensorBoard's smoothing slider does.

    :math:`s_t = w s_{t-1} + (1 - w) x_t`, reported as :math:`s_t / (1 - w^t)`.
    """
    if not 0.0 <= weight < 1.0:
        raise ValueError(f"smoothing weight must be in [0, 1), got {weight}")
    out, running = [], 0.0
    for t, value in enumerate(values, start=1):
        running = weight * running + (1 - weight) * value
        out.append(running / (1 - weight**t))
    return out


def _xy(curve: Curve) -> tuple[Sequence[float], Sequence[float]]:
    if isinstance(curve, tuple) and len(curve) == 2 and not isinstance(curve[0], (int, float)):
        return curve
    return range(len(curve)), curve  # type: ignore[arg-type]


def _draw_curves(ax, curves: Mapping[str, Curve], smoothing: float) -> None:
    for index, (name, curve) in enumerate(curves.items()):
        xs, ys = _xy(curve)
        color = f"C{index}"
        if smoothing > 0:
            ax.plot(xs, ys, color=color, alpha=0.2, linewidth=0.8)
            ys = smooth(ys, smoothing)
        ax.plot(xs, ys, color=color, label=name, linewidth=1.6)


def plot_curves(
    curves: Mapping[str, Curve],
    path: str | os.PathLike,
    title: str = "",
    xlabel: str = "step",
    ylabel: str = "loss",
    logy: bool = False,
    smoothing: float = 0.0,
) -> pathlib.Path:
    """Line plot of several named curves; each is a list of y values or an ``(xs, ys)`` pair.

    With ``smoothing > 0`` the raw curve is drawn faintly and its moving average on top.
    """
    fig = Figure(figsize=(7, 4.2))
    ax = fig.add_subplot()
    _draw_curves(ax, curves, smoothing)
    if logy:
        ax.set_yscale("log")
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    if len(curves) > 1:
        ax.legend()
    return save_figure(fig, path)


def plot_loss_curves(curves: Mapping[str, Curve], path: str | os.PathLike, title: str = "Training loss", **kwargs) -> pathlib.Path:
    """Loss against step for one or more runs (see :func:`plot_curves` for the options)."""
    return plot_curves(curves, path, title=title, **kwargs)


def plot_lr_schedule(lrs: Sequence[float], path: str | os.PathLike, title: str = "Learning-rate schedule") -> pathlib.Path:
    """The learning rate of every optimizer step."""
    return plot_curves({"learning rate": lrs}, path, title=title, xlabel="optimizer step", ylabel="learning rate")


def plot_panels(
    panels: Sequence[Mapping[str, object]],
    path: str | os.PathLike,
    title: str = "",
) -> pathlib.Path:
    """Several :func:`plot_curves`-style panels side by side.

    Each panel is a dict with ``curves`` (name -> curve) and optionally ``xlabel``, ``ylabel``,
    ``title``, ``logy``, ``smoothing``, and ``scatter`` (name -> (xs, ys) drawn as points).
    """
    fig = Figure(figsize=(6 * len(panels), 4.2))
    for position, panel in enumerate(panels, start=1):
        ax = fig.add_subplot(1, len(panels), position)
        for index, (name, points) in enumerate(dict(panel.get("scatter", {})).items()):
            ax.scatter(*points, s=8, alpha=0.4, color=f"C{index + 5}", label=name)
        _draw_curves(ax, dict(panel.get("curves", {})), float(panel.get("smoothing", 0.0)))
        if panel.get("logy"):
            ax.set_yscale("log")
        ax.set(xlabel=panel.get("xlabel", "step"), ylabel=panel.get("ylabel", ""), title=panel.get("title", ""))
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


def plot_trajectories_2d(
    loss_fn,
    trajectories: Mapping[str, Sequence[Sequence[float]]],
    path: str | os.PathLike,
    xlim: tuple[float, float],
    ylim: tuple[float, float],
    title: str = "Optimizer paths",
    minimum: tuple[float, float] | None = None,
) -> pathlib.Path:
    """Paths of optimizers over the contour lines of a 2-D loss ``loss_fn(x, y)`` (NumPy-vectorized)."""
    import numpy as np

    fig = Figure(figsize=(7, 5))
    ax = fig.add_subplot()
    grid_x, grid_y = np.meshgrid(np.linspace(*xlim, 300), np.linspace(*ylim, 300))
    surface = loss_fn(grid_x, grid_y)
    levels = np.quantile(surface, np.linspace(0.0, 0.95, 25))
    ax.contour(grid_x, grid_y, surface, levels=np.unique(levels), cmap="Greys", linewidths=0.6)
    for index, (name, points) in enumerate(trajectories.items()):
        xs, ys = zip(*points)
        ax.plot(xs, ys, "-", marker=".", markersize=3, linewidth=1.2, color=f"C{index}", label=name)
    if minimum is not None:
        ax.plot(*minimum, "k*", markersize=12, label="minimum")
    ax.set(xlim=xlim, ylim=ylim, xlabel="$\\theta_1$", ylabel="$\\theta_2$", title=title)
    ax.legend(fontsize="small")
    return save_figure(fig, path)


def plot_histogram(
    samples: Mapping[str, Sequence[float]],
    path: str | os.PathLike,
    title: str = "",
    xlabel: str = "value",
    bins: int | Sequence[float] = 50,
    markers: Mapping[str, float] | None = None,
) -> pathlib.Path:
    """Overlaid histograms of one or more named samples (shared bins: a count or the edges, e.g.
    ``range(n)`` for integers), with labelled vertical lines (``markers``: label -> x, e.g. a percentile)."""
    import numpy as np

    fig = Figure(figsize=(7, 4.2))
    ax = fig.add_subplot()
    edges = np.histogram_bin_edges(np.concatenate([np.asarray(v, dtype=float) for v in samples.values()]), bins=bins)
    for index, (name, values) in enumerate(samples.items()):
        ax.hist(values, bins=edges, alpha=0.5 if len(samples) > 1 else 0.8, color=f"C{index}", label=name)
    for index, (label, x) in enumerate((markers or {}).items()):
        ax.axvline(x, color=f"C{index + len(samples)}", linestyle="--", linewidth=1.2, label=label)
    ax.set(xlabel=xlabel, ylabel="count", title=title)
    ax.grid(alpha=0.3)
    if len(samples) > 1 or markers:
        ax.legend(fontsize="small")
    return save_figure(fig, path)
